"""The downstream segmenter: the slices it sees and its one 2D MONAI UNet recipe.

The experiment built from it is :mod:`pancreas_gvae.segmentation.experiment` (``pipelines/augment_segmentation.py``);
patient splits are :mod:`pancreas_gvae.segmentation.splits`, scores :mod:`pancreas_gvae.segmentation.scoring`.

* :func:`load_slices` - every slice of some cases from the prepared store, fitted like the generator's
  training data (same ``slice_size`` / ``fit`` / ``fov_mm``, so a pixel means the same mm in both).
* :func:`synthetic_pool` - samples of the EMA generator (loaded by ``synthesis.generator.generator_from_checkpoint``
  or ``synthesis.generator.load_from_run``), split into the windowed CT channel and the thresholded mask.
* :func:`train_unet` - MONAI ``UNet`` + ``DiceCELoss``; with ``ratio`` R > 0, each batch of B holds
  ``round(B * R / (1 + R))`` synthetic slices and the rest real ones (same steps and batch size as the
  real-only arm, so the arms see the same number of samples and gradient steps).
"""


from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from pancreas_gvae.errors import DataError

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


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Binary pancreas masks ``(N, 1, H, W)`` on the CPU (argmax of the two classes), computed on the model's device."""
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device  # a parameter-free stand-in runs on the CPU
    out = [model(images[i:i + batch_size].to(device)).argmax(1, keepdim=True).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).float()
