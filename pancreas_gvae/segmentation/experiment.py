"""Do the synthetic slices help a segmenter? The downstream experiment (issue 14), run by
``pipelines/augment_segmentation.py``.

Design (each point answers a way the question could be answered wrongly):

* **Folds by patient.** The cohort's patients are cut into ``k`` seeded folds (:func:`patient_folds`); each
  fold is once the test set, the rest are its training patients (or: train on one cohort, test on an
  external one's patients, a single "fold").
* **No confound.** For a labelled fraction f, ``subset_cases(train, f, seed)`` picks the labelled patients
  (nested across fractions). The *supervised* generator is trained on exactly those patients' slices; the
  *semi-supervised* one on the images of every training patient with the masks of only those (the other
  patients' masks are withheld: ``CTSliceDataset(withhold_labels=...)``, so no mask loss reaches them; with
  ``model.encoder_reads_masks=false`` its encoder reads the images only, so the empty "unknown" mask of an
  unlabelled slice cannot read as "no pancreas" to it either). A
  generator never sees a test patient (``split.json`` beside it; :func:`segmentation.check_generator_split`).
  Generators are cached by (labelled patients, unlabelled patients, seed, settings that differ from the
  defaults: :attr:`GeneratorSpec.key`): seeds, arms and re-runs reuse them.
* **Arms**, one UNet recipe (same steps, batch size, learning rate, pancreas oversampling, initialisation
  seed, real slices of the labelled patients): ``real``; ``real+classic`` (MONAI RandAffined + intensity +
  noise: the baseline any reviewer asks for); ``real+classic+sup<R>`` / ``real+classic+semi<R>`` (R
  synthetic slices per real one in every batch, from the supervised / semi-supervised generator);
  ``real+classic+sup1-filtered`` (only synthetic pairs whose mask the ``real+classic`` UNet agrees with,
  per-pair Dice >= the threshold); ``tstr-sup`` / ``tstr-semi`` (synthetic pairs only, classic augmentation,
  tested on real patients).
* **Paired statistics.** Every arm of one (fraction, fold, seed) shares everything but the arm, so arms are
  compared by their paired Dice differences against ``real+classic`` (and ``real``): mean and a 95 % t
  confidence interval over the (fold, seed) pairs and over fold means
  (:func:`pancreas_gvae.segmentation.report.paired_summary`).

Rows are resumable: a finished (fraction, arm, fold, seed) in ``dice.csv`` is never recomputed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from pancreas_gvae.errors import DataError, PipelineError
from pancreas_gvae.segmentation import scoring, splits
from pancreas_gvae.segmentation import unet as S
from pancreas_gvae.segmentation.report import BASELINE

COLUMNS = ["fraction", "arm", "fold", "seed", "n_labelled_cases", "n_unlabelled_cases", "n_real_slices",
           "n_synthetic", "generator", "dice", "hd95", "dice_all", "hd95_nonempty", "n_empty_pred",
           "n_test_slices", "n_test_pancreas_slices", "final_loss", "seconds"]


# ----------------------------------------------------------------------------- design


def patient_folds(cases: Sequence[str], k: int, *, seed: int = 0) -> list[splits.CaseSplit]:
    """``k`` seeded folds by patient: fold i tests every k-th patient of one permutation, trains on the rest."""
    ids = sorted(set(map(str, cases)))
    if k < 2 or k > len(ids):
        raise PipelineError(f"--folds must be in [2, {len(ids)}] for {len(ids)} patients, got {k}")
    perm = [ids[i] for i in np.random.default_rng([seed, 15485863]).permutation(len(ids))]
    return [splits.CaseSplit(train=sorted(set(ids) - set(perm[i::k])), test=sorted(perm[i::k]), seed=seed)
            for i in range(k)]


def arms_for(ratios: Sequence[float], *, semi: bool, fraction: float, filter_threshold: float) -> list[str]:
    """The arms of one (fraction, fold, seed) row group, in the order they are trained."""
    arms = ["real", BASELINE]
    modes = ["sup"] + (["semi"] if semi and fraction < 1.0 else [])  # at f = 1 nothing is unlabelled
    for mode in modes:
        arms += [f"real+classic+{mode}{r:g}" for r in ratios]
    if filter_threshold > 0 and 1.0 in [float(r) for r in ratios]:
        arms.append("real+classic+sup1-filtered")
    arms += [f"tstr-{mode}" for mode in modes]
    return arms


def parse_arm(arm: str) -> tuple[str | None, float, bool]:
    """(generator mode or None, synthetic ratio R (inf for TSTR), filtered?) of an arm name."""
    if arm in ("real", BASELINE):
        return None, 0.0, False
    if arm.startswith("tstr-"):
        return arm[5:], math.inf, False
    rest = arm[len("real+classic+"):]
    filtered = rest.endswith("-filtered")
    rest = rest.removesuffix("-filtered")
    mode = "semi" if rest.startswith("semi") else "sup"
    return mode, float(rest[len(mode):]), filtered


# ----------------------------------------------------------------------------- generators


@dataclass
class GeneratorSpec:
    """What one generator is trained on: masks of ``labelled``, images only of ``unlabelled``."""

    labelled: list[str]
    unlabelled: list[str]
    test: list[str]
    seed: int
    config: dict[str, Any] = field(repr=False)

    @property
    def key(self) -> str:
        """Hash of the patients, the seed and the settings that differ from the code's defaults (tracking
        aside). Not of the whole config: a setting added to the code later, at a default that keeps the old
        behaviour (as every new setting must), would otherwise orphan every generator trained before it."""
        from pancreas_gvae.config import Config

        cfg = _changed(self.config, Config().to_dict())
        cfg.pop("tracking", None)
        text = json.dumps({"labelled": sorted(self.labelled), "unlabelled": sorted(self.unlabelled),
                           "seed": self.seed, "config": cfg}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def without_prior(self) -> "GeneratorSpec | None":
        """The same generator sampling N(0, I) codes, if this one has a fitted latent prior: the two train to the
        same weights (the prior is fitted after the steps, never trained through), so one serves both."""
        if not self.config.get("model", {}).get("latent_prior_components"):
            return None
        config = copy.deepcopy(self.config)
        config["model"]["latent_prior_components"] = 0
        return replace(self, config=config)


def _changed(config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The entries of the nested ``config`` whose value differs from ``defaults``'."""
    out = {}
    for k, v in config.items():
        d = defaults.get(k)
        if isinstance(v, dict) and isinstance(d, dict):
            if sub := _changed(v, d):
                out[k] = sub
        elif k not in defaults or v != d:
            out[k] = v
    return out


