r"""Realism of the mask channel of synthetic (image, mask) slices against real ones (issue 11 §2).

The image metrics (:mod:`.mmd`, :mod:`.fidelity`, ...) look at the CT channel; these look at the label
every synthetic slice carries. Inputs are tensors or arrays ``(N, 1, H, W)`` (or ``(N, H, W)``): images in
the ``[0, 1]`` CT window, masks 0/1 (soft masks are thresholded at 0.5, ``mask > 0.5``).

* :func:`mask_share` - the share of slices carrying a pancreas (at least ``min_area`` mask pixels).
* :func:`mask_shape_features` - one row per slice with pancreas: ``area`` (pixels; ``area_mm2`` with
  ``pixel_mm``), ``solidity``, ``eccentricity``, ``components``.
* :func:`mask_shape_distance` - per feature the 1-D Wasserstein distance (``scipy.stats.wasserstein_distance``)
  between the real and the fake feature distributions, divided by the real feature's spread, and their
  mean, ``mask/shape_score`` (0 for identical sets, larger is worse).
* :func:`intensity_under_mask_distance` - the Wasserstein distance between the CT values under the real
  masks and under the fake masks (pooled pixels), in window units.
* :func:`mask_scores` - all of it as one flat ``dict[str, float]`` for MLflow.

**Multi-component masks.** The shape features treat a slice's mask as **one region** (``regionprops`` on
the binary mask, not on its labelled components): ``solidity`` = mask area / area of the convex hull of
the *union* of its components, ``eccentricity`` from the second moments of the union (the ellipse with
the same second moments), ``area`` = all mask pixels. ``components`` counts the 8-connected components
(``skimage.measure.label(connectivity=2)``), so a speckled or split mask shows up twice: as more
components and as a lower solidity (the hull of scattered pieces is mostly empty). The pancreas often
appears as two or three pieces on one axial slice (head and tail), so this is a property to match, not
an error.

**Normalisation.** Each feature's distance is divided by the real feature's interquartile range (robust
to the long tail of areas); where that is 0 (e.g. every real slice has one component) by the real
standard deviation; where that is 0 too, by 1 (the feature's own unit). A normalised distance of 1 means
"the fake distribution is shifted by about one real IQR": the four features become comparable and are
averaged into ``mask/shape_score``. Normalised distances do not depend on ``pixel_mm``.

**Empty sets.** If no fake (or no real) slice has a mask, the shape distances are NaN and
``mask/no_fake_mask`` (``mask/no_real_mask``) is 1.0 - a generator that never draws a pancreas is
reported, not raised on. The intensity distance is NaN likewise.

Scale: 256 vs 256 slices of 64 x 64 take tens of milliseconds on one CPU core (``regionprops`` per slice).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
import torch

__all__ = [
    "SHAPE_FEATURES",
    "as_binary_masks",
    "intensity_under_mask_distance",
    "mask_scores",
    "mask_shape_distance",
    "mask_shape_features",
    "mask_share",
    "robust_scale",
]

SHAPE_FEATURES: tuple[str, ...] = ("area", "solidity", "eccentricity", "components")
DEFAULT_MAX_PIXELS = 50_000


def _as_array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    a = np.asarray(x)
    if a.ndim == 4:
        if a.shape[1] != 1:
            raise ValueError(f"{name}: expected (N, 1, H, W), got shape {a.shape}")
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"{name}: expected (N, 1, H, W) or (N, H, W), got shape {a.shape}")
    return a


def as_binary_masks(masks, name: str = "masks") -> np.ndarray:
    """``(N, H, W)`` bool masks from ``(N, 1, H, W)`` / ``(N, H, W)`` tensors or arrays (``> 0.5``)."""
    return _as_array(masks, name) > 0.5


def _areas(m: np.ndarray) -> np.ndarray:
    return m.reshape(m.shape[0], -1).sum(1)


def mask_share(masks, *, min_area: int = 1) -> float:
    """Share of slices whose mask holds at least ``min_area`` pixels (NaN for an empty set)."""
    m = as_binary_masks(masks)
    if m.shape[0] == 0:
        return math.nan
    return float((_areas(m) >= min_area).mean())


def mask_shape_features(masks, *, min_area: int = 1, pixel_mm: float | None = None) -> pd.DataFrame:
    """One row per slice with at least ``min_area`` mask pixels.

    Columns: ``index`` (slice index in ``masks``), ``area`` (pixels), ``area_mm2`` (only with ``pixel_mm``,
    square pixels of that side), ``solidity``, ``eccentricity`` (the mask as one region: convex hull and
    second moments of the union of its components), ``components`` (8-connected).
    """
    from skimage.measure import label, regionprops

    m = as_binary_masks(masks)
    areas = _areas(m)
    rows = []
    for i in np.flatnonzero(areas >= max(1, min_area)):
        sl = m[i]
        region = regionprops(sl.astype(np.uint8))[0]  # the whole mask as one region (label 1)
        n_comp = int(label(sl, connectivity=2).max())
        rows.append((int(i), float(areas[i]), float(region.solidity), float(region.eccentricity), float(n_comp)))
    df = pd.DataFrame(rows, columns=["index", *SHAPE_FEATURES])
    df["index"] = df["index"].astype(int)
    if pixel_mm is not None:
        df.insert(2, "area_mm2", df["area"] * float(pixel_mm) ** 2)
    return df


def robust_scale(values: Sequence[float] | np.ndarray) -> float:
    """The spread used to normalise a feature's distance: IQR, else standard deviation, else 1."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return 1.0
    q1, q3 = np.percentile(v, [25, 75])
    if q3 - q1 > 1e-12:
        return float(q3 - q1)
    sd = float(v.std())
    return sd if sd > 1e-12 else 1.0


