r"""Fidelity and diversity of a sample set: Fréchet distance, kernel distance, precision/recall, mode coverage.

All functions take **feature vectors** ``(N, F)`` (or images, flattened), computed by a network trained
in this project (:mod:`pancreas_gvae.evaluation.metrics.feature_nets`): no Inception weights exist here, so the
values are "FID-style" and "KID-style", comparable between models evaluated with the same feature
network, not with published FID/KID figures.

Fréchet distance (Heusel et al. 2017) between Gaussians fitted to the two feature sets:

.. math::

    d_F^2 = \lVert \mu_1 - \mu_2 \rVert^2
        + \operatorname{tr}\big(\Sigma_1 + \Sigma_2 - 2 (\Sigma_1 \Sigma_2)^{1/2}\big).

The trace of the matrix square root is computed without ``scipy.linalg.sqrtm`` (which works on the
non-symmetric product and returns complex parts from round-off): :math:`\Sigma_1\Sigma_2` is similar to
the symmetric PSD matrix :math:`M = \Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2}`, so
:math:`\operatorname{tr}(\Sigma_1\Sigma_2)^{1/2} = \sum_i \sqrt{\lambda_i(M)}`, with :math:`\Sigma_1^{1/2}` and the
eigenvalues of :math:`M` from symmetric eigen-decompositions in float64 and negative round-off
eigenvalues clipped to 0. This is stable for singular covariances (fewer samples than features).
Biased for finite :math:`N` (Chong & Forsyth 2020): compare models at the same sample size.

Kernel distance (KID, Bińkowski et al. 2018): the unbiased MMD² with the polynomial kernel
:math:`k(a, b) = (a^\top b / d + 1)^3`, averaged over ``n_subsets`` random subsets of ``subset_size``
from each set; unbiased, so usable at small :math:`N`, and can be slightly negative when the sets match.

Precision and recall (Kynkäänniemi et al. 2019): the real manifold is the union of balls around each
real feature with radius its distance to its :math:`k`-th nearest real neighbour (self excluded), the
generated manifold likewise. Precision = fraction of generated samples inside the real manifold
(fidelity); recall = fraction of real samples inside the generated manifold (coverage/diversity).

Mode coverage (MNIST): the histogram of the classes a trained classifier assigns to the samples; the
number of classes holding at least ``min_fraction`` of the samples, and the KL divergence of the
histogram to the uniform histogram (or to the real images' class histogram).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from pancreas_gvae.evaluation.metrics.mmd import pairwise_sq_distances, unbiased_mmd2

__all__ = [
    "KernelDistance",
    "ModeCoverage",
    "PrecisionRecall",
    "class_histogram",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_features",
    "kernel_distance",
    "knn_radii",
    "mode_coverage",
    "precision_recall",
]


def _flat64(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim < 2:
        raise ValueError(f"expected a set of feature vectors (N, F), got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1).double()


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(F,)`` and covariance ``(F, F)`` (unbiased, divisor ``N - 1``, as ``numpy.cov``) in float64."""
    f = _flat64(features)
    if f.shape[0] < 2:
        raise ValueError("feature statistics need at least 2 samples")
    mu = f.mean(0)
    c = f - mu
    return mu, (c.t() @ c) / (f.shape[0] - 1)


