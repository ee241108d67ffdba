"""MNIST and Fashion-MNIST loading: whichever splits are present, validated, as arrays or tensors.

The files themselves (names, mirrors, checksums, checked downloads): :mod:`pancreas_gvae.data.mnist_files`.

Splits: :func:`load_dataset` uses whichever splits are present. When only one is (the shared test
data has only MNIST's ``t10k`` files), it is split deterministically: the *last*
``holdout_fraction`` (10 % by default) of its rows, in file order, becomes the held-out "test" split
and the rest the "train" split. Each returned :class:`Split` says which files and rows it came from.
"""

from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pancreas_gvae.data.idx import read_idx
from pancreas_gvae.data.mnist_files import SPLITS, DatasetSpec, ensure_files, get_dataset, missing_message, present_file
from pancreas_gvae.errors import DataError

__all__ = ["Split", "load_dataset", "load_split", "to_tensor"]


def load_split(
    data_dir: str | os.PathLike[str], dataset: str | DatasetSpec, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split: ``(images uint8 (N, 28, 28), labels uint8 (N,))``, fully validated.

    Checks: both files present and valid IDX (see :func:`read_idx`), unsigned bytes, images 3-D of
    28×28, labels 1-D, at least one image, as many labels as images, labels in 0..9.
    """
    spec = get_dataset(dataset)
    data_dir = Path(data_dir).absolute()
    (images_path, labels_path) = ensure_files(data_dir, spec, download=False, splits=(split,))

    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    for path, array, what in ((images_path, images, "images"), (labels_path, labels, "labels")):
        if array.dtype != np.uint8:
            raise DataError(f"{path}: {what} are {array.dtype}, expected unsigned bytes (IDX data type 0x08)")
    if images.shape[1:] != spec.image_shape:
        h, w = spec.image_shape
        raise DataError(
            f"{images_path}: images are {images.shape[1]}×{images.shape[2]}, expected {h}×{w} for {spec.name}"
        )
    if len(images) == 0:
        raise DataError(f"{images_path}: contains 0 images")
    if len(images) != len(labels):
        raise DataError(
            f"{spec.name} {split} split: count mismatch: {images_path} has {len(images)} images but "
            f"{labels_path} has {len(labels)} labels"
        )
    bad = labels >= spec.num_classes
    if bad.any():
        first = int(np.argmax(bad))
        raise DataError(
            f"{labels_path}: labels out of range: {int(bad.sum())} label(s) outside 0..{spec.num_classes - 1} "
            f"(first at index {first}: {int(labels[first])})"
        )
    return images, labels


@dataclass(frozen=True, eq=False)
class Split:
    """One split as loaded, with where it came from.

    ``origin`` is the split whose files the rows were read from ("train" for the ``train-*`` files,
    "test" for ``t10k-*``), ``files`` those (images, labels) files, ``rows`` the ``[start, stop)``
    rows taken from them, and ``derived`` True when this split was carved out of the other one
    because its own files are absent. ``source`` says all that in words.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    origin: str
    files: tuple[Path, Path]
    rows: tuple[int, int]
    derived: bool
    source: str = field(default="")

    def __len__(self) -> int:
        return len(self.labels)


def _split(
    name: str, origin: str, files: tuple[Path, Path], images: np.ndarray, labels: np.ndarray,
    start: int, stop: int, total: int, note: str = "",
) -> Split:
    derived = name != origin
    rows = "all rows" if (start, stop) == (0, total) else f"rows {start}:{stop} of {total}"
    source = f"{files[0].name} + {files[1].name} ({origin} files), {rows}{note}"
    return Split(name, images[start:stop], labels[start:stop], origin, files, (start, stop), derived, source)


def load_dataset(
    data_dir: str | os.PathLike[str],
    dataset: str | DatasetSpec,
    *,
    download: bool = False,
    holdout_fraction: float = 0.1,
    urlopen: Callable = urllib.request.urlopen,
) -> dict[str, Split]:
    """Load ``{"train": Split, "test": Split}`` from whichever splits are present in ``data_dir``.

    With ``download=True`` absent files are downloaded first (checked against the official MD5,
    see :func:`ensure_files`); present files are used as they are and validated structurally.
    When both splits are present each is used as is. When only one is, its last
    ``holdout_fraction`` of rows (at least one) becomes "test" and the rest "train"; the
    :class:`Split` objects record this (``derived``, ``rows``, ``source``). A split with only one of
    its two files, or no split at all, raises :class:`DataError` naming the missing files.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be between 0 and 1 (exclusive), got {holdout_fraction}")
    spec = get_dataset(dataset)
    data_dir = Path(data_dir).absolute()
    if download:
        ensure_files(data_dir, spec, download=True, urlopen=urlopen)

    complete = []
    for split in SPLITS:
        files = spec.split_files(split)
        present = [present_file(data_dir, f) for f in files]
        if all(p is not None for p in present):
            complete.append(split)
        elif any(p is not None for p in present):
            missing = [f for f, p in zip(files, present) if p is None]
            raise DataError(
                f"{spec.name} {split} split is incomplete: "
                + missing_message(data_dir, spec, missing, len(files)).removeprefix(f"{spec.name}: ")
            )
    if not complete:
        raise DataError(missing_message(data_dir, spec, list(spec.files), len(spec.files)))

    def files_of(split: str) -> tuple[Path, Path]:
        images_file, labels_file = spec.split_files(split)
        return present_file(data_dir, images_file), present_file(data_dir, labels_file)  # type: ignore[return-value]

    if len(complete) == 2:
        result = {}
        for split in SPLITS:
            images, labels = load_split(data_dir, spec, split)
            result[split] = _split(split, split, files_of(split), images, labels, 0, len(labels), len(labels))
        return result

    (origin,) = complete
    images, labels = load_split(data_dir, spec, origin)
    n = len(labels)
    if n < 2:
        raise DataError(
            f"{files_of(origin)[0]}: only {n} image(s) and no other split: cannot hold out a test split"
        )
    n_test = min(n - 1, max(1, round(n * holdout_fraction)))
    cut = n - n_test
    absent = "test" if origin == "train" else "train"
    note = f"; the {absent} files are absent, so the {origin} files were split: first {cut} train, last {n_test} test"
    return {
        "train": _split("train", origin, files_of(origin), images, labels, 0, cut, n, note),
        "test": _split("test", origin, files_of(origin), images, labels, cut, n, n, note),
    }


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images ``(N, H, W)`` as a float32 tensor ``(N, 1, H, W)`` scaled to [0, 1]."""
    array = np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 3:
        raise DataError(
            f"to_tensor: expected uint8 images of shape (N, H, W), got {array.dtype} of shape {array.shape}"
        )
    if not array.flags.writeable:  # torch.from_numpy warns on read-only arrays
        array = array.copy()
    return torch.from_numpy(array).unsqueeze(1).float().div_(255.0)
