"""The CT job's pieces: phantom default, preparation, slice batches, and the CT artifacts in MLflow.

``pipelines/train_ct.py`` strings these together; each is usable on its own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pancreas_gvae.config import Config
from pancreas_gvae.data.ct.config import DataConfig
from pancreas_gvae.data.ct.phantom import make_phantom_cohort
from pancreas_gvae.data.ct.prepare import prepare_dataset
from pancreas_gvae.errors import DataError, PipelineError
from pancreas_gvae.synthesis.bundle import export_bundle
from pancreas_gvae.synthesis.generator import infer_geometry
from pancreas_gvae.synthesis.slices import generate, save_nifti_slices, split_ct_and_mask, window_to_hu
from pancreas_gvae.training import distributed
from pancreas_gvae.training.batches import DatasetBatches
from pancreas_gvae.tracking.images import image_grid, save_png
from pancreas_gvae.transforms.slice_dataset import CTSliceDataset, read_slices

# Manifest columns that may leave the preparation folder: no case ids, no paths.
SHAREABLE_COLUMNS = ["layout", "status", "reason", "has_label", "input_intensity", "shape", "spacing",
                     "slice_thickness", "slice_interval", "n_slices", "vendor", "hu_min", "hu_max", "label_voxels",
                     "label_median_hu", "pancreas_slice_count", "cache_shape", "cache_spacing"]


def ensure_phantom(root: Path, phantom: dict[str, Any]) -> Path:
    """The embedded default cohort: made once under ``root``, reused afterwards."""
    if not (root / "Pancreas-CT").is_dir():
        print(f"no --data-root given: making a phantom cohort in {root} "
              f"({phantom.get('cases', 6)} cases, {phantom.get('size', 128)} px)")
        make_phantom_cohort(root, cases=int(phantom.get("cases", 6)), size=int(phantom.get("size", 128)),
                            seed=int(phantom.get("seed", 0)))
    return root


def prepare(data_root: Path, prepared: Path, data: DataConfig, *, labels: Path | None, layout: str,
            pancreas_label: int | None, workers: int) -> pd.DataFrame:
    manifest = prepare_dataset(data_root, prepared, labels=labels, layout=layout, pancreas_label=pancreas_label,
                               config=data, workers=workers)
    ok = manifest[manifest["status"] == "ok"]
    excluded = manifest[manifest["status"] != "ok"]
    print(f"prepared {len(ok)} case(s), excluded {len(excluded)}; manifest: {prepared / 'manifest.csv'}")
    for _, row in excluded.iterrows():
        print(f"  excluded {row['case_id']}: {row['reason']}")
    if ok.empty:
        raise DataError(f"no usable case under {data_root}: every case was excluded (see {prepared / 'manifest.csv'})")
    return manifest


def slice_batches(prepared: Path, manifest: pd.DataFrame, data: DataConfig, cfg: Config, *,
                  cases: list[str] | None = None, num_workers: int = 0,
                  withhold_labels: list[str] = ()) -> DatasetBatches:
    """Training batches of ``cases`` (default: every ok case); ``withhold_labels``: cases trained on as images
    only (semi-supervised: their masks never reach a loss, see :class:`CTSliceDataset`)."""
    dataset = CTSliceDataset.from_config(prepared, data, manifest, cases=cases, seed=cfg.train.seed,
                                         withhold_labels=withhold_labels)
    needed = cfg.train.batch_size * distributed.world_size()
    if len(dataset) < needed:
        # A tiny cohort (one 20-slice case): an epoch draws slices with repetition rather than failing.
        dataset.samples_per_epoch = needed
        dataset.set_epoch(0)
    # A cohort with image-only cases hands the label-present flags to the trainer with each batch.
    mixed = not bool(dataset.slices["has_label"].all())
    return DatasetBatches(dataset, batch_size=cfg.train.batch_size,
                          to_tensor=batch_with_label_flags if mixed else batch_to_input,
                          num_workers=num_workers, pin_memory=torch.cuda.is_available())


def batch_to_input(batch: dict[str, Any]) -> torch.Tensor:
    """CT channel(s) then the pancreas mask: every synthetic slice comes with its label."""
    return torch.cat([batch["image"], batch["label"]], dim=1)


def batch_with_label_flags(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, has_label)``: image-only slices carry an all-zero mask that means "unknown"."""
    return batch_to_input(batch), batch["has_label"]


