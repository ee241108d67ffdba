"""What an exported MONAI Bundle's ``configs/inference.json`` calls (``$import ... as pgb``): a seeded prior
draw decoded in batches (:func:`synthesize`) and a loop over the resulting samples (:func:`write_samples`), the
two things MONAI config syntax cannot express cleanly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor

from pancreas_gvae.synthesis.slices import prior_batches

logger = logging.getLogger(__name__)


def spacing_affine(spacing: Sequence[float] | None, spatial_dims: int) -> torch.Tensor:
    """``(spatial_dims + 1)``-square diagonal affine with ``spacing`` mm per pixel (1 mm when ``None``)."""
    values = [1.0] * spatial_dims if spacing is None else [float(s) for s in spacing]
    if len(values) == 1:
        values = values * spatial_dims
    if len(values) != spatial_dims:
        raise ValueError(f"spacing needs {spatial_dims} values, got {list(spacing or [])}")
    return torch.diag(torch.tensor([*values, 1.0], dtype=torch.float64))


def synthesize(network: torch.nn.Module, *, num_samples: int, seed: int = 0, batch_size: int = 64,
               device: str | torch.device = "cpu", spacing: Sequence[float] | None = None,
               name_prefix: str = "synthetic") -> Iterator[dict[str, Any]]:
    """Yield ``{"pred": MetaTensor logits (C, *spatial), "z": latent}`` for ``num_samples`` prior samples.

    The codes come from :func:`~pancreas_gvae.synthesis.slices.prior_batches` (drawn up front from ``seed``), so
    sample ``i`` depends only on ``(seed, i)``. Each sample's meta carries ``filename_or_obj = {name_prefix}_{i:04d}``
    (the name ``SaveImaged`` writes under) and the spacing affine.
    """
    num_samples, batch_size = int(num_samples), int(batch_size)
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    affine = spacing_affine(spacing, int(network.spatial_dims))
    width = max(4, len(str(num_samples - 1)))
    batches = prior_batches(network, num_samples, latent_dim=int(network.latent_dim), seed=int(seed),
                            device=torch.device(device), batch_size=batch_size)
    i = 0
    for z, logits in batches:
        for z_i, x in zip(z, logits):
            meta = {"filename_or_obj": f"{name_prefix}_{i:0{width}d}", "sample_index": i, "seed": int(seed)}
            yield {"pred": MetaTensor(x, affine=affine.clone(), meta=meta), "z": z_i}
            i += 1


def write_samples(samples: Iterable[dict[str, Any]], postprocessing: Callable[[dict[str, Any]], Any], *,
                  output_dir: str | Path | None = None) -> int:
    """Run ``postprocessing`` (which ends in ``SaveImaged``) on every sample; returns how many were written."""
    count = 0
    for sample in samples:
        postprocessing(sample)
        count += 1
    logger.info("wrote %d synthetic sample(s) to %s", count, Path(output_dir).resolve() if output_dir else "output_dir")
    return count
