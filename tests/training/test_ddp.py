"""Two processes on CPU (gloo), launched by torchrun exactly as on a GPU server.

The same file is the worker script: ``torchrun --nproc_per_node 2 test_ddp.py OUT`` trains
tiny GVAE / VAE / GAN models on synthetic data, resumes one, diverges one on purpose and
runs ``train_run``; each rank saves what it holds under OUT and the tests compare them.

Ranks are expected to be *bitwise* identical, not merely close: the only cross-rank
arithmetic is all-reduce, which hands every rank the same reduced buffer (with two ranks
a + b == b + a exactly anyway), and everything downstream (clipping, Adam, EMA,
spectral-norm power iteration, BatchNorm averaging) is deterministic on identical inputs.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

KINDS = ("gvae", "vae", "gan")
STEPS = 3
TINY = ["model.image_size=16", "model.channels=[4,8]", "model.latent_dim=4", "train.batch_size=4",
        "train.device=cpu"]


# --------------------------------------------------------------------------- worker (runs under torchrun)

def _data() -> torch.Tensor:
    return torch.rand(32, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    from pancreas_gvae.config import load_config
    from pancreas_gvae.errors import TrainingDiverged
    from pancreas_gvae.models import build_model
    from pancreas_gvae.training import distributed, loop
    from pancreas_gvae.training.batches import TensorBatches
    from pancreas_gvae.training.checkpoint import load_checkpoint, save_checkpoint
    from pancreas_gvae.training.run import train_run
    from pancreas_gvae.training.trainer import Trainer, seed_everything

    device = distributed.init_distributed("cpu", timeout=datetime.timedelta(seconds=120))
    r = distributed.rank()
    assert distributed.world_size() == 2 and device.type == "cpu"
    data = _data()
    report: dict = {"rank": r}

    def trainer(kind, extra=(), seed_offset=0):
        cfg = load_config(overrides=TINY + [f"model.kind={kind}", *extra])
        seed_everything(cfg.train.seed + seed_offset)
        model = build_model(cfg.model)
        pre = {k: v.clone() for k, v in model.state_dict().items()}
        return Trainer(cfg, model, device), pre

    def snapshot(tr):
        state = tr.state_dict()  # a collective: every rank calls it
        return {k: state[k] for k in ("step", "model", "opt_g", "opt_d", "ema")} | {"noise": state["rng"]["noise"]}

    # 1. a few steps per kind; each rank is seeded differently, so the broadcast at construction
    #    (and nothing else) is what makes the ranks start equal.
    for kind in KINDS:
        tr, pre = trainer(kind, seed_offset=r)
        init = {k: v.clone() for k, v in tr.model.state_dict().items()}
        batches = TensorBatches(data, batch_size=4, seed=0)
        seen = []
        for step in range(STEPS):
            x = batches.batch(step)
            seen.append(x)
            tr.train_step(x)
        torch.save({"pre": pre, "init": init, "final": snapshot(tr), "seen": torch.stack(seen)},
                   out / f"{kind}-rank{r}.pt")

    # 2. resume: rank 0 checkpoints after 2 steps, both ranks load that one file, 2 more steps.
    batches = TensorBatches(data, batch_size=4, seed=1)
    straight, _ = trainer("gvae")
    for step in range(4):
        straight.train_step(batches.batch(step))
    first, _ = trainer("gvae")
    for step in range(2):
        first.train_step(batches.batch(step))
    state = first.state_dict()
    if distributed.is_main_process():
        save_checkpoint(state, out / "resume.pt")
    distributed.barrier()
    resumed, _ = trainer("gvae")
    resumed.load_state_dict(load_checkpoint(out / "resume.pt"))
    for step in range(2, 4):
        resumed.train_step(batches.batch(step))
    torch.save({"straight": snapshot(straight), "resumed": snapshot(resumed)}, out / f"resume-rank{r}.pt")

    # 3. a non-finite loss on rank 1 only must stop both ranks at the same step (no hang).
    tr, _ = trainer("gvae")
    x = data[:4].clone()
    if r == 1:
        x[0, 0, 0, 0] = float("nan")
    try:
        tr.train_step(x)
        report["diverged"] = None
    except TrainingDiverged as err:
        report["diverged"] = str(err)

    # 4. the whole run: only rank 0 checkpoints and talks to MLflow.
    saves = []
    real_save = loop.save_checkpoint
    loop.save_checkpoint = lambda state, path: saves.append(str(path)) or real_save(state, path)
    cfg = load_config(overrides=TINY + [
        "train.steps=4", "train.checkpoint_every=2", "train.sample_every=2", "train.log_every=1",
        "train.num_samples=4", f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}",
        "tracking.log_model=false", "tracking.system_metrics=false"])
    result = train_run(cfg, TensorBatches(data, batch_size=4, seed=0), data[:4], out_dir=out / "run",
                       run_name="ddp-test", progress=False)
    loop.save_checkpoint = real_save
    report.update(saves=saves, run_id=result.run_id, steps=result.trainer.step)

    (out / f"report-rank{r}.json").write_text(json.dumps(report))
    distributed.cleanup()


# --------------------------------------------------------------------------- launcher fixture

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo on the loopback interface
    for attempt in range(2):  # the free port can be taken between probing and binding: retry once
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", __file__, str(out)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        if proc.returncode == 0 or "address already in use" not in (proc.stdout + proc.stderr).lower():
            break
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    print(f"torchrun worker pair took {time.perf_counter() - start:.1f} s")
    return out


def _load(out: Path, name: str, rank: int):
    return torch.load(out / f"{name}-rank{rank}.pt", weights_only=False)


def _assert_identical(a, b, where: str = "") -> None:
    """Bitwise equality of nested state dicts / lists / tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs between ranks (max abs diff {(a.float() - b.float()).abs().max()})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# --------------------------------------------------------------------------- tests on the two ranks' files

