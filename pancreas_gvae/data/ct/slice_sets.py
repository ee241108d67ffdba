"""The 2D slice-set layout (``--layout slices``): cohorts published as 2D slices, not volumes (docs/data.md).

A slice set is a folder of 2D images (PNG, JPEG, ``.npy``) with masks of the same stem, and a patient key per
slice: a column of a manifest CSV (``slice_set.manifest``, ``patient_column``, ``slice_column``, optional
``order_column``, optional ``image_column`` / ``mask_column`` with paths), or else group 1 of
``slice_set.patient_pattern`` on the file stem. The NIH Pancreas-CT 2D set fits the defaults::

    DIR/images/PANCREAS_0001-1106.jpg    8-bit display values (RGB with equal channels = gray)
    DIR/masks/PANCREAS_0001-1106.png     0/255 (any nonzero = pancreas, or slice_set.mask_values)
    DIR/manifest.csv                     slice,patient,source_index,...

**One case per patient**: its slices, ordered by the order column (else by name), are stacked into a
pseudo-volume ``(H, W, n)`` (read by :mod:`pancreas_gvae.data.ct.slice_stacks`) that goes through the same chain, checks and cache as the volume layouts, so the
slice dataset reads it unchanged. The affine is an assumption, since such sets store no geometry: rows run
anterior -> posterior and columns patient right -> left (the radiological display the images are published
in), ``slice_set.pixel_mm`` in-plane, and a nominal ``NOMINAL_SLICE_MM`` along the slice axis, which
means nothing: the slices of one patient are not neighbours (``context_slices`` and resampling across slices
are refused).

**A bad slice is dropped, not the patient**: an unreadable or non-2D file, a colour image, a missing mask
(labels required), a mask of another shape, NaN values: the slice is left out and named in the patient's
``notes`` (``dropped_slices: ...``); the patient goes on with the slices that remain. A patient with no usable
slice is excluded with the commonest reason of its slices (the reason says how many of which, never the slice
names: the ``reason`` column is shareable, ``notes`` and ``source_slices`` are not). Slices of one patient must
share one size (``slice_size_mismatch``: the patient is excluded, no slice can be said to be the odd one).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path


from pancreas_gvae.data.ct.cases import CaseSource
from pancreas_gvae.data.ct.config import DataConfig, SliceSetConfig
from pancreas_gvae.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")
MASK_SUFFIXES = (".png", ".npy")
LOSSY_SUFFIXES = (".jpg", ".jpeg")
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]")


@dataclass
class SliceSource:
    """One slice of a patient: its stem, image and mask files, order value and a problem known from names."""

    name: str
    image: Path | None
    mask: Path | None
    order: float | None = None
    problem: tuple[str, str] | None = None  # (reason code, detail): the slice is dropped
    mask_problem: str = ""  # why no mask was found (missing_label's detail)


# ----------------------------------------------------------------------------- discovery


def _settings(cfg: SliceSetConfig | DataConfig | None) -> SliceSetConfig:
    if cfg is None:
        return SliceSetConfig()
    return cfg.slice_set if isinstance(cfg, DataConfig) else cfg


def _files_by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return found
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes:
            found.setdefault(p.stem, []).append(p)
    return found


def _manifest_header(path: Path) -> list[str]:
    try:
        with path.open(newline="") as handle:
            return next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def is_slice_set(root: str | Path, cfg: SliceSetConfig | DataConfig | None = None) -> bool:
    """``images/`` and ``masks/`` folders with 2D image files, or a slice manifest with image and mask columns."""
    s, root = _settings(cfg), Path(root)
    images, masks = root / s.images, root / s.masks
    if images.is_dir() and masks.is_dir() and any(
            p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") for p in images.iterdir()):
        return True
    if s.manifest and (root / s.manifest).is_file():
        header = _manifest_header(root / s.manifest)
        return {s.patient_column, s.image_column, s.mask_column} <= set(header)
    return False


def natural_key(name: str) -> list:
    """``a-9`` before ``a-10``: digit runs compare as numbers."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def _safe_case_id(patient: str) -> str:
    """A patient key as a cache folder name: no path separators, no leading dot."""
    return _SAFE_ID.sub("_", patient).lstrip(".") or "patient"