def _sym_sqrt(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix by eigen-decomposition (negative round-off eigenvalues → 0)."""
    w, v = torch.linalg.eigh((a + a.t()) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.t()


def frechet_distance(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    r"""Fréchet distance between two Gaussians (module docstring), in float64.

    :math:`\lVert\mu_1-\mu_2\rVert^2 + \operatorname{tr}(\Sigma_1+\Sigma_2-2(\Sigma_1\Sigma_2)^{1/2})`.

    Inputs: means ``(F,)`` and covariance matrices ``(F, F)``.
    Example: for diagonal covariances it is :math:`\lVert\mu_1-\mu_2\rVert^2 + \sum_i(\sqrt{a_i}-\sqrt{b_i})^2`.
    """
    mu1, mu2 = torch.as_tensor(mu1).double().flatten(), torch.as_tensor(mu2).double().flatten()
    s1, s2 = torch.as_tensor(sigma1).double(), torch.as_tensor(sigma2).double()
    f = mu1.numel()
    if mu2.numel() != f or s1.shape != (f, f) or s2.shape != (f, f):
        raise ValueError(
            f"shape mismatch: mu1 {tuple(mu1.shape)}, mu2 {tuple(mu2.shape)}, "
            f"sigma1 {tuple(s1.shape)}, sigma2 {tuple(s2.shape)}"
        )
    r1 = _sym_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_sqrt = torch.linalg.eigvalsh((m + m.t()) / 2).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2.0 * tr_sqrt
    return max(float(value), 0.0)


def frechet_distance_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance of Gaussians fitted (:func:`feature_statistics`) to feature sets ``(N, F)``, ``(M, F)``."""
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


class KernelDistance(NamedTuple):
    """KID: mean and standard deviation over subsets, and the per-subset unbiased MMD² values."""

    mean: float
    std: float
    values: torch.Tensor


def _poly_mmd2(x: torch.Tensor, y: torch.Tensor, degree: int, coef0: float) -> float:
    d = x.shape[1]
    c = torch.full((), coef0, dtype=x.dtype, device=x.device)

    def gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.addmm(c, a, b.t(), alpha=1.0 / d).pow_(degree)

    kxx, kyy, kxy = gram(x, x), gram(y, y), gram(x, y)
    m, n = x.shape[0], y.shape[0]
    return float(
        unbiased_mmd2(kxx.sum() - kxx.diagonal().sum(), kyy.sum() - kyy.diagonal().sum(), kxy.sum(), m, n)
    )


def kernel_distance(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    n_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    coef0: float = 1.0,
    seed: int = 0,
) -> KernelDistance:
    r"""KID: unbiased MMD² with the kernel :math:`(a^\top b/d + c_0)^{p}` (p = ``degree`` = 3, ``coef0`` = 1).

    Each of ``n_subsets`` draws ``min(subset_size, N_real, N_fake)`` rows of each set without
    replacement (generator seeded by ``seed``), as in Bińkowski et al.'s reference code. Float64.
    """
    x, y = _flat64(real), _flat64(fake)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"real and fake differ in dimension: {x.shape[1]} and {y.shape[1]}")
    if n_subsets < 1:
        raise ValueError(f"n_subsets must be >= 1, got {n_subsets}")
    m = min(subset_size, x.shape[0], y.shape[0])
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n_subsets):
        ix = torch.randperm(x.shape[0], generator=gen)[:m].to(x.device)
        iy = torch.randperm(y.shape[0], generator=gen)[:m].to(y.device)
        values.append(_poly_mmd2(x[ix], y[iy], degree, coef0))
    v = torch.tensor(values, dtype=torch.float64)
    return KernelDistance(float(v.mean()), float(v.std()) if n_subsets > 1 else 0.0, v)


def knn_radii(features: torch.Tensor, *, k: int = 3, chunk_size: int = 2048) -> torch.Tensor:
    """Distance of each row to its ``k``-th nearest *other* row (self excluded by index), ``(N,)`` float64; chunked."""
    f = _flat64(features)
    n = f.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N-1] = [1, {n - 1}], got {k}")
    sq = f.pow(2).sum(1)
    out = []
    for i in range(0, n, chunk_size):
        d = pairwise_sq_distances(f[i : i + chunk_size], f, a_sq=sq[i : i + chunk_size], b_sq=sq)
        rows = torch.arange(d.shape[0], device=d.device)
        d[rows, rows + i] = math.inf
        out.append(d.topk(k, dim=1, largest=False).values[:, -1].sqrt())
    return torch.cat(out)


