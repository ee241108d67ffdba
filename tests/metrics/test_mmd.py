"""MMD²: unbiased estimator against a brute-force double loop, chunking, sign behaviour, and why not MONAI's."""

from __future__ import annotations

import math

import pytest
import torch
from monai.metrics import MMDMetric

from pancreas_gvae.evaluation.metrics.mmd import (
    gaussian_bandwidths,
    median_heuristic,
    mmd2_features,
    mmd2_gaussian,
    pairwise_sq_distances,
)


def _brute_mmd2(x: torch.Tensor, y: torch.Tensor, sigma: float) -> float:
    """Gretton et al. 2012 Lemma 6, written out with explicit loops."""
    def k(a, b):
        return math.exp(-float(((a - b) ** 2).sum()) / (2 * sigma**2))

    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j)
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n))
    return sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2 * sxy / (m * n)


def test_two_points_each_hand_computed():
    # x = {0, 1}, y = {0, 2} in 1-D, sigma = 1: k(d) = exp(-d²/2)
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[0.0], [2.0]])
    e = math.exp
    expected = (2 * e(-0.5)) / 2 + (2 * e(-2.0)) / 2 - 2 * (e(0) + e(-2.0) + e(-0.5) + e(-0.5)) / 4
    got = mmd2_gaussian(x, y, bandwidths=[1.0], dtype=torch.float64)
    assert float(got) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 1000])
def test_matches_brute_force_for_every_chunk_size(chunk_size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 3, generator=g, dtype=torch.float64)
    y = torch.randn(7, 3, generator=g, dtype=torch.float64) + 0.5
    sigmas = [0.5, 1.0, 2.0]
    got = mmd2_gaussian(x, y, bandwidths=sigmas, reduction="none", chunk_size=chunk_size, dtype=torch.float64)
    expected = torch.tensor([_brute_mmd2(x, y, s) for s in sigmas], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    mean = mmd2_gaussian(x, y, bandwidths=sigmas, chunk_size=chunk_size, dtype=torch.float64)
    total = mmd2_gaussian(x, y, bandwidths=sigmas, reduction="sum", chunk_size=chunk_size, dtype=torch.float64)
    assert float(mean) == pytest.approx(float(expected.mean()), abs=1e-10)
    assert float(total) == pytest.approx(float(expected.sum()), abs=1e-10)


def test_identical_sets_near_zero_and_same_distribution_near_zero():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(400, 1, 8, 8, generator=g)  # images: flattened to 64-D
    same = float(mmd2_gaussian(x, x.clone()))
    # identical sets: exactly -2/m (1 - mean off-diagonal kernel) + O(1/m²): slightly negative, tiny
    assert -2.0 / 400 <= same <= 0.0
    y = torch.rand(400, 1, 8, 8, generator=g)
    assert abs(float(mmd2_gaussian(x, y))) < 0.01


def test_different_distributions_clearly_positive():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(300, 64, generator=g)
    y = torch.rand(300, 64, generator=g).pow(3)  # same support, different distribution
    same = abs(float(mmd2_gaussian(x, torch.rand(300, 64, generator=g))))
    diff = float(mmd2_gaussian(x, y))
    assert diff > 0.05
    assert diff > 20 * same


def test_monai_linear_kernel_misses_a_variance_change_that_gaussian_mmd_sees():
    # Same mean, different spread: MONAI's MMDMetric (linear kernel) compares only the means.
    g = torch.Generator().manual_seed(3)
    x = 0.5 + 0.05 * torch.randn(500, 1, 4, 4, generator=g)
    y = 0.5 + 0.30 * torch.randn(500, 1, 4, 4, generator=g)
    linear = float(MMDMetric()(x, y))
    gaussian = float(mmd2_gaussian(x, y))
    assert abs(linear) < 0.02
    assert gaussian > 0.1


def test_median_heuristic_and_bandwidths():
    x = torch.tensor([[0.0], [1.0], [3.0]])  # pairwise distances 1, 3, 2 -> median 2
    assert median_heuristic(x) == pytest.approx(2.0)
    expected = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(gaussian_bandwidths(x, factors=(0.5, 1.0, 2.0)), expected)
    with pytest.raises(ValueError, match="identical"):
        median_heuristic(torch.zeros(5, 3))


def test_bandwidths_come_from_the_reference_set_only():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 5, generator=g)
    y1, y2 = torch.randn(200, 5, generator=g), 3 * torch.randn(200, 5, generator=g)
    sig = gaussian_bandwidths(x)
    assert float(mmd2_gaussian(x, y1)) == pytest.approx(float(mmd2_gaussian(x, y1, bandwidths=sig)), abs=1e-6)
    assert float(mmd2_gaussian(x, y2)) == pytest.approx(float(mmd2_gaussian(x, y2, bandwidths=sig)), abs=1e-6)


def test_subsampling_and_features():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(500, 1, 6, 6, generator=g)
    y = torch.rand(500, 1, 6, 6, generator=g) * 0.5
    sub = mmd2_gaussian(x, y, max_samples=200, seed=3)
    assert float(sub) > 0.05
    assert float(sub) == float(mmd2_gaussian(x, y, max_samples=200, seed=3))  # seeded
    # feature space: the identity "network" gives the pixel-space value
    pix = mmd2_gaussian(x, y)
    feat = mmd2_features(x, y, lambda b: b.flatten(1), batch_size=64)
    assert float(feat) == pytest.approx(float(pix), abs=1e-6)
    # a feature map blind to the difference (each image rescaled to unit maximum) sees almost none of it
    blind = mmd2_features(x, y, lambda b: b.flatten(1) / b.flatten(1).amax(1, keepdim=True))
    assert abs(float(blind)) < 0.1 * float(pix)


def test_pairwise_sq_distances_non_negative_and_correct():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g)
    torch.testing.assert_close(pairwise_sq_distances(a, b), torch.cdist(a, b).pow(2), rtol=1e-5, atol=1e-5)
    assert bool((pairwise_sq_distances(a, a) >= 0).all())


def test_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        mmd2_gaussian(torch.zeros(1, 3), torch.ones(4, 3), bandwidths=[1.0])
    with pytest.raises(ValueError, match="dimensions"):
        mmd2_gaussian(torch.zeros(4, 3), torch.ones(4, 2), bandwidths=[1.0])
    with pytest.raises(ValueError, match="reduction"):
        mmd2_gaussian(torch.zeros(4, 3), torch.ones(4, 3), bandwidths=[1.0], reduction="max")
    with pytest.raises(ValueError, match="positive"):
        mmd2_gaussian(torch.zeros(4, 3), torch.ones(4, 3), bandwidths=[0.0])
