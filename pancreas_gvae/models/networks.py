"""The three networks of the GVAE, dimension-generic (``spatial_dims`` 2 or 3).

Each resolution level is one MONAI ``Convolution`` (kernel 3, stride 2), optionally
followed by MONAI ``ResidualUnit``s, so the same code builds 28x28 MNIST models,
2D CT-slice models and 3D patch models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, ResidualUnit, UpSample
from torch import nn

from pancreas_gvae.models.latent_prior import LatentPrior

LEAKY = ("leakyrelu", {"negative_slope": 0.2, "inplace": False})


def _level(spatial_dims: int, cin: int, cout: int, *, norm, act, res_units: int,
           transposed: bool = False, first_norm: bool = True, upsample: str = "transposed") -> nn.Sequential:
    """One resolution level: halve (encoder, D) or double (``transposed=True``: G) the grid, then residual units.

    G doubles with a stride-2 transposed convolution (``upsample="transposed"``) or with nearest-neighbour
    upsampling followed by a 3x3 convolution (``"nearest"``), which cannot draw the checkerboard that uneven
    kernel overlap gives transposed convolutions (Odena et al. 2016).
    """
    norm_first = norm if first_norm else None
    if transposed and upsample == "nearest":
        layers: list[nn.Module] = [
            UpSample(spatial_dims, scale_factor=2, mode="nontrainable", interp_mode="nearest", align_corners=None),
            Convolution(spatial_dims, cin, cout, strides=1, kernel_size=3, act=act, norm=norm_first,
                        adn_ordering="NDA"),
        ]
    else:
        layers = [
            Convolution(spatial_dims, cin, cout, strides=2, kernel_size=3, is_transposed=transposed,
                        act=act, norm=norm_first, adn_ordering="NDA")
        ]
    layers += [ResidualUnit(spatial_dims, cout, cout, subunits=2, act=act, norm=norm) for _ in range(res_units)]
    return nn.Sequential(*layers)


def _down_path(spatial_dims: int, in_channels: int, channels: Sequence[int], *, norm, res_units: int) -> nn.Sequential:
    """Strided levels shared by E and D; no normalisation on the first level, as in DCGAN."""
    widths = [in_channels, *channels]
    return nn.Sequential(*[
        _level(spatial_dims, a, b, norm=norm, act=LEAKY, res_units=res_units, first_norm=i > 0)
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))
    ])


class Encoder(nn.Module):
    """``E(x) -> (mu, logvar)``: strided convolutions, then a linear head; reads the first ``in_channels`` of x."""

    def __init__(self, *, spatial_dims: int, in_channels: int, image_size: int, channels: Sequence[int],
                 latent_dim: int, num_res_units: int = 0, norm: str | None = "batch"):
        super().__init__()
        self.in_channels = in_channels
        self.features = _down_path(spatial_dims, in_channels, channels, norm=norm, res_units=num_res_units)
        bottom = image_size // 2 ** len(channels)
        self.head = nn.Linear(channels[-1] * bottom**spatial_dims, 2 * latent_dim)
        self.init_head()

    # Std of the mu half of the head, in units of 1/sqrt(fan_in): var(mu) = gain**2 * E[feature**2].
    MU_INIT_GAIN = 0.3

    def init_head(self) -> None:
        """Start the posterior near the prior: ``mu`` small, ``logvar`` = 0 (KL ~0.01-0.06 nats per latent dim).

        A fixed-std init (e.g. ``init_weights``' N(0, 0.028)) makes the head's output variance grow with its
        fan-in (channels[-1] * bottom**spatial_dims, 32,768 for ct_256/ct_512): there it gave KL ~46,000 nats
        per sample at step 0 with ~8 % of log-variances pinned at the clamp, where no gradient flows. Scaling
        the mu weights by 1/sqrt(fan_in) keeps var(mu) <= ~0.1 for every config (the features are batch-normed
        LeakyReLU outputs, mean square ~0.3-1.3); a zero logvar half starts every dimension at unit variance
        and still gets gradients (the features feeding it are not zero). ``init_weights`` calls this again
        after its generic pass, so this is the one place the head's start is set; shapes are unchanged.
        """
        latent_dim = self.head.out_features // 2
        with torch.no_grad():
            nn.init.normal_(self.head.weight[:latent_dim], 0.0, self.MU_INIT_GAIN / math.sqrt(self.head.in_features))
            nn.init.zeros_(self.head.weight[latent_dim:])
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.features(x[:, :self.in_channels]).flatten(1)).chunk(2, dim=1)
        # Bounded log-variance keeps exp() finite early in training and under bf16.
        return mu, logvar.clamp(-12.0, 8.0)


class Generator(nn.Module):
    """``G(z) -> logits``; images are ``sigmoid(logits)`` in [0, 1], every channel (CT and mask)."""

    def __init__(self, *, spatial_dims: int, out_channels: int, image_size: int, channels: Sequence[int],
                 latent_dim: int, num_res_units: int = 0, norm: str | None = "batch",
                 upsample: str = "transposed", prior_components: int = 0):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.latent_dim = latent_dim
        # Codes to sample from: N(0, I) (None) or a mixture fitted to training codes after training
        # (pancreas_gvae.models.latent_prior), carried as buffers so checkpoints and bundles hold it.
        self.prior = LatentPrior(latent_dim, prior_components) if prior_components else None
        self.bottom = image_size // 2 ** len(channels)
        widths = list(reversed(channels))
        self.project = nn.Linear(latent_dim, widths[0] * self.bottom**spatial_dims)
        self.up = nn.Sequential(*[
            _level(spatial_dims, a, b, norm=norm, act="relu", res_units=num_res_units, transposed=True,
                   upsample=upsample)
            for a, b in zip(widths, [*widths[1:], widths[-1]])
        ])
        self.out = Convolution(spatial_dims, widths[-1], out_channels, kernel_size=3, conv_only=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(z.shape[0], -1, *([self.bottom] * self.spatial_dims))
        return self.out(self.up(torch.relu(h)))


class Discriminator(nn.Module):
    """``D(x) -> (features_l, logit)``; ``features_l`` (the last conv level) gives the feature-space reconstruction loss."""

    def __init__(self, *, spatial_dims: int, in_channels: int, image_size: int, channels: Sequence[int],
                 num_res_units: int = 0, norm: str | None = None, spectral_norm: bool = True):
        super().__init__()
        self.features = _down_path(spatial_dims, in_channels, channels, norm=norm, res_units=num_res_units)
        bottom = image_size // 2 ** len(channels)
        self.head = nn.Linear(channels[-1] * bottom**spatial_dims, 1)
        if spectral_norm:
            for module in list(self.modules()):
                if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                    nn.utils.parametrizations.spectral_norm(module)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(x)
        return feats, self.head(feats.flatten(1)).squeeze(1)


def count_parameters(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def init_weights(module: nn.Module) -> None:
    """DCGAN-style N(0, 0.02) for convolutions: a stable start for adversarial training."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            weight = getattr(m, "parametrizations", None)
            target = m.parametrizations.weight.original if weight is not None else m.weight
            nn.init.normal_(target, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            weight = getattr(m, "parametrizations", None)
            target = m.parametrizations.weight.original if weight is not None else m.weight
            nn.init.normal_(target, 0.0, 0.02 * math.sqrt(2.0))
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, Encoder):
            m.init_head()  # the posterior head has its own, fan-in-scaled start (Encoder.init_head)