def _one(paths: list[Path], what: str) -> tuple[Path | None, str]:
    if len(paths) <= 1:
        return (paths[0] if paths else None), ""
    return None, f"several {what} files, none chosen: {', '.join(p.name for p in paths)}"


def _mask_for(stem: str, masks: dict[str, list[Path]], masks_name: str) -> tuple[Path | None, str]:
    paths = masks.get(stem, [])
    usable = [p for p in paths if p.suffix.lower() in MASK_SUFFIXES]
    if usable:
        return _one(usable, "mask")
    if paths:
        return None, f"only a JPEG mask ({paths[0].name}; lossy, give PNG or .npy)"
    return None, f"no mask {stem}.png/.npy in {masks_name}/"


def _rows_from_manifest(root: Path, s: SliceSetConfig, images: dict[str, list[Path]], masks: dict[str, list[Path]],
                        masks_name: str) -> list[tuple[str, SliceSource]]:
    path = root / str(s.manifest)
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read the slice manifest {path.name}: {err}") from None
    header = set(rows[0]) if rows else set(_manifest_header(path))
    missing = [c for c in (s.patient_column, s.slice_column) if c not in header]
    if s.slice_column in missing and s.image_column in header:
        missing.remove(s.slice_column)  # the image path names the slice
    if missing:
        raise DataError(f"the slice manifest {path.name} has no column {', '.join(repr(c) for c in missing)} "
                        f"(slice_set.patient_column / slice_column); its columns: {', '.join(sorted(header))}")
    order_col = s.order_column if s.order_column and s.order_column in header else None
    if s.order_column and order_col is None:
        log.info("slice manifest %s has no column %r: slices ordered by name", path.name, s.order_column)
    out, listed, blank = [], set(), 0
    for row in rows:
        patient = (row.get(s.patient_column) or "").strip()
        image_rel = (row.get(s.image_column) or "").strip() if s.image_column in header else ""
        name = (row.get(s.slice_column) or "").strip() if s.slice_column in header else ""
        if not name and image_rel:
            name = Path(image_rel).stem
        if Path(name).suffix.lower() in IMAGE_SUFFIXES:
            name = Path(name).stem
        if not patient or not name:
            blank += 1
            continue
        listed.add(name)
        src = SliceSource(name, None, None)
        if image_rel:
            src.image = root / image_rel
            if not src.image.is_file():
                src.image, src.problem = None, ("no_image", f"{Path(image_rel).name} (manifest) not found")
        else:
            src.image, why = _one(images.get(name, []), "image")
            if src.image is None:
                src.problem = ("ambiguous_image", why) if why else \
                    ("no_image", f"listed in {path.name}, no {name}.png/.jpg/.npy in {s.images}/")
        if s.mask_column in header:
            mask_rel = (row.get(s.mask_column) or "").strip()
            src.mask = root / mask_rel if mask_rel and (root / mask_rel).is_file() else None
            if src.mask is None:
                src.mask_problem = f"mask {Path(mask_rel).name} (manifest) not found" if mask_rel else \
                    "no mask in the manifest"
        else:
            src.mask, src.mask_problem = _mask_for(name, masks, masks_name)
        if order_col:
            try:
                src.order = float(row[order_col])
            except (TypeError, ValueError):
                src.order = None
        out.append((patient, src))
    if blank:
        log.warning("slice manifest %s: %d row(s) without a patient or slice name, ignored", path.name, blank)
    unlisted = sorted(set(images) - listed)
    if unlisted:
        log.warning("%d image(s) in %s/ are not in %s and are ignored (e.g. %s)", len(unlisted), s.images,
                    path.name, unlisted[0])
    return out


