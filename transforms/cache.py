"""The preprocessed store: one folder per case with memory-mappable arrays.

Layout (``OUT/cache/<case_id>/``)::

    image.npy   (slices, rows, cols) float16 (or float32), HU window scaled to [0, 1]
    label.npy   (slices, rows, cols) uint8 0/1 pancreas mask
    meta.json   config_hash, source fingerprint, affine, spacing, per-slice pancreas voxel counts, manifest row

Axes are (S, P, L): slice 0 is the most caudal, rows run anterior -> posterior and columns patient right ->
left, i.e. each ``image[k]`` is an axial slice in the usual radiological display. ``affine`` maps
(slice, row, col) indices to RAS mm. Arrays are stored slice-major and uncompressed so that a dataset
reads one slice from a memory map without loading the volume. ``meta.json`` is written last: a folder
without it is an interrupted write and is redone.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

CACHE_DIRNAME = "cache"
META_NAME = "meta.json"
STORE_AXES = ("S", "P", "L")


@dataclass
class CachedCase:
    case_id: str
    image: np.ndarray  # (slices, rows, cols), memory-mapped unless loaded with mmap=False
    label: np.ndarray
    affine: np.ndarray  # (slice, row, col, 1) -> RAS mm
    spacing: tuple[float, float, float]  # mm along (slice, row, col)
    slice_voxels: np.ndarray  # pancreas voxels per slice
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def pancreas_slices(self) -> np.ndarray:
        return np.flatnonzero(self.slice_voxels)


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


def save_cached_case(root: str | Path, case_id: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray,
                     meta: dict[str, Any], *, dtype: str = "float16") -> dict[str, Any]:
    """Write one case (3D ``image`` in [0, 1] and ``label`` on the same grid with ``affine``) atomically.

    Returns the stored meta (``shape``, ``spacing``, ``affine``, ``slice_voxels`` added to ``meta``).
    """
    img, store_affine = to_store_layout(np.asarray(image), np.asarray(affine, dtype=np.float64))
    lab, _ = to_store_layout(np.asarray(label), np.asarray(affine, dtype=np.float64))
    img = np.ascontiguousarray(img, dtype=np.dtype(dtype))
    lab = np.ascontiguousarray(lab > 0, dtype=np.uint8)
    slice_voxels = lab.reshape(lab.shape[0], -1).sum(axis=1)
    spacing = np.linalg.norm(store_affine[:3, :3], axis=0)

    final = case_dir(root, case_id)
    tmp = final.with_name(f".{case_id}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "image.npy", img)
    np.save(tmp / "label.npy", lab)
    full_meta = {
        **meta,
        "case_id": case_id,
        "shape": list(img.shape),
        "axes": "".join(STORE_AXES),
        "affine": np.round(store_affine, 6).tolist(),
        "spacing": [round(float(s), 6) for s in spacing],
        "slice_voxels": [int(v) for v in slice_voxels],
    }
    (tmp / META_NAME).write_text(json.dumps(full_meta, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return full_meta


def update_cache_meta(root: str | Path, case_id: str, **fields: Any) -> None:
    """Add fields to a case's ``meta.json`` (write to a temporary file, then rename: never half-written)."""
    path = case_dir(root, case_id) / META_NAME
    meta = {**json.loads(path.read_text()), **fields}
    tmp = path.with_name(f".{META_NAME}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path)


def read_cache_meta(root: str | Path, case_id: str) -> dict[str, Any] | None:
    """The stored meta of a complete cache entry, or None (absent, interrupted or unreadable)."""
    folder = case_dir(root, case_id)
    try:
        meta = json.loads((folder / META_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not ((folder / "image.npy").is_file() and (folder / "label.npy").is_file()):
        return None
    return meta


def load_cached_case(path: str | Path, *, mmap: bool = True) -> CachedCase:
    """Open one case folder (``OUT/cache/<case_id>``); arrays are memory-mapped unless ``mmap=False``."""
    path = Path(path)
    meta = json.loads((path / META_NAME).read_text())
    mode = "r" if mmap else None
    return CachedCase(
        case_id=meta["case_id"],
        image=np.load(path / "image.npy", mmap_mode=mode),
        label=np.load(path / "label.npy", mmap_mode=mode),
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
    }
