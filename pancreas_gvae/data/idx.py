"""Read and write IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number, then one big-endian ``uint32`` per dimension, then the data,
big-endian, in C order. The magic number is two zero bytes, a data-type byte and the number of
dimensions: ``0x00000803`` is a 3-D array of unsigned bytes (images), ``0x00000801`` a 1-D array of
unsigned bytes (labels).

Files may be gzip-compressed or raw; compression is detected from the content (the gzip magic bytes
``1f 8b``), not from the file name. Every problem with a file (missing, empty, not gzip, truncated,
wrong magic number, unsupported data type, wrong number of dimensions, payload size not matching the
header) raises :class:`~pancreas_gvae.errors.DataError` naming the file and the problem.
"""

from __future__ import annotations

import gzip
import os
import struct
import uuid
import zlib
from pathlib import Path

import numpy as np

from pancreas_gvae.errors import DataError

__all__ = ["IDX_DTYPES", "IMAGES_MAGIC", "LABELS_MAGIC", "read_idx", "write_idx"]

#: Magic number of a 3-D unsigned-byte IDX file (MNIST images).
IMAGES_MAGIC = 0x00000803
#: Magic number of a 1-D unsigned-byte IDX file (MNIST labels).
LABELS_MAGIC = 0x00000801

#: IDX data-type byte -> (numpy dtype, stored big-endian, human-readable name).
IDX_DTYPES: dict[int, tuple[np.dtype, str]] = {
    0x08: (np.dtype("u1"), "unsigned byte"),
    0x09: (np.dtype("i1"), "signed byte"),
    0x0B: (np.dtype(">i2"), "short (int16)"),
    0x0C: (np.dtype(">i4"), "int (int32)"),
    0x0D: (np.dtype(">f4"), "float (float32)"),
    0x0E: (np.dtype(">f8"), "double (float64)"),
}

_GZIP_MAGIC = b"\x1f\x8b"
_EXPECTED = "expected an IDX file, gzip-compressed or raw"


def _describe_magic(magic: int) -> str:
    return f"0x{magic:08X}"


def _supported_types() -> str:
    return ", ".join(f"0x{code:02X} {name}" for code, (_, name) in IDX_DTYPES.items())


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed where it is gzip; DataError for every I/O or gzip problem."""
    if not path.exists():
        raise DataError(f"not found: {path}; {_EXPECTED}")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; {_EXPECTED}")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from err
    if not raw:
        raise DataError(f"{path}: empty file (0 bytes); {_EXPECTED}")

    if raw[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(raw)
        except EOFError as err:
            raise DataError(
                f"{path}: truncated gzip stream ({len(raw)} bytes on disk; the download or copy was "
                f"cut short): fetch the file again"
            ) from err
        except (gzip.BadGzipFile, zlib.error) as err:
            raise DataError(f"{path}: not a valid gzip file ({err}): fetch the file again") from err
        if not data:
            raise DataError(f"{path}: empty after gzip decompression; {_EXPECTED}")
        return data

    if path.suffix == ".gz" and raw[:2] != b"\x00\x00":
        # Named .gz but neither gzip nor IDX: say what the name promised.
        raise DataError(
            f"{path}: not a valid gzip file (starts with bytes {raw[:4].hex(' ')}, expected gzip magic "
            f"1f 8b) and not a raw IDX file either: fetch the file again"
        )
    return raw


def read_idx(path: str | os.PathLike[str], *, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw) into a writable, native-endian numpy array.

    ``ndim``, where given, is the number of dimensions the caller requires (3 for images, 1 for
    labels); a file with another count raises :class:`DataError`. Unsigned-byte files (data type
    ``0x08``, as in MNIST) come back as ``uint8``; the other IDX data types (``0x09`` int8, ``0x0B``
    int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64) are read too; any other type byte is
    rejected.
    """
    path = Path(path)
    data = _read_bytes(path)

    if len(data) < 4:
        raise DataError(f"{path}: truncated header: {len(data)} bytes, an IDX file starts with a 4-byte magic number")
    (magic,) = struct.unpack(">I", data[:4])
    zero, type_code, n_dims = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise DataError(
            f"{path}: bad magic number {_describe_magic(magic)}: not an IDX file (expected "
            f"{_describe_magic(IMAGES_MAGIC)} for images or {_describe_magic(LABELS_MAGIC)} for labels)"
        )
    if type_code not in IDX_DTYPES:
        raise DataError(
            f"{path}: unsupported IDX data type byte 0x{type_code:02X} in magic number "
            f"{_describe_magic(magic)}; supported: {_supported_types()}"
        )
    if n_dims == 0:
        raise DataError(f"{path}: bad magic number {_describe_magic(magic)}: declares 0 dimensions")
    if ndim is not None and n_dims != ndim:
        expected_magic = (type_code << 8) | ndim
        raise DataError(
            f"{path}: wrong dimension count: the header (magic {_describe_magic(magic)}) declares "
            f"{n_dims} dimension(s), expected {ndim} (magic {_describe_magic(expected_magic)})"
        )

    header_size = 4 + 4 * n_dims
    if len(data) < header_size:
        raise DataError(
            f"{path}: truncated header: {n_dims} dimension(s) need {header_size} header bytes, found {len(data)}"
        )
    dims = struct.unpack(f">{n_dims}I", data[4:header_size])
    dtype, _ = IDX_DTYPES[type_code]

    expected = dtype.itemsize
    for d in dims:  # Python ints: no overflow on a corrupt header
        expected *= d
    found = len(data) - header_size
    shape = "×".join(str(d) for d in dims)
    if found < expected:
        raise DataError(
            f"{path}: truncated: expected {expected} bytes of data, found {found} (header says {shape} "
            f"{dtype.name}): fetch the file again"
        )
    if found > expected:
        raise DataError(
            f"{path}: {found - expected} unexpected trailing bytes: expected {expected} bytes of data, "
            f"found {found} (header says {shape} {dtype.name})"
        )

    array = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header_size)
    # A copy: writable (torch.from_numpy needs that) and in native byte order.
    return array.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def _type_code(dtype: np.dtype) -> int:
    for code, (idx_dtype, _) in IDX_DTYPES.items():
        if idx_dtype.kind == dtype.kind and idx_dtype.itemsize == dtype.itemsize:
            return code
    raise ValueError(f"IDX has no data type for numpy {dtype}; supported: {_supported_types()}")


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file, gzip-compressed when ``path`` ends in ``.gz``; returns the path.

    The write is atomic (a temporary file in the same folder, then a rename) and the gzip output is
    reproducible (no time stamp, no file name in the gzip header).
    """
    path = Path(path)
    array = np.asarray(array)
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got {array.ndim}")
    if any(d > 0xFFFFFFFF for d in array.shape):
        raise ValueError(f"IDX dimensions must fit in 32 bits, got shape {array.shape}")
    code = _type_code(array.dtype)
    big_endian = IDX_DTYPES[code][0]
    header = struct.pack(f">HBB{array.ndim}I", 0, code, array.ndim, *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=big_endian).tobytes()

    # Not mkstemp: its 0600 mode would stick to the final file; "xb" honours the umask.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        with open(tmp, "xb") as f:
            if path.suffix == ".gz":
                with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
                    gz.write(payload)
            else:
                f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
