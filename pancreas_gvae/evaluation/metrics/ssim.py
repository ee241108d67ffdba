r"""Reconstruction quality (SSIM, MSE, L1) and sample diversity (mean pairwise MS-SSIM).

SSIM (Wang et al. 2004), computed by ``monai.metrics.SSIMMetric`` over Gaussian windows and averaged
over the image:

.. math::

    \mathrm{SSIM}(x, y)
        = \frac{(2\mu_x\mu_y + c_1)(2\sigma_{xy} + c_2)}{(\mu_x^2 + \mu_y^2 + c_1)(\sigma_x^2 + \sigma_y^2 + c_2)},
    \quad c_1 = (0.01 L)^2,\ c_2 = (0.03 L)^2,

with ``L = data_range`` (1 for images in [0, 1]). SSIM(x, x) = 1.

MS-SSIM (Wang et al. 2003) computes the contrast-structure term :math:`cs_s` at scales
:math:`s = 1..S` (halving the image each time by 2× average pooling) and the full SSIM at the
coarsest scale: :math:`\mathrm{MS\text{-}SSIM} = \mathrm{SSIM}_S^{w_S} \prod_{s<S} cs_s^{w_s}`.
MONAI's defaults (5 scales, 11-pixel window) need images larger than
:math:`(11-1)\cdot(5-1)^2 = 160` pixels; a 28-pixel MNIST digit only allows 3 scales (28 → 14 → 7) with a
window of at most 7 pixels at the 7-pixel scale. :func:`ms_ssim_settings` therefore picks, for a given
image size, the largest number of scales (≤ 5) whose coarsest scale still holds the window, a 5-pixel
Gaussian window with :math:`\sigma = 1` for small images (11 px, :math:`\sigma = 1.5` otherwise), and the
first ``S`` of MONAI's default weights renormalised to sum to 1. For 28 px: 3 scales, weights
(0.0711, 0.4530, 0.4760), window 5, :math:`\sigma = 1`.

Diversity (as in Odena et al. 2017, conditional GANs): the mean MS-SSIM over random distinct pairs of
samples. **Lower = more diverse**; a collapsed generator approaches 1; compare with the same statistic
on real images of the same set.

Reconstruction error: per-image mean squared and mean absolute error, optionally in data units. For
data scaled to [0, 1] from a window :math:`[lo, hi]` (e.g. CT: HU), :math:`v = x(hi - lo) + lo`, so
:math:`\mathrm{L1}_{HU} = (hi-lo)\,\mathrm{L1}` and :math:`\mathrm{MSE}_{HU} = (hi-lo)^2\,\mathrm{MSE}`. Values
clipped by the window are lost before this, so errors are within-window errors.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from monai.metrics import MultiScaleSSIMMetric, SSIMMetric

__all__ = [
    "MONAI_MS_SSIM_WEIGHTS",
    "MSSSIMSettings",
    "ReconstructionError",
    "ms_ssim_diversity",
    "ms_ssim_settings",
    "reconstruction_error",
    "reconstruction_ssim",
    "to_data_units",
]

#: MONAI's (and Wang et al.'s) default MS-SSIM weights for 5 scales.
MONAI_MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _check_images(x: torch.Tensor, spatial_dims: int, name: str) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if x.ndim != spatial_dims + 2:
        raise ValueError(
            f"{name} must be (N, C, *spatial) with {spatial_dims} spatial dims, got shape {tuple(x.shape)}"
        )


@torch.no_grad()
def reconstruction_ssim(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    *,
    spatial_dims: int = 2,
    data_range: float = 1.0,
    win_size: int = 11,
    kernel_sigma: float = 1.5,
    batch_size: int = 1000,
) -> torch.Tensor:
    """Per-image SSIM between images ``x`` and their reconstructions ``x_hat`` (``monai.metrics.SSIMMetric``).

    ``x``, ``x_hat``: ``(N, C, H, W)`` (``spatial_dims=2``) or ``(N, C, H, W, D)`` (3), values in
    ``[0, data_range]``. Returns ``(N,)`` float32 (channels averaged); report its mean and spread.
    The default 11-pixel window fits 28-pixel images (it is applied without padding: 18×18 windows).
    """
    _check_images(x, spatial_dims, "x")
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    metric = SSIMMetric(
        spatial_dims=spatial_dims,
        data_range=data_range,
        win_size=win_size,
        kernel_sigma=kernel_sigma,
        reduction="none",
    )
    out = [
        metric(x_hat[i : i + batch_size].float(), x[i : i + batch_size].float()).reshape(-1)
        for i in range(0, x.shape[0], batch_size)
    ]
    return torch.cat(out).float().cpu()


class MSSSIMSettings(NamedTuple):
    """Arguments of ``monai.metrics.MultiScaleSSIMMetric`` that fit a given image size."""

    weights: tuple[float, ...]
    kernel_size: int
    kernel_sigma: float


def ms_ssim_settings(spatial_size: Sequence[int] | int, *, max_scales: int = 5) -> MSSSIMSettings:
    """The largest number of scales (≤ ``max_scales``) and a window that MS-SSIM can use on images of this size.

    Uses MONAI's (11 px, σ 1.5) window where it fits, else a 5-pixel window with σ = 1. A scale count
    ``S`` fits when the coarsest scale (``size // 2^(S-1)``) is at least the window and MONAI's own check
    (``size // (S-1)^2 > window - 1``) passes. Weights: the first ``S`` of MONAI's defaults, renormalised.
    Raises ``ValueError`` for images smaller than 5 pixels.
    """
    size = min(spatial_size) if isinstance(spatial_size, Sequence) else int(spatial_size)

    def fits(n_scales: int, k: int) -> bool:
        return size // 2 ** (n_scales - 1) >= k and size // max(1, n_scales - 1) ** 2 > k - 1

    def settings(n_scales: int, k: int, sigma: float) -> MSSSIMSettings:
        w = MONAI_MS_SSIM_WEIGHTS[:n_scales]
        return MSSSIMSettings(tuple(v / sum(w) for v in w) if n_scales < len(MONAI_MS_SSIM_WEIGHTS) else w, k, sigma)

    n_max = min(max_scales, len(MONAI_MS_SSIM_WEIGHTS))
    if n_max >= 2 and fits(n_max, 11):
        return settings(n_max, 11, 1.5)
    for n_scales in range(n_max, 1, -1):
        if fits(n_scales, 5):
            return settings(n_scales, 5, 1.0)
    if size >= 5:
        return MSSSIMSettings((1.0,), 5, 1.0)  # one scale: plain SSIM
    raise ValueError(f"images of {size} pixels are too small for (MS-)SSIM with a 5-pixel window")


@torch.no_grad()
def ms_ssim_diversity(
    samples: torch.Tensor,
    *,
    n_pairs: int = 2000,
    seed: int = 0,
    spatial_dims: int = 2,
    data_range: float = 1.0,
    settings: MSSSIMSettings | None = None,
    batch_size: int = 1000,
) -> torch.Tensor:
    """MS-SSIM of ``n_pairs`` random distinct pairs of ``samples``; returns the ``(n_pairs,)`` values.

    Report ``values.mean()`` (lower = more diverse) with its standard error and ``n_pairs``. Pairs
    ``(i, j), i != j`` are drawn uniformly with replacement from a generator seeded by ``seed``; when
    the set has at most ``n_pairs`` distinct unordered pairs, all of them are used instead. ``settings``
    default to :func:`ms_ssim_settings` for the samples' size (3 scales, 5-px window for 28 px).
    """
    _check_images(samples, spatial_dims, "samples")
    n = samples.shape[0]
    if n < 2:
        raise ValueError("diversity needs at least 2 samples")
    if settings is None:
        settings = ms_ssim_settings(tuple(samples.shape[2:]))
    if n * (n - 1) // 2 <= n_pairs:
        iu = torch.triu_indices(n, n, offset=1)
        i, j = iu[0], iu[1]
    else:
        gen = torch.Generator().manual_seed(seed)
        i = torch.randint(0, n, (n_pairs,), generator=gen)
        j = (i + torch.randint(1, n, (n_pairs,), generator=gen)) % n  # uniform over j != i
    metric = MultiScaleSSIMMetric(
        spatial_dims=spatial_dims,
        data_range=data_range,
        kernel_size=settings.kernel_size,
        kernel_sigma=settings.kernel_sigma,
        weights=settings.weights,
        reduction="none",
    )
    i, j = i.to(samples.device), j.to(samples.device)
    out = [
        metric(samples[i[s : s + batch_size]].float(), samples[j[s : s + batch_size]].float()).reshape(-1)
        for s in range(0, i.shape[0], batch_size)
    ]
    return torch.cat(out).float().cpu()


def to_data_units(x: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    """Map [0, 1]-scaled values back to data units for the window ``(lo, hi)``: ``x * (hi - lo) + lo`` (e.g. HU)."""
    lo, hi = window
    if not hi > lo:
        raise ValueError(f"window must be (lo, hi) with hi > lo, got {window}")
    return x * (hi - lo) + lo


class ReconstructionError(NamedTuple):
    """Per-image reconstruction errors, ``(N,)`` each; in data units when a window was given."""

    mse: torch.Tensor
    l1: torch.Tensor


@torch.no_grad()
def reconstruction_error(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    *,
    window: tuple[float, float] | None = None,
) -> ReconstructionError:
    r"""Per-image MSE :math:`\frac{1}{P}\sum_p (x_p - \hat x_p)^2` and L1 :math:`\frac{1}{P}\sum_p |x_p - \hat x_p|`.

    ``x``, ``x_hat``: ``(N, ...)``, same shape; ``P`` = elements per image. With ``window=(lo, hi)``
    both are first mapped by :func:`to_data_units`, so e.g. the L1 is in HU and the MSE in HU².
    """
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    a, b = x.double(), x_hat.double()
    if window is not None:
        a, b = to_data_units(a, window), to_data_units(b, window)
    diff = (a - b).reshape(x.shape[0], -1)
    return ReconstructionError(mse=diff.pow(2).mean(1), l1=diff.abs().mean(1))
