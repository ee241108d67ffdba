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

    The nearest-neighbour search is :func:`pancreas_gvae.evaluation.metrics.memorisation.nearest_neighbours`. Its
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
from pancreas_gvae.evaluation.metrics.memorisation import nearest_neighbours

__all__ = ["MemorisationByCase", "RealSlices", "SpaceResult", "anonymous_case_names", "load_training_slices",
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
    """Every slice of the prepared ok cases, fitted exactly as training fits them (``data.sampling``: size,
    fit, fov_mm) but without neighbours; returns the slices and the manifest. ``max_slices`` keeps a seeded
    random subset (the nearest-neighbour search then only sees those)."""
    from pancreas_gvae.data.ct.config import fit_options
    from pancreas_gvae.data.ct.manifest import MANIFEST_NAME, read_manifest
    from pancreas_gvae.transforms.slice_dataset import CTSliceDataset

    prepared = Path(prepared)
    if not (prepared / MANIFEST_NAME).is_file():
        raise DataError(f"no {MANIFEST_NAME} in {prepared}: give the prepare_ct / train_ct output folder "
                        "(OUT/prepared for train_ct) to --prepared")
    manifest = read_manifest(prepared)
    s = data.sampling
    ds = CTSliceDataset(prepared, manifest, size=s.slice_size, pos_fraction=None, context_slices=0, seed=seed,
                        **fit_options(data))
    picks = np.arange(len(ds))
    if max_slices is not None and max_slices < len(picks):
        picks = np.sort(np.random.default_rng(seed).choice(picks, size=max_slices, replace=False))
    position = {cid: i for i, cid in enumerate(manifest["case_id"].astype(str))}
    images, cases, slices = [], [], []
    for i in picks:
        item = ds[int(i)]
        images.append(item["image"][0])
        cases.append(position[str(item["case_id"])])
        slices.append(int(item["slice"]))
    return RealSlices(torch.stack(images).float(), np.asarray(cases), np.asarray(slices)), manifest


# ------------------------------------------------------------------------------------------ memorisation


@dataclass
class SpaceResult:
    """Per synthetic sample ``(M,)``, in one space (pixel or feature)."""

    distances: torch.Tensor  # float64: distance to the nearest training slice
    indices: torch.Tensor  # int64: row of that slice in the training set
    ratios: torch.Tensor  # distances / reference_scale
    percentiles: torch.Tensor  # share of reference distances <= the sample's distance
    near_copy: torch.Tensor  # bool: ratio <= threshold
    reference_distances: torch.Tensor  # per (queried) training slice: nearest slice of another case
    reference_scale: float  # median of reference_distances
    reference_kind: str  # "other_case" or "leave_one_out" (a single case)

    def summary(self) -> dict[str, float | int | str]:
        r = self.ratios.double()
        ref = self.reference_distances.double() / self.reference_scale
        return {
            "reference_kind": self.reference_kind,
            "reference_median_distance": round(self.reference_scale, 6),
            "reference_queries": int(self.reference_distances.numel()),
            "near_copies": int(self.near_copy.sum()),
            "min_ratio": round(float(r.min()), 6),
            "p05_ratio": round(float(torch.quantile(r, 0.05)), 6),
            "median_ratio": round(float(r.median()), 6),
            "reference_p05_ratio": round(float(torch.quantile(ref, 0.05)), 6),
        }


@dataclass
class MemorisationByCase:
    pixel: SpaceResult
    feature: SpaceResult | None
    near_copy: torch.Tensor  # (M,) bool: flagged in any space
    threshold: float


def _flat(x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x).reshape(len(x), -1).float()


def _reference(train: torch.Tensor, case_index: np.ndarray, *, max_reference: int | None, seed: int,
               chunk_size: int) -> tuple[torch.Tensor, str]:
    rows = np.arange(len(train))
    if max_reference is not None and max_reference < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_reference, replace=False))
    cases = np.unique(case_index)
    if len(cases) < 2:
        if len(train) < 2:
            raise DataError("the memorisation check needs at least two training slices")
        rows_t = torch.as_tensor(rows)
        ref, _ = nearest_neighbours(train[rows_t], train, exclude_index=rows_t, chunk_size=chunk_size)
        return ref, "leave_one_out"
    out = []
    for c in cases:
        query = rows[case_index[rows] == c]
        if len(query):
            others = torch.as_tensor(np.flatnonzero(case_index != c))
            d, _ = nearest_neighbours(train[torch.as_tensor(query)], train[others], chunk_size=chunk_size)
            out.append(d)
    return torch.cat(out), "other_case"


def _space(samples: torch.Tensor, train: torch.Tensor, case_index: np.ndarray, threshold: float,
           max_reference: int | None, seed: int, chunk_size: int) -> SpaceResult:
    dist, idx = nearest_neighbours(samples, train, chunk_size=chunk_size)
    ref, kind = _reference(train, case_index, max_reference=max_reference, seed=seed, chunk_size=chunk_size)
    scale = float(ref.median())
    if scale <= 0:
        raise DataError("the median real-to-real nearest-neighbour distance is 0 (duplicated slices across cases): "
                        "deduplicate the prepared data before the memorisation check")
    ratios = dist / scale
    sorted_ref = ref.sort().values
    percentiles = torch.searchsorted(sorted_ref, dist, right=True).double() / sorted_ref.numel()
    return SpaceResult(dist, idx, ratios, percentiles, ratios <= threshold, ref, scale, kind)


@torch.no_grad()
def memorisation_check_by_case(samples: torch.Tensor, train: torch.Tensor, case_index: np.ndarray, *,
                               threshold: float = 1.0 / 3.0,
                               feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                               max_reference: int | None = 2000, seed: int = 0,
                               chunk_size: int = 2048) -> MemorisationByCase:
    """Nearest training slice of each synthetic slice against the other-case reference (module docstring).

    ``samples`` ``(M, H, W)`` and ``train`` ``(N, H, W)`` on the same scale (windowed CT in [0, 1]);
    ``case_index`` ``(N,)`` the case of each training slice. ``feature_fn`` maps ``(B, 1, H, W)`` to features.
    """
    if threshold <= 0:
        raise PipelineError(f"the memorisation threshold must be > 0, got {threshold}")
    samples, train = torch.as_tensor(samples).float(), torch.as_tensor(train).float()
    case_index = np.asarray(case_index)
    if samples.shape[1:] != train.shape[1:]:
        raise PipelineError(f"synthetic slices {tuple(samples.shape[1:])} and training slices "
                            f"{tuple(train.shape[1:])} differ in size: prepare with the model's data config")
    if len(case_index) != len(train):
        raise ValueError("case_index needs one entry per training slice")
    args = (threshold, max_reference, seed, chunk_size)
    pixel = _space(_flat(samples), _flat(train), case_index, *args)
    feature = None
    if feature_fn is not None:
        from pancreas_gvae.evaluation.metrics.feature_nets import extract_features

        def feats(x: torch.Tensor) -> torch.Tensor:
            return extract_features(feature_fn, x[:, None], batch_size=256)

        feature = _space(feats(samples), feats(train), case_index, *args)
    near = pixel.near_copy | feature.near_copy if feature is not None else pixel.near_copy
    return MemorisationByCase(pixel, feature, near, threshold)


def memorisation_histogram(result: MemorisationByCase, path: str | Path) -> Path:
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
