"""benchmarks/gpu_check.py on the CPU: the no-GPU message, the --allow-cpu smoke mode, failing rows, bad arguments.

The GPU measurements themselves need a GPU; these tests run every code path of the script at 32x32.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
TINY = ["--allow-cpu", "--image-size", "32", "--set", "model.channels=[8,16]", "--set", "model.latent_dim=8",
        "--batch-size", "2", "--steps", "2"]


@pytest.fixture
def gpu_check(monkeypatch):
    """The script as a module, seeing no CUDA device (so the CPU paths run even on a GPU machine)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return module


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(CUDA_VISIBLE_DEVICES="", TMPDIR=str(tmp_path), MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false")
    return env


def _rows(text: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ct_"):
            rows[(cells[0], cells[1])] = cells
    return rows


def test_without_a_gpu_says_so_in_one_line_and_exits_0(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=_env(tmp_path),
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "nothing was run" in lines[0]


def test_cpu_mode_runs_a_row_per_model(gpu_check, tmp_path, capsys):
    out_file = tmp_path / "report.md"
    code = gpu_check.main([*TINY, "--configs", "ct_256", "--models", "gvae,vae,gan", "--skip-torchrun",
                           "--out-file", str(out_file)])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = _rows(out)
    assert set(rows) == {("ct_256", m) for m in ("gvae", "vae", "gan")}
    for cells in rows.values():
        # config | model | size | batch | steps | finite | images/s | peak GiB | GFLOP/step | MFU
        assert cells[2:6] == ["32", "2", "1+1+1", "yes"]
        assert float(cells[6]) > 0 and float(cells[8]) > 0
        assert cells[9] == "n/a (give --peak-tflops)"
    assert "sampling: skipped (needs ct_512" in out
    assert "torchrun kill/resume: skipped" in out
    assert "result: all passed" in out
    assert out_file.read_text().strip() == out.strip()


def test_a_failing_row_is_reported_and_makes_the_exit_code_1(gpu_check, monkeypatch, capsys):
    """ct_512 at 32x32: the GVAE row passes (its EMA generator is then timed), the VAE's loss is NaN, the GAN raises."""
    from pancreas_gvae.training.trainer import Trainer

    real_step = Trainer.train_step

    def step(self, x, **kwargs):
        if self.cfg.model.kind == "gan":
            raise RuntimeError("boom\nsecond line")
        logs = real_step(self, x, **kwargs)
        if self.cfg.model.kind == "vae":
            logs["loss/vae"] = torch.tensor(float("nan"))  # a 0-d tensor, as the trainer may return
        return logs

    monkeypatch.setattr(Trainer, "train_step", step)
    code = gpu_check.main([*TINY, "--configs", "ct_512", "--skip-torchrun", "--peak-tflops", "1"])
    out = capsys.readouterr().out
    assert code == 1
    rows = _rows(out)
    assert rows[("ct_512", "gvae")][5] == "yes" and rows[("ct_512", "gvae")][9].endswith("%")
    assert rows[("ct_512", "vae")][5] == "NO: loss/vae=nan at step 1"
    assert rows[("ct_512", "gan")][5] == "FAIL: RuntimeError: boom"
    assert "sampling at 32² (ct_512 GVAE EMA generator" in out and "slices/s" in out
    assert "1 TFLOP/s dense bf16 peak (given by --peak-tflops)" in out
    assert "result: FAIL" in out


def test_a_diverging_config_fails_its_rows(gpu_check, capsys):
    code = gpu_check.main([*TINY, "--configs", "ct_256", "--models", "vae", "--skip-torchrun",
                           "--set", "train.lr_g=1e30", "--steps", "3"])
    out = capsys.readouterr().out
    assert code == 1
    cell = _rows(out)[("ct_256", "vae")][5]
    assert cell.startswith(("FAIL: TrainingDiverged", "NO: ")), cell


@pytest.mark.parametrize("argv, message", [
    (["--models", "gvae,unet"], "--models must be a subset"),
    (["--steps", "1"], "--steps must be >= 2"),
    (["--configs", "ct_999"], "no file"),
    (["--allow-cpu", "--set", "model.no_such_key=1"], "unknown config key"),
])
def test_bad_arguments_give_one_line(gpu_check, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert len(err.strip().splitlines()) == 1 and message in err


@pytest.mark.slow
def test_cpu_mode_with_torchrun_kill_and_resume(tmp_path):
    """The whole CLI, torchrun included (gloo, one CPU process): kill after the first checkpoint, resume.

    Marked slow (two torchrun launches importing torch, MONAI and MLflow: ~50 s on 2 cores); CI runs it.
    """
    done = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--configs", "ct_256", "--models", "gvae"],
                          capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _rows(done.stdout)[("ct_256", "gvae")][5] == "yes"
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("torchrun kill/resume")]
    assert "gloo, CPU" in line and "killed after the step-2 checkpoint" in line
    assert "resumed with --resume to step 4, exit 0" in line
    assert "same before and after (1 run, FINISHED): ok" in line
    assert not list(tmp_path.glob("gpu_check_*")), "the work folder of a passing run is removed"


def test_children_import_the_installed_package_not_the_source_folder(gpu_check, monkeypatch):
    """The repository root on a child's PYTHONPATH would shadow the installed package with the bare source folder,
    which lacks pancreas_gvae.transforms (only an install maps transforms/ into the package): on the first GPU run,
    from a wheel install, the torchrun child died of that import. Only a non-editable install shows it, so: a guard."""
    monkeypatch.setenv("PYTHONPATH", "/opt/site")
    assert gpu_check._child_env()["PYTHONPATH"].split(os.pathsep) == ["/opt/site"]
    monkeypatch.delenv("PYTHONPATH")
    assert str(REPO) not in gpu_check._child_env().get("PYTHONPATH", "").split(os.pathsep)
