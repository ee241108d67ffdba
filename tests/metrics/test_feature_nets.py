"""Feature networks: shapes, reproducibility, a real MNIST classifier above 95 %, a CT slice autoencoder that learns."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data.synthetic import create_test_image_2d

from pancreas_gvae.evaluation.metrics.feature_nets import (
    SliceAutoencoder,
    SmallClassifier,
    accuracy,
    extract_features,
    train_classifier,
    train_slice_autoencoder,
)


def _read_idx(path: Path) -> np.ndarray:
    try:
        from pancreas_gvae.data.idx import read_idx
    except ImportError:  # the project's reader is not there: IDX inline (magic, big-endian dims, uint8 data)
        raw = gzip.decompress(path.read_bytes())
        ndim = raw[3]
        dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    return read_idx(path)


def _shapes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two easy classes: a bright square top-left or bottom-right, with noise."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.rand(n, 1, 16, 16, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    x[y == 0, :, 2:7, 2:7] += 0.8
    x[y == 1, :, 9:14, 9:14] += 0.8
    return x.clamp(0, 1), y


def test_classifier_shapes_and_dimension_generic():
    net = SmallClassifier(num_classes=3, channels=4, feature_dim=12).eval()
    x = torch.rand(5, 1, 28, 28)
    assert net.features(x).shape == (5, 12) and net.logits(x).shape == (5, 3)
    net3 = SmallClassifier(num_classes=2, spatial_dims=3, channels=4, feature_dim=8).eval()
    assert net3.features(torch.rand(2, 1, 12, 12, 12)).shape == (2, 8)
    assert extract_features(net.features, x, batch_size=2).shape == (5, 12)


def test_train_classifier_is_reproducible_and_learns_a_toy_task():
    x, y = _shapes(200, seed=0)
    state = torch.random.get_rng_state()
    a = train_classifier(x, y, steps=30, batch_size=32, seed=3, channels=4, feature_dim=16)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    b = train_classifier(x, y, steps=30, batch_size=32, seed=3, channels=4, feature_dim=16)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)
    xt, yt = _shapes(100, seed=1)
    assert accuracy(a, xt, yt) > 0.95
    assert not a.training


def test_train_classifier_rejects_bad_input():
    x, y = _shapes(10, seed=0)
    with pytest.raises(ValueError, match="labels"):
        train_classifier(x, y[:5], steps=1)
    with pytest.raises(ValueError, match="floating point"):
        train_classifier((x * 255).to(torch.uint8), y, steps=1)


def test_classifier_reaches_95_percent_on_real_mnist(mnist_dir):
    images = torch.from_numpy(_read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0)
    labels = torch.from_numpy(_read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz").astype(np.int64))
    # only the official test split is available here: train on its first 8,000 digits, test on the other 2,000
    net = train_classifier(images[:8000], labels[:8000], steps=300, batch_size=128, seed=0)
    acc = accuracy(net, images[8000:], labels[8000:])
    assert acc > 0.95, f"held-out accuracy {acc:.4f}"
    assert net.features(images[:4].unsqueeze(1)).shape == (4, 128)


def test_slice_autoencoder_any_size_and_3d():
    ae = SliceAutoencoder(channels=4, latent_channels=6).eval()
    x = torch.rand(3, 1, 30, 27)  # not a multiple of 8: padded, then cropped back
    assert ae(x).shape == x.shape
    assert ae.features(x).shape == (3, 24) and ae.feature_dim == 24
    assert ae.features(torch.rand(3, 1, 64, 48)).shape == (3, 24)
    ae3 = SliceAutoencoder(spatial_dims=3, channels=4, n_down=2, latent_channels=4).eval()
    assert ae3(torch.rand(2, 1, 10, 12, 9)).shape == (2, 1, 10, 12, 9)
    assert ae3.features(torch.rand(2, 1, 10, 12, 9)).shape == (2, 32)


def test_train_slice_autoencoder_learns_synthetic_slices():
    rng = np.random.RandomState(0)
    imgs = np.stack(
        [create_test_image_2d(32, 32, num_objs=4, rad_max=8, noise_max=0.1, random_state=rng)[0] for _ in range(40)]
    )
    x = torch.from_numpy(imgs).float().unsqueeze(1)
    x = (x - x.min()) / (x.max() - x.min())
    ae, losses = train_slice_autoencoder(x, steps=60, batch_size=16, seed=0, channels=8, return_losses=True)
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])
    assert extract_features(ae.features, x).shape == (40, 32 * 4)


def test_slice_autoencoder_on_real_ct(ct_dir):
    nib = pytest.importorskip("nibabel")
    vol = np.asarray(nib.load(str(ct_dir / "abdomen-3mm" / "ct.nii.gz")).dataobj, dtype=np.float32)  # 122×101×30 HU
    lo, hi = -125.0, 275.0
    slices = torch.from_numpy(np.clip((vol - lo) / (hi - lo), 0, 1)).permute(2, 0, 1).unsqueeze(1)  # axial slices
    assert slices.shape == (30, 1, 122, 101)
    ae, losses = train_slice_autoencoder(slices, steps=40, batch_size=8, seed=0, channels=8, return_losses=True)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])
    f = extract_features(ae.features, slices, batch_size=8)
    assert f.shape == (30, 128) and torch.isfinite(f).all()
