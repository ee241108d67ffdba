"""pipelines/sample.py on a tiny untrained checkpoint: exports, MLflow run, memorisation exclusion, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from mlflow.tracking import MlflowClient

from pancreas_gvae.config import load_config
from pancreas_gvae.data.ct.manifest import to_frame, write_manifest
from pancreas_gvae.synthesis.generator import generator_kwargs
from pancreas_gvae.models.networks import Generator
from pancreas_gvae.synthesis.generator import LoadedGenerator, load_from_checkpoint
from pancreas_gvae.synthesis.sampling import SampleOptions, run_sampling
from pancreas_gvae.training.checkpoint import save_checkpoint
from pancreas_gvae.data.ct.config import data_config
from pancreas_gvae.pipelines import sample as sample_cli
from pancreas_gvae.transforms.cache import save_cached_case

REPO = Path(__file__).resolve().parents[2]
# An untrained generator has no codes to fit a latent prior to: N(0, I) (test_latent_prior.py covers the mixture).
TINY = ["model.channels=[8,16,32]", "model.latent_dim=8", "tracking.system_metrics=false",
        "model.latent_prior_components=0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A training checkpoint of an untrained tiny CT generator (64 px, fov 320 mm: 5 mm pixels)."""
    cfg = load_config(REPO / "configs" / "ct_64.yaml", TINY)
    torch.manual_seed(0)
    gen = Generator(**generator_kwargs(cfg.model))
    ema = {f"module.{k}": v for k, v in gen.state_dict().items()}
    ema["n_averaged"] = torch.tensor(3)
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    save_checkpoint({"config": cfg.to_dict(), "ema": ema, "model": {}, "mlflow_run_id": "abc123", "step": 3}, path)
    return path


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One sqlite MLflow store for the module (creating one costs seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def _fake_prepared(root: Path, n_cases: int = 3) -> Path:
    """A prepare output with ``n_cases`` small cached volumes (1 mm, 4 slices) and their manifest."""
    rng = np.random.default_rng(0)
    rows = []
    for c in range(n_cases):
        cid = f"CASE_{c:02d}"
        image = rng.random((48, 48, 4)).astype(np.float32)  # (x, y, z) with an RAS affine
        label = np.zeros_like(image, np.uint8)
        label[20:28, 20:28, 1:3] = 1
        save_cached_case(root / "cache", cid, image, label, np.diag([1.0, 1.0, 2.0, 1.0]), {})
        rows.append({"case_id": cid, "status": "ok", "layout": "folder"})
    write_manifest(to_frame(rows), root)
    return root


def test_exports_nifti_png_dicom_and_logs_a_sampling_run(tmp_path, checkpoint, store_uri):
    out, uri = tmp_path / "samples", store_uri
    code = sample_cli.main(["--checkpoint", str(checkpoint), "--n", "5", "--format", "nifti,png,dicom",
                            "--out", str(out), "--seed", "3", "--tracking-uri", uri])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generated"] == summary["exported"] == 5 and summary["source"]["run_id"] == "abc123"
    assert summary["files_written"] == {"nifti": 10, "png": 5, "dicom": 10}
    img = nib.load(out / "nifti" / "synthetic_0000_image.nii.gz")
    assert img.shape == (64, 64, 1) and np.allclose(img.header.get_zooms()[:2], (5.0, 5.0))
    ds = pydicom.dcmread(out / "dicom" / "synthetic_0004_image.dcm")
    assert [float(v) for v in ds.PixelSpacing] == [5.0, 5.0]
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    nifti4 = nib.load(out / "nifti" / "synthetic_0004_image.nii.gz").get_fdata()[..., 0].T
    assert np.abs(hu - nifti4).max() <= 1.0, "DICOM and NIfTI hold the same HU"
    assert -125 <= hu.min() and hu.max() <= 275
    assert len(list((out / "png").glob("*.png"))) == 5 and (out / "grid.png").is_file()
    table = pd.read_csv(out / "samples.csv")
    assert table["kept"].all() and list(table["export_name"]) == [f"synthetic_{k:04d}" for k in range(5)]

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pancreas-gvae-ct").experiment_id])
    assert run.info.run_name == "sample" and run.data.tags["source_run_id"] == "abc123"
    assert run.data.params["sample.n"] == "5" and run.data.metrics["sample/exported"] == 5
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "sample")}
    assert {"sample/grid.png", "sample/summary.json", "sample/samples.csv"} <= arts

    # same seed, same pixels (new UIDs)
    again = tmp_path / "again"
    assert sample_cli.main(["--checkpoint", str(checkpoint), "--n", "5", "--format", "nifti", "--out", str(again),
                            "--seed", "3", "--no-mlflow"]) == 0
    a = nib.load(again / "nifti" / "synthetic_0004_image.nii.gz").get_fdata()[..., 0].T
    assert np.array_equal(a, nifti4)


