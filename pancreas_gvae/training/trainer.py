"""The trainer owns the model, both optimisers, the EMA generator and the noise RNG.

Everything that influences the next step is in :meth:`Trainer.state_dict`, so a run
resumed from a checkpoint continues bit-for-bit on CPU.
"""

from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from pancreas_gvae.config import Config
from pancreas_gvae.errors import TrainingDiverged
from pancreas_gvae.models.gvae import GenerativeModel
from pancreas_gvae.training import distributed
from pancreas_gvae.training.steps import STEPS


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _ema_with_warmup(decay: float):
    """EMA whose decay ramps as min(decay, (1 + n) / (10 + n)), so early averages are not dominated by the init."""

    def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        return d * averaged + (1.0 - d) * current

    return avg_fn


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
        self.opt_g = torch.optim.Adam(gen_params, lr=tc.lr_g, betas=tuple(tc.betas))
        self.opt_d = (torch.optim.Adam(model.discriminator.parameters(), lr=tc.lr_d, betas=tuple(tc.betas))
                      if model.discriminator is not None else None)
        self.ema = AveragedModel(model.generator, avg_fn=_ema_with_warmup(tc.ema_decay), use_buffers=False)
        # Model noise (eps, z_p) comes from its own generator, seeded per rank, saved in checkpoints.
        self.noise = torch.Generator(device=device).manual_seed(tc.seed * 1009 + distributed.rank())
        self.precision = self._resolve_precision(tc.precision)
        self.step = 0
        self._step_fn = STEPS[cfg.model.kind]
        self.grad_norms: dict[str, float] = {}

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
        values = {name: float(value.detach()) for name, value in losses.items()}
        local = [not math.isfinite(v) for v in values.values()]
        # Agreed over all ranks, so every rank stops at the same step instead of the others
        # waiting forever in the next gradient all-reduce.
        anywhere = distributed.any_across_ranks(local, device=next(iter(losses.values())).device)
        for (name, v), here, bad in zip(values.items(), local, anywhere):
            if bad:
                raise TrainingDiverged(
                    f"{name} became {v if here else 'non-finite on another process'} at step {self.step}; weights "
                    "from before this step are kept in the last "
                    "checkpoint. Lower train.lr_g / train.lr_d, raise loss.kl_warmup_steps, or enable "
                    "model.spectral_norm, then resume with --resume"
                )

    def apply(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
              grads: tuple[torch.Tensor, ...]) -> None:
        """Set gradients, average them across ranks, clip, step."""
        for p, g in zip(params, grads):
            p.grad = g
        distributed.average_gradients(params)
        if self.cfg.train.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
            self.grad_norms["d" if optimizer is self.opt_d else "g"] = float(norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        self.model.train()
        x = x.to(self.device, non_blocking=True)
        logs = self._step_fn(self, x)
        distributed.average_norm_stats(self.model)  # before the EMA copies G's buffers below
        self.ema.update_parameters(self.model.generator)
        # BatchNorm statistics are copied, not averaged: averaged running variances do not
        # match averaged weights early on and turn every sample grey.
        for ema_buf, buf in zip(self.ema.module.buffers(), self.model.generator.buffers()):
            ema_buf.copy_(buf)
        self.step += 1
        out = {k: float(v.detach()) for k, v in logs.items()}
        out.update({f"grad_norm/{k}": v for k, v in self.grad_norms.items()})
        return out

    @property
    def ema_generator(self) -> torch.nn.Module:
        return self.ema.module

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