def _feature_frame(x, min_area: int) -> pd.DataFrame:
    return x if isinstance(x, pd.DataFrame) else mask_shape_features(x, min_area=min_area)


def mask_shape_distance(real_masks, fake_masks, *, min_area: int = 1) -> dict[str, float]:
    """Normalised 1-D Wasserstein distance per shape feature, and their mean ``mask/shape_score``.

    ``real_masks`` / ``fake_masks``: mask tensors, or frames from :func:`mask_shape_features` (reused to
    avoid computing them twice). Keys: ``mask/{area,solidity,eccentricity,components}_w1`` (divided by the
    real feature's :func:`robust_scale`), ``mask/shape_score``, ``mask/no_fake_mask``, ``mask/no_real_mask``
    (1.0 / 0.0 flags; with either set, every distance is NaN).
    """
    from scipy.stats import wasserstein_distance

    real, fake = _feature_frame(real_masks, min_area), _feature_frame(fake_masks, min_area)
    out: dict[str, float] = {"mask/no_fake_mask": float(len(fake) == 0), "mask/no_real_mask": float(len(real) == 0)}
    dists = []
    for f in SHAPE_FEATURES:
        if len(real) and len(fake):
            d = wasserstein_distance(real[f].to_numpy(), fake[f].to_numpy()) / robust_scale(real[f].to_numpy())
        else:
            d = math.nan
        out[f"mask/{f}_w1"] = float(d)
        dists.append(d)
    out["mask/shape_score"] = float(np.mean(dists)) if len(real) and len(fake) else math.nan
    return out


def _pixels_under(images, masks, name: str) -> np.ndarray:
    img = _as_array(images, f"{name}_images")
    m = as_binary_masks(masks, f"{name}_masks")
    if img.shape != m.shape:
        raise ValueError(f"{name}: images {img.shape} and masks {m.shape} differ in shape")
    return img[m].astype(np.float64)


def _subsample(v: np.ndarray, max_pixels: int, rng: np.random.Generator) -> np.ndarray:
    return v if v.size <= max_pixels else rng.choice(v, size=max_pixels, replace=False)


def intensity_under_mask_distance(real_images, real_masks, fake_images, fake_masks, *,
                                  max_pixels: int = DEFAULT_MAX_PIXELS, seed: int = 0) -> float:
    """Wasserstein distance between the image values under the real and under the fake masks.

    Pixels are pooled over all slices, and each side is subsampled (without replacement, ``seed``) to at
    most ``max_pixels``. In image units (``[0, 1]`` window; multiply by the window width for HU). NaN if
    either side has no mask pixel.
    """
    from scipy.stats import wasserstein_distance

    r = _pixels_under(real_images, real_masks, "real")
    f = _pixels_under(fake_images, fake_masks, "fake")
    if r.size == 0 or f.size == 0:
        return math.nan
    rng = np.random.default_rng(seed)
    return float(wasserstein_distance(_subsample(r, max_pixels, rng), _subsample(f, max_pixels, rng)))


def mask_scores(real_images, real_masks, fake_images, fake_masks, *, pixel_mm: float | None = None,
                min_area: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS, seed: int = 0) -> dict[str, float]:
    """Every mask metric as one flat dict of floats (MLflow-ready; NaN where undefined).

    Keys: ``mask/n_real``, ``mask/n_fake``, ``mask/n_real_with_mask``, ``mask/n_fake_with_mask``,
    ``mask/share_real``, ``mask/share_fake``, the shape distances and flags of :func:`mask_shape_distance`,
    ``mask/area_median_{real,fake}_px`` (and ``..._mm2`` with ``pixel_mm``), ``mask/components_mean_{real,fake}``,
    ``mask/intensity_w1`` (:func:`intensity_under_mask_distance`), ``mask/intensity_mean_{real,fake}`` (mean
    image value under the masks, window units: the sign of the shift).
    """
    rm, fm = as_binary_masks(real_masks, "real_masks"), as_binary_masks(fake_masks, "fake_masks")
    real_f = mask_shape_features(rm, min_area=min_area)
    fake_f = mask_shape_features(fm, min_area=min_area)
    out: dict[str, float] = {
        "mask/n_real": float(rm.shape[0]),
        "mask/n_fake": float(fm.shape[0]),
        "mask/n_real_with_mask": float(len(real_f)),
        "mask/n_fake_with_mask": float(len(fake_f)),
        "mask/share_real": mask_share(rm, min_area=min_area),
        "mask/share_fake": mask_share(fm, min_area=min_area),
    }
    out.update(mask_shape_distance(real_f, fake_f))
    for side, f in (("real", real_f), ("fake", fake_f)):
        med = float(f["area"].median()) if len(f) else math.nan
        out[f"mask/area_median_{side}_px"] = med
        if pixel_mm is not None:
            out[f"mask/area_median_{side}_mm2"] = med * float(pixel_mm) ** 2
        out[f"mask/components_mean_{side}"] = float(f["components"].mean()) if len(f) else math.nan
    out["mask/intensity_w1"] = intensity_under_mask_distance(real_images, rm, fake_images, fm,
                                                             max_pixels=max_pixels, seed=seed)
    for side, img, m in (("real", real_images, rm), ("fake", fake_images, fm)):
        px = _pixels_under(img, m, side)
        out[f"mask/intensity_mean_{side}"] = float(px.mean()) if px.size else math.nan
    return out
