"""The model kinds: GVAE (encoder + generator + discriminator), VAE (no D) and GAN (no E).

All three share the same networks, so the baselines differ from the GVAE only in
which parts exist and which losses train them (see ``pancreas_gvae.training.steps``).
"""

from __future__ import annotations

import torch
from torch import nn

from pancreas_gvae.config import ModelConfig
from pancreas_gvae.models.networks import Discriminator, Encoder, Generator, init_weights


class GenerativeModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.kind
        self.latent_dim = cfg.latent_dim
        common = dict(spatial_dims=cfg.spatial_dims, image_size=cfg.image_size, num_res_units=cfg.num_res_units)
        self.encoder = (
            Encoder(in_channels=cfg.in_channels - (0 if cfg.encoder_reads_masks else cfg.mask_channels),
                    channels=cfg.channels, latent_dim=cfg.latent_dim, norm=cfg.encoder_norm, **common)
            if cfg.kind in ("gvae", "vae") else None
        )
        self.generator = Generator(out_channels=cfg.in_channels, channels=cfg.channels, latent_dim=cfg.latent_dim,
                                   norm=cfg.generator_norm, upsample=cfg.generator_upsample,
                                   prior_components=cfg.prior_components, **common)
        self.discriminator = (
            Discriminator(in_channels=cfg.in_channels, channels=cfg.disc_channels or cfg.channels,
                          norm=cfg.discriminator_norm, spectral_norm=cfg.spectral_norm, **common)
            if cfg.kind in ("gvae", "gan") else None
        )
        for part in (self.encoder, self.generator, self.discriminator):
            if part is not None:
                init_weights(part)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.encoder is None:
            raise ValueError(f"a {self.kind} model has no encoder")
        return self.encoder(x)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.generator(z))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean: the deterministic reconstruction used for evaluation."""
        mu, _ = self.encode(x)
        return self.decode(mu)


def build_model(cfg: ModelConfig) -> GenerativeModel:
    return GenerativeModel(cfg)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``z = mu + exp(logvar / 2) * eps``, ``eps ~ N(0, I)`` drawn from ``generator`` for replayable runs."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps
