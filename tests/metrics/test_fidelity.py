"""Fréchet distance, KID, precision/recall and mode coverage against closed forms and hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pancreas_gvae.evaluation.metrics.fidelity import (
    class_histogram,
    feature_statistics,
    frechet_distance,
    frechet_distance_features,
    kernel_distance,
    knn_radii,
    mode_coverage,
    precision_recall,
)


def test_frechet_identical_gaussians_is_zero():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    cov = a @ a.t() + 0.1 * torch.eye(6, dtype=torch.float64)
    mu = torch.randn(6, generator=g, dtype=torch.float64)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)


def test_frechet_diagonal_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([4.0, 1.0, 0.25])
    # ||mu1 - mu2||² + sum (sqrt a - sqrt b)² = (1 + 0 + 4) + (1 + 1 + 0) = 7
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(7.0, abs=1e-9)


def test_frechet_matches_scipy_sqrtm_on_full_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.01 * np.eye(5), b @ b.T
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    got = frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), torch.from_numpy(mu2), torch.from_numpy(s2))
    assert got == pytest.approx(expected, rel=1e-8)


def test_frechet_from_features():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(300, 8, generator=g)
    assert frechet_distance_features(f, f.clone()) == pytest.approx(0.0, abs=1e-8)
    # fewer samples than features: singular covariances still give a finite, non-negative value
    small = torch.randn(5, 8, generator=g)
    assert math.isfinite(frechet_distance_features(small, small + 1.0))
    # pure mean shift. The singular covariances' null-space eigenvalues come out as about +-1e-15, whose square
    # roots (~3e-8 each) take ~1e-7 off the trace term, by an amount that depends on the CPU's LAPACK path
    # (1.4e-7 on an Intel Xeon, under 1e-8 on an AMD EPYC): hence 1e-6, not 1e-8
    assert frechet_distance_features(small, small + 1.0) == pytest.approx(8.0, abs=1e-6)
    mu, cov = feature_statistics(f)
    torch.testing.assert_close(cov, torch.from_numpy(np.cov(f.double().numpy(), rowvar=False)))


def _brute_poly_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    d = x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1.0) ** 3

    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j)
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n))
    return sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2 * sxy / (m * n)


def test_kid_matches_brute_force_with_one_full_subset():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randn(6, 3, generator=g, dtype=torch.float64) + 0.3
    kid = kernel_distance(x, y, n_subsets=1, subset_size=6)
    assert kid.mean == pytest.approx(_brute_poly_mmd2(x, y), abs=1e-10)
    assert kid.std == 0.0


def test_kid_near_zero_for_same_distribution_positive_for_different():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    same = kernel_distance(x, y, n_subsets=20, subset_size=200)
    diff = kernel_distance(x, 1.5 * y + 0.5, n_subsets=20, subset_size=200)
    assert abs(same.mean) < 0.05
    assert diff.mean > 1.0
    assert same.values.shape == (20,)


def test_knn_radii_hand_computed():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    torch.testing.assert_close(knn_radii(x, k=1), torch.tensor([1.0, 1.0, 2.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(knn_radii(x, k=2, chunk_size=3), torch.tensor([3.0, 2.0, 3.0, 5.0], dtype=torch.float64))


def test_precision_recall_identical_disjoint_and_hand_made():
    g = torch.Generator().manual_seed(5)
    r = torch.randn(200, 4, generator=g)
    pr = precision_recall(r, r.clone(), k=3)
    assert (pr.precision, pr.recall) == (1.0, 1.0)
    far = precision_recall(r, r + 100.0, k=3, chunk_size=64)
    assert (far.precision, far.recall) == (0.0, 0.0)
    # 1-D: real {0, 1, 2, 3} (k = 1 radii all 1), fake {0.5, 10} (k = 1 radii 9.5 each)
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [10.0]])
    hand = precision_recall(real, fake, k=1)
    assert hand.precision == 0.5  # 0.5 is within 1 of a real point; 10 is not
    assert hand.recall == 1.0  # every real point is within 9.5 of 0.5
    assert hand.fake_in_real_manifold.tolist() == [True, False]


def test_mode_coverage_hand_made_histogram():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    mc = mode_coverage(labels, num_classes=4, min_fraction=0.25)
    assert mc.counts.tolist() == [50, 30, 20, 0]
    torch.testing.assert_close(mc.histogram, torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64))
    assert mc.n_covered == 2  # 0.5 and 0.3 are >= 0.25
    expected_kl = 0.5 * math.log(0.5 * 4) + 0.3 * math.log(0.3 * 4) + 0.2 * math.log(0.2 * 4)
    assert mc.kl_to_uniform == pytest.approx(expected_kl)
    assert mc.kl_to_reference is None
    assert mode_coverage(labels, num_classes=4).n_covered == 3
    ref = torch.tensor([25, 25, 25, 25])  # counts are normalised: KL to uniform again
    assert mode_coverage(labels, num_classes=4, reference=ref).kl_to_reference == pytest.approx(expected_kl)
    missing = torch.tensor([1.0, 1.0, 0.0, 0.0])  # the samples use class 2, the reference never does
    assert mode_coverage(labels, num_classes=4, reference=missing).kl_to_reference == math.inf
    # a collapsed generator: one class, KL to uniform = log C
    collapsed = mode_coverage(torch.zeros(100, dtype=torch.long), num_classes=10)
    assert collapsed.n_covered == 1 and collapsed.kl_to_uniform == pytest.approx(math.log(10))
    # logits are reduced by arg-max
    assert class_histogram(torch.tensor([[0.1, 2.0], [3.0, 0.0], [0.0, 1.0]]), 2).tolist() == [1, 2]
    with pytest.raises(ValueError, match="labels must lie"):
        class_histogram(torch.tensor([0, 5]), 4)
