"""A slice-set patient read into a pseudo-volume (:func:`read_slice_case` -> :class:`SliceStack`).

The layout, the assumed geometry and the drop-a-bad-slice rules are described in
:mod:`pancreas_gvae.data.ct.slice_sets`, which finds the patients and their slices; this module reads them.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pancreas_gvae.data.ct.checks import CaseExcluded, check_finite
from pancreas_gvae.data.ct.config import DataConfig

log = logging.getLogger(__name__)

# RGB channels of a gray image may differ by JPEG rounding; more than this (in stored units) is a colour image.
GRAY_TOLERANCE = 2.0
NOMINAL_SLICE_MM = 1.0  # the slice axis of a pseudo-volume: nominal, the slices are not adjacent


@dataclass
class SliceStack:
    """What :func:`read_slice_case` made of a patient: the pseudo-volume, or why there is none."""

    image: np.ndarray | None = None  # (H, W, n) float32 as stored (display values or HU)
    label: np.ndarray | None = None  # (H, W, n) uint8 0/1, None for an image-only patient
    affine: np.ndarray | None = None  # (row, col, slice) -> RAS mm (assumed, see the module docstring)
    names: list[str] = field(default_factory=list)  # the slices used, in stack order
    notes: list[str] = field(default_factory=list)
    excluded: CaseExcluded | None = None


def _read_array(path: Path, *, mask: bool) -> np.ndarray:
    """The stored array of a PNG / JPEG / .npy file; ``unreadable_file`` / ``truncated_file`` when it cannot be."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            if im.mode == "P" and not mask:
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            return np.asarray(im)
    except Exception as err:  # noqa: BLE001 - PIL and numpy raise many types for a bad file
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        code = "truncated_file" if "truncated" in text.lower() else "unreadable_file"
        raise CaseExcluded(code, f"cannot read {path.name}: {type(err).__name__}: {text}"[:200]) from None


def to_gray(arr: np.ndarray, what: str) -> np.ndarray:
    """A 2D array: ``(H, W, 1)`` squeezed, gray+alpha / RGB(A) with equal channels read as gray, alpha dropped.

    RGB whose channels differ by more than :data:`GRAY_TOLERANCE` is a colour image (``not_grayscale``);
    anything else that is not 2D, or not numeric, is ``unreadable_file``.
    """
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise CaseExcluded("unreadable_file", f"{what} is not a numeric image (dtype {arr.dtype})")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    elif arr.ndim == 3 and arr.shape[-1] == 2:  # gray + alpha
        arr = arr[..., 0]
    elif arr.ndim == 3 and arr.shape[-1] in (3, 4):  # RGB(A): gray when the three channels agree
        rgb = arr[..., :3].astype(np.float32)
        diff = float(max(np.abs(rgb[..., 0] - rgb[..., 1]).max(), np.abs(rgb[..., 0] - rgb[..., 2]).max()))
        if not diff <= GRAY_TOLERANCE:
            raise CaseExcluded("not_grayscale", f"{what} is a colour image: its RGB channels differ by up to "
                                                f"{diff:g} (CT slices are gray)")
        arr = rgb.mean(axis=-1) if diff else arr[..., 0]
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise CaseExcluded("unreadable_file", f"{what} is not a 2D image: shape {tuple(arr.shape)}")
    return arr


def read_slice_image(path: Path) -> tuple[np.ndarray, bool]:
    """A 2D image as float32 (gray), and whether it was stored with 8 bits."""
    raw = _read_array(path, mask=False)
    gray = to_gray(raw, path.name)
    out = gray.astype(np.float32)
    check_finite(out, f"image {path.name}")
    return out, raw.dtype == np.uint8


def read_slice_mask(path: Path, values: list[int] | None) -> np.ndarray:
    """A 2D mask as uint8 0/1: any nonzero value (``values`` None) or one of ``values`` is pancreas."""
    gray = to_gray(_read_array(path, mask=True), path.name)
    if np.issubdtype(gray.dtype, np.floating):
        check_finite(gray, f"mask {path.name}")
    if values is None:
        return (gray != 0).astype(np.uint8)
    rounded = np.rint(gray) if np.issubdtype(gray.dtype, np.floating) else gray
    return np.isin(rounded, [int(v) for v in values]).astype(np.uint8)


