"""The main job end to end on a tiny phantom cohort: MLflow record, NIfTI artifacts, resume after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pancreas_gvae.pipelines import train_ct

REPO = Path(__file__).resolve().parents[2]
TINY = ["--set", "data.phantom.cases=3", "--set", "data.phantom.size=64", "--batch-size", "8",
        "--set", "model.channels=[8,16,32]", "--set", "model.latent_dim=8", "--set", "train.log_every=1",
        "--set", "train.sample_every=2", "--set", "train.checkpoint_every=2", "--set", "data.nifti_samples=2",
        "--set", "train.num_samples=8", "--set", "tracking.system_metrics=false",
        "--set", "data.monitor={n_samples: 16, n_real: 32, segmenter_steps: 3}"]


def _argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["--out", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *TINY, *extra]


def _only_run(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("pancreas-gvae-ct")
    (run,) = client.search_runs([exp.experiment_id])
    return client, run


def test_default_job_logs_grids_nifti_model_and_manifest(tmp_path):
    assert train_ct.main(_argv(tmp_path, "--steps", "4")) == 0
    client, run = _only_run(tmp_path)
    assert run.info.run_name == "gvae-ct" and run.info.status == "FINISHED"
    assert run.data.params["model.in_channels"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "recon/mask")) == 4
    # mask scores and label fidelity of the prior samples at every sampling step (2 and 4)
    for key in ("mask/share_fake", "mask/share_real", "mask/n_fake", "fidelity/n_synthetic"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [2, 4], key
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("samples+step+4" in p for p in images) and any("reconstructions+step+4" in p for p in images)
    nifti = sorted(a.path for a in client.list_artifacts(run.info.run_id, "synthetic_nifti"))
    assert len(nifti) == 4  # 2 slices x (image, mask)
    local = Path(client.download_artifacts(run.info.run_id, "synthetic_nifti", str(tmp_path / "dl")))
    img = nib.load(local / "synthetic_0000_image.nii.gz")
    mask = nib.load(local / "synthetic_0000_mask.nii.gz")
    assert img.shape == mask.shape == (64, 64, 1)
    assert np.allclose(img.header.get_zooms()[:2], (320.0 / 64, 320.0 / 64)), "spacing = fov_mm / slice_size"
    assert set(np.unique(mask.get_fdata())) <= {0.0, 1.0}
    assert -1100 <= img.get_fdata().min() and img.get_fdata().max() <= 3100, "CT written in HU"
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert inputs and inputs[0].dataset.name == "ct-slices"
    # case ids are the source DICOM's PatientID: none may reach MLflow
    text = " ".join([str(run.data.params), str(run.data.tags), inputs[0].dataset.profile or "",
                     inputs[0].dataset.schema or "", inputs[0].dataset.source or ""])
    assert "PANCREAS_" not in text
    assert (tmp_path / "out" / "synthetic_overlay.png").is_file()
    bundle = {a.path for a in client.list_artifacts(run.info.run_id, "monai_bundle/configs")}
    assert {"monai_bundle/configs/inference.json", "monai_bundle/configs/metadata.json"} <= bundle


def test_model_and_data_settings_must_agree(tmp_path, capsys):
    code = train_ct.main(_argv(tmp_path, "--steps", "1", "--set", "model.image_size=32"))
    assert code == 2
    assert "data.ct.sampling.slice_size" in capsys.readouterr().err


def test_out_of_memory_gives_advice_not_a_traceback(tmp_path, capsys, monkeypatch):
    from pancreas_gvae.training.trainer import Trainer

    def oom(self, x, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train_step", oom)
    code = train_ct.main(_argv(tmp_path, "--steps", "2", "--set", "tracking.log_model=false"))
    err = capsys.readouterr().err
    assert code == 4
    assert "out of GPU memory" in err and "--batch-size" in err and "Traceback" not in err


@pytest.mark.slow
def test_killed_run_resumes_and_finishes(tmp_path):
    """SIGKILL a run after its first checkpoint, resume it, and finish in the same MLflow run."""
    def command(steps: int, *extra: str) -> list[str]:
        return [sys.executable, str(REPO / "pipelines" / "train_ct.py"), *_argv(tmp_path, "--steps", str(steps)),
                "--set", "tracking.log_model=false", "--set", "train.checkpoint_every=5", *extra]

    ckpt = tmp_path / "out" / "checkpoints" / "last.pt"
    proc = subprocess.Popen(command(400), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ckpt.exists(), "no checkpoint was written before the kill"
        time.sleep(1.0)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < killed_at < 400
    done = subprocess.run(command(killed_at + 6, "--resume"), capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from {ckpt} at step {killed_at}" in done.stdout
    assert torch.load(ckpt, weights_only=False)["step"] == killed_at + 6
    client, run = _only_run(tmp_path)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/g")]
    assert steps[-1] == killed_at + 6


def test_cohort_smaller_than_a_batch_draws_slices_with_repetition(tmp_path):
    """Three tiny phantom cases hold fewer slices than a batch of 512: train anyway, no stack trace."""
    code = train_ct.main(_argv(tmp_path, "--steps", "1", "--set", "tracking.log_model=false") + ["--batch-size", "512"])
    assert code == 0
