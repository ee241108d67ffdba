"""One optimisation step per model kind, written to read like GVAE.md.

GVAE (VAE/GAN, Larsen et al. 2016):
  D: real x against reconstructions G(z_e) and prior samples G(z_p).
  E: beta * KL + feature reconstruction ||D_l(x) - D_l(G(z_e))||^2 + pixel L1; no adversarial gradient.
  G: adversarial loss on G(z_e) and G(z_p) + the same reconstruction terms.
  With ``loss.d_fakes=prior`` D's fake side and G's adversarial term are G(z_p) alone.
E and G get their gradients from their own losses through ``torch.autograd.grad``,
which is how "no adversarial gradient into E" is enforced exactly; they are also clipped
separately (a joint norm would let the adversarial loss rescale E's update).

Image-only slices (``has_label`` 0, an all-zero mask that means "unknown") add no mask loss;
the GVAE shows D such a slice with its own reconstructed mask (detached) instead of the empty
one (``loss.unlabelled_masks=own``) or with its mask channels "unknown", the fakes of its batch
row alike (``blind``); the GAN leaves it out of D's real term, the VAE leaves its mask out of
the likelihood.

Each step returns ``(logs, codes)``: the losses as 0-d tensors (read on the host only at
logging steps) and the latent codes G was run on, which keep the EMA generator's own
normalisation statistics (see ``Trainer.train_step``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

import torch
import torch.nn.functional as F

from pancreas_gvae.config import Config
from pancreas_gvae.models.gvae import GenerativeModel, reparameterize
from pancreas_gvae.training import distributed
from pancreas_gvae.training import losses as L
from pancreas_gvae.training.diffaugment import diff_augment


class Trainer(Protocol):
    """What a step uses of the trainer (``pancreas_gvae.training.trainer.Trainer`` provides it)."""

    cfg: Config
    model: GenerativeModel
    noise: torch.Generator
    diffaugment: tuple[str, ...]
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None

    def autocast(self) -> AbstractContextManager: ...

    def beta(self) -> float: ...

    def check_finite(self, losses: dict[str, torch.Tensor]) -> None: ...

    def apply(self, optimizer: torch.optim.Optimizer,
              groups: dict[str, tuple[list[torch.nn.Parameter], tuple[torch.Tensor, ...]]]) -> None: ...


def _set_requires_grad(module: torch.nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def _image_recon(tr: "Trainer", logits: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                 has_label: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Pixel L1 on the image channels (``pred = sigmoid(logits)``); Dice + BCE on the mask channels' logits (CT)."""
    lc = tr.cfg.loss
    k = tr.cfg.model.mask_channels
    n_img = pred.shape[1] - k
    terms = {"recon/pixel_l1": lc.pixel_l1 * F.l1_loss(pred[:, :n_img].float(), target[:, :n_img].float())}
    if k:
        terms["recon/mask"] = L.mask_loss(logits[:, n_img:], target[:, n_img:], dice_weight=lc.mask_dice,
                                          bce_weight=lc.mask_bce, weight=has_label)
    return terms


def _replace_unlabelled_masks(tr: "Trainer", x: torch.Tensor, has_label: torch.Tensor | None,
                              by: torch.Tensor | float) -> torch.Tensor:
    """``x`` with the mask channels of image-only samples (``has_label`` 0) replaced by ``by``."""
    k = tr.cfg.model.mask_channels
    if has_label is None or not k:
        return x
    keep = has_label.reshape(-1, *([1] * (x.dim() - 1))) > 0
    return torch.cat([x[:, :-k], torch.where(keep, x[:, -k:], by)], dim=1)


def _with_own_masks(tr: "Trainer", x: torch.Tensor, x_rec: torch.Tensor, has_label: torch.Tensor | None) -> torch.Tensor:
    """``x`` with the mask channels of image-only samples replaced by the reconstruction's (detached)."""
    k = tr.cfg.model.mask_channels
    return _replace_unlabelled_masks(tr, x, has_label, x_rec[:, -k:].detach().to(x.dtype) if k else 0.0)


UNKNOWN_MASK = 0.5  # a blinded mask channel: neither pancreas (1) nor background (0), the same for real and fake


