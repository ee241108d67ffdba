"""The UNet's classic augmentation, its validation learning curve and the budget read from it (issue 14 §3, §5)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from pancreas_gvae.segmentation import scoring
from pancreas_gvae.segmentation import unet as seg
from pancreas_gvae.errors import PipelineError


def test_classic_augmentation_moves_image_and_mask_together_and_is_seeded():
    image = torch.zeros(8, 1, 32, 32)
    image[:, :, 8:20, 10:22] = 0.8
    label = (image > 0.5).float()
    aug = seg.ClassicAugmentation(seed=3)
    img, lab = aug(image, label)
    assert img.shape == image.shape and lab.shape == label.shape
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0 and set(lab.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(img, image), "something changed"
    moved = [i for i in range(8) if not torch.equal(lab[i], label[i])]
    assert moved, "the affine part moves some masks"
    for i in moved:  # the mask follows the bright square it labels (intensity changes are small)
        inside = img[i][lab[i] > 0.5]
        assert inside.numel() and float(inside.mean()) > 0.5
    again = seg.ClassicAugmentation(seed=3)(image, label)
    torch.testing.assert_close(again[0], img)
    assert not isinstance(img, __import__("monai").data.MetaTensor)


def test_budget_is_the_first_step_near_the_best():
    steps = [100, 200, 300, 400, 500]
    # 3-point means: 0.35, 0.433, 0.57, 0.603, 0.605 -> the first within 0.01 of 0.605 is step 400
    assert scoring.budget_from_curve(steps, [0.2, 0.5, 0.60, 0.61, 0.60]) == 400
    assert scoring.budget_from_curve(steps, [0.2, 0.3, 0.4, 0.5, 0.9]) == 500  # still rising: the last
    # a one-step spike counts a third: means 0.25, 0.267, 0.533, 0.667, 0.85 -> 500, not the spike's 200
    assert scoring.budget_from_curve(steps, [0.2, 0.3, 0.3, 1.0, 0.7], tolerance=0.0) == 500
    assert scoring.budget_from_curve(steps, [0.6, 0.6, 0.6, 0.6, 0.6]) == 100  # flat: the first
    with pytest.raises(PipelineError):
        scoring.budget_from_curve([], [])


def test_learning_curve_scores_the_validation_slices_at_every_interval():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(12, 1, 32, 32, generator=g)
    label = torch.zeros(12, 1, 32, 32)
    label[:, :, 10:20, 10:20] = 1
    image = image * 0.3 + label * 0.6
    train, val = seg.SliceSet(image[:8], label[:8]), seg.SliceSet(image[8:], label[8:])
    rows = scoring.learning_curve(train, val, steps=6, every=2, batch_size=4, seed=0, pixel_mm=1.0,
                              augment=True)
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(0.0 <= r["dice"] <= 1.0 and r["n_slices"] == 4 for r in rows)


@pytest.mark.slow
def test_segmenter_curve_cli_on_the_phantom_is_resumable(tmp_path):
    from pancreas_gvae.pipelines import segmenter_curve

    out = tmp_path / "curve"
    argv = ["--steps", "4", "--every", "2", "--seeds", "0", "--out", str(out), "--tracking-uri",
            f"sqlite:///{tmp_path / 'm.db'}", "--set", "data.phantom.cases=5", "--set", "data.phantom.size=64"]
    assert segmenter_curve.main(argv) == 0
    frame = pd.read_csv(out / "curve.csv")
    assert sorted(set(frame["arm"])) == ["classic", "none"] and sorted(set(frame["step"])) == [2, 4]
    assert frame["dice"].apply(lambda v: math.isnan(v) or 0 <= v <= 1).all()
    assert (out / "curve.png").stat().st_size > 0
    assert segmenter_curve.main(argv) == 0  # finished arms are skipped
    pd.testing.assert_frame_equal(pd.read_csv(out / "curve.csv"), frame)
    assert segmenter_curve.main(argv[:-4] + ["--augment", "fancy"]) == 2
