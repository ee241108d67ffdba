"""Sample synthetic CT/mask pairs from a trained generator and export them (NIfTI, PNG, DICOM), tracked in MLflow.

``pipelines/sample.py`` is the command line; :func:`~pancreas_gvae.synthesis.generator.load_from_checkpoint` /
:func:`~pancreas_gvae.synthesis.generator.load_from_run` give the EMA
generator with its training config, :func:`run_sampling` does the rest:

1. ``N`` prior samples ``sigmoid(G(z))``, ``z`` from ``seed`` (``N(0, I)``, or the generator's fitted latent
   prior: :func:`pancreas_gvae.models.latent_prior.draw_codes`) by :func:`pancreas_gvae.synthesis.slices.generate`;
   CT channel back to HU through the training window, mask thresholded at 0.5.
2. Optional plausibility filter and memorisation check (:mod:`pancreas_gvae.synthesis.privacy`); a pair that fails either
   is left out of the export, and the reason is recorded.
3. Export of the kept pairs, numbered ``synthetic_0000 ...`` in generation order, in every requested format, plus
   ``samples.csv`` (every generated pair: kept or why not) and ``summary.json``.
4. A new MLflow run (run name ``sample``) in the source run's experiment, tagged ``source_run_id``, with the
   parameters, counts, the PNG grid, the memorisation histogram and the two tables.

Nothing written or logged names an input path, a case id or a source DICOM value (docs/sampling-and-privacy.md).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pancreas_gvae.config import Config
from pancreas_gvae.errors import PipelineError
from pancreas_gvae.synthesis.dicom import write_dicom_pairs
from pancreas_gvae.synthesis.generator import Geometry, LoadedGenerator, infer_geometry
from pancreas_gvae.synthesis.privacy import (
    load_training_slices,
    memorisation_check_by_case,
    memorisation_histogram,
    plausibility_table,
    reason_counts,
)
from pancreas_gvae.synthesis.slices import SyntheticSlices, generate, save_nifti_slices, split_ct_and_mask, window_to_hu
from pancreas_gvae.tracking.images import image_grid, save_png

__all__ = ["FORMATS", "SampleOptions", "geometry", "run_sampling", "sample_pairs"]

FORMATS = ("nifti", "png", "dicom")
SUBDIRS = {"nifti": "nifti", "png": "png", "dicom": "dicom"}
OUTPUT_FILES = ("samples.csv", "summary.json", "grid.png", "memorisation_hist.png")


@dataclass
class SampleOptions:
    n: int
    out: Path
    formats: tuple[str, ...] = FORMATS
    seed: int = 0
    filter: bool = False
    min_mask_voxels: int | None = None  # None: data.ct.checks.min_label_voxels
    memorisation_check: bool = False
    prepared: Path | None = None
    memorisation_threshold: float = 1.0 / 3.0
    max_train_slices: int | None = None
    max_reference: int | None = 2000
    feature_steps: int = 0  # > 0: also a feature space, from a SliceAutoencoder trained on the real slices
    overwrite: bool = False
    tracking_uri: str | None = None
    mlflow: bool = True
    batch_size: int = 64
    extra_tags: dict[str, str] = field(default_factory=dict)


def geometry(config: Config) -> tuple[Any, Geometry]:
    """The data config and the geometry of the training slices
    (:func:`pancreas_gvae.synthesis.generator.infer_geometry`, as the training job's own NIfTI samples), with
    the gaps filled for writing files: 1 mm pixels when unknown, a nominal HU window when there was none."""
    from pancreas_gvae.data.ct.config import data_config

    if "ct" not in (config.data or {}):
        raise PipelineError("the model's config has no data.ct section: it is not a CT model")
    data = data_config(config)
    geo = infer_geometry(config)
    notes = tuple(geo.notes)
    spacing = tuple(float(v) for v in geo.spacing) if geo.spacing else (1.0, 1.0)
    if not geo.spacing:
        notes += ("pixel size unknown (fit crop without preprocess.spacing): 1 mm written",)
    lo, hi = (float(v) for v in (geo.window or data.preprocess.hu_window))
    if geo.window is None:
        notes += (f"HU are NOMINAL: [0, 1] mapped to data.ct.preprocess.hu_window [{lo:g}, {hi:g}] only so that "
                  "the exports and the plausibility filter have units; the training data had no known window",)
    return data, Geometry(spacing, (lo, hi), notes)


def row_col_mm(spacing: tuple[float, ...]) -> tuple[float, float]:
    """(row, column) mm of a slice from a geometry's (x, y) spacing: rows run along y. The one place the order
    changes, for the writers that want it (DICOM PixelSpacing, the samples' summary)."""
    return float(spacing[-1]), float(spacing[0])


def sample_pairs(loaded: LoadedGenerator, n: int, seed: int, window: tuple[float, float], *,
                 batch_size: int = 64) -> tuple[torch.Tensor, SyntheticSlices]:
    """``n`` samples in [0, 1] ``(n, C, H, W)`` and the CT (HU) / mask pairs split from them."""
    if n < 1:
        raise PipelineError(f"--n must be at least 1, got {n}")
    samples = generate(loaded.generator, n, latent_dim=loaded.config.model.latent_dim, seed=seed,
                       batch_size=batch_size)
    slices = split_ct_and_mask(samples, mask_channels=loaded.config.model.mask_channels)
    return samples, dataclasses.replace(slices, ct=window_to_hu(slices.ct, window))


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PipelineError(f"--out {out} is not empty; choose a new folder or pass --overwrite")
        for sub in SUBDIRS.values():
            shutil.rmtree(out / sub, ignore_errors=True)
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _pair_png(sample: torch.Tensor) -> np.ndarray:
    """CT alone, then CT with the mask overlay, side by side."""
    plain = sample.clone()
    plain[-1] = 0
    return image_grid(torch.stack([plain, sample]), nrow=2, mask_channels=1)


def _feature_fn(real: torch.Tensor, steps: int, seed: int):
    from pancreas_gvae.evaluation.metrics.feature_nets import train_slice_autoencoder

    net = train_slice_autoencoder(real[:, None], steps=steps, seed=seed)
    return net.features


def run_sampling(loaded: LoadedGenerator, opts: SampleOptions) -> dict[str, Any]:
    """Sample, check, export and track (module docstring); returns the summary written to ``summary.json``."""
    formats = tuple(opts.formats)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise PipelineError(f"--format takes a comma-separated subset of {','.join(FORMATS)}; got {','.join(formats)}")
    if opts.memorisation_check and opts.prepared is None:
        raise PipelineError("--memorisation-check needs --prepared DIR (the prepare output: manifest.csv, cache/)")
    data, geo = geometry(loaded.config)
    pixel_mm, image_size = row_col_mm(geo.spacing), int(loaded.config.model.image_size)
    real = manifest = None
    if opts.memorisation_check:  # read the training slices first: a bad --prepared fails before anything is written
        real, manifest = load_training_slices(opts.prepared, data, max_slices=opts.max_train_slices, seed=opts.seed)
    out = Path(opts.out)
    _prepare_out(out, opts.overwrite)

    samples, slices = sample_pairs(loaded, opts.n, opts.seed, geo.window, batch_size=opts.batch_size)
    table = pd.DataFrame({"sample": np.arange(opts.n)})
    keep = np.ones(opts.n, dtype=bool)
    summary: dict[str, Any] = {
        "statement": "SYNTHETIC - generated by pancreas-gvae; not a patient",
        "source": {"kind": loaded.source, "run_id": loaded.source_run_id},
        "model_kind": loaded.config.model.kind, "weights": "ema", "seed": opts.seed, "generated": opts.n,
        "formats": list(formats),
        "geometry": {"image_size": image_size, "pixel_mm": list(pixel_mm), "hu_window": list(geo.window),
                     "notes": list(geo.notes)},
    }

    # plausibility: always measured, applied with --filter
    checks = data.checks
    min_voxels = int(opts.min_mask_voxels if opts.min_mask_voxels is not None else checks.min_label_voxels)
    plaus = plausibility_table(slices.ct, slices.mask, min_voxels=min_voxels, median_hu=checks.label_median_hu,
                               max_fat_fraction=checks.max_fat_fraction)
    table = pd.concat([table, plaus], axis=1)
    summary["filter"] = {"applied": opts.filter, "min_mask_voxels": min_voxels,
                         "median_hu_range": [float(v) for v in checks.label_median_hu],
                         "max_fat_fraction": checks.max_fat_fraction,
                         "implausible": int((~plaus["plausible"]).sum()),
                         "reasons": reason_counts(plaus)}
    if opts.filter:
        keep &= plaus["plausible"].to_numpy()
        summary["filter"]["dropped"] = int((~plaus["plausible"]).sum())

    mem = None
    if real is not None:
        feature_fn = _feature_fn(real.images, opts.feature_steps, opts.seed) if opts.feature_steps > 0 else None
        n_ct = samples.shape[1] - loaded.config.model.mask_channels
        mem = memorisation_check_by_case(samples[:, n_ct // 2], real.images, real.case_index,
                                         threshold=opts.memorisation_threshold, feature_fn=feature_fn,
                                         max_reference=opts.max_reference, seed=opts.seed)
        names = {i: f"case_{i:03d}" for i in range(len(manifest))}
        for label, space in (("nn", mem.pixel), ("feature_nn", mem.feature)):
            if space is None:
                continue
            rows = space.indices.numpy()
            table[f"{label}_distance"] = space.distances.numpy()
            table[f"{label}_ratio"] = space.ratios.numpy()
            table[f"{label}_percentile"] = space.percentiles.numpy()
            table[f"{label}_case"] = [names[int(c)] for c in real.case_index[rows]]
            table[f"{label}_slice"] = real.slice_index[rows]
        table["near_copy"] = mem.near_copy.numpy()
        keep &= ~mem.near_copy.numpy()
        summary["memorisation"] = {
            "threshold": mem.threshold, "training_slices": int(len(real.images)),
            "training_cases": int(len(np.unique(real.case_index))), "compared": "windowed CT channel, "
            f"{image_size}x{image_size} px (training fit {data.sampling.fit})",
            "near_copies": int(mem.near_copy.sum()), "excluded": int(mem.near_copy.sum()),
            "pixel": mem.pixel.summary(),
            **({"feature": {**mem.feature.summary(), "feature_net": f"SliceAutoencoder, {opts.feature_steps} steps, "
                            f"seed {opts.seed}"}} if mem.feature is not None else {}),
        }
        memorisation_histogram(mem, out / "memorisation_hist.png")

    # export
    kept = np.flatnonzero(keep)
    width = max(4, len(str(max(len(kept) - 1, 0))))
    export_names = [f"synthetic_{k:0{width}d}" for k in range(len(kept))]
    table["kept"] = keep
    table["export_name"] = ""
    table.loc[kept, "export_name"] = export_names
    kept_slices = SyntheticSlices(slices.ct[kept], slices.mask[kept])
    written: dict[str, int] = {}
    if len(kept):
        if "nifti" in formats:
            written["nifti"] = len(save_nifti_slices(kept_slices, out / SUBDIRS["nifti"], pixel_mm=pixel_mm[0]))
        if "png" in formats:
            for name, k in zip(export_names, kept):
                save_png(_pair_png(samples[k]), out / SUBDIRS["png"] / f"{name}.png")
            written["png"] = len(kept)
        if "dicom" in formats:
            pairs = write_dicom_pairs(kept_slices.ct, kept_slices.mask, out / SUBDIRS["dicom"],
                                      pixel_mm=pixel_mm, window=geo.window)
            written["dicom"] = 2 * len(pairs)
    # the grid never shows a near-copy: kept pairs, or (nothing kept) the pairs only the filter dropped
    not_copies = np.flatnonzero(~mem.near_copy.numpy()) if mem is not None else np.arange(opts.n)
    grid_rows, what = (kept, "kept pairs") if len(kept) else (not_copies, "nothing kept: pairs the filter dropped")
    grid = None
    if len(grid_rows):
        grid = save_png(image_grid(samples[grid_rows], nrow=8, mask_channels=1), out / "grid.png")
    summary["exported"] = int(len(kept))
    summary["files_written"] = written
    summary["grid"] = what if grid is not None else "none (every pair was a near-copy)"
    if "dicom" in formats:
        summary["dicom_mask"] = "CT Image Storage secondary series per slice, ImageType DERIVED\\SECONDARY\\AXIAL\\MASK"
    table.to_csv(out / "samples.csv", index=False)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default))

    if opts.mlflow:
        summary["mlflow_run_id"] = _log_to_mlflow(loaded, opts, out, summary)
    _print_report(summary, out)
    return summary


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _log_to_mlflow(loaded: LoadedGenerator, opts: SampleOptions, out: Path, summary: dict[str, Any]) -> str | None:
    from pancreas_gvae.tracking import MlflowTracker

    uri = opts.tracking_uri or loaded.tracking_uri or loaded.config.tracking.tracking_uri
    experiment = loaded.experiment or loaded.config.tracking.experiment
    tags = {"job": "sample", "model": loaded.config.model.kind, "source": loaded.source, **opts.extra_tags}
    if loaded.source_run_id:
        tags["source_run_id"] = loaded.source_run_id
    tracker = MlflowTracker(tracking_uri=uri, experiment=experiment, run_name="sample",
                            fallback_dir=Path.cwd(), tags=tags, system_metrics=False)
    try:
        # no paths (they can name patients or sites): only what decides the samples and the checks
        tracker.log_config({"sample": {
            "n": opts.n, "seed": opts.seed, "formats": ",".join(summary["formats"]), "filter": opts.filter,
            "min_mask_voxels": summary["filter"]["min_mask_voxels"], "memorisation_check": opts.memorisation_check,
            "memorisation_threshold": opts.memorisation_threshold if opts.memorisation_check else None,
            "max_train_slices": opts.max_train_slices, "feature_steps": opts.feature_steps, "weights": "ema"}})
        metrics = {"sample/generated": summary["generated"], "sample/exported": summary["exported"],
                   "filter/implausible": summary["filter"]["implausible"]}
        metrics.update({f"filter/{k}": v for k, v in summary["filter"]["reasons"].items()})
        if "memorisation" in summary:
            m = summary["memorisation"]
            metrics["memorisation/near_copies"] = m["near_copies"]
            for space in ("pixel", "feature"):
                for key, value in m.get(space, {}).items():
                    if isinstance(value, (int, float)):
                        metrics[f"memorisation/{space}_{key}"] = value
        tracker.log_metrics({k: float(v) for k, v in metrics.items()}, step=0)
        for name in ("grid.png", "summary.json", "samples.csv", "memorisation_hist.png"):
            if (out / name).is_file():
                tracker.log_artifact(out / name, artifact_path="sample")
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    return tracker.run_id


def _print_report(summary: dict[str, Any], out: Path) -> None:
    f = summary["filter"]
    print(f"generated {summary['generated']} pair(s) (seed {summary['seed']}); exported {summary['exported']} to {out}")
    verb = "dropped" if f["applied"] else "would drop (no --filter)"
    reasons = ", ".join(f"{k} {v}" for k, v in f["reasons"].items()) or "none"
    print(f"  plausibility: {f['implausible']} implausible, {verb}; reasons: {reasons}")
    if "memorisation" in summary:
        m = summary["memorisation"]
        p = m["pixel"]
        print(f"  memorisation: {m['near_copies']} near-copy(ies) excluded (ratio <= {m['threshold']:.3g}); "
              f"pixel ratios min {p['min_ratio']:.3f}, 5th pct {p['p05_ratio']:.3f}, median {p['median_ratio']:.3f} "
              f"(real-to-real other-case 5th pct {p['reference_p05_ratio']:.3f}); "
              f"{m['training_slices']} training slices of {m['training_cases']} case(s)")
    else:
        print("  memorisation: not checked (pass --memorisation-check --prepared DIR before sharing the export)")
    if summary.get("mlflow_run_id"):
        print(f"  MLflow run {summary['mlflow_run_id']} (tag source_run_id={summary['source']['run_id']})")

