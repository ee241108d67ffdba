r"""Likelihood-based metrics in nats per image: KL, ELBO, importance-weighted bound, Parzen window.

Model interface (callables, so any model class fits):

- ``encode(x) -> (mu, logvar)``: the Gaussian posterior
  :math:`q(z|x) = \mathcal N(\mu, \operatorname{diag} e^{\log\sigma^2})` (any latent shape; all non-batch
  dimensions are latent dimensions);
- ``decode(z) -> out``: for ``likelihood="bernoulli"`` the **logits** of the pixel probabilities
  (``model.decode_logits``), for ``likelihood="gaussian"`` the **mean** image (``model.decode``).

Prior :math:`p(z) = \mathcal N(0, I)`. Decoder likelihoods, summed over the :math:`P` pixels of an image:

- Bernoulli: :math:`\log p(x|z) = \sum_p x_p \log s(\ell_p) + (1-x_p)\log(1-s(\ell_p)) = -\mathrm{BCE}(\ell, x)`,
  with :math:`s` the sigmoid. This is a normalised log-probability only for **binary** pixels: evaluate on
  binarised images (:func:`binarize`) to report a log-likelihood. On continuous [0, 1] pixels the same
  formula is the usual (unnormalised) BCE reconstruction term: fine as a training loss or for comparing
  models on identical data, but not a likelihood (the continuous Bernoulli normaliser is *not* added).
- Gaussian with fixed :math:`\sigma`:
  :math:`\log p(x|z) = -\tfrac12 \sum_p \big[(x_p-\mu_p)^2/\sigma^2 + \log(2\pi\sigma^2)\big]`, a density on
  continuous pixels (can be positive); only comparable between models at the same :math:`\sigma`.

Closed-form KL of the diagonal Gaussian posterior to the prior, per image:

.. math::

    \mathrm{KL}(q(z|x)\,\|\,\mathcal N(0,I))
        = \tfrac12 \sum_d \big(\mu_d^2 + e^{\log\sigma_d^2} - 1 - \log\sigma_d^2\big).

ELBO, per image, with the KL analytic and the reconstruction term by Monte Carlo with ``n_samples``
draws :math:`z^{(s)} = \mu + \sigma \odot \epsilon^{(s)}`:

.. math:: \mathcal L(x) = \mathbb E_{q(z|x)}[\log p(x|z)] - \mathrm{KL}(q(z|x)\,\|\,p(z)) \le \log p(x).

Importance-weighted bound (Burda et al. 2016, IWAE), with :math:`z_i \sim q(z|x)` i.i.d.:

.. math:: \mathcal L_k(x) = \log \frac1k \sum_{i=1}^k \frac{p(x|z_i)\,p(z_i)}{q(z_i|x)}
          = \operatorname{logsumexp}_i \big[\log p(x|z_i) + \log p(z_i) - \log q(z_i|x)\big] - \log k.

In expectation
:math:`\mathcal L = \mathbb E[\mathcal L_1] \le \mathbb E[\mathcal L_k] \le \mathbb E[\mathcal L_{k+1}] \le \log p(x)`,
and :math:`\mathcal L_k \to \log p(x)` as :math:`k\to\infty`; Burda et al. report :math:`k = 5000` on MNIST.
The log-sum-exp is taken in float64. Report the mean over held-out images with its standard error, the
decoder likelihood, :math:`k` and the seed.

Parzen-window estimate for models without an encoder (the GAN; Breuleux et al. 2011, Goodfellow et al.
2014): an isotropic Gaussian kernel density on :math:`n` generated samples :math:`s_i`,

.. math::

    \log \hat p_\sigma(x) = \operatorname{logsumexp}_i\Big[-\frac{\lVert x - s_i\rVert^2}{2\sigma^2}\Big]
        - \log n - \frac P2 \log(2\pi\sigma^2),

with :math:`\sigma` chosen on a validation split from a grid, then evaluated on the test images.
**Known weakness** (Theis, van den Oord & Bethge 2016, "A note on the evaluation of generative
models", ICLR): Parzen estimates "should generally be avoided". In high dimension the estimate needs an
impractically large number of samples to approach the true log-likelihood (their example: already for
6×6 image patches), so it is far off at 784 pixels with 10^4 samples; its ranking of models can be
wrong (a k-means model of the data beats the true data samples used as centres); and it is largely
independent of both the true likelihood and the visual quality of samples. It is reported only because
the article asks for a likelihood for the GAN: always next to the sample-based metrics, never as a
figure of merit on its own, and not comparable with the IWAE bounds of the encoder models.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from pancreas_gvae.evaluation.metrics.mmd import pairwise_sq_distances

__all__ = [
    "ELBOTerms",
    "ParzenResult",
    "binarize",
    "decoder_log_likelihood",
    "elbo",
    "encoder_kl",
    "iwae_bound",
    "kl_standard_normal",
    "parzen_estimate",
    "parzen_log_likelihood",
    "select_parzen_bandwidth",
]

_LOG_2PI = math.log(2.0 * math.pi)
_MAX_ELEMENTS = 2**24

Encode = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Decode = Callable[[torch.Tensor], torch.Tensor]


def binarize(x: torch.Tensor, *, seed: int | None = 0, threshold: float = 0.5) -> torch.Tensor:
    """Binary images from [0, 1] intensities: stochastic ``Bernoulli(x)`` draws with ``seed`` (the usual
    protocol for MNIST likelihoods), or ``x > threshold`` when ``seed`` is None."""
    if seed is None:
        return (x > threshold).to(x.dtype)
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(x.detach().float().cpu().clamp(0, 1), generator=gen).to(device=x.device, dtype=x.dtype)


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    r"""Per-image KL divergence to the standard normal prior, in nats, ``(N,)`` float64.

    :math:`\mathrm{KL}(\mathcal N(\mu, e^{\log\sigma^2}) \| \mathcal N(0, I))
    = \frac12\sum(\mu^2 + e^{\log\sigma^2} - 1 - \log\sigma^2)`,
    summed over all non-batch dimensions.
    """
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar must have the same shape, got {tuple(mu.shape)} and {tuple(logvar.shape)}")
    mu, logvar = mu.double(), logvar.double()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).reshape(mu.shape[0], -1).sum(1)


def _elementwise_log_likelihood(x: torch.Tensor, out: torch.Tensor, likelihood: str, sigma: float) -> torch.Tensor:
    """Per-pixel log-likelihood in the decoder output's dtype (at least float32), broadcast to ``out``'s shape.

    Per-pixel terms in float32 are accurate to ~1e-7 relative; callers sum them in float64.
    """
    dtype = torch.promote_types(out.dtype, torch.float32)
    out, x = out.to(dtype), x.to(dtype)
    if likelihood == "bernoulli":
        return -F.binary_cross_entropy_with_logits(out, x.expand_as(out), reduction="none")
    if likelihood == "gaussian":
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        return -0.5 * ((x - out).pow(2) / sigma**2 + (_LOG_2PI + 2.0 * math.log(sigma)))
    raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")


def decoder_log_likelihood(
    x: torch.Tensor,
    out: torch.Tensor,
    *,
    likelihood: str = "bernoulli",
    sigma: float = 0.1,
) -> torch.Tensor:
    r"""Per-image :math:`\log p(x|z)` summed over all non-batch dimensions, ``(N,)`` float64.

    ``out`` is the decoder output for ``x``: logits (``"bernoulli"``) or the mean image (``"gaussian"``,
    with fixed standard deviation ``sigma``). See the module docstring for when these are likelihoods.
    """
    if x.shape != out.shape:
        raise ValueError(f"x and out must have the same shape, got {tuple(x.shape)} and {tuple(out.shape)}")
    return _elementwise_log_likelihood(x, out, likelihood, sigma).reshape(x.shape[0], -1).sum(1, dtype=torch.float64)


def _sum_image(t: torch.Tensor, image_ndim: int) -> torch.Tensor:
    """Sum the last ``image_ndim`` dimensions, in float64."""
    return t.flatten(t.ndim - image_ndim).sum(-1, dtype=torch.float64)


def _log_weights(
    xb: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    decode: Decode,
    n_samples: int,
    sample_chunk: int | None,
    gen: torch.Generator,
    likelihood: str,
    sigma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(x|z), log p(z) - log q(z|x))`` for ``n_samples`` posterior draws per image, each ``(S, B)`` float64."""
    b = xb.shape[0]
    img_nd = xb.ndim - 1
    lat_nd = mu.ndim - 1
    std = torch.exp(0.5 * logvar)
    log_px, log_ratio = [], []
    if sample_chunk is None:  # decoder outputs of about 2^24 elements (64 MB in float32) per call
        sample_chunk = max(1, min(n_samples, _MAX_ELEMENTS // max(1, b * xb[0].numel())))
    for s0 in range(0, n_samples, sample_chunk):
        s = min(sample_chunk, n_samples - s0)
        eps = torch.randn((s, *mu.shape), generator=gen, dtype=torch.float32).to(device=mu.device, dtype=mu.dtype)
        z = mu.unsqueeze(0) + std.unsqueeze(0) * eps  # (s, B, ...)
        out = decode(z.reshape(s * b, *mu.shape[1:]))
        out = out.reshape(s, b, *xb.shape[1:])
        ll = _elementwise_log_likelihood(xb.unsqueeze(0), out, likelihood, sigma)
        log_px.append(_sum_image(ll, img_nd))
        z64, eps64 = z.double(), eps.double()
        log_pz = -0.5 * _sum_image(z64.pow(2) + _LOG_2PI, lat_nd)
        log_qz = -0.5 * _sum_image(logvar.double().unsqueeze(0) + eps64.pow(2) + _LOG_2PI, lat_nd)
        log_ratio.append(log_pz - log_qz)
    return torch.cat(log_px), torch.cat(log_ratio)


def _check_xy(x: torch.Tensor, k: int, name: str) -> None:
    if x.ndim < 2:
        raise ValueError(f"x must be a batch (N, ...), got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"{name} must be >= 1, got {k}")


@torch.no_grad()
def iwae_bound(
    x: torch.Tensor,
    encode: Encode,
    decode: Decode,
    *,
    k: int = 100,
    likelihood: str = "bernoulli",
    sigma: float = 0.1,
    batch_size: int = 100,
    sample_chunk: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    r"""Per-image importance-weighted bound :math:`\mathcal L_k(x)` on :math:`\log p(x)` in nats, ``(N,)`` float64.

    ``k`` importance samples per image from ``q(z|x)``; images are processed ``batch_size`` at a time
    and samples ``sample_chunk`` at a time (``decode`` sees ``sample_chunk * batch_size`` latents; by default
    as many as keep each decoder output under about 2^24 elements; lower ``batch_size`` for big images). The
    noise comes from a CPU generator seeded by ``seed``: the result is reproducible and independent of
    the device. See the module docstring for the likelihoods and what they mean.
    """
    _check_xy(x, k, "k")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size]
        mu, logvar = encode(xb)
        log_px, log_ratio = _log_weights(xb, mu, logvar, decode, k, sample_chunk, gen, likelihood, sigma)
        out.append(torch.logsumexp(log_px + log_ratio, dim=0) - math.log(k))
    return torch.cat(out).cpu()


class ELBOTerms(NamedTuple):
    """Per-image ELBO and its two terms, ``(N,)`` float64 each: ``elbo = reconstruction - kl``."""

    elbo: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor


@torch.no_grad()
def elbo(
    x: torch.Tensor,
    encode: Encode,
    decode: Decode,
    *,
    n_samples: int = 1,
    likelihood: str = "bernoulli",
    sigma: float = 0.1,
    batch_size: int = 100,
    sample_chunk: int | None = None,
    seed: int = 0,
) -> ELBOTerms:
    r"""Per-image ELBO :math:`\mathbb E_q[\log p(x|z)] - \mathrm{KL}(q\|p)` with the KL in closed form.

    The expectation is a Monte-Carlo mean over ``n_samples`` posterior draws (seeded by ``seed``). Use the
    same ``likelihood`` (and ``sigma``) for every model compared.
    """
    _check_xy(x, n_samples, "n_samples")
    gen = torch.Generator().manual_seed(seed)
    rec, kl = [], []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size]
        mu, logvar = encode(xb)
        log_px, _ = _log_weights(xb, mu, logvar, decode, n_samples, sample_chunk, gen, likelihood, sigma)
        rec.append(log_px.mean(0))
        kl.append(kl_standard_normal(mu, logvar))
    reconstruction = torch.cat(rec).cpu()
    kl_t = torch.cat(kl).cpu()
    return ELBOTerms(elbo=reconstruction - kl_t, reconstruction=reconstruction, kl=kl_t)


@torch.no_grad()
def encoder_kl(x: torch.Tensor, encode: Encode, *, batch_size: int = 500) -> torch.Tensor:
    """Per-image closed-form ``KL(q(z|x) || N(0, I))`` in nats, ``(N,)`` float64; report its mean on held-out images."""
    parts = [kl_standard_normal(*encode(x[i : i + batch_size])) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(parts).cpu()


# --- Parzen window -------------------------------------------------------------------------------------


@torch.no_grad()
def parzen_log_likelihood(
    x: torch.Tensor,
    centres: torch.Tensor,
    sigmas: float | Sequence[float] | torch.Tensor,
    *,
    chunk_size: int = 1024,
) -> torch.Tensor:
    r"""Parzen-window :math:`\log\hat p_\sigma(x)` for each row of ``x`` and each bandwidth, ``(N, n_sigmas)`` float64.

    ``x``: ``(N, ...)`` evaluation images; ``centres``: ``(n, ...)`` generated samples (the kernel
    centres); both flattened to vectors. All bandwidths share one pass over the squared distances; the
    log-sum-exp over centres is accumulated chunk by chunk (running maximum), so memory is
    ``chunk_size²`` whatever ``N`` and ``n``. See the module docstring for the formula and its weakness.
    """
    xf = x.reshape(x.shape[0], -1).double()
    cf = centres.reshape(centres.shape[0], -1).double()
    if xf.shape[1] != cf.shape[1]:
        raise ValueError(f"x and centres differ in dimension: {xf.shape[1]} and {cf.shape[1]}")
    sig = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if sig.numel() == 0 or bool((sig <= 0).any()):
        raise ValueError(f"sigmas must be positive, got {sig.tolist()}")
    n, p = cf.shape
    neg_inv = (-0.5 / sig.pow(2)).to(xf.device)  # (S,)
    c_sq = cf.pow(2).sum(1)
    out = []
    for i in range(0, xf.shape[0], chunk_size):
        xi = xf[i : i + chunk_size]
        xi_sq = xi.pow(2).sum(1)
        acc = torch.full((sig.numel(), xi.shape[0]), -math.inf, dtype=torch.float64, device=xf.device)
        for j in range(0, n, chunk_size):
            d = pairwise_sq_distances(xi, cf[j : j + chunk_size], a_sq=xi_sq, b_sq=c_sq[j : j + chunk_size])
            e = neg_inv.view(-1, 1, 1) * d.unsqueeze(0)  # (S, b, c)
            acc = torch.logaddexp(acc, torch.logsumexp(e, dim=2))
        out.append(acc.t())
    log_norm = math.log(n) + 0.5 * p * (_LOG_2PI + 2.0 * torch.log(sig))
    return torch.cat(out).cpu() - log_norm.unsqueeze(0)


def _grid(sigmas: Sequence[float] | torch.Tensor | None) -> torch.Tensor:
    """The bandwidth grid: ``sigmas``, or 10 values log-spaced in [0.05, 1]."""
    if sigmas is None:
        return torch.logspace(math.log10(0.05), 0.0, 10, dtype=torch.float64)
    return torch.as_tensor(sigmas, dtype=torch.float64).flatten()


def select_parzen_bandwidth(
    validation: torch.Tensor,
    centres: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor | None = None,
    *,
    chunk_size: int = 1024,
) -> tuple[float, torch.Tensor]:
    """The bandwidth of the grid ``sigmas`` that maximises the mean Parzen log-likelihood of ``validation``.

    Returns ``(best_sigma, mean_log_likelihood_per_sigma)``. Default grid: 10 values log-spaced in
    [0.05, 1] (for [0, 1] pixels; Goodfellow et al. 2014 searched [0.1, 1] on MNIST). A best value at
    either end of the grid means the grid should be widened.
    """
    grid = _grid(sigmas)
    scores = parzen_log_likelihood(validation, centres, grid, chunk_size=chunk_size).mean(0)
    return float(grid[int(scores.argmax())]), scores


class ParzenResult(NamedTuple):
    """Parzen estimate on the test images with the validation-selected bandwidth."""

    log_likelihood: torch.Tensor  # (N_test,) nats per image, float64
    sigma: float
    grid: torch.Tensor
    validation_scores: torch.Tensor
    at_grid_edge: bool


def parzen_estimate(
    test: torch.Tensor,
    validation: torch.Tensor,
    centres: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor | None = None,
    *,
    chunk_size: int = 1024,
) -> ParzenResult:
    """Choose the bandwidth on ``validation`` (:func:`select_parzen_bandwidth`), then evaluate ``test`` with it.

    ``validation`` and ``test`` must be disjoint real images (and disjoint from the training set);
    ``centres`` are the model's samples. ``at_grid_edge`` flags a bandwidth at the end of the grid.
    """
    grid = _grid(sigmas)
    sigma, scores = select_parzen_bandwidth(validation, centres, grid, chunk_size=chunk_size)
    idx = int(scores.argmax())
    ll = parzen_log_likelihood(test, centres, sigma, chunk_size=chunk_size)[:, 0]
    return ParzenResult(ll, sigma, grid, scores, at_grid_edge=idx in (0, grid.numel() - 1))