def _blinded(tr: "Trainer", x: torch.Tensor, has_label: torch.Tensor | None) -> torch.Tensor:
    """``x`` with the mask channels of the rows of image-only samples set to ``UNKNOWN_MASK``.

    Applied to the real batch and to the reconstructions and prior samples of the same rows, so D sees the same
    share of blinded pairs on both sides and cannot tell real from fake by the blinding."""
    return _replace_unlabelled_masks(tr, x, has_label, UNKNOWN_MASK)


def _aug(tr: "Trainer", x: torch.Tensor) -> torch.Tensor:
    """What D's adversarial judgement sees: ``x`` through DiffAugment (``loss.diffaugment``; identity if empty)."""
    m = tr.cfg.model
    return diff_augment(x, tr.diffaugment, tr.noise, image_channels=m.in_channels - m.mask_channels)


def _d_update(tr: "Trainer", x: torch.Tensor, fakes: list[torch.Tensor], logs: dict,
              real_weight: torch.Tensor | None = None) -> None:
    lc = tr.cfg.loss
    D = tr.model.discriminator
    _set_requires_grad(D, True)
    real = _aug(tr, x.detach()).detach().requires_grad_(lc.r1_gamma > 0)  # R1 on what D sees (as in ADA)
    with tr.autocast():
        _, real_logit = D(real)
        fake_logits = [D(_aug(tr, f.detach()))[1] for f in fakes]
        loss_d = L.d_adversarial(real_logit, fake_logits, lc.adversarial, real_weight)
    if lc.r1_gamma > 0:
        loss_d = loss_d + 0.5 * lc.r1_gamma * L.r1_penalty(real_logit.float(), real)
    tr.check_finite({"loss/d": loss_d})
    logs["loss/d"] = loss_d.detach()
    logs["d/real_logit"] = real_logit.detach().float().mean()
    logs["d/fake_logit"] = torch.stack([f.detach().float().mean() for f in fake_logits]).mean()
    # Decided on the mean over ranks, so every rank skips (or not) together and collectives stay in step.
    # Equilibrium gating is the one opt-in setting that reads a loss on the host every step.
    skip = lc.d_gate_loss is not None and float(distributed.mean_across_ranks(loss_d.detach())) < lc.d_gate_loss
    logs["d/skipped"] = torch.tensor(float(skip))
    if not skip:
        params = list(D.parameters())
        tr.apply(tr.opt_d, {"d": (params, torch.autograd.grad(loss_d, params))})
    _set_requires_grad(D, False)


Codes = list[torch.Tensor]


def gvae_step(tr: "Trainer", x: torch.Tensor,
              has_label: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], Codes]:
    lc = tr.cfg.loss
    E, G, D = tr.model.encoder, tr.model.generator, tr.model.discriminator
    logs: dict[str, torch.Tensor] = {}
    with tr.autocast():
        mu, logvar = E(x)
        z_e = reparameterize(mu.float(), logvar.float(), tr.noise)
        z_p = torch.randn(z_e.shape, generator=tr.noise, device=x.device)
        rec_logits = G(z_e)
        x_rec = torch.sigmoid(rec_logits)
        x_prior = torch.sigmoid(G(z_p))
    if lc.unlabelled_masks == "blind":  # what D sees of each: real, reconstruction, prior sample
        x_real, d_rec, d_prior = (_blinded(tr, t, has_label) for t in (x, x_rec, x_prior))
    else:
        x_real, d_rec, d_prior = _with_own_masks(tr, x, x_rec, has_label), x_rec, x_prior
    both = lc.d_fakes == "both"
    _d_update(tr, x_real, [d_rec, d_prior] if both else [d_prior], logs)

    with tr.autocast():
        feat_real, _ = D(x_real)
        if tr.diffaugment or not both:  # features for the reconstruction loss from the images themselves
            feat_rec, _ = D(d_rec)
            logit_rec = D(_aug(tr, d_rec))[1] if both else None
        else:
            feat_rec, logit_rec = D(d_rec)
        _, logit_prior = D(_aug(tr, d_prior))
        recon_terms = _image_recon(tr, rec_logits, x_rec, x, has_label)
        recon_terms["recon/feature"] = lc.feature_recon * F.mse_loss(feat_rec.float(), feat_real.detach().float())
        recon = torch.stack(list(recon_terms.values())).sum()
        kl = L.kl_loss(mu.float(), logvar.float(), x[0].numel())
        loss_e = tr.beta() * kl + recon
        fake_logits = [logit_rec, logit_prior] if both else [logit_prior]
        loss_g = lc.adversarial_weight * L.g_adversarial(fake_logits, lc.adversarial) + lc.recon_weight_g * recon
    tr.check_finite({"loss/e": loss_e, "loss/g": loss_g})
    e_params, g_params = list(E.parameters()), list(G.parameters())
    grads_e = torch.autograd.grad(loss_e, e_params, retain_graph=True)
    grads_g = torch.autograd.grad(loss_g, g_params)
    tr.apply(tr.opt_g, {"e": (e_params, grads_e), "g": (g_params, grads_g)})
    logs.update({k: v.detach() for k, v in recon_terms.items()},
                **{"loss/e": loss_e.detach(), "loss/g": loss_g.detach(), "kl": (kl * x[0].numel()).detach()})
    return logs, [z_e.detach(), z_p]


