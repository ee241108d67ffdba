"""MNIST and Fashion-MNIST: file names, mirrors, checksums, checked downloads and loading.

Both data sets come as four IDX files (see :mod:`pancreas_gvae.data.idx`)::

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz    the "train" split (60,000 images)
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz     the "test" split (10,000 images)

A file is looked for under its ``.gz`` name first, then under the same name without ``.gz`` (the
layout torchvision leaves behind); compression is detected from the content either way.

Checksums: the official MD5 of each ``.gz`` file is checked for every file this module *downloads*
(a mismatch is never kept). Files that are already present are *not* checked against the official
MD5, because legitimate local copies differ (the shared test data holds a 1,000 + 1,000 subset of
Fashion-MNIST rewritten as valid IDX files); their structure is validated instead, completely, by
:func:`~pancreas_gvae.data.idx.read_idx` and :func:`load_split`.

Splits: :func:`load_dataset` uses whichever splits are present. When only one is (the shared test
data has only MNIST's ``t10k`` files), it is split deterministically: the *last*
``holdout_fraction`` (10 % by default) of its rows, in file order, becomes the held-out "test" split
and the rest the "train" split. Each returned :class:`Split` says which files and rows it came from.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from pancreas_gvae.data.idx import read_idx
from pancreas_gvae.errors import DataError

__all__ = [
    "DATASETS",
    "FASHION_MNIST",
    "MNIST",
    "SPLITS",
    "DatasetSpec",
    "FileSpec",
    "Split",
    "ensure_files",
    "file_md5",
    "get_dataset",
    "load_dataset",
    "load_split",
    "to_tensor",
]

#: The two splits of both data sets, in their canonical order.
SPLITS: tuple[str, ...] = ("train", "test")

_FILE_PREFIX = {"train": "train", "test": "t10k"}
_FILE_STEM = {"images": "images-idx3-ubyte", "labels": "labels-idx1-ubyte"}


@dataclass(frozen=True)
class FileSpec:
    """One of a data set's four files: its standard name, the official MD5 of that file, and its role."""

    name: str
    md5: str
    split: str  # "train" or "test"
    kind: str  # "images" or "labels"


@dataclass(frozen=True)
class DatasetSpec:
    """A data set: its name, the mirrors that serve its files (URL prefixes ending in '/') and the files."""

    name: str
    mirrors: tuple[str, ...]
    files: tuple[FileSpec, ...]
    num_classes: int = 10
    image_shape: tuple[int, int] = (28, 28)

    def file(self, split: str, kind: str) -> FileSpec:
        for f in self.files:
            if f.split == split and f.kind == kind:
                return f
        raise DataError(f"{self.name}: no {kind} file for split {split!r}; known splits: {', '.join(SPLITS)}")

    def split_files(self, split: str) -> tuple[FileSpec, FileSpec]:
        """The (images, labels) files of ``split``."""
        if split not in SPLITS:
            raise DataError(f"{self.name}: unknown split {split!r}; known splits: {', '.join(SPLITS)}")
        return self.file(split, "images"), self.file(split, "labels")

    def urls(self, f: FileSpec) -> list[str]:
        """The URL of ``f`` on each mirror, in the order they are tried."""
        return [(m if m.endswith("/") else m + "/") + f.name for m in self.mirrors]


def _files(md5s: dict[tuple[str, str], str]) -> tuple[FileSpec, ...]:
    return tuple(
        FileSpec(f"{_FILE_PREFIX[split]}-{_FILE_STEM[kind]}.gz", md5s[split, kind], split, kind)
        for split in SPLITS
        for kind in ("images", "labels")
    )


MNIST = DatasetSpec(
    name="mnist",
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    files=_files(
        {
            ("train", "images"): "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            ("train", "labels"): "d53e105ee54ea40749a09fcbcd1e9432",
            ("test", "images"): "9fb629c4189551a2d022fa330f9573f3",
            ("test", "labels"): "ec29112dd5afa0611ce80d1b7f02629c",
        }
    ),
)

FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    files=_files(
        {
            ("train", "images"): "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            ("train", "labels"): "25c81989df183df01b3e8a0aad5dffbe",
            ("test", "images"): "bef4ecab320f06d8554ea6380940ec79",
            ("test", "labels"): "bb300cfdad3c16e7a12a480ee83cd310",
        }
    ),
)

#: The known data sets by name.
DATASETS: dict[str, DatasetSpec] = {MNIST.name: MNIST, FASHION_MNIST.name: FASHION_MNIST}


def get_dataset(dataset: str | DatasetSpec) -> DatasetSpec:
    """The :class:`DatasetSpec` for a name ("mnist", "fashion-mnist"; case and '_' / '-' are ignored)."""
    if isinstance(dataset, DatasetSpec):
        return dataset
    key = str(dataset).strip().lower().replace("_", "-")
    if key == "fashionmnist":
        key = "fashion-mnist"
    if key not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    return DATASETS[key]


def file_md5(path: str | os.PathLike[str]) -> str:
    """Hex MD5 of a file's bytes, read in chunks."""
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
    return md5.hexdigest()


