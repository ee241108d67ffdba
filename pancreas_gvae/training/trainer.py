"""The trainer owns the model, both optimisers, the EMA generator and the noise RNG.

Everything that influences the next step is in :meth:`Trainer.state_dict`, so a run
resumed from a checkpoint continues bit-for-bit on CPU. On a GPU the step never waits
for the device except where asked: losses stay tensors (read at logging steps), the
finiteness check is accumulated on the device and read at checking steps (every logging
and checkpoint step, so a checkpoint is never written after a non-finite step), and the
EMA decay is computed on the host.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from pancreas_gvae.config import Config
from pancreas_gvae.training.diffaugment import parse_policy
from pancreas_gvae.errors import TrainingDiverged
from pancreas_gvae.models.gvae import GenerativeModel
from pancreas_gvae.models.latent_prior import encode_codes
from pancreas_gvae.training import distributed
from pancreas_gvae.training.steps import STEPS


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


EMA_STAT_CODES = 32  # codes per step that keep the EMA generator's normalisation statistics


def ema_decay(decay: float, n_averaged: int) -> float:
    """EMA decay with warm-up, min(decay, (1 + n) / (10 + n)), so early averages are not dominated by the init."""
    return min(decay, (1.0 + n_averaged) / (10.0 + n_averaged))


def _has_norm_stats(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats
               for m in module.modules())


class Trainer:
    def __init__(self, cfg: Config, model: GenerativeModel, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.model = model.to(device)
        tc = cfg.train
        distributed.require_process_group()
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
            if tc.channels_last and cfg.model.spatial_dims == 2:
                self.model = self.model.to(memory_format=torch.channels_last)
        if tc.compile:
            for part in (model.encoder, model.generator, model.discriminator):
                if part is not None:
                    part.compile()  # in place: state_dict keys stay the same, checkpoints stay portable
        distributed.broadcast_module(self.model)
        gen_params = [p for part in (model.encoder, model.generator) if part is not None for p in part.parameters()]
        # Fused Adam on CUDA: one kernel per step and step counters kept on the device (the
        # for-each/single-tensor versions read a host counter; on CPU that costs nothing).
        fused = device.type == "cuda"
        self.opt_g = torch.optim.Adam(gen_params, lr=tc.lr_g, betas=tuple(tc.betas), fused=fused)
        self.opt_d = (torch.optim.Adam(model.discriminator.parameters(), lr=tc.lr_d, betas=tuple(tc.betas),
                                       fused=fused)
                      if model.discriminator is not None else None)
        # AveragedModel is the container (checkpoint keys ``module.*`` and ``n_averaged``, read by the
        # exporters); the update itself is :meth:`update_ema`, because AveragedModel.update_parameters
        # reads ``n_averaged`` on the host every step (a device sync on a GPU).
        self.ema = AveragedModel(model.generator, use_buffers=False)
        self._ema_count = 0  # host copy of ema.n_averaged
        self._ema_has_norm_stats = _has_norm_stats(self.ema.module)  # fixed by the architecture
        # Model noise (eps, z_p) comes from its own generator, seeded per rank, saved in checkpoints.
        self.noise = torch.Generator(device=device).manual_seed(tc.seed * 1009 + distributed.rank())
        self.precision = self._resolve_precision(tc.precision)
        self.step = 0
        self._step_fn = STEPS[cfg.model.kind]
        self.diffaugment = parse_policy(cfg.loss.diffaugment)  # D's differentiable augmentation (steps._aug)
        self.grad_norms: dict[str, torch.Tensor] = {}
        # Per loss name: (first non-finite step or -1, its value), kept on the device.
        self._nonfinite: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._check_now = True

    def _resolve_precision(self, name: str) -> str:
        if name == "auto":
            return "bf16" if self.device.type == "cuda" else "fp32"
        return name

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def beta(self) -> float:
        lc = self.cfg.loss
        if lc.kl_warmup_steps <= 0:
            return lc.beta_kl
        return lc.beta_kl * min(1.0, self.step / lc.kl_warmup_steps)

    def check_finite(self, losses: dict[str, torch.Tensor]) -> None:
        """Record non-finite losses on the device; raise at checking steps (see :meth:`train_step`)."""
        for name, value in losses.items():
            v = value.detach().float().reshape(())
            first, seen = self._nonfinite.get(name) or (torch.full((), -1, dtype=torch.long, device=v.device),
                                                         torch.zeros((), device=v.device))
            new = ~torch.isfinite(v) & (first < 0)
            self._nonfinite[name] = (torch.where(new, self.step, first), torch.where(new, v, seen))
        if self._check_now:
            self.raise_if_diverged()

    def raise_if_diverged(self) -> None:
        """Stop with :class:`TrainingDiverged` if any loss was non-finite on any rank (a collective)."""
        if not self._nonfinite:
            return
        names = list(self._nonfinite)
        firsts = torch.stack([first for first, _ in self._nonfinite.values()]).tolist()
        values = torch.stack([value for _, value in self._nonfinite.values()]).tolist()
        local = [f >= 0 for f in firsts]
        # Agreed over all ranks, so every rank stops at the same step instead of the others
        # waiting forever in the next gradient all-reduce.
        anywhere = distributed.any_across_ranks(local, device=next(iter(self._nonfinite.values()))[0].device)
        for name, first, value, here, bad in zip(names, firsts, values, local, anywhere):
            if bad:
                what = f"became {value} at step {first}" if here else \
                    f"became non-finite on another process at step {self.step} or earlier"
                raise TrainingDiverged(
                    f"{name} {what}; the last checkpoint holds weights from before it. Lower train.lr_g / "
                    "train.lr_d (e.g. --set train.lr_g=1e-4) or raise loss.kl_warmup_steps, then rerun with "
                    "--resume: a resumed run applies the new optimisation settings to the restored state. "
                    "Model changes (e.g. model.spectral_norm) need a fresh run in a new --out"
                )

    def apply(self, optimizer: torch.optim.Optimizer,
              groups: dict[str, tuple[list[torch.nn.Parameter], tuple[torch.Tensor, ...]]]) -> None:
        """Set gradients, average them across ranks (one coalesced all-reduce), clip each group on its own, step.

        Groups are clipped separately (E and G in the GVAE): with one joint norm, G's adversarial
        gradient would rescale E's update and so reach E after all.
        """
        params: list[torch.nn.Parameter] = []
        for group_params, grads in groups.values():
            for p, g in zip(group_params, grads):
                p.grad = g
            params += group_params
        distributed.average_gradients(params)
        if self.cfg.train.grad_clip > 0:
            for name, (group_params, _) in groups.items():
                # A tensor: read on the host only when logged.
                self.grad_norms[name] = torch.nn.utils.clip_grad_norm_(group_params, self.cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def update_ema(self, codes: list[torch.Tensor]) -> None:
        """Average G's weights into the EMA generator; then update the EMA generator's own norm statistics.

        The statistics come from running the EMA generator itself (train mode, no gradient) on the
        codes G saw this step (posterior and prior codes for the GVAE): BatchNorm statistics copied
        from the live G belong to other weights and, once the two drift apart, turn samples grey.
        """
        ema_params = list(self.ema.module.parameters())
        params = [p.detach() for p in self.model.generator.parameters()]
        if self._ema_count == 0:
            torch._foreach_copy_(ema_params, params)
        else:
            torch._foreach_lerp_(ema_params, params, 1.0 - ema_decay(self.cfg.train.ema_decay, self._ema_count))
        self.ema.n_averaged += 1
        self._ema_count += 1
        ema = self.ema.module
        if self._ema_has_norm_stats:
            ema.train()
            # Up to EMA_STAT_CODES codes, shared between posterior and prior: a whole-batch forward cost a
            # third of a CPU step; the momentum average over steps makes up for the smaller batch.
            per_set = max(1, EMA_STAT_CODES // len(codes))
            with self.autocast():
                ema(torch.cat([z.detach()[:per_set] for z in codes]))
            distributed.average_norm_stats(ema)

    def train_step(self, x: torch.Tensor, *, has_label: torch.Tensor | None = None,
                   check: bool = True) -> dict[str, torch.Tensor]:
        """One step; returns its losses as detached 0-d tensors.

        ``has_label`` (one 0/1 value per sample) marks image-only samples, whose mask channels are
        unknown: they add no mask loss (see :mod:`pancreas_gvae.training.steps`). ``check=False``
        defers the finiteness check (no host-device sync): the training loop passes ``True`` only on
        logging and checkpoint steps; a non-finite loss in between is reported with the step it first
        happened at.
        """
        self.model.train()
        x = x.to(self.device, non_blocking=True)
        if has_label is not None:
            has_label = has_label.to(self.device, non_blocking=True)
        self._check_now = check
        logs, codes = self._step_fn(self, x, has_label)
        if has_label is not None:
            logs["batch/labelled_share"] = has_label.float().mean()
        distributed.average_norm_stats(self.model)
        self.update_ema(codes)
        self.step += 1
        logs.update({f"grad_norm/{k}": v.detach() for k, v in self.grad_norms.items()})
        return logs

    def apply_optimisation_settings(self) -> None:
        """Learning rates and betas from the config onto the optimisers (after a restored optimiser state).

        Everything else a resumed run may change (clipping, loss weights, total steps, precision,
        logging, EMA decay) is read from ``self.cfg`` at each step already.
        """
        tc = self.cfg.train
        for optimizer, lr in ((self.opt_g, tc.lr_g), (self.opt_d, tc.lr_d)):
            for group in optimizer.param_groups if optimizer is not None else ():
                group["lr"] = lr
                group["betas"] = tuple(tc.betas)

    @property
    def ema_generator(self) -> torch.nn.Module:
        return self.ema.module

    @torch.no_grad()
    def fit_latent_prior(self, images: torch.Tensor, *, batch_size: int = 256) -> None:
        """Refit the generator's latent prior (``model.latent_prior_components`` > 0; a no-op otherwise) to the
        encoder's codes of ``images`` (CPU is fine), and give the EMA generator, the one that is shipped, the same.
        Every rank computes the same fit (same weights, same images, fixed seed)."""
        prior = self.model.generator.prior
        if prior is None:
            return
        mu, logvar = encode_codes(self.model.encoder, images, device=self.device, batch_size=batch_size)
        prior.fit(mu, logvar, seed=self.cfg.train.seed)
        self.ema.module.prior.load_state_dict(prior.state_dict())

    def state_dict(self) -> dict:
        """Under several processes this is a collective (it gathers every rank's noise RNG): call it on all ranks."""
        noise_per_rank = distributed.all_gather_object(self.noise.get_state()) if distributed.is_distributed() else None
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict() if self.opt_d else None,
            "ema": self.ema.state_dict(),
            # bf16 needs no loss scaling; kept in the format so an fp16 scaler can be added without a break.
            "scaler": None,
            "rng": {
                "noise": self.noise.get_state(),
                "noise_per_rank": noise_per_rank,  # rank r resumes with its own stream (same world size)
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
        self.opt_g.load_state_dict(state["opt_g"])
        if self.opt_d is not None and state.get("opt_d") is not None:
            self.opt_d.load_state_dict(state["opt_d"])
        self.ema.load_state_dict(state["ema"])
        self._ema_count = int(self.ema.n_averaged)
        self.apply_optimisation_settings()
        rng = state["rng"]
        per_rank = rng.get("noise_per_rank")
        if per_rank is not None and len(per_rank) == distributed.world_size():
            self.noise.set_state(per_rank[distributed.rank()])
        elif distributed.rank() == 0:
            self.noise.set_state(rng["noise"])
        else:  # another world size: a fresh stream per rank, never a copy of rank 0's
            self.noise.manual_seed((self.cfg.train.seed * 1009 + distributed.rank()) * 1_000_003 + self.step)
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