def preview_slices(prepared: Path, manifest: pd.DataFrame, data: DataConfig, n: int, seed: int) -> torch.Tensor:
    """Real pancreas slices for the reconstruction grids (all from slices that hold pancreas)."""
    ds = CTSliceDataset.from_config(prepared, data, manifest, seed=seed + 1)
    ds.pos_fraction = 1.0
    ds.set_epoch(0)
    return stack_inputs(ds, n)


def stack_inputs(dataset: CTSliceDataset, n: int) -> torch.Tensor:
    """The first ``n`` items of the dataset's current epoch as model inputs ``(N, C + 1, H, W)``."""
    return slices_at(dataset, dataset.order[:n])


class MaskMonitor:
    """Scores of the EMA generator's prior samples against real slices, at every sampling step of a CT run.

    Logged to MLflow as ``mask/...`` (share of samples with a mask vs the real share, shape realism,
    intensity under the mask: :func:`pancreas_gvae.evaluation.metrics.mask_scores`) and ``fidelity/...`` (a UNet
    trained once, at the start, on real slices of the cohort predicts on the samples; Dice against their
    masks: :func:`pancreas_gvae.segmentation.label_fidelity`). The samples come from fixed codes, so the
    curves compare like with like from step to step. With ``tstr_steps`` > 0 it also trains a UNet on the
    samples alone at every sampling step and scores it on the cohort's real slices (``tstr/...``): costly,
    and on patients the generator trained on, so off by default; ``evaluate.py`` gives the held-out-patient
    figures (TSTR included).
    """

    def __init__(self, real: torch.Tensor, *, latent_dim: int, n_samples: int, seed: int, pixel_mm: float | None,
                 segmenter: torch.nn.Module | None = None, tstr_steps: int = 0):
        self.real_img, self.real_mask = real[:, :1], (real[:, -1:] > 0.5).float()
        self.latent_dim, self.n_samples, self.seed = latent_dim, n_samples, seed
        self.pixel_mm, self.segmenter, self.tstr_steps = pixel_mm, segmenter, tstr_steps

    @torch.no_grad()
    def __call__(self, trainer) -> dict[str, float]:
        import math

        from pancreas_gvae.evaluation import metrics as M
        from pancreas_gvae.segmentation import scoring
        from pancreas_gvae.segmentation import unet as S

        samples = generate(trainer.ema_generator, self.n_samples, latent_dim=self.latent_dim, seed=self.seed,
                           device=trainer.device)
        fake_img, fake_mask = samples[:, :1], (samples[:, -1:] > 0.5).float()
        scores = M.mask_scores(self.real_img, self.real_mask, fake_img, fake_mask, pixel_mm=self.pixel_mm)
        if self.segmenter is not None:
            synthetic = S.SliceSet(fake_img, fake_mask, ["synthetic"] * len(samples))
            scores.update(scoring.label_fidelity(self.segmenter, synthetic, pixel_mm=self.pixel_mm or 1.0))
            if self.tstr_steps > 0:
                real = S.SliceSet(self.real_img, self.real_mask, [])
                scores.update(scoring.tstr(synthetic, real, real, steps=self.tstr_steps, batch_size=16, seed=self.seed,
                                     pixel_mm=self.pixel_mm or 1.0, real_model=self.segmenter))
        return {k: float(v) for k, v in scores.items() if math.isfinite(float(v))}


def mask_monitor(prepared: Path, manifest: pd.DataFrame, data: DataConfig, cfg: Config) -> MaskMonitor:
    """The monitor of a CT run (``data.monitor``: ``n_samples`` 256, ``n_real`` 512, ``segmenter_steps`` 200,
    ``tstr_steps`` 0)."""
    from pancreas_gvae.segmentation import unet as S
    from pancreas_gvae.data.ct.config import slice_spacing_mm

    opts = dict(cfg.data.get("monitor", {}) or {})
    unknown = set(opts) - {"n_samples", "n_real", "segmenter_steps", "tstr_steps"}
    if unknown:
        raise PipelineError(f"unknown key(s) under data.monitor: {', '.join(sorted(unknown))}")
    ds = CTSliceDataset.from_config(prepared, data, manifest, seed=cfg.train.seed + 3)
    rows, _ = draw_like_training(ds, int(opts.get("n_real", 512)), data.sampling.pos_fraction, seed=cfg.train.seed)
    real = slices_at(ds, rows)
    spacing = slice_spacing_mm(data)
    pixel_mm = spacing[0] if spacing is not None else None
    monitor = MaskMonitor(real, latent_dim=cfg.model.latent_dim, n_samples=int(opts.get("n_samples", 256)),
                          seed=cfg.train.seed + 11, pixel_mm=pixel_mm)
    steps = int(opts.get("segmenter_steps", 200))
    if steps > 0 and distributed.is_main_process():
        labelled = S.SliceSet(monitor.real_img.contiguous(), monitor.real_mask, [])
        monitor.segmenter, _ = S.train_unet(labelled, None, steps=steps, batch_size=16, ratio=0.0,
                                            seed=cfg.train.seed)
        monitor.tstr_steps = int(opts.get("tstr_steps", 0))
    return monitor


