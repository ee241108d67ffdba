"""The downstream segmenter's pieces: splits, slice loading, a 2D MONAI UNet, its metrics, label fidelity, TSTR.

The experiment built from them is :mod:`pancreas_gvae.segmentation.experiment` (``pipelines/augment_segmentation.py``):

* :func:`split_cases` - a fixed case-level train / test split from a seed (never by slice: neighbouring
  slices of one patient are near-copies), and :func:`subset_cases` - the data fraction as a subset of
  the *training* cases (at least one).
* :func:`load_slices` - every slice of some cases from the prepared store, fitted like the generator's
  training data (same ``slice_size`` / ``fit`` / ``fov_mm``, so a pixel means the same mm in both).
* :func:`synthetic_pool` - samples of the EMA generator (loaded by ``synthesis.generator.generator_from_checkpoint``
  or ``synthesis.generator.load_from_run``),
  split into the windowed CT channel and the thresholded mask.
* :func:`train_unet` - MONAI ``UNet`` + ``DiceCELoss``; with ``ratio`` R > 0, each batch of B holds
  ``round(B * R / (1 + R))`` synthetic slices and the rest real ones (same steps and batch size as the
  real-only arm, so the arms see the same number of samples and gradient steps).
* :func:`evaluate_predictions` - slice-wise ``DiceMetric`` and ``HausdorffDistanceMetric(percentile=95)``.
* :func:`label_fidelity` - a segmenter trained on real slices predicts on synthetic images; Dice against
  the synthetic masks (do the labels fit the images?). :func:`tstr` - Train on Synthetic, Test on Real:
  the same UNet recipe trained on synthetic pairs only and on real ones, both scored on real test slices.
  The mask channel's own realism (share, shape, intensity under the mask) is :mod:`pancreas_gvae.evaluation.metrics.masks`.

Leakage guard: a generator used for augmentation must only have seen training cases. The experiment
(:mod:`pancreas_gvae.segmentation.experiment`) trains each from a manifest restricted to its cases
(:func:`restrict_manifest`) and writes the case lists to ``split.json`` beside its checkpoint (a local
file: case ids are TCIA PatientIDs and never go to MLflow); :func:`check_generator_split` refuses a
checkpoint whose ``split.json`` names a test case, and reports "unverified" when there is none.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from pancreas_gvae.data.ct.config import slice_spacing_mm
from pancreas_gvae.errors import DataError, PipelineError

SPLIT_NAME = "split.json"


# ----------------------------------------------------------------------------- splits


@dataclass
class CaseSplit:
    train: list[str]
    test: list[str]
    seed: int = 0

    def __post_init__(self) -> None:
        overlap = set(self.train) & set(self.test)
        if overlap:
            raise PipelineError(f"{len(overlap)} case(s) on both sides of the train / test split")

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "train": list(self.train), "test": list(self.test)}


def ok_cases(manifest: pd.DataFrame) -> list[str]:
    return sorted(manifest.loc[manifest["status"] == "ok", "case_id"].astype(str))


def split_cases(case_ids: Sequence[str], *, test_fraction: float = 0.4, seed: int = 0) -> CaseSplit:
    """A seeded, case-level split: ``max(1, round(test_fraction * n))`` test cases, the rest train (>= 1)."""
    ids = sorted(set(map(str, case_ids)))
    if len(ids) < 2:
        raise DataError(f"need at least 2 usable cases for a train / test split, got {len(ids)}")
    if not 0.0 < test_fraction < 1.0:
        raise PipelineError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = min(len(ids) - 1, max(1, round(test_fraction * len(ids))))
    perm = np.random.default_rng([seed, 7919]).permutation(len(ids))
    test = sorted(ids[i] for i in perm[:n_test])
    train = sorted(ids[i] for i in perm[n_test:])
    return CaseSplit(train=train, test=test, seed=seed)


def n_cases_for(fraction: float, n_train: int) -> int:
    if not 0.0 < fraction <= 1.0:
        raise PipelineError(f"fractions must be in (0, 1], got {fraction}")
    return max(1, min(n_train, round(fraction * n_train)))


def subset_cases(train: Sequence[str], fraction: float, seed: int) -> list[str]:
    """``fraction`` of the training cases (at least one), drawn with ``seed``; nested across fractions."""
    train = sorted(train)
    k = n_cases_for(fraction, len(train))
    perm = np.random.default_rng([seed, 104729]).permutation(len(train))
    return sorted(train[i] for i in perm[:k])


def restrict_manifest(manifest: pd.DataFrame, cases: Sequence[str]) -> pd.DataFrame:
    """The manifest with only ``cases`` left (what the generator may see)."""
    keep = manifest["case_id"].astype(str).isin(set(cases))
    return manifest[keep].reset_index(drop=True)


def write_split(split: CaseSplit, folder: str | Path) -> Path:
    path = Path(folder) / SPLIT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split.to_json(), indent=2))
    return path


def check_generator_split(checkpoint: str | Path, split: CaseSplit) -> str:
    """``ok`` if the generator's recorded training cases avoid every test case, ``unverified`` without a record.

    Raises when a test case of this split was in the generator's training data (leakage).
    """
    ckpt = Path(checkpoint)
    for folder in (ckpt.parent, ckpt.parent.parent):
        path = folder / SPLIT_NAME
        if path.is_file():
            seen = set(json.loads(path.read_text())["train"])
            leaked = seen & set(split.test)
            if leaked:
                raise PipelineError(f"the generator at {ckpt} was trained on {len(leaked)} of this split's "
                                    f"test case(s) (see {path}): synthetic slices would leak the test set. "
                                    "Train the generator on this split's training cases only (a new --out)")
            return "ok"
    return "unverified"


# ----------------------------------------------------------------------------- data


@dataclass
class SliceSet:
    image: torch.Tensor  # (N, 1, H, W) float32 in [0, 1]
    label: torch.Tensor  # (N, 1, H, W) float32 0/1
    case_id: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.image.shape[0])

    @property
    def has_pancreas(self) -> torch.Tensor:
        return self.label.flatten(1).amax(1) > 0


def load_slices(prepared: str | Path, manifest: pd.DataFrame, cases: Sequence[str], *, size: int,
                fit: str = "resize", fov_mm: float | None = None, centre: str = "image",
                centre_jitter_mm: float = 0.0) -> SliceSet:
    """Every axial slice of ``cases`` (centre slice only, no 2.5D context), fitted to ``size x size``
    (``fit`` ... ``centre_jitter_mm`` as :func:`pancreas_gvae.data.ct.config.fit_options` gives them)."""
    from pancreas_gvae.transforms.slice_dataset import CTSliceDataset, read_slices

    if not cases:
        raise DataError("no case to load")
    ds = CTSliceDataset(prepared, manifest, size=size, pos_fraction=None, context_slices=0, seed=0,
                        cases=list(cases), fit=fit, fov_mm=fov_mm, centre=centre,
                        centre_jitter_mm=centre_jitter_mm)
    missing = set(cases) - set(ds.case_ids)
    if missing:
        raise DataError(f"{len(missing)} requested case(s) are not ok in the prepared store")
    got = read_slices(ds)  # every slice once, in (case, slice) order
    return SliceSet(got["image"], got["label"], got["case_id"])


def synthetic_pool(generator: torch.nn.Module, n: int, *, latent_dim: int, seed: int,
                   mask_channels: int = 1) -> SliceSet:
    """``n`` synthetic (CT, mask) pairs: centre CT channel in [0, 1] and the mask thresholded at 0.5."""
    from pancreas_gvae.synthesis.slices import generate, split_ct_and_mask

    samples = generate(generator, n, latent_dim=latent_dim, seed=seed)
    s = split_ct_and_mask(samples, mask_channels=mask_channels)
    return SliceSet(torch.from_numpy(s.ct)[:, None].float(), torch.from_numpy(s.mask)[:, None].float(),
                    ["synthetic"] * n)


# ----------------------------------------------------------------------------- model, training


def build_unet(channels: Sequence[int] = (16, 32, 64, 128)) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=tuple(channels),
                strides=tuple([2] * (len(channels) - 1)), num_res_units=1, norm="batch")


def split_batch(batch_size: int, ratio: float) -> tuple[int, int]:
    """(real, synthetic) slices per batch for ``ratio`` synthetic per real slice; at least one real."""
    n_syn = int(round(batch_size * ratio / (1.0 + ratio))) if ratio > 0 else 0
    n_syn = min(n_syn, batch_size - 1)
    return batch_size - n_syn, n_syn


def _real_weights(real: SliceSet, pos_fraction: float | None) -> np.ndarray:
    pos = real.has_pancreas.numpy()
    n = len(pos)
    if pos_fraction is None or pos.all() or not pos.any():
        return np.full(n, 1.0 / n)
    w = np.where(pos, pos_fraction / pos.sum(), (1.0 - pos_fraction) / (~pos).sum())
    return w / w.sum()


class ClassicAugmentation:
    """The augmentation any reviewer asks for first (issue 14 §3), applied per slice of a batch: MONAI
    ``RandAffined`` (rotation up to 15 degrees, scale up to 10 %, shift up to 6 % of the side; image bilinear,
    mask nearest, zero outside), ``RandScaleIntensityd`` / ``RandShiftIntensityd`` (10 % / 0.05 of the [0, 1]
    range) and ``RandGaussianNoised`` (sd 0.02), seeded. ``(B, 1, H, W)`` image and mask in, same out."""

    def __init__(self, seed: int):
        self.seed, self.chain = seed, None

    def _build(self, size: int):
        from monai.transforms import (Compose, RandAffined, RandGaussianNoised, RandScaleIntensityd,
                                      RandShiftIntensityd)

        keys = ("image", "label")
        self.chain = Compose([
            RandAffined(keys, prob=0.8, rotate_range=math.radians(15), scale_range=0.1,
                        translate_range=0.06 * size, mode=("bilinear", "nearest"), padding_mode="zeros"),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.05, prob=0.5),
            RandGaussianNoised("image", std=0.02, prob=0.3),
        ])
        self.chain.set_random_state(self.seed)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from monai.data import get_track_meta, set_track_meta

        if self.chain is None:
            self._build(int(image.shape[-1]))
        track = get_track_meta()
        set_track_meta(False)  # plain tensors: MetaTensor bookkeeping would cost more than the transforms here
        try:
            out = [self.chain({"image": x, "label": y}) for x, y in zip(image, label)]
        finally:
            set_track_meta(track)
        img = torch.stack([torch.as_tensor(o["image"]).as_subclass(torch.Tensor) for o in out]).clamp_(0.0, 1.0)
        lab = torch.stack([torch.as_tensor(o["label"]).as_subclass(torch.Tensor) for o in out])
        return img.float(), (lab > 0.5).float()


def train_unet(real: SliceSet, synthetic: SliceSet | None, *, steps: int, batch_size: int, ratio: float,
               seed: int, lr: float = 1e-3, pos_fraction: float | None = 0.6,
               channels: Sequence[int] = (16, 32, 64, 128), log=None, augment: bool = False,
               callback=None, callback_every: int = 0,
               device: str | torch.device | None = None) -> tuple[torch.nn.Module, list[float]]:
    """Train a 2D UNet for ``steps`` batches of ``batch_size`` (real slices oversampled towards pancreas).

    ``augment``: :class:`ClassicAugmentation` on every batch (real and synthetic alike). ``callback(step,
    model)`` runs every ``callback_every`` steps (a learning curve; the model is put back in train mode).
    ``device``: default CUDA when there is one (slices are drawn and augmented on the CPU, then moved).
    """
    from monai.losses import DiceCELoss

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 31337])
    n_real, n_syn = split_batch(batch_size, ratio if synthetic is not None and len(synthetic) else 0.0)
    model = build_unet(channels).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    weights = _real_weights(real, pos_fraction)
    augmenter = ClassicAugmentation(seed) if augment else None
    losses = []
    model.train()
    for step in range(steps):
        idx = rng.choice(len(real), size=n_real, replace=True, p=weights)
        x, y = real.image[idx], real.label[idx]
        if n_syn:
            sidx = rng.choice(len(synthetic), size=n_syn, replace=True)
            x, y = torch.cat([x, synthetic.image[sidx]]), torch.cat([y, synthetic.label[sidx]])
        if augmenter is not None:
            x, y = augmenter(x, y)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
        if log is not None and (step + 1) % max(1, steps // 5) == 0:
            log(step + 1, float(np.mean(losses[-max(1, steps // 5):])))
        if callback is not None and callback_every and (step + 1) % callback_every == 0:
            callback(step + 1, model.eval())
            model.train()
    return model.eval(), losses


def learning_curve(train: SliceSet, val: SliceSet, *, steps: int, every: int, batch_size: int, seed: int,
                   pixel_mm: float, augment: bool = False, lr: float = 1e-3) -> list[dict[str, float]]:
    """Validation Dice / HD95 of one :func:`train_unet` run every ``every`` steps (``val``: slices of training
    patients held back from ``train``, never the test patients): the curve the UNet budget is read from."""
    rows: list[dict[str, float]] = []

    def score(step: int, model: torch.nn.Module) -> None:
        rows.append({"step": step, **evaluate_model(model, val, pixel_mm=pixel_mm)})

    train_unet(train, None, steps=steps, batch_size=batch_size, ratio=0.0, seed=seed, lr=lr, augment=augment,
               callback=score, callback_every=every)
    return rows


def budget_from_curve(steps: Sequence[int], dice: Sequence[float], *, tolerance: float = 0.01) -> int:
    """The first step whose validation Dice (mean of it and its neighbours, against single-point noise) is
    within ``tolerance`` of the best such value: more steps than this buy less than ``tolerance`` Dice."""
    d = np.asarray(dice, dtype=float)
    if len(d) == 0:
        raise PipelineError("an empty learning curve has no budget")
    smooth = np.array([np.nanmean(d[max(0, i - 1):i + 2]) for i in range(len(d))])
    return int(np.asarray(steps)[int(np.flatnonzero(smooth >= np.nanmax(smooth) - tolerance)[0])])


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Binary pancreas masks ``(N, 1, H, W)`` on the CPU (argmax of the two classes), computed on the model's device."""
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device  # a parameter-free stand-in runs on the CPU
    out = [model(images[i:i + batch_size].to(device)).argmax(1, keepdim=True).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).float()


