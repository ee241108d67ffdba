"""Segmentation: the downstream 2D MONAI UNet, its scoring, and the augmentation experiment built on it."""
