"""Differentiable augmentation for the discriminator (DiffAugment, Zhao et al. 2020, arXiv:2006.10738).

A discriminator trained on a few hundred slices memorises them and stops giving the generator a useful
signal. DiffAugment applies the same random, differentiable transformations to real and generated images
every time D sees them (in D's update and in G's adversarial loss), so D cannot memorise the real set and
G's gradient passes through the augmentation. Policies (comma-separated in ``loss.diffaugment``):

* ``translation``: a shift by up to 1/8 of the image in each direction, zeros shifted in;
* ``cutout``: one square of half the image size, at a random place, set to zero;
* ``color``: brightness (±0.2) and contrast (×0.7–1.3 about the slice mean) on the image channels only;
  mask channels are never changed in value.

Geometric policies move image and mask channels together, so an augmented pair still matches. Random
parameters come from the trainer's noise generator, so training stays deterministic and resumable.
MONAI's random transforms work per sample on the CPU inside data loading and are not differentiable with
respect to their input, which is what this needs; hence this small module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POLICIES = ("translation", "cutout", "color")


def parse_policy(text: str) -> tuple[str, ...]:
    """``"translation,cutout"`` -> ``("translation", "cutout")``; unknown names raise ``ValueError``."""
    names = tuple(p.strip() for p in (text or "").split(",") if p.strip())
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ValueError(f"unknown DiffAugment policy {', '.join(unknown)}; choose from {', '.join(POLICIES)}")
    return names


def _uniform(n: int, lo: float, hi: float, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=like.device, dtype=torch.float32) * (hi - lo) + lo


def translation(x: torch.Tensor, generator: torch.Generator, ratio: float = 0.125) -> torch.Tensor:
    """Shift each sample by up to ``ratio`` of its size (whole pixels), zeros shifted in (2D)."""
    n, _, h, w = x.shape
    dy = torch.round(_uniform(n, -ratio, ratio, x, generator) * h) * 2 / h  # affine_grid units: [-1, 1] = size
    dx = torch.round(_uniform(n, -ratio, ratio, x, generator) * w) * 2 / w
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=torch.float32)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2], theta[:, 1, 2] = dx, dy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False).to(x.dtype)


def cutout(x: torch.Tensor, generator: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    """Zero one ``ratio``-sized square per sample at a random centre (2D)."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = (_uniform(n, 0, 1, x, generator) * (h + 1 - ch % 2)).long()
    cx = (_uniform(n, 0, 1, x, generator) * (w + 1 - cw % 2)).long()
    yy = torch.arange(h, device=x.device).view(1, h, 1)
    xx = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((yy - cy.view(n, 1, 1)).abs() * 2 < ch) & ((xx - cx.view(n, 1, 1)).abs() * 2 < cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def color(x: torch.Tensor, generator: torch.Generator, image_channels: int) -> torch.Tensor:
    """Brightness and contrast of the first ``image_channels`` channels; the rest (masks) untouched."""
    n = x.shape[0]
    img, rest = x[:, :image_channels], x[:, image_channels:]
    shape = (n,) + (1,) * (x.dim() - 1)
    img = img + _uniform(n, -0.2, 0.2, x, generator).view(shape).to(x.dtype)
    mean = img.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    img = (img - mean) * _uniform(n, 0.7, 1.3, x, generator).view(shape).to(x.dtype) + mean
    return torch.cat([img, rest], dim=1)


def diff_augment(x: torch.Tensor, policy: tuple[str, ...], generator: torch.Generator, *,
                 image_channels: int) -> torch.Tensor:
    """``x`` (N, C, H, W) through the policies, in the order given; unchanged for an empty policy."""
    if not policy:
        return x
    if x.dim() != 4:
        raise ValueError("DiffAugment is implemented for 2D slices (N, C, H, W)")
    for name in policy:
        if name == "translation":
            x = translation(x, generator)
        elif name == "cutout":
            x = cutout(x, generator)
        else:
            x = color(x, generator, image_channels)
    return x