def _present(data_dir: Path, f: FileSpec) -> Path | None:
    """The file on disk: under its ``.gz`` name, else under the name without ``.gz``; None if neither."""
    for candidate in (data_dir / f.name, data_dir / f.name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _manual_fetch_list(data_dir: Path, spec: DatasetSpec, files: Iterable[FileSpec]) -> str:
    lines = []
    for f in files:
        lines.append(f"  {data_dir / f.name}  (official md5 {f.md5}) from any of:")
        lines.extend(f"      {url}" for url in spec.urls(f))
    return "\n".join(lines)


def _missing_message(data_dir: Path, spec: DatasetSpec, missing: list[FileSpec], n_wanted: int) -> str:
    return (
        f"{spec.name}: {len(missing)} of {n_wanted} file(s) not found in {data_dir}; expected:\n"
        f"{_manual_fetch_list(data_dir, spec, missing)}\n"
        f"Load with download=True (needs network access), or fetch the files by hand and put them "
        f"at the paths above (an uncompressed copy without the .gz suffix works too)."
    )


class _NetworkFailure(Exception):
    """A mirror could not be reached or the transfer broke; ``http`` is True for an HTTP error status."""

    def __init__(self, reason: str, *, http: bool = False):
        super().__init__(reason)
        self.http = http


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
        return f"{type(err).__name__}: {err.reason}"
    return f"{type(err).__name__}: {err}"


_NET_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException, OSError)


def _fetch(url: str, tmp: Path, urlopen: Callable, timeout: float) -> str:
    """Stream ``url`` into the new file ``tmp``; returns the MD5 of what was received.

    Network problems raise :class:`_NetworkFailure`; problems writing ``tmp`` raise OSError.
    """
    md5 = hashlib.md5()
    with open(tmp, "xb") as out:
        try:
            response = urlopen(url, timeout=timeout)
        except urllib.error.HTTPError as err:
            err.close()
            raise _NetworkFailure(f"HTTP {err.code} {err.reason}", http=True) from err
        except _NET_ERRORS as err:
            raise _NetworkFailure(_reason(err)) from err
        with response:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except (*_NET_ERRORS, ValueError) as err:
                    raise _NetworkFailure(f"transfer broke off: {_reason(err)}") from err
                if not chunk:
                    break
                md5.update(chunk)
                out.write(chunk)
    return md5.hexdigest()


def _download(
    data_dir: Path, spec: DatasetSpec, f: FileSpec, missing: list[FileSpec], urlopen: Callable, timeout: float
) -> Path:
    """Download ``f`` from the first mirror that serves it with the official MD5; atomic rename into place."""
    target = data_dir / f.name
    if not spec.mirrors:
        raise DataError(f"{target}: not found, and {spec.name} has no mirror to download it from")
    failures: list[str] = []
    offline = True  # every mirror failed to connect or transfer (no HTTP status, no checksum)
    for url in spec.urls(f):
        tmp = data_dir / f".{f.name}.{uuid.uuid4().hex[:12]}.part"
        try:
            try:
                actual = _fetch(url, tmp, urlopen, timeout)
            except _NetworkFailure as err:
                offline = offline and not err.http
                failures.append(f"{url}: {err}")
                continue
            except OSError as err:
                raise DataError(f"cannot write {tmp} (for {target}): {err.strerror or err}") from err
            if actual != f.md5:
                offline = False
                failures.append(f"{url}: checksum mismatch: expected md5 {f.md5}, got md5 {actual}")
                continue
            os.replace(tmp, target)
            return target
        finally:
            tmp.unlink(missing_ok=True)

    if offline:
        raise DataError(
            f"{spec.name}: cannot download {f.name}, the network is unreachable (offline?):\n"
            + "\n".join(f"  {line}" for line in failures)
            + f"\nFetch these files by hand and put them in {data_dir}:\n"
            + _manual_fetch_list(data_dir, spec, missing)
        )
    raise DataError(
        f"{target}: download failed from every mirror, nothing was written (expected md5 {f.md5}):\n"
        + "\n".join(f"  {line}" for line in failures)
    )


def ensure_files(
    data_dir: str | os.PathLike[str],
    dataset: str | DatasetSpec,
    *,
    download: bool,
    urlopen: Callable = urllib.request.urlopen,
    splits: Iterable[str] = SPLITS,
    timeout: float = 60.0,
) -> list[Path]:
    """Make sure the files of ``splits`` are in ``data_dir``; returns their paths (images, labels per split).

    Files already present are used as they are (their checksum is not compared: see the module
    docstring). Absent files are, with ``download=True``, fetched from each mirror in turn into a
    temporary file, checked against the official MD5, and renamed into place atomically; a mismatch
    is deleted and the next mirror tried. With ``download=False`` absent files raise
    :class:`DataError` listing their full paths and the URLs to fetch them from. ``urlopen`` is
    ``urllib.request.urlopen`` or a stand-in with the same call signature (for tests).
    """
    spec = get_dataset(dataset)
    data_dir = Path(data_dir).absolute()
    wanted = [f for split in splits for f in spec.split_files(split)]
    missing = [f for f in wanted if _present(data_dir, f) is None]

    if missing and not download:
        raise DataError(_missing_message(data_dir, spec, missing, len(wanted)))
    if missing:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"cannot create the data folder {data_dir}: {err.strerror or err}") from err
        for i, f in enumerate(missing):
            _download(data_dir, spec, f, missing[i:], urlopen, timeout)

    paths = [_present(data_dir, f) for f in wanted]
    assert all(p is not None for p in paths)
    return paths  # type: ignore[return-value]


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
        present = [_present(data_dir, f) for f in files]
        if all(p is not None for p in present):
            complete.append(split)
        elif any(p is not None for p in present):
            missing = [f for f, p in zip(files, present) if p is None]
            raise DataError(
                f"{spec.name} {split} split is incomplete: "
                + _missing_message(data_dir, spec, missing, len(files)).removeprefix(f"{spec.name}: ")
            )
    if not complete:
        raise DataError(_missing_message(data_dir, spec, list(spec.files), len(spec.files)))

    def files_of(split: str) -> tuple[Path, Path]:
        images_file, labels_file = spec.split_files(split)
        return _present(data_dir, images_file), _present(data_dir, labels_file)  # type: ignore[return-value]

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