def draw_like_training(ds, n: int, pos_fraction: float | None, seed: int) -> tuple[np.ndarray, str]:
    """Up to ``n`` distinct slice rows of ``ds`` with the training draw's pancreas share (no slice twice).

    Training oversamples pancreas slices to ``pos_fraction``; held-out slices drawn at their natural share
    would score a model against another distribution. When one pool runs out, fewer slices are drawn so the
    share still holds; a cohort whose slices all hold pancreas (slice sets) has share 1 either way.
    """
    rng = np.random.default_rng([seed, 4242])
    has = ds.slices["has_pancreas"].to_numpy().astype(bool)
    pos, neg = rng.permutation(np.flatnonzero(has)), rng.permutation(np.flatnonzero(~has))
    if pos_fraction is None or not len(pos) or not len(neg):
        rows = rng.permutation(np.arange(len(has)))[:n]
    else:
        f = float(pos_fraction)
        total = min(n, int(len(pos) / f) if f > 0 else n, int(len(neg) / (1 - f)) if f < 1 else n)
        n_pos = int(round(f * total))
        rows = rng.permutation(np.concatenate([pos[:n_pos], neg[:total - n_pos]]))
    share = float(has[rows].mean()) if len(rows) else float("nan")
    natural = float(has.mean()) if len(has) else float("nan")
    return rows, f"pancreas share {share:.2f} (training draw {pos_fraction}; all slices of these cases {natural:.2f})"


def slices_at(ds: CTSliceDataset, rows) -> torch.Tensor:
    """Model inputs ``(N, C + 1, H, W)`` for the given slice rows of ``ds`` (CT channel(s) + mask)."""
    got = read_slices(ds, rows)
    return torch.cat([got["image"], got["label"]], dim=1)


def shareable_manifest(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest without case ids or paths: case ids are the source DICOM's PatientID for TCIA data."""
    out = manifest[[c for c in SHAREABLE_COLUMNS if c in manifest.columns]].copy()
    out.insert(0, "case", [f"case_{i:03d}" for i in range(len(out))])
    return out


def log_ct_artifacts(trainer, tracker, out_dir: Path, *, data: DataConfig, manifest: pd.DataFrame,
                     n_nifti: int = 16) -> None:
    """Synthetic NIfTI slices (HU, with spacing), an overlay grid, and the manifest as a dataset input."""
    cfg = trainer.cfg
    samples = generate(trainer.ema_generator, n_nifti, latent_dim=cfg.model.latent_dim, seed=cfg.train.seed + 1,
                       device=trainer.device)
    slices = split_ct_and_mask(samples, mask_channels=cfg.model.mask_channels)
    geometry = infer_geometry(cfg)
    if geometry.window is not None:  # else display values of an unknown window: kept in [0, 1]
        slices = dataclasses.replace(slices, ct=window_to_hu(slices.ct, geometry.window))
    nifti_dir = out_dir / "synthetic_nifti"
    save_nifti_slices(slices, nifti_dir, pixel_mm=geometry.spacing[0] if geometry.spacing else 1.0)
    tracker.log_artifacts(nifti_dir, artifact_path="synthetic_nifti")
    bundle = export_bundle(trainer.ema_generator, cfg, out_dir / "bundle", spacing=geometry.spacing,
                           window=geometry.window, overwrite=True)
    tracker.log_artifacts(bundle, artifact_path="monai_bundle")
    grid = image_grid(samples, mask_channels=cfg.model.mask_channels, nrow=8)
    tracker.log_artifact(save_png(grid, out_dir / "synthetic_overlay.png"), artifact_path="final")
    tracker.log_dataset(shareable_manifest(manifest), name="ct-slices", context="training")
