"""MNIST / Fashion-MNIST: split loading and validation, checked downloads (offline, fake urlopen), real data."""

from __future__ import annotations

import hashlib
import io
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from pancreas_gvae.data.idx import write_idx
from pancreas_gvae.data.mnist import load_dataset, load_split, to_tensor
from pancreas_gvae.data.mnist_files import DATASETS, DatasetSpec, FileSpec, ensure_files, file_md5, get_dataset
from pancreas_gvae.errors import DataError

NAMES = {
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}


def _write_split(data_dir: Path, split: str, n: int, *, n_labels: int | None = None, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    write_idx(data_dir / NAMES[split, "images"], rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
    write_idx(data_dir / NAMES[split, "labels"], (np.arange(n if n_labels is None else n_labels) % 10).astype(np.uint8))


# --- the data set descriptions ------------------------------------------------------------------


def test_dataset_descriptions():
    mnist, fashion = get_dataset("mnist"), get_dataset("Fashion_MNIST")
    assert set(DATASETS) == {"mnist", "fashion-mnist"}
    for spec in (mnist, fashion):
        assert {(f.split, f.kind): f.name for f in spec.files} == NAMES
        assert all(len(f.md5) == 32 for f in spec.files)
    assert mnist.file("test", "images").md5 == "9fb629c4189551a2d022fa330f9573f3"
    assert fashion.file("train", "images").md5 == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    assert mnist.mirrors == (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    )
    assert fashion.urls(fashion.file("test", "labels")) == [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-labels-idx1-ubyte.gz"
    ]
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        get_dataset("cifar")


# --- load_split / load_dataset on synthetic files -----------------------------------------------


def test_load_split_synthetic(tmp_path):
    _write_split(tmp_path, "test", 12)
    images, labels = load_split(tmp_path, "mnist", "test")
    assert images.dtype == np.uint8 and images.shape == (12, 28, 28)
    assert labels.dtype == np.uint8 and labels.shape == (12,)


def test_count_mismatch(tmp_path):
    _write_split(tmp_path, "train", 10, n_labels=9)
    with pytest.raises(DataError, match="count mismatch") as err:
        load_split(tmp_path, "mnist", "train")
    message = str(err.value)
    assert "10 images" in message and "9 labels" in message
    assert str(tmp_path / NAMES["train", "labels"]) in message


def test_labels_out_of_range(tmp_path):
    _write_split(tmp_path, "test", 5)
    write_idx(tmp_path / NAMES["test", "labels"], np.array([0, 1, 2, 10, 255], dtype=np.uint8))
    with pytest.raises(DataError, match=r"labels out of range: 2 label\(s\) outside 0..9 \(first at index 3: 10\)"):
        load_split(tmp_path, "fashion-mnist", "test")


def test_images_with_wrong_dimension_count(tmp_path):
    _write_split(tmp_path, "test", 5)
    write_idx(tmp_path / NAMES["test", "images"], np.zeros((5, 784), dtype=np.uint8))
    with pytest.raises(DataError, match="wrong dimension count"):
        load_split(tmp_path, "mnist", "test")


def test_images_with_wrong_size(tmp_path):
    _write_split(tmp_path, "test", 5)
    write_idx(tmp_path / NAMES["test", "images"], np.zeros((5, 32, 32), dtype=np.uint8))
    with pytest.raises(DataError, match="images are 32×32, expected 28×28"):
        load_split(tmp_path, "mnist", "test")


def test_uncompressed_files_are_found(tmp_path):
    _write_split(tmp_path, "test", 4)
    for kind in ("images", "labels"):
        gz = tmp_path / NAMES["test", kind]
        gz.rename(gz.with_suffix(""))  # torchvision-style raw name, still gzip content: detected by content
    images, labels = load_split(tmp_path, "mnist", "test")
    assert len(images) == len(labels) == 4


def test_load_dataset_both_splits(tmp_path):
    _write_split(tmp_path, "train", 30)
    _write_split(tmp_path, "test", 20, seed=1)
    data = load_dataset(tmp_path, "fashion-mnist")
    assert set(data) == {"train", "test"}
    assert (len(data["train"]), len(data["test"])) == (30, 20)
    assert not data["train"].derived and not data["test"].derived
    assert data["test"].origin == "test" and data["test"].files[0].name == "t10k-images-idx3-ubyte.gz"
    assert data["train"].rows == (0, 30) and "all rows" in data["train"].source


def test_load_dataset_single_split_holds_out_last_tenth(tmp_path):
    _write_split(tmp_path, "test", 50)
    images, _ = load_split(tmp_path, "mnist", "test")
    data = load_dataset(tmp_path, "mnist")
    train, test = data["train"], data["test"]
    assert (len(train), len(test)) == (45, 5)
    assert train.rows == (0, 45) and test.rows == (45, 50)
    assert train.origin == test.origin == "test" and train.derived
    np.testing.assert_array_equal(test.images, images[45:])
    assert "train files are absent" in train.source
    again = load_dataset(tmp_path, "mnist")  # deterministic
    np.testing.assert_array_equal(again["test"].labels, test.labels)


def test_load_dataset_incomplete_split(tmp_path):
    _write_split(tmp_path, "test", 5)
    (tmp_path / NAMES["test", "labels"]).unlink()
    with pytest.raises(DataError, match="mnist test split is incomplete") as err:
        load_dataset(tmp_path, "mnist")
    assert str(tmp_path / NAMES["test", "labels"]) in str(err.value)


def test_load_dataset_nothing_present(tmp_path):
    with pytest.raises(DataError, match="4 of 4 file") as err:
        load_dataset(tmp_path / "empty", "mnist")
    for name in NAMES.values():
        assert str(tmp_path / "empty" / name) in str(err.value)


def test_to_tensor():
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    tensor = to_tensor(images)
    assert tensor.dtype == torch.float32 and tensor.shape == (1, 1, 2, 2)
    assert torch.allclose(tensor[0, 0], torch.tensor([[0.0, 1.0], [0.2, 0.4]]))
    with pytest.raises(DataError, match="expected uint8 images"):
        to_tensor(images.astype(np.float32))


# --- downloads through a fake urlopen -----------------------------------------------------------

PAYLOAD = {"good": b"the genuine file bytes", "bad": b"an HTML error page from a broken mirror"}
MD5 = {key: hashlib.md5(value).hexdigest() for key, value in PAYLOAD.items()}
MIRRORS = ("https://mirror-one.example/data/", "https://mirror-two.example/data")


def _spec(md5: str = MD5["good"]) -> DatasetSpec:
    files = tuple(FileSpec(name, md5, split, kind) for (split, kind), name in NAMES.items())
    return DatasetSpec("toy", MIRRORS, files)


class FakeUrlopen:
    """Serves ``responses[mirror_index]`` bytes (or raises it, if it is an exception); records calls."""

    def __init__(self, *responses):
        self.responses = responses
        self.calls: list[str] = []

    def __call__(self, url, timeout=None):
        self.calls.append(url)
        index = 0 if url.startswith(MIRRORS[0]) else 1
        response = self.responses[index]
        if isinstance(response, BaseException):
            raise response
        return io.BytesIO(response)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_download_good_checksum(tmp_path):
    fake = FakeUrlopen(PAYLOAD["good"], PAYLOAD["good"])
    paths = ensure_files(tmp_path, _spec(), download=True, urlopen=fake)
    assert [p.name for p in paths] == list(NAMES.values())
    assert all(p.read_bytes() == PAYLOAD["good"] for p in paths)
    assert fake.calls == [MIRRORS[0] + name for name in NAMES.values()]  # first mirror only
    assert _leftovers(tmp_path) == sorted(NAMES.values())


def test_download_bad_checksum_falls_back_to_second_mirror(tmp_path):
    fake = FakeUrlopen(PAYLOAD["bad"], PAYLOAD["good"])
    paths = ensure_files(tmp_path, _spec(), download=True, urlopen=fake, splits=("test",))
    assert all(p.read_bytes() == PAYLOAD["good"] for p in paths)
    assert fake.calls[:2] == [MIRRORS[0] + NAMES["test", "images"], MIRRORS[1] + "/" + NAMES["test", "images"]]
    assert _leftovers(tmp_path) == sorted([NAMES["test", "images"], NAMES["test", "labels"]])


def test_download_all_checksums_bad(tmp_path):
    fake = FakeUrlopen(PAYLOAD["bad"], PAYLOAD["bad"])
    with pytest.raises(DataError) as err:
        ensure_files(tmp_path, _spec(), download=True, urlopen=fake)
    message = str(err.value)
    assert str(tmp_path / NAMES["train", "images"]) in message
    assert f"expected md5 {MD5['good']}" in message and f"got md5 {MD5['bad']}" in message
    assert len(fake.calls) == 2
    assert _leftovers(tmp_path) == []  # no partial or temporary file left behind


def test_download_http_error_then_good_mirror(tmp_path):
    not_found = urllib.error.HTTPError(MIRRORS[0], 404, "Not Found", {}, None)
    fake = FakeUrlopen(not_found, PAYLOAD["good"])
    paths = ensure_files(tmp_path, _spec(), download=True, urlopen=fake, splits=("train",))
    assert all(p.read_bytes() == PAYLOAD["good"] for p in paths)


def test_offline_lists_expected_files_and_mirrors(tmp_path):
    offline = urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    fake = FakeUrlopen(offline, offline)
    data_dir = tmp_path / "mnist"
    with pytest.raises(DataError) as err:
        ensure_files(data_dir, "mnist", download=True, urlopen=fake)
    message = str(err.value)
    assert "offline" in message
    for spec_file in get_dataset("mnist").files:
        assert str(data_dir / spec_file.name) in message
        for url in get_dataset("mnist").urls(spec_file):
            assert url in message
    assert len(fake.calls) == 2  # gave up after the first file failed everywhere
    assert _leftovers(data_dir) == []


def test_absent_without_download_lists_expected_files(tmp_path):
    with pytest.raises(DataError, match="2 of 2 file") as err:
        ensure_files(tmp_path, "mnist", download=False, splits=("train",))
    assert str(tmp_path / NAMES["train", "images"]) in str(err.value)
    assert "download=True" in str(err.value)


def test_present_files_are_not_checksummed_or_downloaded(tmp_path):
    _write_split(tmp_path, "train", 3)
    _write_split(tmp_path, "test", 3)

    def no_network(url, timeout=None):
        raise AssertionError(f"unexpected download of {url}")

    paths = ensure_files(tmp_path, "mnist", download=True, urlopen=no_network)  # md5s differ: still fine
    assert len(paths) == 4
    data = load_dataset(tmp_path, "mnist", download=True, urlopen=no_network)
    assert len(data["train"]) == 3


# --- the real data in ../shared/data ------------------------------------------------------------


def test_real_mnist_t10k(mnist_dir):
    assert file_md5(mnist_dir / "t10k-images-idx3-ubyte.gz") == "9fb629c4189551a2d022fa330f9573f3"
    images, labels = load_split(mnist_dir, "mnist", "test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and set(np.unique(labels)) == set(range(10))
    pixels = to_tensor(images)
    assert pixels.shape == (10_000, 1, 28, 28)
    assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    assert float(pixels.mean()) == pytest.approx(0.1325, abs=0.01)

    data = load_dataset(mnist_dir, "mnist")  # only t10k present: 9,000 train + 1,000 held out
    assert (len(data["train"]), len(data["test"])) == (9_000, 1_000)
    assert data["train"].derived and data["train"].origin == "test"


def test_real_fashion_mnist_subset(fashion_dir):
    data = load_dataset(fashion_dir, "fashion-mnist")  # not the official files: md5 must not matter
    assert (len(data["train"]), len(data["test"])) == (1_000, 1_000)
    assert not data["train"].derived and not data["test"].derived
    for split in data.values():
        assert split.images.shape == (1_000, 28, 28)
        assert set(np.unique(split.labels)) == set(range(10))
        assert 0.25 < float(to_tensor(split.images).mean()) < 0.32  # Fashion-MNIST mean ≈ 0.286
