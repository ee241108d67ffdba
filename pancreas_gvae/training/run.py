"""A whole training run: model, trainer, resume, MLflow, loop, final artifacts.

Shared by the MNIST smoke job and the CT job; they differ only in their data and
in the extra artifacts they log (``on_finish``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pancreas_gvae.config import Config, flatten
from pancreas_gvae.errors import PipelineError, TrainingDiverged
from pancreas_gvae.models import build_model
from pancreas_gvae.tracking import MlflowTracker, NullTracker
from pancreas_gvae.training import distributed
from pancreas_gvae.training.checkpoint import load_checkpoint, remove_orphan_temporaries
from pancreas_gvae.training.loop import BatchSource, Preview, fit
from pancreas_gvae.training.trainer import Trainer, seed_everything
from pancreas_gvae.tracking.images import save_png

PRIOR_FIT_IMAGES = 2048  # training images whose codes the latent prior is fitted to (a seeded subset)


@dataclass
class RunResult:
    trainer: Trainer
    run_id: str | None
    tracking_uri: str | None
    checkpoint: Path
    last_logs: dict[str, float]
    seconds: float


def out_of_memory_advice(cfg: Config) -> str:
    m, t = cfg.model, cfg.train
    return (f"out of GPU memory at batch size {t.batch_size} per GPU, {m.image_size}px, channels {m.channels}. "
            f"Lower --batch-size (train.batch_size, e.g. {max(1, t.batch_size // 2)}), or use a smaller config "
            "(configs/ct_256.yaml instead of ct_512.yaml), or narrower model.channels; keep train.precision=bf16. "
            "Resume with --resume: the last checkpoint is intact")


def config_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """``(key, checkpoint value, new value)`` for every config key that differs (dotted keys, sorted)."""
    a, b = flatten(old), flatten(new)
    missing = object()
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


def check_resumable(old: dict, new: dict, ckpt: Path) -> list[tuple[str, object, object]]:
    """The changes a resumed run will apply; a model change (shapes, kind) is refused, naming the key. A key the
    checkpoint's config lacks (added to the schema after it was written) counts as the default that run had."""
    flat = flatten(old)
    old = {**{k: v for k, v in flatten(Config().to_dict()).items() if k not in flat}, **flat}
    changes = config_changes(old, flatten(new))
    model = [(k, a, b) for k, a, b in changes if k.startswith("model.")]
    if model:
        key, was, now = model[0]
        raise PipelineError(f"cannot resume {ckpt}: {key} was {was!r} in the checkpoint, now {now!r} (a model change "
                            "alters the networks); resume with the checkpoint's model settings or start a new --out")
    return changes


def checkpoint_path(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints" / "last.pt"


def train_run(cfg: Config, batches: BatchSource, preview_images: torch.Tensor, *, out_dir: str | Path,
              run_name: str, resume: bool = False, tags: dict[str, str] | None = None,
              on_finish: Callable[[Trainer, object, Path], None] | None = None,
              progress: bool = True, monitor: Callable[[Trainer], dict[str, float]] | None = None) -> RunResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    device = distributed.init_distributed(cfg.train.device)  # a no-op without torchrun; idempotent
    trainer = Trainer(cfg, build_model(cfg.model), device)
    ckpt = checkpoint_path(out_dir)
    if distributed.is_main_process():
        for name in remove_orphan_temporaries(ckpt):
            print(f"removed {name}, left by an interrupted checkpoint write")

    run_id = None
    if resume:
        if not ckpt.is_file():
            raise PipelineError(f"--resume given but no checkpoint at {ckpt}; run without --resume to start fresh")
        # On the CPU: RNG states must stay CPU byte tensors; load_state_dict copies weights to the device.
        state = load_checkpoint(ckpt, map_location="cpu")
        changes = check_resumable(state["config"], cfg.to_dict(), ckpt)
        trainer.load_state_dict(state)  # the optimisers get this run's learning rates and betas
        run_id = state.get("mlflow_run_id")
        distributed.print0(f"resuming from {ckpt} at step {trainer.step}")
        for key, was, now in changes:
            distributed.print0(f"  {key}: {was!r} -> {now!r}")

    refit_prior = None
    if trainer.model.generator.prior is not None:  # model.latent_prior_components > 0
        prior_images = batches.fit_sample(PRIOR_FIT_IMAGES, cfg.train.seed)
        if len(prior_images) < 2:  # refuse before any MLflow run or training
            raise PipelineError(f"{len(prior_images)} training image(s) are too few to fit a latent prior: set "
                                "model.latent_prior_components=0")
        refit_prior = lambda: trainer.fit_latent_prior(prior_images)  # noqa: E731
        distributed.print0(f"latent prior: {cfg.model.latent_prior_components}-component Gaussian mixture, "
                           f"refitted at each checkpoint to the codes of {len(prior_images)} training images")

    main = distributed.is_main_process()
    tc = cfg.tracking
    tracker = (MlflowTracker(tracking_uri=tc.tracking_uri, experiment=tc.experiment, run_name=run_name,
                             fallback_dir=out_dir, resume_run_id=run_id, tags=tags,
                             system_metrics=tc.system_metrics)
               if main else NullTracker())
    if main:
        tracker.log_config(cfg.to_dict())
    preview = Preview(trainer, preview_images, num_samples=cfg.train.num_samples, seed=cfg.train.seed)
    start = time.perf_counter()
    try:
        logs = fit(trainer, batches, steps=cfg.train.steps, checkpoint_path=ckpt, tracker=tracker, preview=preview,
                   extra_state=lambda: {"mlflow_run_id": tracker.run_id}, progress=progress, monitor=monitor,
                   refit_prior=refit_prior)
        if main:
            for key, grid in preview.grids().items():
                tracker.log_artifact(save_png(grid, out_dir / f"{key}.png"), artifact_path="final")
            if on_finish is not None:
                on_finish(trainer, tracker, out_dir)
            if tc.log_model:
                tracker.log_generator(trainer.ema_generator.eval().cpu(), latent_dim=cfg.model.latent_dim,
                                      register_name=tc.register_name)
                trainer.ema_generator.to(device)
    except TrainingDiverged:
        tracker.end("FAILED")
        raise
    except torch.cuda.OutOfMemoryError:
        tracker.end("FAILED")
        raise PipelineError(out_of_memory_advice(cfg), exit_code=4) from None
    except BaseException:
        tracker.end("KILLED")
        raise
    tracker.end("FINISHED")
    return RunResult(trainer, tracker.run_id, tracker.tracking_uri, ckpt, logs, time.perf_counter() - start)