# ----------------------------------------------------------------------------- evaluation


def evaluate_predictions(pred: torch.Tensor, label: torch.Tensor, *, pixel_mm: float = 1.0) -> dict[str, float]:
    """Slice-wise Dice and HD95 of binary masks ``(N, 1, H, W)``.

    * ``dice``, ``hd95``: mean over the slices whose reference holds pancreas. HD95 is in mm (pixels times
      ``pixel_mm``); a slice with an empty prediction gets the worst possible distance, the image diagonal
      (MONAI returns inf there), so missing the organ is not silently dropped. ``hd95_nonempty`` averages
      only slices with a non-empty prediction; ``n_empty_pred`` counts the others.
    * ``dice_all``: mean over every slice, where a slice with no pancreas in either scores 1 and a false
      positive on a pancreas-free slice scores 0 (``ignore_empty=False``).
    """
    import warnings

    from monai.metrics import DiceMetric, HausdorffDistanceMetric
    from monai.networks.utils import one_hot

    pred, label = (pred > 0.5).float(), (label > 0.5).float()
    pos = label.flatten(1).amax(1) > 0
    res: dict[str, float] = {"n_slices": float(len(label)), "n_pancreas_slices": float(pos.sum())}
    p2, l2 = one_hot(pred, 2), one_hot(label, 2)
    dice_all = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(p2, l2)
    res["dice_all"] = float(dice_all.mean()) if len(label) else math.nan
    if not pos.any():
        res.update(dice=math.nan, hd95=math.nan, hd95_nonempty=math.nan, n_empty_pred=0.0)
        return res
    pp, lp = p2[pos], l2[pos]
    res["dice"] = float(DiceMetric(include_background=False, reduction="none")(pp, lp).mean())
    empty = pred[pos].flatten(1).amax(1) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "prediction is all 0": handled below
        hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(pp, lp)[:, 0]
    hd = hd.clone().float()
    diagonal = math.hypot(*label.shape[-2:])
    bad = empty | ~torch.isfinite(hd)
    hd_mm = torch.where(bad, torch.full_like(hd, diagonal), hd) * pixel_mm
    res["hd95"] = float(hd_mm.mean())
    res["hd95_nonempty"] = float(hd_mm[~bad].mean()) if (~bad).any() else math.nan
    res["n_empty_pred"] = float(bad.sum())
    return res


