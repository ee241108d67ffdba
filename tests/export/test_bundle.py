"""MONAI Bundle export: layout and metadata, the bundle run by MONAI (CLI and API), the export pipeline."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pancreas_gvae.config import Config, load_config
from pancreas_gvae.errors import PipelineError
from pancreas_gvae.synthesis.bundle import export_bundle
from pancreas_gvae.synthesis.generator import generator_kwargs, infer_geometry
from pancreas_gvae.models import build_model
from pancreas_gvae.models.networks import Generator
from pancreas_gvae.training.checkpoint import save_checkpoint
from pancreas_gvae.training.trainer import Trainer, seed_everything
from pancreas_gvae.pipelines.export_bundle import main as export_main

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file")  # MONAI's note on trusting configs

TINY = {"image_size": 16, "channels": [4, 8], "latent_dim": 4, "in_channels": 2, "mask_channels": 1}
SPACING, WINDOW = (0.8, 0.9), (-125.0, 275.0)
# Top-level keys the current MONAI metadata schema (meta_schema_20240725.json) requires.
SCHEMA_REQUIRED = ["schema", "version", "monai_version", "pytorch_version", "numpy_version",
                   "required_packages_version", "task", "description", "authors", "copyright", "network_data_format"]
TENSOR_REQUIRED = ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"]


def _tiny_config(**model) -> Config:
    return Config.from_dict({"model": {**TINY, **model}})


def _generator(cfg: Config, seed: int = 0) -> Generator:
    """An untrained generator with weights large enough for images with contrast (not a flat 75 HU)."""
    torch.manual_seed(seed)
    gen = build_model(cfg.model).generator.eval()
    with torch.no_grad():
        for p in gen.parameters():
            p.normal_(0.0, 0.5)
    return gen


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Path, Generator]:
    cfg = _tiny_config()
    gen = _generator(cfg)
    out = export_bundle(gen, cfg, tmp_path_factory.mktemp("bundle") / "b", spacing=SPACING, window=WINDOW,
                        num_samples=3)
    return out, gen


def _expected(gen: Generator, n: int, seed: int) -> torch.Tensor:
    z = (gen.prior.sample(n, seed) if gen.prior is not None
         else torch.randn(n, gen.latent_dim, generator=torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        return torch.sigmoid(gen(z))


def _read(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img


def _check_samples(out: Path, gen: Generator, n: int, seed: int) -> None:
    probs = _expected(gen, n, seed)
    for i in range(n):
        image, img = _read(out / f"synthetic_{i:04d}_image.nii.gz")
        mask, msk = _read(out / f"synthetic_{i:04d}_mask.nii.gz")
        assert image.shape == mask.shape == (16, 16, 1), "a 2D slice is written as H x W x 1"
        assert image.dtype == np.int16 and mask.dtype == np.uint8, "whole HU, as CT is stored"
        for header in (img.header, msk.header):
            np.testing.assert_allclose(header.get_zooms()[:2], SPACING, rtol=1e-6)
        assert set(np.unique(mask)) <= {0, 1}
        lo, hi = WINDOW
        np.testing.assert_allclose(image[..., 0], np.round(lo + (hi - lo) * probs[i, 0].numpy()), atol=1)
        p = probs[i, 1].numpy()
        clear = np.abs(p - 0.5) > 1e-4
        np.testing.assert_array_equal(mask[..., 0][clear], (p >= 0.5)[clear])
    assert not (out / f"synthetic_{n:04d}_image.nii.gz").exists()


def _run_in_process(bundle_dir: Path, **override) -> None:
    from monai.bundle import run

    run(config_file=str(bundle_dir / "configs" / "inference.json"), bundle_root=str(bundle_dir),
        logging_file=False, **override)


def test_export_writes_a_bundle_with_schema_fields(bundle):
    out, gen = bundle
    for rel in ("configs/metadata.json", "configs/inference.json", "configs/logging.conf", "models/model.pt",
                "docs/README.md", "docs/license.txt"):
        assert (out / rel).is_file(), rel
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert [k for k in SCHEMA_REQUIRED if k not in meta] == []
    assert "optional_packages_version" not in meta, "MONAI renames it onto required_packages_version"
    fmt = meta["network_data_format"]
    z, pred = fmt["inputs"]["z"], fmt["outputs"]["pred"]
    assert (z["type"], z["num_channels"], z["spatial_shape"]) == ("vector", 4, [])
    assert (pred["num_channels"], pred["spatial_shape"]) == (2, [16, 16])
    image, mask = fmt["post_processed_outputs"]["image"], fmt["post_processed_outputs"]["mask"]
    assert image["value_range"] == list(WINDOW) and image["pixel_spacing_mm"] == list(SPACING)
    assert image["dtype"] == "int16"
    assert mask["value_range"] == [0, 1] and mask["dtype"] == "uint8"
    for tensor in (z, pred, image, mask):
        assert [k for k in TENSOR_REQUIRED if k not in tensor] == []
    assert meta["training_config"]["model"]["latent_dim"] == 4
    assert "synthetic" in (out / "docs" / "README.md").read_text().lower()

    cfg = json.loads((out / "configs" / "inference.json").read_text())
    assert cfg["network_def"]["_target_"] == "pancreas_gvae.models.networks.Generator"
    rebuilt = Generator(**{k: v for k, v in cfg["network_def"].items() if k != "_target_"})
    rebuilt.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True))
    for key, value in gen.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


@pytest.mark.slow  # a fresh interpreter importing torch + MONAI + ITK: 5-15 s
@pytest.mark.skipif(importlib.util.find_spec("fire") is None,
                    reason="`python -m monai.bundle` needs the `fire` package (pip install fire)")
def test_monai_bundle_cli_writes_synthetic_nifti(bundle, tmp_path):
    out, gen = bundle
    samples = tmp_path / "samples"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--num_samples", "3", "--seed", "7", "--output_dir", str(samples)],
        cwd=out, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "wrote 3 synthetic sample(s)" in proc.stdout + proc.stderr
    _check_samples(samples, gen, n=3, seed=7)
    assert not (out / "samples").exists(), "--output_dir is honoured"


def test_bundle_api_is_seeded_and_batch_size_invariant(bundle, tmp_path):
    out, gen = bundle
    _run_in_process(out, output_dir=str(tmp_path / "a"), num_samples=5, seed=3, batch_size=2)
    _run_in_process(out, output_dir=str(tmp_path / "b"), num_samples=5, seed=3, batch_size=64)
    _run_in_process(out, output_dir=str(tmp_path / "c"), num_samples=5, seed=4)
    _check_samples(tmp_path / "a", gen, n=5, seed=3)
    for i in range(5):
        name = f"synthetic_{i:04d}_image.nii.gz"
        a, b, c = (_read(tmp_path / d / name)[0] for d in "abc")
        # Same codes, other batch size: CPU convolution kernels may sum in another order, so a value
        # can land on the other side of an integer-HU rounding boundary; never more than 1 HU.
        np.testing.assert_allclose(a, b, atol=1, rtol=0)
        assert not np.allclose(a, c, atol=1)
        assert len(np.unique(a)) > 10, "the test generator should make images with contrast"


def test_bundle_samples_from_the_generators_fitted_latent_prior(tmp_path):
    cfg = _tiny_config(latent_prior_components=2)
    gen = _generator(cfg)
    codes = torch.randn(64, gen.latent_dim, generator=torch.Generator().manual_seed(1))
    gen.prior.fit(torch.cat([codes * 0.1 + 3.0, codes * 0.1 - 3.0]), torch.full((128, gen.latent_dim), -4.0))
    out = export_bundle(gen, cfg, tmp_path / "b", spacing=SPACING, window=WINDOW, num_samples=3)
    _run_in_process(out, output_dir=str(tmp_path / "s"), num_samples=4, seed=2)
    _check_samples(tmp_path / "s", gen, n=4, seed=2)  # the mixture's codes, not N(0, I)'s
    plain = torch.sigmoid(gen(torch.randn(4, gen.latent_dim, generator=torch.Generator().manual_seed(2))))
    assert not torch.allclose(_expected(gen, 4, 2), plain, atol=0.05)


def test_single_channel_model_without_window_or_spacing(tmp_path):
    cfg = _tiny_config(in_channels=1, mask_channels=0)
    out = export_bundle(_generator(cfg), cfg, tmp_path / "mnist_like", name="mnist_gvae")
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert "mask" not in meta["network_data_format"]["post_processed_outputs"] and meta["name"] == "mnist_gvae"
    _run_in_process(out, output_dir=str(tmp_path / "s"), num_samples=2)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["synthetic_0000_image.nii.gz",
                                                                  "synthetic_0001_image.nii.gz"]
    image, img = _read(tmp_path / "s" / "synthetic_0000_image.nii.gz")
    assert image.dtype == np.float32 and image.min() >= 0.0 and image.max() <= 1.0
    np.testing.assert_allclose(img.header.get_zooms()[:2], (1.0, 1.0))


def test_export_refuses_mismatches_and_non_empty_folders(tmp_path):
    cfg = _tiny_config()
    gen = _generator(cfg)
    with pytest.raises(PipelineError, match="does not match"):
        export_bundle(gen, _tiny_config(latent_dim=8), tmp_path / "x")
    with pytest.raises(PipelineError, match="spacing needs 2"):
        export_bundle(gen, cfg, tmp_path / "x", spacing=(1.0, 1.0, 2.0))
    with pytest.raises(PipelineError, match="low < high"):
        export_bundle(gen, cfg, tmp_path / "x", window=(275, -125))
    export_bundle(gen, cfg, tmp_path / "x")
    with pytest.raises(PipelineError, match="not empty"):
        export_bundle(gen, cfg, tmp_path / "x")
    export_bundle(gen, cfg, tmp_path / "x", overwrite=True)


def test_generator_kwargs_match_the_training_model():
    cfg = _tiny_config(num_res_units=1, generator_norm="instance")
    Generator(**generator_kwargs(cfg.model)).load_state_dict(build_model(cfg.model).generator.state_dict())


@pytest.fixture(scope="module")
def ct_checkpoint(tmp_path_factory) -> tuple[Path, Trainer]:
    """A training checkpoint of the tiny CT model after two steps, with a CT data section in its config."""
    data = {"ct": {"preprocess": {"hu_window": [-100, 200], "spacing": [1.0, 1.0, None]},
                   "sampling": {"fit": "resize", "fov_mm": 320.0, "slice_size": 16}}}
    overrides = [f"model.{k}={json.dumps(v)}" for k, v in TINY.items()] + ["train.batch_size=4"]
    cfg = load_config(overrides=overrides, base={"data": data})
    seed_everything(0)
    trainer = Trainer(cfg, build_model(cfg.model), torch.device("cpu"))
    x = torch.rand(4, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    x[:, 1] = (x[:, 1] > 0.7).float()
    for _ in range(2):  # the first update copies the weights; from the second on the EMA differs from the raw G
        trainer.train_step(x)
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "last.pt"
    return save_checkpoint(trainer.state_dict(), path), trainer


def test_export_pipeline_exports_the_ema_generator_with_recorded_geometry(ct_checkpoint, tmp_path, capsys):
    ckpt, trainer = ct_checkpoint
    assert infer_geometry(trainer.cfg)[:2] == ((20.0, 20.0), (-100.0, 200.0))
    out = tmp_path / "bundle"
    assert export_main(["--checkpoint", str(ckpt), "--out", str(out), "--num-samples", "4"]) == 0
    printed = capsys.readouterr().out
    assert "exported the ema generator" in printed and "data.ct.sampling.fov_mm" in printed

    weights = torch.load(out / "models" / "model.pt", weights_only=True)
    ema, raw = trainer.ema_generator.state_dict(), trainer.model.generator.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in ema.items())
    assert any(not torch.equal(weights[k], v) for k, v in raw.items())
    cfg = json.loads((out / "configs" / "inference.json").read_text())
    assert (cfg["spacing"], cfg["hu_window"], cfg["num_samples"]) == ([20.0, 20.0], [-100.0, 200.0], 4)

    _run_in_process(out, output_dir=str(tmp_path / "s"), num_samples=2)
    mask, img = _read(tmp_path / "s" / "synthetic_0001_mask.nii.gz")
    assert set(np.unique(mask)) <= {0, 1}
    np.testing.assert_allclose(img.header.get_zooms()[:2], (20.0, 20.0))

    # explicit flags win; the raw generator on request
    out2 = tmp_path / "bundle2"
    assert export_main(["--checkpoint", str(ckpt), "--out", str(out2), "--spacing", "0.7", "--no-window",
                        "--weights", "model"]) == 0
    cfg2 = json.loads((out2 / "configs" / "inference.json").read_text())
    assert (cfg2["spacing"], cfg2["hu_window"]) == ([0.7, 0.7], None)
    weights2 = torch.load(out2 / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(weights2[k], v) for k, v in raw.items())


def test_export_pipeline_errors_are_one_line(ct_checkpoint, tmp_path, capsys):
    assert export_main(["--checkpoint", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "b")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    ckpt, _ = ct_checkpoint
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_infer_geometry_reads_the_ct_data_section():
    assert infer_geometry(_tiny_config())[:2] == (None, None), "no CT data section (MNIST): nothing known"
    defaults = infer_geometry(Config.from_dict({"model": TINY, "data": {"ct": {}}}))
    assert defaults[:2] == ((400.0 / 128, 400.0 / 128), (-125.0, 275.0))
    crop = {"ct": {"preprocess": {"spacing": [0.7, 0.8, None]}, "sampling": {"fit": "crop", "slice_size": 16}}}
    assert infer_geometry(Config.from_dict({"model": TINY, "data": crop})).spacing == (0.7, 0.8)


def test_3d_model_with_context_channels_saves_the_centre_ct_channel_and_the_mask(tmp_path):
    cfg = _tiny_config(spatial_dims=3, image_size=8, channels=[4], in_channels=4, mask_channels=1)
    gen = _generator(cfg)
    out = export_bundle(gen, cfg, tmp_path / "b3", spacing=(0.8, 0.8, 2.5))
    _run_in_process(out, output_dir=str(tmp_path / "s"), num_samples=1, seed=5)
    image, img = _read(tmp_path / "s" / "synthetic_0000_image.nii.gz")
    mask, _ = _read(tmp_path / "s" / "synthetic_0000_mask.nii.gz")
    assert image.shape == mask.shape == (8, 8, 8)
    np.testing.assert_allclose(img.header.get_zooms(), (0.8, 0.8, 2.5), rtol=1e-6)
    probs = _expected(gen, 1, seed=5)[0]
    np.testing.assert_allclose(image, probs[1].numpy(), atol=1e-5)  # channels: CT-1, CT, CT+1, mask
    assert set(np.unique(mask)) <= {0, 1}


def test_display_values_of_an_unknown_window_are_not_exported_as_hu():
    """NIH 2D slices (8-bit, window unstated): no HU window to map back to; a known window still gives one."""
    configs = Path(__file__).resolve().parents[2] / "configs"
    geo = infer_geometry(load_config(configs / "ct_nih2d.yaml"))
    assert geo.window is None and "unknown window" in " ".join(geo.notes)
    assert geo.spacing == (102.4 / 64, 102.4 / 64)  # configs/ct_nih2d.yaml: 102.4 mm window, 64 px
    assert "centred on each slice's pancreas" in " ".join(geo.notes)
    assert infer_geometry(load_config(configs / "ct_64.yaml")).window == (-125.0, 275.0)
