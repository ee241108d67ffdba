"""Loss terms of GVAE.md, each a small function so the training steps read like the spec.

Scaling: reconstruction terms are means over elements; the KL is summed over latent
dimensions and divided by the number of image elements, so ``beta_kl = 1`` weighs it
as in a per-pixel-normalised ELBO, independent of image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

# Dice on sigmoid(logits), per sample and channel: MONAI applies the sigmoid itself, on fp32 logits.
_dice = DiceLoss(sigmoid=True, reduction="none")


def kl_per_sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over latent dimensions, one value per sample (nats)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def kl_loss(mu: torch.Tensor, logvar: torch.Tensor, elements_per_sample: int) -> torch.Tensor:
    return kl_per_sample(mu, logvar).mean() / elements_per_sample


def d_adversarial(real_logit: torch.Tensor, fake_logits: list[torch.Tensor], kind: str,
                  real_weight: torch.Tensor | None = None) -> torch.Tensor:
    """D's loss: real against the mean over fake sets (reconstructions and prior samples).

    ``real_weight`` (per sample) leaves samples out of the real term, e.g. image-only slices whose
    empty mask channel would otherwise be shown to D as a real image+mask pair.
    """
    if kind == "hinge":
        real = F.relu(1.0 - real_logit)
        fake = torch.stack([F.relu(1.0 + f).mean() for f in fake_logits]).mean()
    else:  # non-saturating logistic
        real = F.softplus(-real_logit)
        fake = torch.stack([F.softplus(f).mean() for f in fake_logits]).mean()
    if real_weight is None:
        return real.mean() + fake
    w = real_weight.to(real.dtype).reshape(-1)
    return (real * w).sum() / w.sum().clamp_min(1.0) + fake


def g_adversarial(fake_logits: list[torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "hinge":
        return torch.stack([-f.mean() for f in fake_logits]).mean()
    return torch.stack([F.softplus(-f).mean() for f in fake_logits]).mean()


def r1_penalty(real_logit: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): squared gradient norm of D at real images."""
    (grad,) = torch.autograd.grad(real_logit.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def mask_loss(logits: torch.Tensor, target: torch.Tensor, *, dice_weight: float, bce_weight: float,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Dice + BCE on the mask channel(s), from G's **logits**, always in fp32.

    CUDA autocast refuses ``F.binary_cross_entropy`` on probabilities (it is unsafe in reduced
    precision), so the BCE is taken on logits (``binary_cross_entropy_with_logits``, log-sum-exp
    stable) and the Dice on ``sigmoid(logits)``; autocast is switched off here so that neither
    is computed in bf16, whatever region the caller is in. ``weight`` (one value per sample, e.g.
    the label-present flag of image-only cases) averages over the weighted samples only, so an
    unlabelled sample adds no mask gradient.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = logits.float()
        target = target.float()
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
        per_sample = dice_weight * _dice(logits, target).flatten(1).mean(1) + bce_weight * bce
        if weight is None:
            return per_sample.mean()
        weight = weight.float().reshape(-1)
        return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """-log p(x|z) for a Bernoulli decoder on [0, 1] pixels (cross-entropy), summed per sample (nats).

    ``keep`` (0/1, broadcastable to ``x``) leaves elements out, e.g. the unknown mask of an image-only slice.
    """
    nll = F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none")
    return (nll if keep is None else nll * keep).flatten(1).sum(1)


def gaussian_nll(mean: torch.Tensor, x: torch.Tensor, sigma: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """-log N(x; mean, sigma^2 I) summed per sample (nats); ``keep`` as in :func:`bernoulli_nll`."""
    var = sigma**2
    per_element = 0.5 * ((x.float() - mean.float()).pow(2) / var + torch.log(torch.tensor(2 * torch.pi * var)))
    return (per_element if keep is None else per_element * keep).flatten(1).sum(1)