def slice_pixel_mm(data) -> float:
    """mm per pixel of the fitted slices (:func:`pancreas_gvae.data.ct.config.slice_spacing_mm`); HD95 needs one."""
    spacing = slice_spacing_mm(data)
    if spacing is None or abs(spacing[0] - spacing[1]) > 1e-6:
        raise PipelineError(f"HD95 in mm needs square pixels of a fixed size, got {spacing}; "
                            "use sampling.fit=resize with sampling.fov_mm")
    return spacing[0]


def evaluate_model(model: torch.nn.Module, test: SliceSet, *, pixel_mm: float) -> dict[str, float]:
    return evaluate_predictions(predict(model, test.image), test.label, pixel_mm=pixel_mm)


# ----------------------------------------------------------------------------- synthetic labels (issue 11 §2)


def label_fidelity(seg_model: torch.nn.Module, synthetic: SliceSet, *, pixel_mm: float = 1.0) -> dict[str, float]:
    """Do the synthetic masks label the synthetic images? A segmenter trained on *real* slices judges.

    ``seg_model`` (a :func:`train_unet` network trained on real training slices) predicts on the synthetic
    images; :func:`evaluate_predictions` compares the predictions with the synthetic masks. Keys:

    * ``fidelity/dice``, ``fidelity/hd95`` (mm): on the synthetic slices whose mask is non-empty - low when
      the mask does not sit on what a real-trained segmenter sees as pancreas;
    * ``fidelity/missed_share``: of those, the share where the segmenter finds nothing;
    * ``fidelity/fp_empty_share``: of the synthetic slices with an *empty* mask, the share where the
      segmenter finds pancreas (a pancreas drawn in the image but missing from the label); NaN without
      such slices;
    * ``fidelity/dice_all``: every slice (an empty mask with an empty prediction scores 1);
    * counts ``fidelity/n_synthetic``, ``fidelity/n_with_mask``, ``fidelity/n_empty_mask``.

    Bounded by the segmenter's own accuracy on real test slices: read it next to that Dice.
    """
    if len(synthetic) == 0:
        raise DataError("label fidelity needs at least one synthetic slice")
    pred = predict(seg_model, synthetic.image)
    res = evaluate_predictions(pred, synthetic.label, pixel_mm=pixel_mm)
    pos = synthetic.has_pancreas
    found = pred.flatten(1).amax(1) > 0.5
    n_pos, n_empty = int(pos.sum()), int((~pos).sum())
    return {
        "fidelity/dice": res["dice"],
        "fidelity/hd95": res["hd95"],
        "fidelity/missed_share": res["n_empty_pred"] / n_pos if n_pos else math.nan,
        "fidelity/fp_empty_share": float(found[~pos].float().mean()) if n_empty else math.nan,
        "fidelity/dice_all": res["dice_all"],
        "fidelity/n_synthetic": float(len(synthetic)),
        "fidelity/n_with_mask": float(n_pos),
        "fidelity/n_empty_mask": float(n_empty),
    }


