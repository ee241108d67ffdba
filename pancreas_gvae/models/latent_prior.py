r"""Where prior samples' codes come from: N(0, I), or a Gaussian mixture fitted ex post to the codes of training images.

A VAE-family decoder is trained on codes of real images. When those codes do not fill N(0, I) ("prior holes":
measured by :func:`pancreas_gvae.evaluation.metrics.aggregate_posterior`; docs/results.md shows the phantom main
job's codes filling a thin region, so N(0, I) draws decode to bodies without organs), sampling the prior
draws from regions the decoder never learnt. Ex-post density estimation (Ghosh et al. 2020, "From variational to
deterministic autoencoders"; the two-stage VAE of Dai & Wipf 2019 is the same idea with a second VAE) fits a
density to the codes after training and samples codes from it instead. Here that density is a Gaussian mixture
with ``components`` full-covariance components fitted by EM (scikit-learn's ``GaussianMixture``) to the
posterior means :math:`\mu(x_i)` of the training images, with the mean posterior variance
:math:`\overline{\sigma^2}` added to every component's covariance (``reg_covar``): the aggregate posterior is the
mixture :math:`\frac1N\sum_i \mathcal N(\mu_i, \operatorname{diag}\sigma_i^2)`, so a component's spread is that of
its means plus the posterior's own. ``components = 0`` keeps N(0, I).

The fitted mixture lives in the generator as buffers (:class:`LatentPrior` is a submodule of
:class:`~pancreas_gvae.models.networks.Generator`), so checkpoints, the MONAI bundle and every sampler carry it;
the training loop refits it whenever it saves a checkpoint or a preview grid. The GVAE's adversarial and KL
terms still use N(0, I) during training; only sampling changes.

Privacy: mixture means are averages of many codes only when each component holds many images; with few
training images per component a mean can sit near one patient's code. The memorisation check of
:mod:`pancreas_gvae.evaluation.metrics.memorisation` is what tells; keep ``components`` small against the
number of training slices (fewer than 16 images per component fit fewer components).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pancreas_gvae.errors import PipelineError

__all__ = ["COVARIANCES", "LatentPrior", "draw_codes", "encode_codes", "prior_codes", "prior_label", "with_prior"]

# scikit-learn's covariance types: one full matrix per component, one shared, a diagonal, or one variance each.
COVARIANCES = ("full", "tied", "diag", "spherical")

MIN_IMAGES_PER_COMPONENT = 16
_COMPONENT_SEED = 104_729  # the component draw gets its own stream, so code i's noise is prior_codes' code i


def prior_codes(n: int, latent_dim: int, seed: int) -> torch.Tensor:
    """``n`` codes ``z ~ N(0, I)`` on the CPU from ``torch.Generator().manual_seed(seed)``: code ``i`` depends only
    on ``(seed, i)``. The project's one seeded standard-normal draw (sampling, evaluation, the bundle, training
    previews, and the noise of :meth:`LatentPrior.sample`)."""
    return torch.randn(int(n), int(latent_dim), generator=torch.Generator().manual_seed(int(seed)))


class LatentPrior(nn.Module):
    """A Gaussian mixture over the latent space, held as buffers: ``log_weights (K,)``, ``means (K, d)``,
    ``scale_tril (K, d, d)`` (Cholesky factors of the covariances) and ``fitted`` (0 until :meth:`fit`)."""

    def __init__(self, latent_dim: int, components: int):
        super().__init__()
        if components < 1:
            raise ValueError(f"a fitted latent prior needs components >= 1, got {components}")
        self.latent_dim, self.components = int(latent_dim), int(components)
        self.register_buffer("log_weights", torch.full((components,), -float(torch.log(torch.tensor(components)))))
        self.register_buffer("means", torch.zeros(components, latent_dim))
        self.register_buffer("scale_tril", torch.eye(latent_dim).repeat(components, 1, 1))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.uint8))

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    @torch.no_grad()
    def fit(self, mu: torch.Tensor, logvar: torch.Tensor, *, seed: int = 0, covariance: str = "full") -> "LatentPrior":
        """Fit the mixture to posterior means ``mu`` ``(N, d)`` with the mean of ``exp(logvar)`` as every
        component's added variance; deterministic for a given ``seed``. ``covariance`` is one of
        :data:`COVARIANCES` (scikit-learn's ``covariance_type``: a full ``d x d`` matrix per component needs many
        codes per component; ``tied``/``diag``/``spherical`` estimate fewer numbers). With fewer than
        ``MIN_IMAGES_PER_COMPONENT`` codes per component, fewer components are fitted (the rest get weight 0; at
        least one): e.g. a generator of a few labelled patients; :attr:`used_components` says how many."""
        from sklearn.mixture import GaussianMixture  # EM with k-means init: not worth re-writing

        mu = mu.detach().double().flatten(1).cpu()
        if mu.shape[1] != self.latent_dim:
            raise ValueError(f"codes have {mu.shape[1]} dimensions, the prior {self.latent_dim}")
        if mu.shape[0] < 2:
            raise ValueError(f"{mu.shape[0]} code(s) are too few to fit a latent prior: train on more images or "
                             "set model.latent_prior_components 0")
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance {covariance!r}: choose one of {', '.join(COVARIANCES)}")
        k = max(1, min(self.components, mu.shape[0] // MIN_IMAGES_PER_COMPONENT))
        spread = float(logvar.detach().double().exp().mean())
        gmm = GaussianMixture(k, covariance_type=covariance, reg_covar=max(spread, 1e-6),
                              random_state=int(seed), n_init=1, max_iter=200).fit(mu.numpy())
        self.log_weights.fill_(-float("inf"))
        self.log_weights[:k] = torch.as_tensor(gmm.weights_).log()
        self.means.zero_()
        self.means[:k] = torch.as_tensor(gmm.means_)
        self.scale_tril.copy_(torch.eye(self.latent_dim).expand_as(self.scale_tril))
        self.scale_tril[:k] = torch.linalg.cholesky(_full_covariances(gmm, k, self.latent_dim))
        self.fitted.fill_(1)
        return self

    @property
    def used_components(self) -> int:
        return int(torch.isfinite(self.log_weights).sum())

    @torch.no_grad()
    def sample(self, n: int, seed: int) -> torch.Tensor:
        """``n`` codes on the CPU: component ``c_i`` from the weights, ``z_i = m_c + L_c eps_i`` with ``eps`` =
        :func:`prior_codes` ``(n, d, seed)``; code ``i`` depends only on ``(seed, i)``."""
        if not self.is_fitted:
            raise PipelineError("the generator's latent prior has not been fitted (model.latent_prior_components > 0 "
                                "but no training refit it): sample from a training run's checkpoint")
        eps = prior_codes(n, self.latent_dim, seed)
        uniform = torch.rand(int(n), generator=torch.Generator().manual_seed(int(seed) + _COMPONENT_SEED))
        cdf = self.log_weights.cpu().double().softmax(0).cumsum(0)
        comp = torch.searchsorted(cdf, uniform.double()).clamp_(max=self.used_components - 1)  # fp round-off
        tril = self.scale_tril.cpu().float()[comp]
        return self.means.cpu().float()[comp] + (tril @ eps.unsqueeze(-1)).squeeze(-1)


def _full_covariances(gmm, k: int, d: int) -> torch.Tensor:
    """A fitted ``GaussianMixture``'s ``covariances_`` as ``(k, d, d)`` matrices, whatever its covariance type."""
    c = torch.as_tensor(gmm.covariances_)
    return {"full": lambda: c, "tied": lambda: c.expand(k, d, d), "diag": lambda: torch.diag_embed(c),
            "spherical": lambda: c[:, None, None] * torch.eye(d, dtype=c.dtype)}[gmm.covariance_type]()


