"""The preprocessed store: one folder per case with memory-mappable arrays.

Layout (``OUT/cache/<case_id>/``)::

    image.npy   (slices, rows, cols) float16 (or float32), HU window scaled to [0, 1]
    label.npy   (slices, rows, cols) uint8 0/1 pancreas mask; absent for an image-only case (has_label false)
    meta.json   config_hash, source fingerprint, has_label, affine, spacing, per-slice pancreas voxel counts,
                manifest row

Axes are (S, P, L): slice 0 is the most caudal, rows run anterior -> posterior and columns patient right ->
left, i.e. each ``image[k]`` is an axial slice in the usual radiological display. ``affine`` maps
(slice, row, col) indices to RAS mm. Arrays are stored slice-major and uncompressed so that a dataset
reads one slice from a memory map without loading the volume. ``meta.json`` is written last: a folder
without it is an interrupted write and is redone.

A case is written into a temporary folder unique to the process (``.<case_id>.tmp-<pid>-<random>``) and
renamed into place; a folder it replaces (or removes) is first renamed aside (``.<case_id>.trash-...``), so
no reader ever sees half a case. Both kinds of leftovers of a killed run are removed by
:func:`clean_orphans` (called under the output folder's lock).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

CACHE_DIRNAME = "cache"
META_NAME = "meta.json"
STORE_AXES = ("S", "P", "L")
TMP_MARK, TRASH_MARK = ".tmp-", ".trash-"


@dataclass
class CachedCase:
    case_id: str
    image: np.ndarray  # (slices, rows, cols), memory-mapped unless loaded with mmap=False
    label: np.ndarray  # all zero (a read-only broadcast view) for an image-only case
    affine: np.ndarray  # (slice, row, col, 1) -> RAS mm
    spacing: tuple[float, float, float]  # mm along (slice, row, col)
    slice_voxels: np.ndarray  # pancreas voxels per slice
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def pancreas_slices(self) -> np.ndarray:
        return np.flatnonzero(self.slice_voxels)

    @property
    def has_label(self) -> bool:
        return bool(self.meta.get("has_label", True))


def cache_root(out_or_cache_dir: str | Path) -> Path:
    """Accept the prepare output folder or its ``cache/`` sub-folder."""
    p = Path(out_or_cache_dir)
    return p / CACHE_DIRNAME if (p / CACHE_DIRNAME).is_dir() else p


def case_dir(root: str | Path, case_id: str) -> Path:
    return Path(root) / case_id


def to_store_layout(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a 3D array with ``affine`` to the (S, P, L) store axes; returns (array view, its affine)."""
    src = nib.orientations.io_orientation(affine)
    dst = nib.orientations.axcodes2ornt(STORE_AXES)
    transform = nib.orientations.ornt_transform(src, dst)
    out = nib.orientations.apply_orientation(volume, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, volume.shape)
    return out, new_affine


