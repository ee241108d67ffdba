"""SSIM, MS-SSIM diversity settings for 28-px images, and reconstruction error in data units (HU)."""

from __future__ import annotations

import pytest
import torch
from monai.metrics import MultiScaleSSIMMetric

from pancreas_gvae.evaluation.metrics.ssim import (
    MONAI_MS_SSIM_WEIGHTS,
    ms_ssim_diversity,
    ms_ssim_settings,
    reconstruction_error,
    reconstruction_ssim,
    to_data_units,
)


def _images(n: int, size: int = 28, seed: int = 0, spatial_dims: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, *([size] * spatial_dims), generator=g)


def test_ssim_is_one_for_identical_images_2d_and_3d():
    x = _images(5)
    s = reconstruction_ssim(x, x.clone())
    assert s.shape == (5,)
    torch.testing.assert_close(s, torch.ones(5), rtol=0, atol=1e-5)
    v = _images(2, size=16, spatial_dims=3)
    s3 = reconstruction_ssim(v, v.clone(), spatial_dims=3, win_size=7)
    torch.testing.assert_close(s3, torch.ones(2), rtol=0, atol=1e-5)
    blank = torch.zeros(2, 1, 28, 28)  # constant images: the stabilising constants make SSIM exactly 1
    torch.testing.assert_close(reconstruction_ssim(blank, blank), torch.ones(2), rtol=0, atol=1e-6)


def test_ssim_drops_with_noise_and_is_batched_consistently():
    x = _images(6)
    g = torch.Generator().manual_seed(1)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    s = reconstruction_ssim(x, noisy)
    assert bool((s < 0.9).all())
    torch.testing.assert_close(reconstruction_ssim(x, noisy, batch_size=2), s)
    with pytest.raises(ValueError, match="same shape"):
        reconstruction_ssim(x, noisy[:3])


def test_ms_ssim_settings_for_28_px():
    st = ms_ssim_settings((28, 28))
    assert len(st.weights) == 3 and st.kernel_size == 5 and st.kernel_sigma == 1.0
    assert sum(st.weights) == pytest.approx(1.0)
    w = MONAI_MS_SSIM_WEIGHTS[:3]
    assert st.weights == pytest.approx(tuple(v / sum(w) for v in w))
    assert ms_ssim_settings(512).weights == MONAI_MS_SSIM_WEIGHTS and ms_ssim_settings(512).kernel_size == 11
    # MONAI's defaults do not fit a 28-pixel image: the reason for ms_ssim_settings
    x = _images(2)
    with pytest.raises(ValueError):
        MultiScaleSSIMMetric(spatial_dims=2)(x, x)


def test_diversity_identical_samples_is_one_and_noise_is_low():
    same = _images(1).repeat(10, 1, 1, 1)
    d_same = ms_ssim_diversity(same, n_pairs=20)
    torch.testing.assert_close(d_same, torch.ones_like(d_same), rtol=0, atol=1e-5)
    noise = _images(50, seed=2)
    d_noise = ms_ssim_diversity(noise, n_pairs=100, seed=0)
    assert d_noise.shape == (100,)
    assert float(d_noise.mean()) < 0.2  # independent noise images: very diverse
    assert torch.equal(d_noise, ms_ssim_diversity(noise, n_pairs=100, seed=0))  # seeded


def test_diversity_uses_all_pairs_of_a_small_set():
    x = _images(4, seed=3)
    d = ms_ssim_diversity(x, n_pairs=1000)
    assert d.shape == (6,)  # 4 choose 2


def test_reconstruction_error_plain_and_in_hu():
    x = torch.full((2, 1, 4, 4), 0.5)
    x_hat = torch.full((2, 1, 4, 4), 0.75)
    x_hat[1] = 0.5
    err = reconstruction_error(x, x_hat)
    torch.testing.assert_close(err.l1, torch.tensor([0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(err.mse, torch.tensor([0.0625, 0.0], dtype=torch.float64))
    # window [-125, 275] HU: 0.5 -> 75 HU, 0.75 -> 175 HU: L1 100 HU, MSE 10,000 HU²
    hu = reconstruction_error(x, x_hat, window=(-125.0, 275.0))
    torch.testing.assert_close(hu.l1, torch.tensor([100.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(hu.mse, torch.tensor([10000.0, 0.0], dtype=torch.float64))
    assert float(to_data_units(torch.tensor(0.0), (-87.0, 199.0))) == -87.0
    assert float(to_data_units(torch.tensor(1.0), (-87.0, 199.0))) == 199.0
    with pytest.raises(ValueError, match="hi > lo"):
        to_data_units(x, (1.0, 0.0))