@torch.no_grad()
def encode_codes(encoder: nn.Module, images: torch.Tensor, *, device: torch.device | str = "cpu",
                 batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's posterior ``(mu, logvar)`` of ``images``, in eval mode, batch by batch, as fp32 on the CPU."""
    was_training = encoder.training
    encoder.eval()
    codes = [encoder(images[i:i + batch_size].to(device)) for i in range(0, images.shape[0], batch_size)]
    encoder.train(was_training)
    return torch.cat([c[0].float().cpu() for c in codes]), torch.cat([c[1].float().cpu() for c in codes])


def prior_label(components: int, covariance: str = "full") -> str:
    """How tables name a prior: ``N(0,I)``, ``gmm8`` (full covariances) or e.g. ``gmm8-diag``."""
    if components == 0:
        return "N(0,I)"
    return f"gmm{components}" + ("" if covariance == "full" else f"-{covariance}")


def with_prior(generator: nn.Module, codes: tuple[torch.Tensor, torch.Tensor], components: int, *,
               covariance: str = "full", seed: int = 0) -> nn.Module:
    """A copy of ``generator`` (same weights) that samples its codes from another prior: N(0, I) for
    ``components`` 0, else a mixture fitted to ``codes`` (``encode_codes`` of training images). For scoring
    several priors on one checkpoint (``evaluate.py --priors``); the original is untouched."""
    twin = copy.deepcopy(generator)
    if components == 0:
        twin.prior = None
    else:
        device = next(generator.parameters()).device
        twin.prior = LatentPrior(codes[0].shape[1], components).fit(*codes, seed=seed,
                                                                    covariance=covariance).to(device)
    return twin


def draw_codes(generator: nn.Module, n: int, latent_dim: int, seed: int) -> torch.Tensor:
    """``n`` codes to decode with ``generator``: from its fitted :class:`LatentPrior` if it has one, else N(0, I).
    The one place that decides which prior a sample comes from."""
    prior = getattr(generator, "prior", None)
    if isinstance(prior, LatentPrior):
        return prior.sample(n, seed)
    return prior_codes(n, latent_dim, seed)
