"""MONAI transforms and the slice cache, installed as ``pancreas_gvae.transforms`` (the folder stays at the top)."""