def _unique() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_cached_case(root: str | Path, case_id: str) -> None:
    """Remove a case folder: renamed aside first (one atomic step for readers), then deleted."""
    final = case_dir(root, case_id)
    trash = final.with_name(f".{case_id}{TRASH_MARK}{_unique()}")
    try:
        os.replace(final, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def clean_orphans(root: str | Path) -> list[str]:
    """Remove the temporary and renamed-aside folders (and meta files) a killed run left in the cache.

    Only safe while no other run writes to ``root``: the caller holds the output folder's lock.
    Returns the names removed.
    """
    root = Path(root)
    removed = []
    for p in [*root.glob(f".*{TMP_MARK}*"), *root.glob(f".*{TRASH_MARK}*"), *root.glob(f"*/.{META_NAME}{TMP_MARK}*")]:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(str(p.relative_to(root)))
    return removed


def save_cached_case(root: str | Path, case_id: str, image: np.ndarray, label: np.ndarray | None,
                     affine: np.ndarray, meta: dict[str, Any], *, dtype: str = "float16") -> dict[str, Any]:
    """Write one case (3D ``image`` in [0, 1] and ``label`` on the same grid with ``affine``) atomically.

    ``label=None``: an image-only case, stored without ``label.npy`` (``has_label: false``, no pancreas slices).
    Returns the stored meta (``shape``, ``spacing``, ``affine``, ``slice_voxels`` added to ``meta``).
    """
    img, store_affine = to_store_layout(np.asarray(image), np.asarray(affine, dtype=np.float64))
    img = np.ascontiguousarray(img, dtype=np.dtype(dtype))
    if label is not None:
        lab, _ = to_store_layout(np.asarray(label), np.asarray(affine, dtype=np.float64))
        lab = np.ascontiguousarray(lab > 0, dtype=np.uint8)
        slice_voxels = lab.reshape(lab.shape[0], -1).sum(axis=1)
    else:
        lab, slice_voxels = None, np.zeros(img.shape[0], dtype=np.int64)
    spacing = np.linalg.norm(store_affine[:3, :3], axis=0)

    final = case_dir(root, case_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{case_id}{TMP_MARK}{os.getpid()}-", dir=final.parent))
    try:
        np.save(tmp / "image.npy", img)
        if lab is not None:
            np.save(tmp / "label.npy", lab)
        full_meta = {
            **meta,
            "case_id": case_id,
            "has_label": lab is not None,
            "shape": list(img.shape),
            "axes": "".join(STORE_AXES),
            "affine": np.round(store_affine, 6).tolist(),
            "spacing": [round(float(s), 6) for s in spacing],
            "slice_voxels": [int(v) for v in slice_voxels],
        }
        (tmp / META_NAME).write_text(json.dumps(full_meta, indent=1))
        remove_cached_case(root, case_id)  # an older entry: renamed aside, so the rename below cannot fail
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return full_meta


def update_cache_meta(root: str | Path, case_id: str, **fields: Any) -> None:
    """Add fields to a case's ``meta.json`` (write to a temporary file, then rename: never half-written)."""
    path = case_dir(root, case_id) / META_NAME
    meta = {**json.loads(path.read_text()), **fields}
    tmp = path.with_name(f".{META_NAME}{TMP_MARK}{_unique()}")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path)


def read_cache_meta(root: str | Path, case_id: str) -> dict[str, Any] | None:
    """The stored meta of a complete cache entry, or None (absent, interrupted or unreadable)."""
    folder = case_dir(root, case_id)
    try:
        meta = json.loads((folder / META_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not (folder / "image.npy").is_file() or (meta.get("has_label", True) and not (folder / "label.npy").is_file()):
        return None
    return meta


def load_cached_case(path: str | Path, *, mmap: bool = True) -> CachedCase:
    """Open one case folder (``OUT/cache/<case_id>``); arrays are memory-mapped unless ``mmap=False``."""
    path = Path(path)
    meta = json.loads((path / META_NAME).read_text())
    mode = "r" if mmap else None
    image = np.load(path / "image.npy", mmap_mode=mode)
    if meta.get("has_label", True):
        label = np.load(path / "label.npy", mmap_mode=mode)
    else:  # image-only: an all-zero mask that costs no memory
        label = np.broadcast_to(np.zeros((), dtype=np.uint8), image.shape)
    return CachedCase(
        case_id=meta["case_id"],
        image=image,
        label=label,
        affine=np.asarray(meta["affine"], dtype=np.float64),
        spacing=tuple(meta["spacing"]),
        slice_voxels=np.asarray(meta["slice_voxels"], dtype=np.int64),
        meta=meta,
    )


def case_as_dict(path: str | Path) -> dict[str, Any]:
    """A cached case as a MONAI-style dict of ``(1, slices, rows, cols)`` float32 tensors (for patch sampling)."""
    case = load_cached_case(path, mmap=False)
    return {
        "image": torch.from_numpy(case.image.astype(np.float32))[None],
        "label": torch.from_numpy(case.label.astype(np.float32))[None],
        "case_id": case.case_id,
        "has_label": case.has_label,
    }
