"""Scoring a segmenter and the synthetic labels with it.

* :func:`learning_curve` / :func:`budget_from_curve` - validation Dice over training steps, and the budget
  where it levels off (``pipelines/segmenter_curve.py``).
* :func:`evaluate_predictions` - slice-wise ``DiceMetric`` and ``HausdorffDistanceMetric(percentile=95)``.
* :func:`label_fidelity` - a segmenter trained on real slices predicts on synthetic images; Dice against
  the synthetic masks (do the labels fit the images?). :func:`tstr` - Train on Synthetic, Test on Real:
  the same UNet recipe trained on synthetic pairs only and on real ones, both scored on real test slices.
  The mask channel's own realism (share, shape, intensity under the mask) is :mod:`pancreas_gvae.evaluation.metrics.masks`.
"""


from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from pancreas_gvae.data.ct.config import slice_spacing_mm
from pancreas_gvae.errors import DataError, PipelineError

from pancreas_gvae.segmentation.unet import SliceSet, predict, train_unet


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


# ----------------------------------------------------------------------------- training budget


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