def slice_affine(pixel_mm: float, rows_towards: str = "posterior") -> np.ndarray:
    """(row, col, slice) -> RAS mm: rows run towards ``rows_towards`` (radiological display: posterior; a set
    published upside down, table at the top: anterior), columns to the patient's left, slices to superior
    (nominal spacing). The store's reorientation then shows every set the same way up."""
    px = float(pixel_mm)
    row_y = -px if rows_towards == "posterior" else px
    return np.array([[0.0, -px, 0.0, 0.0], [row_y, 0.0, 0.0, 0.0], [0.0, 0.0, NOMINAL_SLICE_MM, 0.0],
                     [0.0, 0.0, 0.0, 1.0]])


def _dropped_note(dropped: list[tuple[str, str, str]], total: int) -> str:
    items = ", ".join(f"{name} ({code}: {detail})" for name, code, detail in dropped)
    return f"dropped_slices: {len(dropped)} of {total}: {items}"


def read_slice_case(case, cfg: DataConfig, *, has_label: bool) -> SliceStack:
    """Read, check and stack a patient's slices; bad slices are dropped (noted), the rest stacked in order.

    ``excluded`` is set (and ``image`` None) when no usable slice remains, when the slices differ in size, or
    when 8-bit display images are declared as HU; the notes are kept either way.
    """
    s = cfg.slice_set
    out = SliceStack()
    kept_img: list[np.ndarray] = []
    kept_lab: list[np.ndarray] = []
    dropped: list[tuple[str, str, str]] = []
    eight_bit = []
    for src in case.slices:
        if src.problem is not None:
            dropped.append((src.name, *src.problem))
            continue
        if has_label and src.mask is None:
            dropped.append((src.name, "missing_label", src.mask_problem or "no mask"))
            continue
        try:
            image, bits8 = read_slice_image(src.image)
            if has_label:
                mask = read_slice_mask(src.mask, s.mask_values)
                if mask.shape != image.shape:
                    raise CaseExcluded("label_extent_mismatch", f"mask {src.mask.name} is "
                                       f"{'x'.join(map(str, mask.shape))}, the image "
                                       f"{'x'.join(map(str, image.shape))}")
                kept_lab.append(mask)
        except CaseExcluded as err:
            dropped.append((src.name, err.reason, err.detail))
            continue
        kept_img.append(image)
        eight_bit.append(bits8)
        out.names.append(src.name)
    total = len(case.slices)
    if dropped:
        out.notes.append(_dropped_note(dropped, total))
    if not kept_img:
        counts = Counter(code for _, code, _ in dropped)
        code = counts.most_common(1)[0][0] if counts else "no_image"
        summary = ", ".join(f"{n} {c}" for c, n in counts.most_common())
        out.excluded = CaseExcluded(code, f"no usable slice: {len(dropped)} of {total} dropped ({summary})")
        return out
    sizes = Counter(img.shape for img in kept_img)
    if len(sizes) > 1:
        listed = ", ".join(f"{'x'.join(map(str, shape))} ({n})" for shape, n in sizes.most_common())
        out.excluded = CaseExcluded("slice_size_mismatch", f"slices of {len(sizes)} sizes: {listed}; one "
                                                           f"patient's slices must share one size and pixel size")
        out.names = []
        return out
    if cfg.preprocess.input_intensity.kind == "hu" and all(eight_bit):
        out.excluded = CaseExcluded(
            "implausible_hu", "8-bit images read as HU (preprocess.input_intensity.kind: hu); declare their display "
                              "values (kind: display, e.g. configs/data/nih_slices.yaml; docs/data.md)")
        out.names = []
        return out
    out.image = np.stack(kept_img, axis=-1)
    if has_label:
        out.label = np.stack(kept_lab, axis=-1)
        empty = int(sum(not m.any() for m in kept_lab))
        if empty:
            out.notes.append(f"slices_without_pancreas: {empty} of {len(kept_lab)}")
    out.affine = slice_affine(s.pixel_mm, s.rows_towards)
    return out
