"""DiffAugment: same geometry for image and mask, mask values untouched, differentiable, seeded, wired into D."""

from __future__ import annotations

import pytest
import torch

from pancreas_gvae.config import load_config
from pancreas_gvae.training.diffaugment import cutout, diff_augment, parse_policy, translation
from pancreas_gvae.errors import PipelineError
from pancreas_gvae.models import build_model
from pancreas_gvae.training.trainer import Trainer, seed_everything


def _pairs(n=8, size=16):
    img = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, 5:11, 4:9] = 1.0
    return torch.cat([img * (1 + mask), mask], 1)


def test_geometry_moves_image_and_mask_together_and_keeps_mask_values():
    x = _pairs()
    marker = x.clone()
    marker[:, 0] = x[:, 1]  # image channel = mask: after a shared geometric op the two stay equal
    g = torch.Generator().manual_seed(1)
    out = diff_augment(marker, ("translation", "cutout", "color"), g, image_channels=1)
    moved = diff_augment(marker, ("translation", "cutout"), torch.Generator().manual_seed(1), image_channels=1)
    assert torch.equal(moved[:, 0], moved[:, 1]), "image and mask must move together"
    assert set(out[:, 1].unique().tolist()) <= {0.0, 1.0}, "mask values are never changed"
    assert not torch.equal(out[:, 0], marker[:, 0]), "color changes the image channel"
    shifted = translation(x, torch.Generator().manual_seed(2))
    assert not torch.equal(shifted, x) and shifted[:, 1].sum() <= x[:, 1].sum()
    cut = cutout(x, torch.Generator().manual_seed(3))
    assert (cut == 0).flatten(1).float().mean(1).min() >= 0.2, "a half-size square is zeroed"


def test_seeded_and_differentiable():
    x = _pairs().requires_grad_(True)
    a = diff_augment(x, ("translation", "cutout", "color"), torch.Generator().manual_seed(5), image_channels=1)
    b = diff_augment(x, ("translation", "cutout", "color"), torch.Generator().manual_seed(5), image_channels=1)
    assert torch.equal(a, b)
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_policy_names_are_checked():
    assert parse_policy(" translation , cutout ") == ("translation", "cutout") and parse_policy("") == ()
    with pytest.raises(ValueError, match="flip"):
        parse_policy("translation,flip")
    with pytest.raises(PipelineError, match="loss.diffaugment"):
        load_config(overrides=["loss.diffaugment=rotate"])


@pytest.mark.parametrize("kind", ["gvae", "gan"])
def test_discriminator_sees_augmented_images_and_training_stays_finite(kind):
    over = ["model.in_channels=2", "model.mask_channels=1", "model.image_size=16", "model.channels=[4,8]",
            "model.latent_dim=4", "train.batch_size=8", f"model.kind={kind}"]
    runs = []
    for policy in ("''", "translation,cutout,color"):
        cfg = load_config(overrides=over + [f"loss.diffaugment={policy}"])
        seed_everything(0)
        tr = Trainer(cfg, build_model(cfg.model), torch.device("cpu"))
        logs = [tr.train_step(_pairs()) for _ in range(3)]
        assert all(torch.isfinite(v) for step in logs for v in step.values())
        runs.append(torch.cat([p.detach().flatten() for p in tr.model.discriminator.parameters()]))
    assert not torch.equal(runs[0], runs[1]), "the policy changes what D learns from"