@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_ranks_hold_identical_state_after_training(ddp_out, kind):
    r0, r1 = _load(ddp_out, kind, 0), _load(ddp_out, kind, 1)
    # seeded differently, the ranks built different weights; rank 0's broadcast made them equal
    assert not all(torch.equal(r0["pre"][k], r1["pre"][k]) for k in r0["pre"])
    _assert_identical(r0["init"], r1["init"], "init")
    for part in ("model", "opt_g", "opt_d", "ema"):
        _assert_identical(r0["final"][part], r1["final"][part], part)
    assert r0["final"]["step"] == r1["final"]["step"] == STEPS
    model = r0["final"]["model"]
    # the state that could drift is there and was compared: BatchNorm stats, spectral-norm vectors
    if kind != "gan":
        assert any(k.endswith("running_var") for k in model if k.startswith("encoder."))
    if kind != "vae":
        assert any(k.endswith("._u") for k in model if k.startswith("discriminator."))
    assert r0["final"]["ema"]["n_averaged"].item() == STEPS
    # training did something
    changed = [k for k, v in model.items() if v.is_floating_point() and not torch.equal(v, r0["init"][k])]
    assert any(k.startswith("generator.") and "weight" in k for k in changed)
    assert any(k.startswith("generator.") and k.endswith("running_mean") for k in changed)
    # the model noise is per rank
    assert not torch.equal(r0["final"]["noise"], r1["final"]["noise"])


@pytest.mark.slow
def test_ranks_train_on_disjoint_shards(ddp_out):
    a, b = _load(ddp_out, "gvae", 0)["seen"], _load(ddp_out, "gvae", 1)["seen"]
    assert a.shape == b.shape == (STEPS, 4, 1, 16, 16)
    images = lambda t: {tuple(img.flatten().tolist()) for img in t.flatten(0, 1)}  # noqa: E731
    assert len(images(a)) == len(images(b)) == STEPS * 4
    assert not images(a) & images(b), "the two ranks saw some of the same images in one epoch"
    for kind in ("vae", "gan"):  # the shard depends on (seed, step, rank) only
        assert torch.equal(_load(ddp_out, kind, 0)["seen"], a)


