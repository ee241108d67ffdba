"""KL, ELBO, IWAE and Parzen against closed forms, on a linear-Gaussian model whose log p(x) is known exactly.

Model: z ~ N(0, I_2), x | z ~ N(W z + b, s² I_3) with orthogonal columns in W, so that
log p(x) = log N(x; b, W Wᵀ + s² I) and the exact posterior is diagonal:
S = (I + WᵀW / s²)⁻¹, m = S Wᵀ (x - b) / s².
"""

from __future__ import annotations

import math

import pytest
import torch

from pancreas_gvae.evaluation.metrics.likelihood import (
    binarize,
    decoder_log_likelihood,
    elbo,
    encoder_kl,
    iwae_bound,
    kl_standard_normal,
    parzen_estimate,
    parzen_log_likelihood,
    select_parzen_bandwidth,
)

S = 0.5
W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
B = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
POST_VAR = 1.0 / (1.0 + (W * W).sum(0) / S**2)  # diag of S


def decode(z: torch.Tensor) -> torch.Tensor:
    return z @ W.t() + B


def encode_exact(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = POST_VAR * ((x - B) @ W) / S**2
    return mu, POST_VAR.log().expand_as(mu).clone()


def encode_off(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A deliberately imperfect encoder: shifted mean, inflated variance."""
    mu, logvar = encode_exact(x)
    return mu + 0.5, logvar + 1.0


def exact_log_px(x: torch.Tensor) -> torch.Tensor:
    cov = W @ W.t() + S**2 * torch.eye(3, dtype=torch.float64)
    return torch.distributions.MultivariateNormal(B, covariance_matrix=cov).log_prob(x)


def _data(n: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return decode(z) + S * torch.randn(n, 3, generator=g, dtype=torch.float64)


def test_kl_closed_form():
    assert float(kl_standard_normal(torch.zeros(1, 4), torch.zeros(1, 4))[0]) == 0.0
    # mu = (1, 2), var = (1, 2): 0.5 [(1 + 1 - 1 - 0) + (4 + 2 - 1 - ln 2)] = 3 - ln(2)/2
    kl = kl_standard_normal(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, math.log(2.0)]]))
    assert float(kl[0]) == pytest.approx(3.0 - math.log(2.0) / 2, abs=1e-9)
    # spatial latents are summed over every non-batch dimension
    assert kl_standard_normal(torch.ones(3, 2, 2, 2), torch.zeros(3, 2, 2, 2)).tolist() == [4.0, 4.0, 4.0]
    x = torch.zeros(7, 3, dtype=torch.float64)
    prior_encoder = lambda b: (torch.zeros(b.shape[0], 5), torch.zeros(b.shape[0], 5))  # noqa: E731
    assert encoder_kl(x, prior_encoder, batch_size=3).tolist() == [0.0] * 7


def test_decoder_likelihoods_hand_computed():
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    assert float(decoder_log_likelihood(x, torch.zeros(1, 4))[0]) == pytest.approx(-4 * math.log(2.0))
    logits = torch.tensor([[-1.0, 2.0, 0.5, 3.0]])
    expected = float((x * logits - torch.nn.functional.softplus(logits)).sum())
    assert float(decoder_log_likelihood(x, logits)[0]) == pytest.approx(expected, abs=1e-6)
    # Gaussian, sigma 0.5, residuals (0.5, 0, 0, 0): -0.5 * (1 + 4 log(2 pi 0.25))
    mean = x.clone()
    mean[0, 0] = 0.5
    expected_g = -0.5 * (0.25 / 0.25 + 4 * math.log(2 * math.pi * 0.25))
    assert float(decoder_log_likelihood(x, mean, likelihood="gaussian", sigma=0.5)[0]) == pytest.approx(expected_g)
    with pytest.raises(ValueError, match="likelihood"):
        decoder_log_likelihood(x, mean, likelihood="laplace")


def test_iwae_with_the_exact_posterior_is_log_px_for_every_k():
    x = _data()
    for k in (1, 7):
        got = iwae_bound(x, encode_exact, decode, k=k, likelihood="gaussian", sigma=S, sample_chunk=3)
        torch.testing.assert_close(got, exact_log_px(x), rtol=0, atol=1e-6)


def test_elbo_with_the_exact_posterior_is_log_px_in_expectation():
    x = _data()
    terms = elbo(x, encode_exact, decode, n_samples=4000, likelihood="gaussian", sigma=S, sample_chunk=1000)
    torch.testing.assert_close(terms.elbo, terms.reconstruction - terms.kl)
    assert float((terms.elbo - exact_log_px(x)).mean()) == pytest.approx(0.0, abs=0.02)


def exact_elbo(x: torch.Tensor, encoder) -> torch.Tensor:
    """Closed-form ELBO of the linear-Gaussian model: E_q||x - Wz - b||² = ||x - W mu - b||² + sum_d v_d ||W_d||²."""
    mu, logvar = encoder(x)
    v = logvar.exp()
    sq = (x - decode(mu)).pow(2).sum(1) + (v * (W * W).sum(0)).sum(1)
    rec = -0.5 * (sq / S**2 + 3 * math.log(2 * math.pi * S**2))
    return rec - kl_standard_normal(mu, logvar)


def test_elbo_monte_carlo_matches_closed_form():
    x = _data(n=10, seed=1)
    terms = elbo(x, encode_off, decode, n_samples=4000, sample_chunk=1000, likelihood="gaussian", sigma=S)
    torch.testing.assert_close(terms.elbo, exact_elbo(x, encode_off), rtol=0, atol=0.15)


def test_iwae_orders_elbo_k1_and_larger_k_with_an_imperfect_encoder():
    x = _data(n=10, seed=1)
    reps = 400
    xr = x.repeat_interleave(reps, 0)  # many independent draws per image: estimates of expectations
    log_px, elbo_exact = exact_log_px(x), exact_elbo(x, encode_off)
    kw = dict(likelihood="gaussian", sigma=S, batch_size=1000)
    draws = {k: iwae_bound(xr, encode_off, decode, k=k, seed=k, **kw).view(10, reps) for k in (1, 5, 50)}
    iw = {k: d.mean(1) for k, d in draws.items()}
    # IWAE with k = 1 is an unbiased estimate of the ELBO: within 4.5 standard errors per image
    se = draws[1].std(1) / reps**0.5
    assert bool(((iw[1] - elbo_exact).abs() < 4.5 * se).all())
    # ELBO = E[L_1] <= E[L_5] <= E[L_50] <= log p(x): gaps of several nats here, far above the noise
    # (standard errors about 0.2, 0.07 and 0.02 nats)
    assert bool((iw[5] > iw[1] + 1.0).all())
    assert bool((iw[50] > iw[5] + 0.3).all())
    assert bool((iw[50] <= log_px + 0.05).all())
    assert bool((iw[50] >= elbo_exact).all())
    assert bool((elbo_exact < log_px).all())


def test_bernoulli_iwae_on_images_with_spatial_shape():
    g = torch.Generator().manual_seed(2)
    x = binarize(torch.rand(6, 1, 4, 4, generator=g), seed=0)
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    lin = torch.randn(16, 3, generator=g)

    def enc(b):
        return b.flatten(1) @ lin * 0.1, torch.full((b.shape[0], 3), -1.0)

    def dec(z):
        return (z @ lin.t()).view(-1, 1, 4, 4)

    lk = iwae_bound(x, enc, dec, k=20, batch_size=4, sample_chunk=6)
    el = elbo(x, enc, dec, n_samples=20, batch_size=4).elbo
    assert lk.shape == (6,) and el.shape == (6,)
    assert bool((lk <= 0).all())  # a probability of binary pixels: log p <= 0
    assert float(lk.mean()) >= float(el.mean()) - 0.5
    assert torch.equal(lk, iwae_bound(x, enc, dec, k=20, batch_size=4, sample_chunk=6))  # seeded


def test_binarize_threshold_mode():
    x = torch.tensor([[0.2, 0.5, 0.51, 0.9]])
    assert binarize(x, seed=None).tolist() == [[0.0, 0.0, 1.0, 1.0]]


def test_parzen_single_point_matches_gaussian_density():
    centre = torch.tensor([[0.2, -0.4, 1.0]], dtype=torch.float64)
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    sigmas = [0.3, 1.0]
    got = parzen_log_likelihood(x, centre, sigmas)
    for j, s in enumerate(sigmas):
        expected = torch.distributions.Normal(centre[0], s).log_prob(x).sum(1)
        torch.testing.assert_close(got[:, j], expected)


def test_parzen_mixture_hand_computed_and_chunked():
    centres = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    x = torch.tensor([[1.0]], dtype=torch.float64)
    # 0.5 N(1; 0, 1) + 0.5 N(1; 2, 1) = N(1; 0, 1)
    expected = -0.5 - 0.5 * math.log(2 * math.pi)
    assert float(parzen_log_likelihood(x, centres, 1.0)[0, 0]) == pytest.approx(expected)
    g = torch.Generator().manual_seed(3)
    c = torch.randn(50, 4, generator=g)
    q = torch.randn(13, 4, generator=g)
    chunked = parzen_log_likelihood(q, c, [0.2, 0.7], chunk_size=4)
    torch.testing.assert_close(chunked, parzen_log_likelihood(q, c, [0.2, 0.7]))


def test_parzen_bandwidth_is_chosen_on_validation():
    g = torch.Generator().manual_seed(4)
    centres = torch.randn(300, 2, generator=g)
    val = torch.randn(200, 2, generator=g)
    test = torch.randn(200, 2, generator=g)
    grid = [0.01, 0.05, 0.2, 0.4, 0.8, 3.0]
    best, scores = select_parzen_bandwidth(val, centres, grid)
    assert best == grid[int(scores.argmax())]
    assert best in (0.2, 0.4, 0.8)  # neither the spiky nor the flat end of the grid
    res = parzen_estimate(test, val, centres, grid)
    assert res.sigma == best and not res.at_grid_edge
    torch.testing.assert_close(res.log_likelihood, parzen_log_likelihood(test, centres, best)[:, 0])
    # in 2-D with 300 centres, the estimate is within ~0.5 nats of the true N(0, I) log-density
    true = torch.distributions.Normal(0.0, 1.0).log_prob(test).sum(1).double()
    assert abs(float(res.log_likelihood.mean() - true.mean())) < 0.5


def test_aggregate_posterior_sees_a_prior_hole():
    """Codes spread as the prior: KL ~0, variance ~1; codes 1.5x wider: KL = d/2 (v - 1 - ln v) for v = 2.25."""
    from pancreas_gvae.evaluation.metrics.prior_gap import aggregate_posterior

    d, n = 4, 20000
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=gen)
    tight = torch.full((n, d), math.log(1e-4))  # a confident encoder: sigma^2 = 1e-4

    matched = aggregate_posterior(z, lambda x: (x, tight[: len(x)]), batch_size=3000)
    assert abs(matched.kl_nats) < 0.01 and abs(matched.variance - 1) < 0.03
    assert matched.posterior_variance == pytest.approx(1e-4, rel=1e-6)

    wide = aggregate_posterior(1.5 * z, lambda x: (x, tight[: len(x)]))
    v = 2.25 + 1e-4
    assert wide.kl_nats == pytest.approx(0.5 * d * (v - 1 - math.log(v)), rel=0.05)
    assert wide.variance == pytest.approx(v, rel=0.03)
