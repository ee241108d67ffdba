"""Per-case checks and the named reasons a case is excluded for.

Every check raises :class:`CaseExcluded` with one of the reason codes below; the preparation turns it into a
manifest row ``status=excluded, reason="<code>: <detail>"`` and carries on with the other cases.
"""

from __future__ import annotations

import math

import numpy as np

from pancreas_gvae.data.ct.config import CheckConfig
from pancreas_gvae.errors import DataError

# code -> what it means (docs/data.md lists the same table)
REASONS: dict[str, str] = {
    "duplicate_case": "a known duplicate (TCIA PANCREAS_0025 / 0070 repeat PANCREAS_0002)",
    "missing_label": "no label file found for the image",
    "no_image": "the case folder holds no DICOM or NIfTI image",
    "ambiguous_image": "several NIfTI images in one case folder, or two cases with one id",
    "unreadable_file": "a file cannot be parsed (not DICOM / not NIfTI / corrupt; a slice-set file that is not a "
                       "2D image)",
    "truncated_file": "a file ends before its pixel data does",
    "no_pixel_data": "a DICOM file of the chosen series has no Pixel Data element",
    "not_ct": "the series modality is not CT (e.g. MR)",
    "not_axial": "the slice normal is not within max_oblique_degrees of the S-I axis",
    "invalid_orientation": "DICOM ImageOrientationPatient is not two perpendicular unit vectors (e.g. a zero vector)",
    "degenerate_affine": "a NIfTI affine (image or label) is singular: a zero or collinear column, no voxel size",
    "sheared_geometry": "a NIfTI affine's voxel axes are not perpendicular (sheared beyond max_tilt_degrees)",
    "gantry_tilt": "slices are stacked at an angle to their normal (GantryDetectorTilt or sheared positions)",
    "duplicate_slices": "two slices at the same position",
    "missing_slices": "a gap between slices is a multiple of the slice interval",
    "non_uniform_spacing": "slice gaps differ from the median interval beyond slice_gap_tolerance",
    "inconsistent_slices": "slices of the chosen series differ in pixel spacing (or lack it)",
    "too_few_slices": "fewer slices than min_slices",
    "slice_size_mismatch": "the slices of one patient of a 2D slice set differ in size",
    "not_grayscale": "a 2D slice is a colour image (RGB channels that differ)",
    "non_finite_voxels": "NaN or infinite voxel values",
    "implausible_hu": "voxel values do not look like Hounsfield units (no air below -500 or nothing above 0), "
                      "or lie outside the declared display range",
    "label_extent_mismatch": "label and image cover different boxes in world space (other shape / extent)",
    "empty_label": "no (or too few) pancreas voxels after mapping the label values",
    "label_hu_check": "HU under the world-paired mask is not soft tissue (median range, air or fat fraction)",
    "error": "an unexpected error while preparing the case (message attached)",
}


class CaseExcluded(DataError):
    """One case cannot be used; ``reason`` is a code from :data:`REASONS`, ``detail`` says what was found."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown exclusion reason {reason!r}")
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def check_slice_positions(positions: np.ndarray, cfg: CheckConfig) -> float:
    """Slice interval from sorted positions along the normal; raises on duplicates, gaps or uneven spacing."""
    if len(positions) < max(cfg.min_slices, 2):
        raise CaseExcluded("too_few_slices", f"{len(positions)} slices, need at least {max(cfg.min_slices, 2)}")
    gaps = np.diff(positions)
    if np.any(gaps < 1e-3):
        k = int(np.argmax(gaps < 1e-3))
        raise CaseExcluded("duplicate_slices", f"two slices at position {positions[k]:.2f} mm")
    interval = float(np.median(gaps))
    ratio = gaps / interval
    tol = cfg.slice_gap_tolerance
    off = np.abs(ratio - 1.0) > tol
    if not off.any():
        return interval
    whole = np.abs(ratio - np.rint(ratio)) <= tol
    missing = off & whole & (np.rint(ratio) >= 2)
    if missing.any():
        n_missing = int((np.rint(ratio[missing]) - 1).sum())
        k = int(np.flatnonzero(missing)[0])
        raise CaseExcluded(
            "missing_slices",
            f"{n_missing} slice(s) missing (first gap {gaps[k]:.2f} mm between {positions[k]:.2f} and "
            f"{positions[k + 1]:.2f} mm; interval {interval:.3g} mm)",
        )
    k = int(np.argmax(np.abs(ratio - 1.0)))
    raise CaseExcluded(
        "non_uniform_spacing",
        f"gap {gaps[k]:.3g} mm vs median interval {interval:.3g} mm (tolerance {tol:.0%}); "
        f"{int(off.sum())} of {len(gaps)} gaps off",
    )


def angle_degrees(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two directions, ignoring their sign."""
    cos = abs(float(np.dot(a, b))) / (float(np.linalg.norm(a)) * float(np.linalg.norm(b)) + 1e-12)
    return math.degrees(math.acos(min(1.0, cos)))


