"""pancreas-gvae: synthetic, labelled pancreas CT slices from a Generative Variational Autoencoder."""

__version__ = "0.1.0"