@pytest.mark.slow
def test_resume_under_two_ranks_continues_exactly(ddp_out):
    for r in (0, 1):
        run = _load(ddp_out, "resume", r)
        _assert_identical(run["straight"], run["resumed"], f"rank {r} resumed vs straight")
    ckpt = torch.load(ddp_out / "resume.pt", weights_only=False)
    per_rank = ckpt["rng"]["noise_per_rank"]
    assert len(per_rank) == 2 and not torch.equal(per_rank[0], per_rank[1])


@pytest.mark.slow
def test_non_finite_loss_on_one_rank_stops_both(ddp_out):
    reports = [json.loads((ddp_out / f"report-rank{r}.json").read_text()) for r in (0, 1)]
    assert "loss/d became non-finite on another process at step 0" in reports[0]["diverged"]
    assert "loss/d became nan at step 0" in reports[1]["diverged"]


@pytest.mark.slow
def test_train_run_writes_one_checkpoint_and_one_mlflow_run(ddp_out):
    r0, r1 = (json.loads((ddp_out / f"report-rank{r}.json").read_text()) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 4
    assert len(r0["saves"]) == 2 and r1["saves"] == [], "only rank 0 writes checkpoints"
    assert r1["run_id"] is None
    with sqlite3.connect(ddp_out / "mlflow.db") as db:
        runs = db.execute("SELECT run_uuid, status FROM runs").fetchall()
    assert runs == [(r0["run_id"], "FINISHED")]
    ckpt = torch.load(ddp_out / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["step"] == 4 and ckpt["mlflow_run_id"] == r0["run_id"]
    assert len(ckpt["rng"]["noise_per_rank"]) == 2
    assert sorted(p.name for p in (ddp_out / "run").glob("*.png")) == ["reconstructions.png", "samples.png"]


# --------------------------------------------------------------------------- single-process behaviour (fast)

def test_helpers_are_no_ops_without_torchrun(monkeypatch):
    from pancreas_gvae.training import distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_distributed("cpu") == torch.device("cpu")
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main_process()
    t = torch.ones(3)
    distributed.average_norm_stats(torch.nn.BatchNorm1d(3))
    assert distributed.any_across_ranks([True, False]) == [True, False]
    assert distributed.mean_across_ranks(t) is t
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    distributed.barrier()
    distributed.cleanup()


def test_torchrun_without_process_group_is_refused(monkeypatch):
    from pancreas_gvae.errors import PipelineError
    from pancreas_gvae.training import distributed

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PipelineError, match="init_distributed"):
        distributed.require_process_group()
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(PipelineError, match="MASTER_ADDR"):
        distributed.init_distributed("cpu")


def test_gradients_are_averaged_in_a_few_coalesced_all_reduces(tmp_path, monkeypatch):
    """One all-reduce per 25 MB bucket, not one per parameter (a one-process gloo group counts the calls)."""
    import torch.distributed as dist

    from pancreas_gvae.training import distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        calls = []
        real = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: calls.append(t.numel()) or real(t, *a, **k))
        params = [torch.nn.Parameter(torch.zeros(n)) for n in [10] * 200 + [8 * 2**20, 4 * 2**20, 10]]
        for i, p in enumerate(params):
            p.grad = torch.full_like(p, float(i))
        distributed.average_gradients(params)
        assert len(calls) == 3, calls  # 200 small + the 32 MB one alone, then 16 MB + 10 elements
        assert sum(calls) == sum(p.numel() for p in params)
        assert all(torch.equal(p.grad, torch.full_like(p, float(i))) for i, p in enumerate(params))
        assert [len(b) for b in distributed.buckets([p.grad for p in params])] == [200, 1, 2]
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
