"""The training loop: steps, metrics, sample grids and checkpoints at fixed intervals."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Protocol

import torch
from tqdm.auto import tqdm

from pancreas_gvae.models.latent_prior import draw_codes
from pancreas_gvae.training import distributed
from pancreas_gvae.training.checkpoint import save_checkpoint
from pancreas_gvae.training.trainer import Trainer
from pancreas_gvae.tracking.images import image_grid, interleave


class BatchSource(Protocol):
    steps_per_epoch: int

    def batch(self, step: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The inputs of step ``step``, or ``(inputs, has_label)`` where some samples have no label."""

    def fit_sample(self, n: int, seed: int) -> torch.Tensor:
        """Up to ``n`` training inputs, a seeded subset, for fitting the latent prior (no effect on batches)."""


class Preview:
    """Fixed prior noise and a fixed real batch, so grids are comparable from step to step (codes from the
    generator's fitted latent prior when it has one: the same seed, refitted prior)."""

    def __init__(self, trainer: Trainer, real: torch.Tensor, *, num_samples: int, seed: int):
        self.num_samples, self.seed = num_samples, seed + 7919
        self.real = real[: min(num_samples // 2, real.shape[0])]
        self.trainer = trainer
        self.mask_channels = trainer.cfg.model.mask_channels

    @torch.no_grad()
    def samples(self) -> torch.Tensor:
        G = self.trainer.ema_generator.eval()
        z = draw_codes(G, self.num_samples, self.trainer.model.latent_dim, self.seed)
        return torch.sigmoid(G(z.to(self.trainer.device))).float()

    @torch.no_grad()
    def reconstructions(self) -> torch.Tensor | None:
        model = self.trainer.model
        if model.encoder is None:
            return None
        model.eval()
        real = self.real.to(self.trainer.device)
        mu, _ = model.encoder(real)
        rec = torch.sigmoid(self.trainer.ema_generator.eval()(mu)).float()
        return interleave(real.float(), rec)

    def grids(self) -> dict[str, "object"]:
        out = {"samples": image_grid(self.samples(), mask_channels=self.mask_channels)}
        rec = self.reconstructions()
        if rec is not None:
            out["reconstructions"] = image_grid(rec, mask_channels=self.mask_channels)
        return out


def fit(trainer: Trainer, batches: BatchSource, *, steps: int, checkpoint_path: Path, tracker, preview: Preview,
        extra_state: Callable[[], dict] | None = None, progress: bool = True,
        monitor: Callable[[Trainer], dict[str, float]] | None = None,
        refit_prior: Callable[[], None] | None = None) -> dict[str, float]:
    """Train up to ``steps`` total steps (continuing from ``trainer.step``); return the last logged values.

    ``refit_prior`` (e.g. :meth:`Trainer.fit_latent_prior` on a fixed set of training images) runs before every
    sample grid and checkpoint, so both show and hold a prior fitted to the weights of that step.

    Losses are read on the host only at logging steps (and at epoch ends for the epoch means);
    every other step runs without waiting for the device.
    """
    tc = trainer.cfg.train
    main = distributed.is_main_process()
    bar = tqdm(total=steps, initial=trainer.step, disable=not (progress and main), dynamic_ncols=True,
               desc=f"{trainer.cfg.model.kind}")
    logs: dict[str, float] = {}
    window_images, window_start = 0, time.perf_counter()
    epoch_sums: dict[str, torch.Tensor] = {}
    epoch_steps = 0
    while trainer.step < steps:
        upcoming = trainer.step + 1
        log_now = upcoming % tc.log_every == 0 or upcoming == steps
        checkpoint_now = upcoming % tc.checkpoint_every == 0 or upcoming == steps
        batch = batches.batch(trainer.step)
        x, has_label = batch if isinstance(batch, tuple) else (batch, None)
        step_logs = trainer.train_step(x, has_label=has_label, check=log_now or checkpoint_now)
        window_images += x.shape[0] * distributed.world_size()
        step = trainer.step
        for key, value in step_logs.items():
            epoch_sums[key] = epoch_sums[key] + value if key in epoch_sums else value.detach().float().clone()
        epoch_steps += 1
        if step % batches.steps_per_epoch == 0:
            # Per-epoch metrics: the mean of each loss over the epoch's steps run in this process.
            tracker.log_metrics({f"epoch/{k}": float(v) / epoch_steps for k, v in epoch_sums.items()}, step=step)
            epoch_sums, epoch_steps = {}, 0
        if log_now:
            elapsed = time.perf_counter() - window_start
            logs = {k: float(v) for k, v in step_logs.items()}
            logs["perf/images_per_s"] = window_images / max(elapsed, 1e-9)
            window_images, window_start = 0, time.perf_counter()
            tracker.log_metrics(logs, step=step)
            bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items()
                             if k.startswith(("loss/", "perf/"))}, refresh=False)
        sample_now = step % tc.sample_every == 0 or step == steps
        if refit_prior is not None and (sample_now or checkpoint_now):
            refit_prior()
        if main and sample_now:
            for key, grid in preview.grids().items():
                tracker.log_image(key, grid, step=step)
            if monitor is not None:  # e.g. the CT run's mask scores of prior samples
                tracker.log_metrics(monitor(trainer), step=step)
        if checkpoint_now:
            state = trainer.state_dict()  # every rank: it gathers the per-rank noise RNG states
            if main:
                save_checkpoint({**state, **(extra_state() if extra_state else {})}, checkpoint_path)
        bar.update(1)
    bar.close()
    return logs