def tstr(synthetic: SliceSet, real_train: SliceSet, real_test: SliceSet, *, steps: int, batch_size: int,
         seed: int, pixel_mm: float, lr: float = 1e-3, pos_fraction: float | None = 0.6,
         channels: Sequence[int] = (16, 32, 64, 128), real_model: torch.nn.Module | None = None,
         augment: bool = False) -> dict[str, float]:
    """Train on Synthetic, Test on Real: the UNet of :func:`train_unet` on synthetic pairs only vs on real ones.

    Both arms are one :func:`train_unet` recipe (same steps, batch size, seed, learning rate, pancreas
    oversampling ``pos_fraction``, channels, ``augment``); the synthetic arm passes the synthetic set in the ``real``
    slot with no second set, so it never sees a real slice. Both are scored on ``real_test`` by
    :func:`evaluate_model`. ``real_model``: an already trained real-only network (e.g. the real arm of
    the augmentation experiment) to score instead of training one - the caller vouches that it used the
    same recipe.

    Keys: ``tstr/dice_synthetic``, ``tstr/dice_real``, ``tstr/ratio`` (synthetic / real; NaN when the real
    Dice is 0 or NaN), ``tstr/hd95_synthetic``, ``tstr/hd95_real`` (mm), ``tstr/n_synthetic``,
    ``tstr/n_real_train``, ``tstr/n_test_pancreas_slices``.
    """
    if len(synthetic) == 0 or len(real_train) == 0 or len(real_test) == 0:
        raise DataError(f"TSTR needs non-empty sets, got {len(synthetic)} synthetic, {len(real_train)} real "
                        f"training and {len(real_test)} real test slices")
    recipe = dict(steps=steps, batch_size=batch_size, ratio=0.0, seed=seed, lr=lr, pos_fraction=pos_fraction,
                  channels=channels, augment=augment)
    syn_model, _ = train_unet(synthetic, None, **recipe)
    if real_model is None:
        real_model, _ = train_unet(real_train, None, **recipe)
    syn = evaluate_model(syn_model, real_test, pixel_mm=pixel_mm)
    real = evaluate_model(real_model, real_test, pixel_mm=pixel_mm)
    ratio = syn["dice"] / real["dice"] if real["dice"] > 0 else math.nan  # NaN > 0 is False
    return {
        "tstr/dice_synthetic": syn["dice"],
        "tstr/dice_real": real["dice"],
        "tstr/ratio": float(ratio),
        "tstr/hd95_synthetic": syn["hd95"],
        "tstr/hd95_real": real["hd95"],
        "tstr/n_synthetic": float(len(synthetic)),
        "tstr/n_real_train": float(len(real_train)),
        "tstr/n_test_pancreas_slices": real["n_pancreas_slices"],
    }