def test_filter_drops_implausible_pairs_and_reports_why(tmp_path, checkpoint, capsys):
    out = tmp_path / "f"
    # an untrained generator's mask is noise around 0.5: demand a big mask so that some fail
    assert sample_cli.main(["--checkpoint", str(checkpoint), "--n", "6", "--format", "png", "--out", str(out),
                            "--filter", "--min-mask-voxels", "5000", "--no-mlflow"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    table = pd.read_csv(out / "samples.csv", keep_default_na=False)
    dropped = (~table["plausible"]).sum()
    assert summary["filter"]["dropped"] == dropped and summary["exported"] == 6 - dropped
    assert dropped > 0 and set(table.loc[~table["plausible"], "reason"]) <= {
        "small_mask", "small_mask;median_hu_out_of_range", "small_mask;fat_in_mask",
        "small_mask;median_hu_out_of_range;fat_in_mask", "empty_mask"}
    assert len(list((out / "png").glob("*.png"))) == 6 - dropped
    assert "plausibility:" in capsys.readouterr().out


class _CopyGenerator(torch.nn.Module):
    """Returns fixed logits for every z: a 'generator' that memorised one training slice."""

    def __init__(self, x01: torch.Tensor, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("logits", torch.logit(x01.clamp(1e-4, 1 - 1e-4)))

    def forward(self, z):
        return self.logits.expand(len(z), *self.logits.shape[1:])


def test_memorisation_check_leaves_near_copies_out(tmp_path, checkpoint):
    prepared = _fake_prepared(tmp_path / "prepared")
    real = load_from_checkpoint(checkpoint)
    data = data_config(real.config)
    from pancreas_gvae.synthesis.privacy import load_training_slices

    slices, manifest = load_training_slices(prepared, data)
    assert slices.images.shape == (12, 64, 64) and sorted(set(slices.case_index)) == [0, 1, 2]
    copy = torch.stack([slices.images[7], torch.zeros_like(slices.images[7])])[None]
    stub = LoadedGenerator(_CopyGenerator(copy, 8), real.config, "checkpoint", experiment="x")
    out = tmp_path / "out"
    summary = run_sampling(stub, SampleOptions(n=3, out=out, formats=("nifti", "dicom"), memorisation_check=True,
                                               prepared=prepared, mlflow=False))
    assert summary["memorisation"]["near_copies"] == 3 and summary["exported"] == 0
    assert not (out / "nifti").exists() and not (out / "dicom").exists()
    table = pd.read_csv(out / "samples.csv")
    assert table["near_copy"].all() and (table["nn_ratio"] < 0.05).all()
    assert set(table["nn_case"]) == {f"case_{slices.case_index[7]:03d}"}, "anonymous case numbering, no case id"
    assert "CASE_" not in (out / "samples.csv").read_text() + (out / "summary.json").read_text()
    assert (out / "memorisation_hist.png").is_file()
    assert not (out / "grid.png").exists(), "a near-copy is never shown, not even in the grid"

    # the real (untrained) generator is far from the random training volumes: nothing flagged
    out2 = tmp_path / "out2"
    summary = run_sampling(real, SampleOptions(n=4, out=out2, formats=("png",), memorisation_check=True,
                                               prepared=prepared, mlflow=False))
    assert summary["memorisation"]["near_copies"] == 0 and summary["exported"] == 4


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "{tmp}/missing.pt"], "checkpoint not found"),
    (["--run-id", "0123456789abcdef", "--tracking-uri", "sqlite:///{tmp}/none.db"], "no MLflow store"),
    (["--run-id", "0123456789abcdef", "--tracking-uri", "{store}"], "not found"),
    (["--checkpoint", "{ckpt}", "--memorisation-check"], "needs --prepared"),
    (["--checkpoint", "{ckpt}", "--memorisation-check", "--prepared", "{tmp}"], "no manifest.csv"),
    (["--checkpoint", "{tmp}/notackpt.pt"], "could not be read"),
])
def test_clear_errors_exit_2_without_traceback(tmp_path, checkpoint, store_uri, capsys, argv, message):
    (tmp_path / "notackpt.pt").write_text("not a checkpoint")
    argv = [a.format(tmp=tmp_path, ckpt=checkpoint, store=store_uri) for a in argv]
    code = sample_cli.main([*argv, "--n", "2", "--out", str(tmp_path / "out"), "--no-mlflow"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err


def test_non_empty_out_needs_overwrite(tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    args = ["--checkpoint", str(checkpoint), "--n", "1", "--format", "png", "--out", str(out), "--no-mlflow"]
    assert sample_cli.main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert sample_cli.main([*args, "--overwrite"]) == 0


def test_bad_format_is_an_argparse_error(tmp_path, checkpoint):
    with pytest.raises(SystemExit) as exc:
        sample_cli.main(["--checkpoint", str(checkpoint), "--n", "1", "--format", "jpeg", "--out", str(tmp_path)])
    assert exc.value.code == 2
