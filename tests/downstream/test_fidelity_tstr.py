"""Issue 11 §2: label fidelity of synthetic (image, mask) pairs and Train-on-Synthetic-Test-on-Real.

Tiny stand-in data: bright ellipses on noise as the "CT" and their masks as labels (32 px, some slices
without an organ). A second draw of the same process plays the generator's samples; shuffling or moving
the masks relative to the images plays a generator whose labels do not fit its images.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.draw import ellipse

from pancreas_gvae.segmentation import scoring

from pancreas_gvae.segmentation import unet as seg
from pancreas_gvae.errors import DataError

SIZE = 32
RECIPE = dict(steps=40, batch_size=8, seed=0, lr=1e-2, channels=(8, 16, 32))


def ellipse_slices(n: int, seed: int, *, p_empty: float = 0.2) -> seg.SliceSet:
    rng = np.random.default_rng(seed)
    img = rng.normal(0.3, 0.08, (n, 1, SIZE, SIZE)).astype(np.float32)
    lab = np.zeros((n, 1, SIZE, SIZE), np.float32)
    for i in range(n):
        if rng.random() < p_empty:
            continue
        rr, cc = ellipse(rng.integers(8, 24), rng.integers(8, 24), rng.integers(3, 7), rng.integers(3, 7),
                         shape=(SIZE, SIZE), rotation=rng.uniform(0, np.pi))
        lab[i, 0, rr, cc] = 1
        img[i, 0, rr, cc] += 0.45
    return seg.SliceSet(torch.from_numpy(img.clip(0, 1)), torch.from_numpy(lab), [f"case{seed}"] * n)


def shuffled_labels(s: seg.SliceSet, seed: int = 0) -> seg.SliceSet:
    perm = torch.randperm(len(s), generator=torch.Generator().manual_seed(seed))
    return seg.SliceSet(s.image, s.label[perm], list(s.case_id))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions: one intra-op thread is faster, and stays fast on a busy shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return {"train": ellipse_slices(64, 0), "synthetic": ellipse_slices(48, 1), "test": ellipse_slices(32, 2)}


@pytest.fixture(scope="module")
def segmenter(data):
    model, losses = seg.train_unet(data["train"], None, ratio=0.0, **RECIPE)
    return model


def test_label_fidelity_high_for_matching_pairs_low_for_shuffled_masks(data, segmenter):
    syn = data["synthetic"]
    good = scoring.label_fidelity(segmenter, syn, pixel_mm=0.5)
    assert good["fidelity/dice"] > 0.75
    assert good["fidelity/missed_share"] < 0.1 and good["fidelity/fp_empty_share"] <= 0.2
    assert good["fidelity/n_synthetic"] == len(syn)
    assert good["fidelity/n_with_mask"] + good["fidelity/n_empty_mask"] == len(syn)
    assert good["fidelity/n_with_mask"] == float(syn.has_pancreas.sum())
    assert all(isinstance(v, float) for v in good.values())

    bad = scoring.label_fidelity(segmenter, shuffled_labels(syn), pixel_mm=0.5)
    assert bad["fidelity/dice"] < 0.4 < good["fidelity/dice"]
    assert bad["fidelity/hd95"] > 2 * good["fidelity/hd95"]
    # shuffling puts empty masks on images that show an organ: the segmenter flags them
    assert bad["fidelity/fp_empty_share"] > 0.5

    moved = seg.SliceSet(syn.image, torch.roll(syn.label, shifts=(9, 9), dims=(-2, -1)))
    assert scoring.label_fidelity(segmenter, moved)["fidelity/dice"] < 0.4


def test_label_fidelity_matches_evaluate_predictions_and_handles_all_empty(data, segmenter):
    syn = data["synthetic"]
    ref = scoring.evaluate_predictions(seg.predict(segmenter, syn.image), syn.label, pixel_mm=0.5)
    fid = scoring.label_fidelity(segmenter, syn, pixel_mm=0.5)
    assert fid["fidelity/dice"] == ref["dice"] and fid["fidelity/hd95"] == ref["hd95"]
    empty = seg.SliceSet(syn.image, torch.zeros_like(syn.label))
    e = scoring.label_fidelity(segmenter, empty)
    assert math.isnan(e["fidelity/dice"]) and math.isnan(e["fidelity/missed_share"])
    assert e["fidelity/fp_empty_share"] > 0.5  # the images do show organs
    with pytest.raises(DataError):
        scoring.label_fidelity(segmenter, seg.SliceSet(syn.image[:0], syn.label[:0]))


def test_tstr_reports_both_arms_and_their_ratio(data):
    res = scoring.tstr(data["synthetic"], data["train"], data["test"], pixel_mm=1.0, **RECIPE)
    for key in ("tstr/dice_synthetic", "tstr/dice_real", "tstr/ratio", "tstr/hd95_synthetic", "tstr/hd95_real"):
        assert isinstance(res[key], float) and math.isfinite(res[key]), key
    assert res["tstr/dice_real"] > 0.75 and res["tstr/dice_synthetic"] > 0.7
    assert res["tstr/ratio"] == pytest.approx(res["tstr/dice_synthetic"] / res["tstr/dice_real"])
    assert res["tstr/ratio"] > 0.75
    assert res["tstr/n_synthetic"] == len(data["synthetic"]) and res["tstr/n_real_train"] == len(data["train"])
    assert res["tstr/n_test_pancreas_slices"] == float(data["test"].has_pancreas.sum())

    # synthetic labels that do not fit their images teach nothing: the synthetic arm collapses, the real arm
    # is the same network as before (same recipe and seed)
    bad = scoring.tstr(shuffled_labels(data["synthetic"]), data["train"], data["test"], pixel_mm=1.0, **RECIPE)
    assert bad["tstr/dice_synthetic"] < 0.4 and bad["tstr/ratio"] < 0.5
    assert bad["tstr/dice_real"] == pytest.approx(res["tstr/dice_real"], abs=1e-6)


def test_tstr_reuses_a_given_real_model_and_refuses_empty_sets(data, segmenter):
    res = scoring.tstr(data["synthetic"], data["train"], data["test"], pixel_mm=1.0, real_model=segmenter, **RECIPE)
    assert res["tstr/dice_real"] == pytest.approx(scoring.evaluate_model(segmenter, data["test"], pixel_mm=1.0)["dice"])
    empty = seg.SliceSet(data["synthetic"].image[:0], data["synthetic"].label[:0])
    with pytest.raises(DataError, match="non-empty"):
        scoring.tstr(empty, data["train"], data["test"], pixel_mm=1.0, **RECIPE)