def check_axial(normal: np.ndarray, cfg: CheckConfig) -> None:
    angle = angle_degrees(normal, np.array([0.0, 0.0, 1.0]))
    if angle > cfg.max_oblique_degrees:
        plane = "sagittal" if abs(normal[0]) > abs(normal[1]) else "coronal"
        if abs(normal[2]) >= max(abs(normal[0]), abs(normal[1])):
            plane = "oblique axial"
        raise CaseExcluded(
            "not_axial", f"slice normal {np.round(normal, 3).tolist()} is {angle:.1f} deg off axial ({plane})"
        )


def check_tilt(first: np.ndarray, last: np.ndarray, normal: np.ndarray, gantry_tilts: list[float],
               cfg: CheckConfig) -> None:
    """Slices must be stacked along their normal; a tilted gantry shears the stack."""
    tilt = max((abs(t) for t in gantry_tilts), default=0.0)
    if tilt > cfg.max_tilt_degrees:
        raise CaseExcluded("gantry_tilt", f"GantryDetectorTilt {tilt:g} deg")
    step = last - first
    if np.linalg.norm(step) > 1e-6:
        angle = angle_degrees(step, normal)
        if angle > cfg.max_tilt_degrees:
            raise CaseExcluded(
                "gantry_tilt", f"slice positions advance {angle:.1f} deg off the slice normal (sheared stack)"
            )


def check_orientation(iop: tuple[float, ...], cfg: CheckConfig) -> None:
    """ImageOrientationPatient must be two unit vectors at right angles (within ``max_tilt_degrees``)."""
    row, col = np.asarray(iop[:3], dtype=float), np.asarray(iop[3:], dtype=float)
    lengths = (float(np.linalg.norm(row)), float(np.linalg.norm(col)))
    if min(lengths) < 1e-6:
        raise CaseExcluded("invalid_orientation", f"ImageOrientationPatient {list(iop)} has a zero direction vector")
    angle = math.degrees(math.acos(max(-1.0, min(1.0, float(row @ col) / (lengths[0] * lengths[1])))))
    if max(abs(n - 1.0) for n in lengths) > 0.01 or abs(angle - 90.0) > cfg.max_tilt_degrees:
        raise CaseExcluded(
            "invalid_orientation",
            f"ImageOrientationPatient {list(iop)}: direction lengths {lengths[0]:.3g}, {lengths[1]:.3g} and "
            f"{angle:.1f} deg apart (unit vectors at 90 deg expected)",
        )


def check_affine(affine: np.ndarray, what: str, max_shear_degrees: float) -> None:
    """A voxel-to-world affine must be invertible with perpendicular voxel axes.

    A zero (or collinear) column has no voxel size or direction: ``degenerate_affine``. Axes off 90 degrees are
    a shear (e.g. a gantry tilt exported to NIfTI) that reorientation and resampling along the array axes would
    silently drop: ``sheared_geometry``.
    """
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.all(np.isfinite(m)):
        raise CaseExcluded("degenerate_affine", f"the {what} affine holds NaN/inf")
    lengths = np.linalg.norm(m, axis=0)
    det = float(np.linalg.det(m))
    if lengths.min() < 1e-6 or abs(det) < 1e-6 * float(np.prod(lengths)):
        raise CaseExcluded(
            "degenerate_affine",
            f"the {what} affine is singular (column lengths {', '.join(f'{v:.3g}' for v in lengths)} mm, "
            f"determinant {det:.3g}): no voxel size or direction",
        )
    dirs = m / lengths
    worst = max(abs(90.0 - math.degrees(math.acos(max(-1.0, min(1.0, float(dirs[:, a] @ dirs[:, b]))))))
                for a, b in ((0, 1), (0, 2), (1, 2)))
    if worst > max_shear_degrees:
        raise CaseExcluded(
            "sheared_geometry",
            f"the {what} affine's voxel axes are {worst:.1f} deg off perpendicular (max {max_shear_degrees:g}): "
            f"a sheared grid (e.g. gantry tilt) that resampling along the array axes would drop",
        )