def _inside_manifold(
    queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Boolean ``(Q,)``: query ``q`` lies in some ball ``||q - c_j|| <= r_j``."""
    c_sq = centres.pow(2).sum(1)
    r_sq = radii.pow(2)
    q_sq = queries.pow(2).sum(1)
    inside = torch.zeros(queries.shape[0], dtype=torch.bool, device=queries.device)
    for i in range(0, queries.shape[0], chunk_size):
        qi, qi_sq = queries[i : i + chunk_size], q_sq[i : i + chunk_size]
        hit = torch.zeros(qi.shape[0], dtype=torch.bool, device=queries.device)
        for j in range(0, centres.shape[0], chunk_size):
            d = pairwise_sq_distances(qi, centres[j : j + chunk_size], a_sq=qi_sq, b_sq=c_sq[j : j + chunk_size])
            hit |= (d <= r_sq[j : j + chunk_size].unsqueeze(0)).any(1)
        inside[i : i + chunk_size] = hit
    return inside


class PrecisionRecall(NamedTuple):
    """Improved precision and recall (Kynkäänniemi et al. 2019) and the per-sample memberships behind them."""

    precision: float
    recall: float
    fake_in_real_manifold: torch.Tensor  # (M,) bool
    real_in_fake_manifold: torch.Tensor  # (N,) bool


def precision_recall(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    k: int = 3,
    chunk_size: int = 2048,
) -> PrecisionRecall:
    r"""Improved precision and recall of a sample set (Kynkäänniemi et al. 2019).

    Precision :math:`= \frac1M\sum_j \mathbb 1[\exists i: \lVert g_j - r_i\rVert \le \rho_k(r_i)]`; recall swaps roles.

    ``real`` ``(N, F)``, ``fake`` ``(M, F)``: feature vectors (or images, flattened); :math:`\rho_k` is the
    distance to the ``k``-th nearest neighbour within the same set (default ``k = 3``, as in the paper).
    Identical sets give 1 and 1; well-separated sets 0 and 0. Cost: O((N + M)²·F), chunked; float64.
    """
    r, g = _flat64(real), _flat64(fake)
    if r.shape[1] != g.shape[1]:
        raise ValueError(f"real and fake differ in dimension: {r.shape[1]} and {g.shape[1]}")
    r_radii = knn_radii(r, k=k, chunk_size=chunk_size)
    g_radii = knn_radii(g, k=k, chunk_size=chunk_size)
    fake_in = _inside_manifold(g, r, r_radii, chunk_size)
    real_in = _inside_manifold(r, g, g_radii, chunk_size)
    return PrecisionRecall(float(fake_in.double().mean()), float(real_in.double().mean()), fake_in.cpu(), real_in.cpu())


def class_histogram(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts per class ``(num_classes,)`` int64 of ``labels`` ``(N,)``, or of the arg-max of logits ``(N, C)``."""
    labels = torch.as_tensor(labels)
    if labels.ndim == 2:
        labels = labels.argmax(1)
    labels = labels.long().flatten()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]")
    return torch.bincount(labels.cpu(), minlength=num_classes)


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p || q) in nats with 0·log 0 = 0; inf where q = 0 < p."""
    mask = p > 0
    if bool((q[mask] <= 0).any()):
        return math.inf
    return float((p[mask] * (p[mask].log() - q[mask].log())).sum())


class ModeCoverage(NamedTuple):
    """Class histogram of the samples and what it says about mode coverage."""

    counts: torch.Tensor  # (C,) int64
    histogram: torch.Tensor  # (C,) float64, sums to 1
    n_covered: int  # classes holding at least min_fraction of the samples
    kl_to_uniform: float  # KL(histogram || uniform), nats; 0 = perfectly balanced, log C = one class
    kl_to_reference: float | None  # KL(histogram || reference histogram), nats, when a reference is given


def mode_coverage(
    labels: torch.Tensor,
    *,
    num_classes: int,
    min_fraction: float = 0.01,
    reference: torch.Tensor | None = None,
) -> ModeCoverage:
    r"""Mode coverage of a sample set from its predicted classes.

    ``labels``: ``(N,)`` classes assigned to the samples by a trained classifier (or ``(N, C)`` logits).
    A class is *covered* when it holds at least ``min_fraction`` of the samples (default 1 %: a tenth
    of the uniform share of MNIST's 10 classes). ``kl_to_uniform`` :math:`= \sum_c h_c \log(C h_c)`;
    ``kl_to_reference`` :math:`= \sum_c h_c \log(h_c / r_c)` for a reference histogram (counts or
    frequencies, e.g. the classifier's predictions on real held-out images) — infinite when the
    samples use a class the reference never does.
    """
    counts = class_histogram(labels, num_classes)
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no labels given")
    hist = counts.double() / total
    uniform = torch.full_like(hist, 1.0 / num_classes)
    kl_ref = None
    if reference is not None:
        ref = torch.as_tensor(reference, dtype=torch.float64).flatten().cpu()
        if ref.numel() != num_classes or bool((ref < 0).any()) or float(ref.sum()) <= 0:
            raise ValueError(f"reference must be {num_classes} non-negative counts or frequencies")
        kl_ref = _kl(hist, ref / ref.sum())
    return ModeCoverage(
        counts=counts,
        histogram=hist,
        n_covered=int((hist >= min_fraction).sum()),
        kl_to_uniform=_kl(hist, uniform),
        kl_to_reference=kl_ref,
    )
