"""Sample grids as RGB uint8 arrays (for MLflow images and PNG files), with mask overlays for CT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

MASK_RGB = np.array([255, 40, 40], dtype=np.float32)


def _to_2d(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C, H, W); 3D volumes show their middle axial slice."""
    if x.ndim == 5:
        x = x[..., x.shape[-1] // 2]
    return x


def image_grid(x: torch.Tensor, *, nrow: int = 8, mask_channels: int = 0, pad: int = 2,
               mask_alpha: float = 0.45) -> np.ndarray:
    """Tile images in [0, 1] into an (H, W, 3) uint8 grid.

    The first channel is shown in grey; with ``mask_channels`` the last channel is a
    mask, thresholded at 0.5 and tinted red over the image.
    """
    x = _to_2d(x.detach().float().cpu().clamp(0, 1))
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    nrows = -(-n // ncol)
    grid = np.zeros((nrows * (h + pad) + pad, ncol * (w + pad) + pad, 3), dtype=np.float32)
    for i in range(n):
        gray = x[i, 0].numpy()[..., None] * 255.0
        tile = np.repeat(gray, 3, axis=2)
        if mask_channels:
            mask = (x[i, -1].numpy() > 0.5)[..., None]
            tile = np.where(mask, (1 - mask_alpha) * tile + mask_alpha * MASK_RGB, tile)
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top: top + h, left: left + w] = tile
    return grid.round().astype(np.uint8)


def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[a0, b0, a1, b1, ...]: real images next to their reconstructions."""
    return torch.stack([a, b], dim=1).flatten(0, 1)


def save_png(grid: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def side_by_side(panels: dict[str, np.ndarray], *, gap: int = 8, label_height: int = 14) -> np.ndarray:
    """Grids (``image_grid`` outputs) next to each other, each under its label: "real | GVAE | VAE | GAN"."""
    from PIL import ImageDraw

    height = max(g.shape[0] for g in panels.values())
    width = sum(g.shape[1] for g in panels.values()) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, height + label_height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    left = 0
    for label, grid in panels.items():
        canvas.paste(Image.fromarray(grid), (left, label_height))
        draw.text((left + 2, 1), label, fill=(0, 0, 0))
        left += grid.shape[1] + gap
    return np.asarray(canvas)