def check_finite(array: np.ndarray, what: str) -> None:
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise CaseExcluded("non_finite_voxels", f"{bad} NaN/inf voxel(s) in the {what}")


def check_hu_scale(lo: float, hi: float, floor: float = float("-inf")) -> None:
    """Air below -500 HU and tissue above 0 HU; in data windowed to a ``floor`` above -500, air sits at the floor."""
    air = max(-500.0, floor)
    if lo > air + 1e-3 or hi < 0:
        where = "air < -500" if air == -500.0 else f"air at the window floor {floor:g}"
        raise CaseExcluded("implausible_hu", f"values span {lo:g}..{hi:g}; a CT in HU has {where} and tissue > 0")


def hu_outlier_note(arr: np.ndarray, lo: float, hi: float, allowed: list[float]) -> str | None:
    """A note when voxels lie far outside the CT range (e.g. 1e9 spikes); ``lo``/``hi`` are the array's range."""
    a, b = allowed
    if a <= lo and hi <= b:
        return None
    n = int(np.count_nonzero(arr < a) + np.count_nonzero(arr > b))
    return (f"hu_outliers: {n} voxel(s) outside [{a:g}, {b:g}] HU (range {lo:.4g}..{hi:.4g}); "
            f"kept, the HU window clips them")


def label_hu_stats(hu: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """HU statistics under a binary mask on the same grid (the pairing sanity check)."""
    if hu.flags.f_contiguous and mask.flags.f_contiguous and not hu.flags.c_contiguous:
        hu, mask = hu.T, mask.T  # index in memory order: boolean indexing walks C order
    values = hu[mask.astype(bool)]
    if values.size == 0:
        return {"label_voxels": 0, "label_median_hu": float("nan"), "label_air_fraction": float("nan"),
                "label_fat_fraction": float("nan")}
    return {
        "label_voxels": int(values.size),
        "label_median_hu": float(np.median(values)),
        "label_air_fraction": float(np.mean(values < -500)),
        "label_fat_fraction": float(np.mean(values < -50)),
    }


def check_label_hu(stats: dict[str, float], cfg: CheckConfig) -> None:
    """Contrast-enhanced pancreas is soft tissue; a mask on fat or air means the pairing is wrong.

    A statistic that is NaN was not measurable (windowed or display data, see ``CheckLabelHUd``) and is skipped.
    """
    n = stats["label_voxels"]
    if n < cfg.min_label_voxels:
        raise CaseExcluded("empty_label", f"{n} pancreas voxel(s) on the image grid (need {cfg.min_label_voxels})")
    lo, hi = cfg.label_median_hu
    med, air, fat = stats["label_median_hu"], stats["label_air_fraction"], stats["label_fat_fraction"]
    problems = []
    if not math.isnan(med) and not lo <= med <= hi:
        problems.append(f"median {med:.0f} HU outside [{lo:g}, {hi:g}]")
    if air > cfg.max_air_fraction:
        problems.append(f"{air:.1%} of voxels are air (< -500 HU; max {cfg.max_air_fraction:.0%})")
    if fat > cfg.max_fat_fraction:
        problems.append(f"{fat:.1%} of voxels are fat or air (< -50 HU; max {cfg.max_fat_fraction:.0%})")
    if problems:
        raise CaseExcluded("label_hu_check", "; ".join(problems) + " under the mask")
