"""Encoder, generator and discriminator built from MONAI blocks, and the three model kinds."""

from pancreas_gvae.models.gvae import GenerativeModel, build_model
from pancreas_gvae.models.networks import Discriminator, Encoder, Generator

__all__ = ["Discriminator", "Encoder", "GenerativeModel", "Generator", "build_model"]
