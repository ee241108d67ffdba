"""read_idx / write_idx: round trips and every kind of broken file, each raising DataError."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from pancreas_gvae.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx, write_idx
from pancreas_gvae.errors import DataError


def _images(n: int = 5) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def _raw_idx(array: np.ndarray) -> bytes:
    """Hand-built IDX bytes (unsigned byte), independent of write_idx."""
    header = struct.pack(f">HBB{array.ndim}I", 0, 0x08, array.ndim, *array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_round_trip_images(tmp_path, name):
    images = _images()
    path = write_idx(tmp_path / name, images)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    back = read_idx(path, ndim=3)
    assert back.dtype == np.uint8 and back.shape == (5, 28, 28)
    np.testing.assert_array_equal(back, images)
    assert back.flags.writeable
    assert not list(tmp_path.glob(".*.part"))  # the temporary file was renamed, not left behind


@pytest.mark.parametrize("name", ["labels-idx1-ubyte", "labels-idx1-ubyte.gz"])
def test_round_trip_labels(tmp_path, name):
    labels = np.arange(10, dtype=np.uint8)
    path = write_idx(tmp_path / name, labels)
    header = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
    assert struct.unpack(">II", header[:8]) == (LABELS_MAGIC, 10)
    np.testing.assert_array_equal(read_idx(path, ndim=1), labels)


def test_write_matches_hand_built_layout(tmp_path):
    images = _images(2)
    path = write_idx(tmp_path / "x-idx3-ubyte", images)
    assert path.read_bytes() == _raw_idx(images)
    assert struct.unpack(">I", path.read_bytes()[:4])[0] == IMAGES_MAGIC


def test_gzip_detected_by_content_not_suffix(tmp_path):
    images = _images(3)
    gz_without_suffix = tmp_path / "images-idx3-ubyte"
    gz_without_suffix.write_bytes(gzip.compress(_raw_idx(images)))
    np.testing.assert_array_equal(read_idx(gz_without_suffix), images)
    raw_with_gz_suffix = tmp_path / "images-idx3-ubyte.gz"
    raw_with_gz_suffix.write_bytes(_raw_idx(images))
    np.testing.assert_array_equal(read_idx(raw_with_gz_suffix), images)


def test_big_endian_wider_types_round_trip(tmp_path):
    for array in (np.arange(-3, 3, dtype=np.int16), np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)):
        back = read_idx(write_idx(tmp_path / f"a-{array.dtype}.gz", array))
        assert back.dtype == array.dtype and back.dtype.isnative
        np.testing.assert_array_equal(back, array)


def test_bad_magic(tmp_path):
    path = tmp_path / "bad-magic"
    path.write_bytes(b"\x12\x34\x08\x03" + b"\x00" * 100)
    with pytest.raises(DataError, match=r"bad magic number 0x12340803: not an IDX file") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_unsupported_type_byte(tmp_path):
    path = tmp_path / "bad-type"
    path.write_bytes(struct.pack(">HBBI", 0, 0x0A, 1, 2) + b"\x00\x00")
    with pytest.raises(DataError, match=r"unsupported IDX data type byte 0x0A.*0x08 unsigned byte"):
        read_idx(path)


def test_wrong_dimension_count(tmp_path):
    path = write_idx(tmp_path / "flat-images-idx3-ubyte", np.zeros((4, 784), dtype=np.uint8))
    with pytest.raises(DataError, match=r"wrong dimension count.*declares 2 dimension\(s\), expected 3") as err:
        read_idx(path, ndim=3)
    assert "0x00000803" in str(err.value) and str(path) in str(err.value)


def test_zero_dimensions(tmp_path):
    path = tmp_path / "zero-dims"
    path.write_bytes(struct.pack(">HBB", 0, 0x08, 0) + b"\x00")
    with pytest.raises(DataError, match="declares 0 dimensions"):
        read_idx(path)


def test_truncated_header(tmp_path):
    path = tmp_path / "short-header"
    path.write_bytes(struct.pack(">HBBI", 0, 0x08, 3, 10))  # 3 dims announced, only 1 given
    with pytest.raises(DataError, match=r"truncated header: 3 dimension\(s\) need 16 header bytes, found 8"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_payload(tmp_path, gz):
    data = _raw_idx(_images(2))[:-100]
    path = tmp_path / "trunc"
    path.write_bytes(gzip.compress(data) if gz else data)
    expected = 2 * 28 * 28
    with pytest.raises(DataError, match=rf"truncated: expected {expected} bytes of data, found {expected - 100}"):
        read_idx(path)


def test_trailing_bytes(tmp_path):
    path = tmp_path / "trailing.gz"
    path.write_bytes(gzip.compress(_raw_idx(_images(2)) + b"junk"))
    with pytest.raises(DataError, match=r"4 unexpected trailing bytes: expected 1568 bytes of data, found 1572"):
        read_idx(path)


@pytest.mark.parametrize(
    "damage, cause",
    [
        (lambda b: b.__setitem__(10, 0x07), "invalid block type"),  # zlib.error: reserved deflate block type
        (lambda b: b.__setitem__(slice(20, 40), b"\xff" * 20), "CRC check failed"),  # BadGzipFile
        (lambda b: b.__setitem__(2, 0x09), "Unknown compression method"),  # BadGzipFile in the header
    ],
    ids=["deflate", "crc", "header"],
)
def test_corrupt_gzip(tmp_path, damage, cause):
    data = bytearray(gzip.compress(_raw_idx(_images(2)), mtime=0))
    damage(data)  # the gzip magic bytes stay intact
    path = tmp_path / "corrupt-idx3-ubyte.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="not a valid gzip file") as err:
        read_idx(path)
    assert str(path) in str(err.value) and cause in str(err.value)


def test_gz_suffix_but_garbage(tmp_path):
    path = tmp_path / "html-error-page.gz"
    path.write_bytes(b"<html>Access denied</html>")
    with pytest.raises(DataError, match="not a valid gzip file"):
        read_idx(path)


def test_truncated_gzip(tmp_path):
    full = gzip.compress(_raw_idx(_images(5)))
    path = tmp_path / "cut-idx3-ubyte.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="truncated gzip stream"):
        read_idx(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty-idx1-ubyte.gz"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty file \(0 bytes\)") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nowhere" / "train-images-idx3-ubyte.gz"
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert str(err.value).startswith(f"not found: {path}; expected")
    assert err.value.exit_code == 2


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        read_idx(tmp_path)
