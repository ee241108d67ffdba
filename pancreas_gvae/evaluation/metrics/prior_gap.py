r"""Prior-hole diagnosis: how well the prior N(0, I) covers the codes of real images.

A VAE-style decoder is trained on codes drawn from q(z|x) of real images. When the aggregate posterior
:math:`q(z) = \frac1N \sum_n q(z|x_n)` does not fill the prior, prior samples land in regions the decoder
never saw, and decode to images unlike the data however good the reconstructions are ("holes in the
prior": Rosca, Lakshminarayanan & Mohamed 2018; Dai & Wipf 2019, "Diagnosing and enhancing VAE models").
This module fits a Gaussian :math:`\mathcal N(m, S)` to :math:`q(z)` and measures its KL to the prior:

.. math::

    \mathrm{KL}(\mathcal N(m, S)\,\|\,\mathcal N(0, I)) = \tfrac12\big(\operatorname{tr} S + m^\top m - d
        - \log\det S\big),

with :math:`S` the covariance of the posterior means plus the mean posterior variance (the law of total
variance for the mixture). 0 means prior draws land where real codes are.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

__all__ = ["AggregatePosterior", "aggregate_posterior"]

Encode = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class AggregatePosterior(NamedTuple):
    """How well the prior N(0, I) covers the codes of real images (a "prior hole" diagnosis).

    ``kl_nats``: KL(N(m, S) || N(0, I)) of the Gaussian fitted to the aggregate posterior (mean of the codes,
    ``S`` = covariance of the means + mean posterior variance): 0 when prior samples land where real codes
    are; ``variance``: mean of ``S``'s diagonal (1 when matched); ``posterior_variance``: mean sigma^2 of
    q(z|x); ``mean`` and ``covariance``: the fitted Gaussian itself (float64). A decoder only sees codes near
    real ones in training, so a large ``kl_nats`` means prior samples decode from regions it was never
    trained on (Rosca et al. 2018; Dai & Wipf 2019).
    """

    kl_nats: float
    variance: float
    posterior_variance: float
    mean: torch.Tensor
    covariance: torch.Tensor


@torch.no_grad()
def aggregate_posterior(x: torch.Tensor, encode: Encode, *, batch_size: int = 500) -> AggregatePosterior:
    """Fit a Gaussian to the aggregate posterior of ``x`` (e.g. the training images) and compare it with N(0, I)."""
    parts = [encode(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    mu = torch.cat([p[0] for p in parts]).double().cpu()
    var = torch.cat([p[1] for p in parts]).double().exp().cpu()
    d = mu.shape[1]
    cov = torch.cov(mu.T).reshape(d, d) if mu.shape[0] > 1 else torch.zeros(d, d, dtype=torch.float64)
    s = cov + torch.diag(var.mean(0))
    m = mu.mean(0)
    kl = 0.5 * (torch.trace(s) + m @ m - d - torch.linalg.slogdet(s).logabsdet)
    return AggregatePosterior(float(kl), float(torch.diagonal(s).mean()), float(var.mean()), m, s)
