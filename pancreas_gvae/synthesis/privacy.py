r"""Checks that run on synthetic CT/mask pairs before they leave the training environment.

Plausibility filter (:func:`plausibility_table`)
    A pair is kept when its mask holds at least ``min_voxels`` pixels, the median HU under the mask lies in
    the data config's ``checks.label_median_hu`` range (the range every real case had to pass in
    preparation) and the share of mask pixels below -50 HU (fat) is at most ``checks.max_fat_fraction``.
    Reasons: ``empty_mask``, ``small_mask``, ``median_hu_out_of_range``, ``fat_in_mask``.

Memorisation check (:func:`memorisation_check_by_case`)
    For each synthetic slice :math:`s_j`: its nearest training slice and distance
    :math:`d_j = \min_i \lVert s_j - t_i \rVert` (pixel space: the windowed CT channel in [0, 1], at the
    generator's resolution; optionally also a feature space). The scale is what independent real slices
    look like: for each training slice, the distance to its nearest slice *of another case*
    (:math:`r_i = \min_{c(i') \ne c(i)} \lVert t_i - t_{i'} \rVert`; neighbouring slices of one patient are
    near-duplicates and would make the scale meaningless). The ratio :math:`\rho_j = d_j / \operatorname{median}(r)`
    and the percentile of :math:`d_j` among the :math:`r_i` are reported; ``near_copy`` is
    :math:`\rho_j \le` ``threshold`` (default 1/3) in any space. With a single case, the reference falls back
    to leave-one-out distances within the training set (named in the result).

    The check itself is the project's one memorisation check,
    :func:`pancreas_gvae.evaluation.metrics.memorisation.memorisation_check` with ``case_index``. Its
    limitation holds here too: a pixel-space search misses shifted or re-windowed copies; passing the check
    is evidence against verbatim copying, not a privacy proof.

Nothing in this module returns a case id: the nearest training slice is named ``case_NNN`` by its position in
the manifest (the same numbering as the training run's de-identified manifest in MLflow) plus its slice index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pancreas_gvae.errors import DataError, PipelineError
from pancreas_gvae.evaluation.metrics.memorisation import MemorisationResult, memorisation_check

__all__ = ["RealSlices", "anonymous_case_names", "load_training_slices",
           "memorisation_check_by_case", "memorisation_histogram", "plausibility_table"]

FAT_HU = -50.0


# ------------------------------------------------------------------------------------------ plausibility


def plausibility_table(ct_hu: np.ndarray, mask: np.ndarray, *, min_voxels: int = 10,
                       median_hu: Sequence[float] = (-30.0, 250.0),
                       max_fat_fraction: float | None = 0.30) -> pd.DataFrame:
    """One row per pair: ``mask_voxels, median_hu, fat_fraction, plausible, reason`` (reasons ``;``-joined)."""
    ct_hu = np.asarray(ct_hu, dtype=np.float32)
    mask = np.asarray(mask) > 0
    lo, hi = (float(v) for v in median_hu)
    rows = []
    for k in range(ct_hu.shape[0]):
        values = ct_hu[k][mask[k]]
        n = int(values.size)
        med = float(np.median(values)) if n else float("nan")
        fat = float((values < FAT_HU).mean()) if n else float("nan")
        reasons = []
        if n == 0:
            reasons.append("empty_mask")
        elif n < min_voxels:
            reasons.append("small_mask")
        if n and not lo <= med <= hi:
            reasons.append("median_hu_out_of_range")
        if n and max_fat_fraction is not None and fat > max_fat_fraction:
            reasons.append("fat_in_mask")
        rows.append({"mask_voxels": n, "median_hu": med, "fat_fraction": fat, "plausible": not reasons,
                     "reason": ";".join(reasons)})
    return pd.DataFrame(rows, columns=["mask_voxels", "median_hu", "fat_fraction", "plausible", "reason"])


def reason_counts(table: pd.DataFrame) -> dict[str, int]:
    """How many pairs each reason removed (a pair with two reasons counts under both)."""
    counts: dict[str, int] = {}
    for text in table["reason"]:
        for reason in filter(None, str(text).split(";")):
            counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items()))


# ------------------------------------------------------------------------------------------ real slices


@dataclass
class RealSlices:
    images: torch.Tensor  # (N, H, W) float32 in [0, 1]: the windowed CT as the generator was trained on it
    case_index: np.ndarray  # (N,) int: position of the slice's case in the manifest (-> case_NNN)
    slice_index: np.ndarray  # (N,) int: slice within the cached case


def anonymous_case_names(manifest: pd.DataFrame) -> dict[str, str]:
    """case id -> ``case_NNN`` by manifest row order, as :func:`pancreas_gvae.training.ct.shareable_manifest`."""
    return {str(cid): f"case_{i:03d}" for i, cid in enumerate(manifest["case_id"].astype(str))}


def load_training_slices(prepared: str | Path, data, *, max_slices: int | None = None,
                         seed: int = 0) -> tuple[RealSlices, pd.DataFrame]:
    """Every slice of the prepared ok cases in (case, slice) order, fitted exactly as training fits them
    (``data.sampling``: size, fit, fov_mm) but without neighbours; returns the slices and the manifest.
    ``max_slices`` keeps a seeded random subset (the nearest-neighbour search then only sees those)."""
    from pancreas_gvae.data.ct.config import fit_options
    from pancreas_gvae.data.ct.manifest import MANIFEST_NAME, read_manifest
    from pancreas_gvae.transforms.slice_dataset import CTSliceDataset, read_slices

    prepared = Path(prepared)
    if not (prepared / MANIFEST_NAME).is_file():
        raise DataError(f"no {MANIFEST_NAME} in {prepared}: give the prepare_ct / train_ct output folder "
                        "(OUT/prepared for train_ct) to --prepared")
    manifest = read_manifest(prepared)
    s = data.sampling
    ds = CTSliceDataset(prepared, manifest, size=s.slice_size, pos_fraction=None, context_slices=0, seed=seed,
                        **fit_options(data))
    got = read_slices(ds, max_slices=max_slices, seed=seed)
    position = {cid: i for i, cid in enumerate(manifest["case_id"].astype(str))}
    cases = np.asarray([position[c] for c in got["case_id"]])
    return RealSlices(got["image"][:, 0], cases, got["slice"]), manifest


# ------------------------------------------------------------------------------------------ memorisation


def memorisation_check_by_case(samples: torch.Tensor, train: torch.Tensor, case_index: np.ndarray, *,
                               threshold: float = 1.0 / 3.0,
                               feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                               max_reference: int | None = 2000, seed: int = 0,
                               chunk_size: int = 2048) -> MemorisationResult:
    """The memorisation check (:func:`~pancreas_gvae.evaluation.metrics.memorisation.memorisation_check`) of
    synthetic slices against training slices with the other-case reference, its problems as pipeline errors.

    ``samples`` ``(M, H, W)`` and ``train`` ``(N, H, W)`` on the same scale (windowed CT in [0, 1]);
    ``case_index`` ``(N,)`` the case of each training slice. ``feature_fn`` maps ``(B, 1, H, W)`` to features.
    """
    if threshold <= 0:
        raise PipelineError(f"the memorisation threshold must be > 0, got {threshold}")
    samples, train = torch.as_tensor(samples).float(), torch.as_tensor(train).float()
    if samples.shape[1:] != train.shape[1:]:
        raise PipelineError(f"synthetic slices {tuple(samples.shape[1:])} and training slices "
                            f"{tuple(train.shape[1:])} differ in size: prepare with the model's data config")
    if len(train) < 2:
        raise DataError("the memorisation check needs at least two training slices")
    try:
        return memorisation_check(samples[:, None], train[:, None], case_index=case_index, feature_fn=feature_fn,
                                  threshold=threshold, max_reference=max_reference, seed=seed,
                                  chunk_size=chunk_size, batch_size=256)
    except ValueError as err:  # e.g. slices duplicated across cases: one line for the user
        raise DataError(f"memorisation check: {err}") from None


def memorisation_histogram(result: MemorisationResult, path: str | Path) -> Path:
    """Histogram of synthetic-to-nearest-training ratios against the real-to-real (other-case) ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spaces = [("pixel", result.pixel)] + ([("feature", result.feature)] if result.feature is not None else [])
    fig, axes = plt.subplots(1, len(spaces), figsize=(6 * len(spaces), 4), squeeze=False)
    for ax, (name, space) in zip(axes[0], spaces):
        ref = (space.reference_distances / space.reference_scale).numpy()
        syn = space.ratios.numpy()
        hi = float(max(ref.max(), syn.max(), result.threshold)) * 1.05
        bins = np.linspace(0.0, hi, 40)
        ax.hist(ref, bins=bins, alpha=0.5, density=True, label=f"real to nearest other-case slice (n={len(ref)})")
        ax.hist(syn, bins=bins, alpha=0.6, density=True, label=f"synthetic to nearest training slice (n={len(syn)})")
        ax.axvline(result.threshold, color="red", linestyle="--",
                   label=f"near-copy threshold {result.threshold:.3g} ({int(space.near_copy.sum())} flagged)")
        ax.set_xlabel(f"{name}-space distance / median real-to-real distance")
        ax.set_ylabel("density")
        ax.set_title(f"memorisation check, {name} space ({space.reference_kind})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
