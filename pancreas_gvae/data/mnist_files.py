"""MNIST and Fashion-MNIST files: names, mirrors, official checksums and checked downloads.

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
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from pancreas_gvae.errors import DataError

__all__ = ["DATASETS", "FASHION_MNIST", "MNIST", "SPLITS", "DatasetSpec", "FileSpec", "ensure_files", "file_md5",
           "get_dataset"]

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


def present_file(data_dir: Path, f: FileSpec) -> Path | None:
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


def missing_message(data_dir: Path, spec: DatasetSpec, missing: list[FileSpec], n_wanted: int) -> str:
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
    missing = [f for f in wanted if present_file(data_dir, f) is None]

    if missing and not download:
        raise DataError(missing_message(data_dir, spec, missing, len(wanted)))
    if missing:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"cannot create the data folder {data_dir}: {err.strerror or err}") from err
        for i, f in enumerate(missing):
            _download(data_dir, spec, f, missing[i:], urlopen, timeout)

    paths = [present_file(data_dir, f) for f in wanted]
    assert all(p is not None for p in paths)
    return paths  # type: ignore[return-value]