def train_or_reuse_generator(spec: GeneratorSpec, prepared: Path, manifest: pd.DataFrame, cfg, root: Path, *,
                             tags: dict[str, str]) -> Path:
    """The checkpoint of ``spec``'s generator under ``root/<key>``: trained (or continued) only when needed.

    ``split.json`` beside it lists every patient it saw (labelled and unlabelled) against the fold's test
    patients; its MLflow run carries counts only, never a case id."""
    from pancreas_gvae.data.ct.config import check_model_matches_data, data_config
    from pancreas_gvae.training import ct
    from pancreas_gvae.training.run import PRIOR_FIT_IMAGES, checkpoint_path, train_run

    out = root / spec.key
    ckpt = checkpoint_path(out)
    seen = sorted(set(spec.labelled) | set(spec.unlabelled))
    split = splits.CaseSplit(train=seen, test=spec.test, seed=spec.seed)
    if ckpt.is_file() and (out / "done").is_file():
        splits.check_generator_split(ckpt, split)
        return ckpt
    data = data_config(cfg)
    check_model_matches_data(cfg, data)
    restricted = splits.restrict_manifest(manifest, seen)
    batches = ct.slice_batches(prepared, restricted, data, cfg, cases=seen, withhold_labels=spec.unlabelled)
    if set(batches.dataset.case_ids) & set(spec.test):
        raise PipelineError("generator data holds a test patient")  # cannot happen; guard
    twin = spec.without_prior()
    if twin is not None and (root / twin.key / "done").is_file() and not ckpt.is_file():
        splits.write_split(split, out)
        refit_prior(checkpoint_path(root / twin.key), cfg, batches.fit_sample(PRIOR_FIT_IMAGES, cfg.train.seed),
                    ckpt)
        (out / "done").write_text(f"latent prior fitted to the weights of generator {twin.key}\n")
        print(f"generator {spec.key}: the weights of {twin.key} (the same training with N(0, I) codes), a "
              f"{cfg.model.latent_prior_components}-component latent prior fitted to them", flush=True)
        splits.check_generator_split(ckpt, split)
        return ckpt
    preview = ct.preview_slices(prepared, splits.restrict_manifest(manifest, spec.labelled), data,
                                cfg.train.num_samples // 2, cfg.train.seed)
    splits.write_split(split, out)
    train_run(cfg, batches, preview, out_dir=out, resume=ckpt.is_file(), run_name=f"generator-{spec.key}",
              tags={**tags, "n_labelled_cases": str(len(spec.labelled)),
                    "n_unlabelled_cases": str(len(spec.unlabelled)), "purpose": "downstream-generator"},
              progress=False)
    (out / "done").write_text("trained\n")
    splits.check_generator_split(ckpt, split)
    return ckpt


def refit_prior(twin: Path, cfg, images: torch.Tensor, path: Path) -> Path:
    """A checkpoint at ``path`` of ``cfg`` (a config with a latent prior) holding the weights, optimiser and EMA
    state of ``twin`` (the same training with N(0, I) codes) and the prior fitted as training fits it: to the
    trained encoder's codes of ``images`` (``fit_sample`` of the training slices), seeded with ``train.seed``.
    Checked on NIH: a K = 8 generator trained from scratch has its twin's weights bit for bit."""
    from pancreas_gvae.models.gvae import build_model
    from pancreas_gvae.models.latent_prior import encode_codes
    from pancreas_gvae.training.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(twin, map_location="cpu")
    model = build_model(cfg.model)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if unexpected or any(".prior." not in k for k in missing):
        raise PipelineError(f"{twin} is not the same model as the config's (besides its latent prior)")
    prior = model.generator.prior
    prior.fit(*encode_codes(model.encoder, images), seed=cfg.train.seed)
    for where, prefix in (("model", "generator.prior."), ("ema", "module.prior.")):
        state[where].update({prefix + k: v for k, v in prior.state_dict().items()})
    state["config"] = cfg.to_dict()
    save_checkpoint(state, path)
    return path


def synthetic_pool(checkpoint: Path, n: int, *, seed: int) -> S.SliceSet:
    from pancreas_gvae.synthesis.generator import generator_from_checkpoint

    generator, gcfg = generator_from_checkpoint(checkpoint)
    return S.synthetic_pool(generator, n, latent_dim=gcfg.model.latent_dim, seed=seed,
                            mask_channels=gcfg.model.mask_channels)


def filter_by_agreement(pool: S.SliceSet, judge: torch.nn.Module, threshold: float) -> S.SliceSet:
    """The pairs whose mask a real-trained UNet agrees with: per-pair Dice >= ``threshold`` (an empty mask
    with an empty prediction agrees)."""
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    pred = S.predict(judge, pool.image)
    # per pair; ignore_empty=False scores an empty mask with an empty prediction 1 (as evaluate_predictions' dice_all)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(
        one_hot(pred, 2), one_hot((pool.label > 0.5).float(), 2))[:, 0]
    keep = dice >= threshold
    return S.SliceSet(pool.image[keep], pool.label[keep], [c for c, k in zip(pool.case_id, keep) if k])


