"""GPU proof: bf16 train steps of GVAE/VAE/GAN at 256² and 512² (finite losses, images/s, peak GiB, MFU), EMA
sampling slices/s at 512², and a torchrun run of pipelines/train_ct.py killed after its step-10 checkpoint, resumed.

On a GPU server, from the repository root:  python benchmarks/gpu_check.py     (exit 0 = everything passed)
Budget: under 8 minutes on one H200-class GPU, no network. No GPU: says so, exits 0 (--allow-cpu: a CPU smoke run).
Results go into docs/benchmarks.md by hand, with the printed date, device and command.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import os
import re
import signal
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TRAIN_CT = REPO / "pipelines" / "train_ct.py"
KINDS = ("gvae", "vae", "gan")
NO_GPU = ("gpu_check: no CUDA device on this machine; nothing was run "
          "(this check needs a GPU; --allow-cpu runs a CPU smoke)")

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s; first match of the pattern in the device name wins.
PEAKS = [
    (r"H200", 989e12),
    (r"H100.*PCIe", 756e12),
    (r"H100.*NVL", 835e12),
    (r"H100", 989e12),  # SXM
    (r"A100", 312e12),
    (r"L40S", 362e12),
    (r"\bA10\b", 125e12),
    (r"RTX 4090", 165e12),
]
# CPU mode (--allow-cpu): small enough that every code path runs in seconds; --set can override these.
CPU_DEFAULTS = {"image_size": 32, "steps": 3, "batch_size": 2}
CPU_MODEL = ["model.channels=[8,16]", "model.latent_dim=8"]
CPU_TORCHRUN = ["data.phantom.cases=2", "data.phantom.size=64", "data.loader_workers=0", "data.nifti_samples=2",
                "train.num_samples=4", "tracking.log_model=false", "tracking.system_metrics=false",
                "data.monitor={n_samples: 16, n_real: 32, segmenter_steps: 3}"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        self.exit(2, f"gpu_check: error: {message}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="ct_256,ct_512", help="comma-separated names under configs/ or YAML paths")
    p.add_argument("--models", default="gvae,vae,gan", help="comma-separated subset of gvae,vae,gan")
    p.add_argument("--steps", type=int, help="train steps per row, warm-up included (default 20; CPU mode 3)")
    p.add_argument("--batch-size", type=int, help="per-GPU batch (default: each config's train.batch_size)")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (default: detected from the GPU name)")
    p.add_argument("--skip-torchrun", action="store_true", help="leave out the torchrun kill/resume run")
    p.add_argument("--allow-cpu", action="store_true", help="no GPU: run everything on the CPU at a tiny size")
    p.add_argument("--image-size", type=int, help="CPU mode only (default 32)")
    p.add_argument("--out-file", type=Path, help="also write the report here")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every config (repeatable)")
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.configs:
        p.error("--configs is empty")
    bad = [m for m in args.models if m not in KINDS]
    if bad or not args.models:
        p.error(f"--models must be a subset of {','.join(KINDS)}, got {','.join(bad) or 'nothing'}")
    for name, value, low in (("--steps", args.steps, 2), ("--batch-size", args.batch_size, 1),
                             ("--image-size", args.image_size, 4)):
        if value is not None and value < low:
            p.error(f"{name} must be >= {low}, got {value}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        p.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if bad := [o for o in args.overrides if "=" not in o]:
        p.error(f"--set takes KEY=VALUE, got {bad[0]!r}")
    args.config_paths = []
    for c in args.configs:
        path = Path(c) if c.endswith((".yaml", ".yml")) else CONFIGS / f"{c}.yaml"
        if not path.is_file():
            p.error(f"config {c}: no file {path}")
        args.config_paths.append(path)
    args.parser = p
    return args


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()
    line = f"{type(err).__name__}: {text[0] if text else ''}".replace("|", "/")  # a markdown table cell
    return line if len(line) <= limit else line[: limit - 1] + "…"


def detect_peak(device: torch.device, given_tflops: float | None) -> tuple[float | None, str]:
    if given_tflops is not None:
        return given_tflops * 1e12, "given by --peak-tflops"
    if device.type != "cuda":
        return None, "unknown for a CPU"
    name = torch.cuda.get_device_name(device)
    for pattern, peak in PEAKS:
        if re.search(pattern, name):
            return peak, f"detected from {name}"
    return None, f"unknown for {name}"


def synthetic_batch(batch: int, channels: int, size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """CT-like channels in [0, 1] and a last channel that is a binary disc (the "pancreas"), made on the device."""
    g = torch.Generator(device=device).manual_seed(seed)
    axis = torch.linspace(-1.0, 1.0, size, device=device)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    centre = torch.rand(batch, 2, generator=g, device=device) * 0.8 - 0.4
    radius = 0.1 + 0.2 * torch.rand(batch, generator=g, device=device)
    mask = ((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2
            < radius[:, None, None] ** 2).float()
    ct = 0.3 * torch.rand(batch, channels - 1, size, size, generator=g, device=device) + 0.5 * mask[:, None]
    return torch.cat([ct.clamp(0, 1), mask[:, None]], dim=1)


class _GlobalOnly:
    """Replaces FlopCounterMode's module tracker, whose backward hooks break ``torch.autograd.grad`` on leaf
    tensors (pytorch/pytorch#131753), the way the GVAE step takes its gradients; only the total is needed."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def count_flops(step, x: torch.Tensor) -> tuple[int, dict]:
    """FLOPs of one ``step(x)`` (matmuls and convolutions, forward and backward) and what the step returned."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        logs = step(x)
    return counter.get_total_flops(), logs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def count_host_syncs(device: torch.device):
    """Count CUDA host-device synchronisations in the block (``torch.cuda.set_sync_debug_mode("warn")``)."""
    counted = {"n": None}
    if device.type != "cuda":
        yield counted
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counted
        finally:
            torch.cuda.set_sync_debug_mode("default")
    counted["n"] = sum("synchroniz" in str(w.message).lower() for w in caught)


def load(path: Path, overrides: list[str]):
    from pancreas_gvae.config import load_config

    return load_config(path, overrides)


def common_overrides(args, cpu: bool, cpu_extra: tuple[str, ...] = ()) -> list[str]:
    """CPU tiny settings first, then the user's --set (which may override them)."""
    out = []
    if cpu:
        size = args.image_size or CPU_DEFAULTS["image_size"]
        out += [f"model.image_size={size}", f"data.ct.sampling.slice_size={size}", *CPU_MODEL, *cpu_extra]
    return out + list(args.overrides)


def train_row(path: Path, kind: str, args, device: torch.device, cpu: bool, peak: float | None) -> tuple[dict, object]:
    """One (config, model) row; returns the row and the trainer (kept only for the ct_512 GVAE's sampling)."""
    from pancreas_gvae.models import build_model
    from pancreas_gvae.training.trainer import Trainer, seed_everything

    row = {"config": path.stem, "model": kind}
    overrides = common_overrides(args, cpu) + [f"model.kind={kind}", "train.precision=bf16",
                                               f"train.device={device.type}"]
    batch = args.batch_size or (CPU_DEFAULTS["batch_size"] if cpu else None)
    if batch:
        overrides.append(f"train.batch_size={batch}")
    cfg = load(path, overrides)
    m = cfg.model
    steps = args.steps or (CPU_DEFAULTS["steps"] if cpu else 20)
    warmup = max(1, min(5, steps // 4))
    row.update(batch=cfg.train.batch_size, size=m.image_size)
    seed_everything(cfg.train.seed)
    trainer = Trainer(cfg, build_model(m), device)
    x = synthetic_batch(cfg.train.batch_size, m.in_channels, m.image_size, device, seed=cfg.train.seed)
    # As the training loop calls it between logging steps: finiteness recorded on the device, not read.
    step = lambda batch: trainer.train_step(batch, check=False)  # noqa: E731
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    logs = [step(x) for _ in range(warmup)]
    _sync(device)
    start = time.perf_counter()
    with count_host_syncs(device) as syncs:
        for _ in range(steps - warmup):
            logs.append(step(x))
    _sync(device)
    seconds = time.perf_counter() - start
    per_step = seconds / (steps - warmup)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    trainer.raise_if_diverged()  # the trainer's own deferred finiteness check, after the timed window
    flops, counted_logs = count_flops(trainer.train_step, x)  # one extra, untimed step (checked)
    logs.append(counted_logs)
    bad = [(i + 1, k, float(v)) for i, step_logs in enumerate(logs) for k, v in step_logs.items()
           if not math.isfinite(float(v))]
    row.update(
        steps=f"{warmup}+{steps - warmup}+1",
        finite="yes" if not bad else f"NO: {bad[0][1]}={bad[0][2]} at step {bad[0][0]}",
        ok=not bad,
        ips=f"{cfg.train.batch_size / per_step:.4g}",
        peak=f"{peak_mem:.2f}" if peak_mem is not None else "n/a (CPU)",
        gflop=f"{flops / 1e9:.4g}",
        mfu=f"{100 * flops / per_step / peak:.1f}%" if peak else "n/a (give --peak-tflops)",
        syncs=f"{syncs['n'] / (steps - warmup):.3g}" if syncs["n"] is not None else "n/a (CPU)",
    )
    return row, trainer


@torch.no_grad()
def sampling_rate(trainer, device: torch.device, batch: int, iters: int) -> float:
    """Slices/s of the EMA generator: z ~ N(0, I) -> sigmoid(G(z)), eval mode, bf16 autocast, no grad."""
    G = trainer.ema_generator.eval()
    z = torch.randn(batch, trainer.model.latent_dim, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        for _ in range(2):
            out = torch.sigmoid(G(z))
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            out = torch.sigmoid(G(z))
        _sync(device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(out.float()).all():
        raise FloatingPointError("non-finite samples")
    return iters * batch / seconds


# --------------------------------------------------------------------------- torchrun kill / resume

def _torchrun_cmd(out: Path, steps: int, extra: list[str], resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(TRAIN_CT),
           "--config", str(CONFIGS / "ct_256.yaml"), "--steps", str(steps), "--out", str(out / "run"),
           "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}"]
    for item in extra:
        cmd += ["--set", item]
    return cmd + (["--resume"] if resume else [])


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    # No repository root on PYTHONPATH: its pancreas_gvae/ would shadow the installed package, which alone maps
    # transforms/ and pipelines/ into it (a non-editable install, as in docker/, failed the torchrun run so).
    env["PYTHONUNBUFFERED"] = "1"
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one node, no network needed
    return env


def _tail(path: Path) -> str:
    """The worker's own error from a torchrun log: its ``error: ...`` line, else its exception line."""
    text = path.read_text(errors="replace") if path.exists() else ""
    lines = [re.sub(r"^\[(default)?rank\d+\]:\s*", "", ln.strip()) for ln in text.splitlines() if ln.strip()]
    cli = [ln for ln in lines if ln.startswith("error: ")]
    raised = [ln for ln in lines
              if re.match(r"[\w.]+(Error|Exception|Diverged)\b.*:", ln) and "ChildFailedError" not in ln]
    return (cli or raised or lines[-1:] or ["(no output)"])[0][:300]


def _kill_group(proc: subprocess.Popen) -> str:
    """SIGTERM the whole process group (torchrun, its worker, data-loader workers); SIGKILL after 15 s."""
    if proc.poll() is not None:
        return "already exited"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
        return "SIGTERM"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "SIGTERM, then SIGKILL"


def torchrun_check(args, cpu: bool, work: Path, timeout: float) -> tuple[bool, str]:
    """Kill a torchrun run after its first checkpoint (step 10), resume it, check it ends in the same MLflow run.

    The first run asks for many steps, so it is still training when the checkpoint appears however fast the GPU
    is; the resumed run asks for the checkpoint's step + 10 (20 when killed right after step 10). CPU mode: 2, 4.
    """
    label = f"torchrun kill/resume (ct_256 gvae, 1 process, {'gloo, CPU' if cpu else 'nccl'})"
    every = 2 if cpu else 10
    extra = common_overrides(args, cpu, tuple(CPU_TORCHRUN)) + [
        "model.kind=gvae", f"train.checkpoint_every={every}", "train.log_every=5"]
    if cpu:
        extra.append("train.device=cpu")
    if args.batch_size or cpu:
        extra.append(f"train.batch_size={args.batch_size or CPU_DEFAULTS['batch_size']}")
    ckpt = work / "run" / "checkpoints" / "last.pt"
    env = _child_env()
    log1, log2 = work / "first.log", work / "resume.log"
    with open(log1, "w") as handle:
        proc = subprocess.Popen(_torchrun_cmd(work, 1000, extra, resume=False), stdout=handle,
                                stderr=subprocess.STDOUT, cwd=work, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        how = _kill_group(proc)
    if how == "already exited":
        return False, (f"{label}: FAIL: the first run stopped by itself "
                       f"(exit {proc.returncode}: {_tail(log1)}; log {log1})")
    if not ckpt.exists():
        return False, f"{label}: FAIL: no checkpoint from the first run after {timeout:.0f} s (log {log1})"
    first = torch.load(ckpt, map_location="cpu", weights_only=False)
    killed_at, run_id = int(first["step"]), first.get("mlflow_run_id")
    target = killed_at + every
    with open(log2, "w") as handle:
        try:
            done = subprocess.run(_torchrun_cmd(work, target, extra, resume=True), stdout=handle,
                                  stderr=subprocess.STDOUT, cwd=work, env=env, timeout=timeout, start_new_session=True)
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = None
    if code != 0:
        why = f"no exit after {timeout:.0f} s" if code is None else f"exit {code}: {_tail(log2)}"
        return False, f"{label}: killed at step {killed_at} ({how}); FAIL: resume {why} (log {log2})"
    last = torch.load(ckpt, map_location="cpu", weights_only=False)
    problems = []
    if f"at step {killed_at}" not in log2.read_text(errors="replace"):
        problems.append(f"the resumed run did not report 'resuming ... at step {killed_at}'")
    if int(last["step"]) != target:
        problems.append(f"checkpoint step {last['step']}, expected {target}")
    if not run_id or last.get("mlflow_run_id") != run_id:
        problems.append(f"MLflow run id {run_id} before, {last.get('mlflow_run_id')} after")
    runs_note = ""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
        runs = [r for exp in client.search_experiments() for r in client.search_runs([exp.experiment_id])]
        runs_note = f" ({len(runs)} run, {runs[0].info.status})" if len(runs) == 1 else ""
        if len(runs) != 1 or runs[0].info.status != "FINISHED":
            problems.append(f"MLflow holds {len(runs)} run(s), statuses {[r.info.status for r in runs]}")
    except Exception as err:  # noqa: BLE001 - reported, not raised
        problems.append(f"MLflow store unreadable: {_one_line(err)}")
    same = "same" if run_id == last.get("mlflow_run_id") else "NOT same"
    head = (f"{label}: killed after the step-{killed_at} checkpoint ({how}), resumed with --resume to step "
            f"{last['step']}, exit 0; MLflow run {run_id} {same} before and after{runs_note}")
    if problems:
        return False, f"{head}: FAIL: {'; '.join(problems)}"
    return True, f"{head}: ok"


# --------------------------------------------------------------------------- report

def markdown_table(rows: list[dict]) -> str:
    cols = [("config", "config"), ("model", "model"), ("size", "size"), ("batch", "batch/GPU"), ("steps", "steps"),
            ("finite", "finite"), ("ips", "images/s"), ("peak", "peak GiB"), ("gflop", "GFLOP/step"), ("mfu", "MFU"),
            ("syncs", "host syncs/step")]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(k, "-")) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


def environment(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        dev = f"{name} ({total:.0f} GiB)"
    else:
        dev = "CPU (--allow-cpu smoke mode, not a GPU measurement)"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    now = datetime.datetime.now(datetime.timezone.utc)
    return (f"device: {dev}; torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {cudnn}; "
            f"date {now:%Y-%m-%d %H:%M} UTC")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print(NO_GPU)
        return 0
    if cuda and args.image_size is not None:
        args.parser.error("--image-size is for the CPU mode only (no CUDA device)")
    cpu = not cuda
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    from pancreas_gvae.errors import PipelineError

    for path in args.config_paths:  # bad --set keys or values: one line, before anything runs
        try:
            load(path, common_overrides(args, cpu))
        except PipelineError as err:
            args.parser.error(f"{path.name}: {err}")
    peak, peak_source = detect_peak(device, args.peak_tflops)

    rows, failed, sampling = [], False, None
    for path in args.config_paths:
        for kind in args.models:
            t0 = time.perf_counter()
            trainer = None
            try:
                row, trainer = train_row(path, kind, args, device, cpu, peak)
                failed |= not row.pop("ok")
            except Exception as err:  # noqa: BLE001 - one failing row must not hide the others
                row = {"config": path.stem, "model": kind, "finite": f"FAIL: {_one_line(err)}"}
                failed = True
            rows.append(row)
            if trainer is not None and kind == "gvae" and path.stem == "ct_512":
                batch, iters = (8, 2) if cpu else (64, 10)
                size = trainer.cfg.model.image_size
                try:
                    rate = sampling_rate(trainer, device, batch, iters)
                    sampling = (f"sampling at {size}² (ct_512 GVAE EMA generator, eval, bf16 autocast, no grad, "
                                f"batch {batch}, {iters} timed batches): {rate:.4g} slices/s")
                except Exception as err:  # noqa: BLE001
                    sampling = f"sampling at {size}² (ct_512 GVAE EMA generator): FAIL: {_one_line(err)}"
                    failed = True
            del trainer
            _free(device)
            print(f"gpu_check: {path.stem} {kind}: {row.get('finite')} ({time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr, flush=True)
    if sampling is None:
        selected = "gvae" in args.models and any(p.stem == "ct_512" for p in args.config_paths)
        sampling = ("sampling: not run (the ct_512 GVAE row failed)" if selected
                    else "sampling: skipped (needs ct_512 and gvae in --configs / --models)")

    if args.skip_torchrun:
        resume = "torchrun kill/resume: skipped (--skip-torchrun)"
    else:
        t0 = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        try:
            ok, resume = torchrun_check(args, cpu, work, timeout=300.0)
        except Exception as err:  # noqa: BLE001
            ok, resume = False, f"torchrun kill/resume: FAIL: {_one_line(err)} (files in {work})"
        failed |= not ok
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        print(f"gpu_check: torchrun kill/resume ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)

    mfu_note = (f"{peak / 1e12:g} TFLOP/s dense bf16 peak ({peak_source})" if peak
                else f"device peak ({peak_source}; give --peak-tflops)")
    report = "\n".join([
        markdown_table(rows),
        "",
        "steps = warm-up + timed + 1 FLOP-counted; images/s = batch x timed steps / their wall time "
        "(torch.cuda.synchronize-bracketed); peak GiB = torch.cuda.max_memory_allocated over warm-up and timed "
        f"steps; GFLOP/step = FlopCounterMode count of one train step; MFU = FLOP/step / s per step / {mfu_note}; "
        "host syncs/step = CUDA sync-debug warnings per timed step (0 expected: losses are read at logging steps). "
        "Synthetic batch (CT-like channels + binary disc mask), train.precision=bf16.",
        sampling,
        resume,
        environment(device) + f"; this check took {time.perf_counter() - started:.0f} s",
        "command: python " + " ".join(sys.argv if argv is None else [sys.argv[0], *argv]),
        "result: " + ("FAIL" if failed else "all passed"),
    ])
    print(report)
    if args.out_file:
        args.out_file.parent.mkdir(parents=True, exist_ok=True)
        args.out_file.write_text(report + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