def vae_step(tr: "Trainer", x: torch.Tensor,
             has_label: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], Codes]:
    lc = tr.cfg.loss
    E, G = tr.model.encoder, tr.model.generator
    with tr.autocast():
        mu, logvar = E(x)
        z = reparameterize(mu.float(), logvar.float(), tr.noise)
        logits = G(z)
    k = tr.cfg.model.mask_channels
    # Image-only samples: their (unknown) mask channels are left out of the likelihood.
    keep = None if has_label is None or not k else torch.cat(
        [torch.ones_like(x[:, :-k]), has_label.reshape(-1, *([1] * (x.dim() - 1))).expand_as(x[:, -k:])], 1)
    if lc.vae_likelihood == "bernoulli":
        nll = L.bernoulli_nll(logits, x, keep)
    else:
        nll = L.gaussian_nll(torch.sigmoid(logits), x, lc.gaussian_sigma, keep)
    kl = L.kl_per_sample(mu.float(), logvar.float())
    n_el = x[0].numel()
    loss = (nll.mean() + tr.beta() * kl.mean()) / n_el
    logs = {"nll": nll.detach().mean(), "kl": kl.detach().mean()}
    if tr.cfg.model.mask_channels:
        k = tr.cfg.model.mask_channels
        mask = L.mask_loss(logits[:, -k:], x[:, -k:], dice_weight=lc.mask_dice, bce_weight=0.0, weight=has_label)
        logs["recon/mask"] = mask.detach()
        loss = loss + mask
    tr.check_finite({"loss/vae": loss})
    e_params, g_params = list(E.parameters()), list(G.parameters())
    grads = torch.autograd.grad(loss, e_params + g_params)
    tr.apply(tr.opt_g, {"e": (e_params, grads[:len(e_params)]), "g": (g_params, grads[len(e_params):])})
    logs["loss/vae"] = loss.detach()
    return logs, [z.detach()]


def gan_step(tr: "Trainer", x: torch.Tensor,
             has_label: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], Codes]:
    lc = tr.cfg.loss
    G, D = tr.model.generator, tr.model.discriminator
    logs: dict[str, torch.Tensor] = {}
    z = torch.randn((x.shape[0], tr.model.latent_dim), generator=tr.noise, device=x.device)
    with tr.autocast():
        fake = torch.sigmoid(G(z))
    _d_update(tr, x, [fake], logs, real_weight=has_label if tr.cfg.model.mask_channels else None)
    with tr.autocast():
        _, logit = D(_aug(tr, fake))
        loss_g = L.g_adversarial([logit], lc.adversarial)
    tr.check_finite({"loss/g": loss_g})
    params = list(G.parameters())
    tr.apply(tr.opt_g, {"g": (params, torch.autograd.grad(loss_g, params))})
    logs["loss/g"] = loss_g.detach()
    return logs, [z]


STEPS = {"gvae": gvae_step, "vae": vae_step, "gan": gan_step}