# ----------------------------------------------------------------------------- the experiment


@dataclass
class Recipe:
    """The UNet recipe every arm shares, and the synthetic-pool settings."""

    steps: int
    batch_size: int = 16
    lr: float = 1e-3
    pos_fraction: float = 0.6
    channels: tuple[int, ...] = (16, 32, 64, 128)
    pool_size: int = 2000
    filter_threshold: float = 0.5


def run_group(*, fraction: float, fold: int, seed: int, split: splits.CaseSplit, arms: list[str], done: set,
              load: Callable[[list[str]], S.SliceSet], test: S.SliceSet, generator: Callable[[str], Path | None],
              recipe: Recipe, pixel_mm: float, on_row: Callable[[dict], None]) -> None:
    """Train and score the missing arms of one (fraction, fold, seed); ``on_row`` gets each finished row."""
    labelled = splits.subset_cases(split.train, fraction, seed)
    unlabelled = sorted(set(split.train) - set(labelled))
    todo = [a for a in arms if (fraction, a, fold, seed) not in done]
    if not todo:
        return
    real = load(labelled)
    if len(real) == 0:
        raise DataError(f"fraction {fraction:g}: the labelled patients have no slice")
    pools: dict[str, S.SliceSet] = {}
    judge = None
    for arm in arms:  # in order: the real+classic UNet is the filter's judge
        if arm not in todo and not (arm == BASELINE and "real+classic+sup1-filtered" in todo):
            continue
        mode, ratio, filtered = parse_arm(arm)
        synthetic, key = None, ""
        if mode is not None:
            ckpt = generator(mode)
            key = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.parent.name
            if mode not in pools:
                pools[mode] = synthetic_pool(ckpt, recipe.pool_size, seed=10_000 + seed)
            synthetic = pools[mode]
            if filtered:
                synthetic = filter_by_agreement(synthetic, judge, recipe.filter_threshold)
                if len(synthetic) == 0:
                    print(f"   {arm}: no synthetic pair passes the filter; arm skipped")
                    continue
        t0 = time.perf_counter()
        recipe_kw = dict(steps=recipe.steps, batch_size=recipe.batch_size, seed=seed, lr=recipe.lr,
                         pos_fraction=recipe.pos_fraction, channels=recipe.channels, augment=arm != "real")
        if math.isinf(ratio):  # TSTR: synthetic pairs only
            model, losses = S.train_unet(synthetic, None, ratio=0.0, **recipe_kw)
        else:
            model, losses = S.train_unet(real, synthetic, ratio=ratio, **recipe_kw)
        if arm == BASELINE:
            judge = model
        if arm not in todo:
            continue
        m = scoring.evaluate_model(model, test, pixel_mm=pixel_mm)
        on_row({"fraction": fraction, "arm": arm, "fold": fold, "seed": seed, "n_labelled_cases": len(labelled),
                "n_unlabelled_cases": len(unlabelled) if mode == "semi" else 0, "n_real_slices": len(real),
                "n_synthetic": len(synthetic) if synthetic is not None else 0, "generator": key,
                "dice": m["dice"], "hd95": m["hd95"], "dice_all": m["dice_all"], "hd95_nonempty": m["hd95_nonempty"],
                "n_empty_pred": int(m["n_empty_pred"]), "n_test_slices": int(m["n_slices"]),
                "n_test_pancreas_slices": int(m["n_pancreas_slices"]),
                "final_loss": float(np.mean(losses[-10:])), "seconds": round(time.perf_counter() - t0, 1)})