def _rows_from_pattern(s: SliceSetConfig, images: dict[str, list[Path]], masks: dict[str, list[Path]],
                       masks_name: str) -> list[tuple[str, SliceSource]]:
    pattern = re.compile(s.patient_pattern)
    out, unmatched = [], []
    for stem, paths in images.items():
        m = pattern.match(stem)
        if not m or not m.group(1):
            unmatched.append(stem)
            continue
        src = SliceSource(stem, None, None)
        src.image, why = _one(paths, "image")
        if src.image is None:
            src.problem = ("ambiguous_image", why)
        src.mask, src.mask_problem = _mask_for(stem, masks, masks_name)
        out.append((m.group(1), src))
    if unmatched:
        log.warning("%d image name(s) do not match slice_set.patient_pattern %r and are ignored (e.g. %s)",
                    len(unmatched), s.patient_pattern, unmatched[0])
    return out


def discover_slices(root: Path, labels_dir: Path | None, cfg: SliceSetConfig | DataConfig | None = None):
    """One :class:`~pancreas_gvae.data.ct.cases.CaseSource` (kind ``slices``) per patient; ``labels_dir`` (the
    ``--labels`` flag) replaces the masks folder. Returns ``(cases, masks folder)``."""

    s = _settings(cfg)
    images_dir = root / s.images
    masks_dir = labels_dir or root / s.masks
    images = _files_by_stem(images_dir, IMAGE_SUFFIXES)
    masks = _files_by_stem(masks_dir, MASK_SUFFIXES + LOSSY_SUFFIXES)
    manifest = root / s.manifest if s.manifest else None
    if manifest is not None and manifest.is_file():
        rows = _rows_from_manifest(root, s, images, masks, masks_dir.name)
        source = f"manifest {manifest.name}"
    else:
        if not images:
            raise DataError(f"no 2D images ({', '.join(IMAGE_SUFFIXES)}) in {images_dir} and no slice manifest "
                            f"(slice_set.images / slice_set.manifest)")
        rows = _rows_from_pattern(s, images, masks, masks_dir.name)
        source = f"patient_pattern {s.patient_pattern}"
    patients: dict[str, list[SliceSource]] = {}
    for patient, src in rows:
        patients.setdefault(patient, []).append(src)
    if not patients:
        raise DataError(f"no slices with a patient under {root} (from the {source})")
    cases = []
    for patient, slices in patients.items():
        slices.sort(key=lambda x: (x.order is None, x.order if x.order is not None else 0.0, natural_key(x.name)))
        case_id = _safe_case_id(patient)
        has_mask = any(x.mask is not None and x.problem is None for x in slices)
        label = (masks_dir if masks_dir.is_dir() else root) if has_mask else None
        case = CaseSource(case_id, "slices", images_dir if images_dir.is_dir() else root, "slices", label,
                          slices=slices)
        if case_id != patient:
            case.notes.append("patient key made file-safe for the case id")
        if label is None:
            case.label_missing = f"no mask for any of its {len(slices)} slice(s) in {masks_dir.name}/"
        cases.append(case)
    log.info("slice set: %d slice(s) of %d patient(s) (patients from the %s)", len(rows), len(cases), source)
    return sorted(cases, key=lambda c: c.case_id), masks_dir if masks_dir.is_dir() else None


def slice_fingerprint(case) -> str:
    """Names, order, sizes and mtimes of a patient's slice and mask files: a change redoes the patient."""
    h = hashlib.sha256()
    for src in case.slices:
        h.update(f"{src.name}|{src.order}|{src.problem}\n".encode())
        for p in (src.image, src.mask):
            if p is None:
                h.update(b"-\n")
                continue
            h.update(file_stamp(p))
    return h.hexdigest()[:16]


def file_stamp(path: Path) -> bytes:
    """Name, size and mtime of a file (``missing`` when it cannot be read), a line of a source fingerprint."""
    try:
        st = path.stat()
        return f"{path.name}|{st.st_size}|{st.st_mtime_ns}\n".encode()
    except OSError:
        return f"{path.name}|missing\n".encode()
