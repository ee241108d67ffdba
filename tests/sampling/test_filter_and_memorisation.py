"""Plausibility filter reasons, and the memorisation check: a copy of a training slice is flagged, noise is not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pancreas_gvae.errors import PipelineError
from pancreas_gvae.synthesis.privacy import memorisation_check_by_case, memorisation_histogram, plausibility_table, reason_counts


def _pair(hu_inside: float, *, voxels: int = 40, size: int = 16, hu_outside: float = -100.0):
    ct = np.full((size, size), hu_outside, np.float32)
    mask = np.zeros((size, size), np.uint8)
    mask.flat[:voxels] = 1
    ct[mask > 0] = hu_inside
    return ct, mask


def test_filter_reasons():
    pairs = [_pair(100.0), _pair(100.0, voxels=0), _pair(100.0, voxels=3), _pair(-90.0), _pair(260.0)]
    ct = np.stack([p[0] for p in pairs])
    mask = np.stack([p[1] for p in pairs])
    ct[0, 0, :4] = -100.0  # 4 of 40 fat pixels: 10 %, allowed
    table = plausibility_table(ct, mask, min_voxels=10, median_hu=(-30, 250), max_fat_fraction=0.3)
    assert table["plausible"].tolist() == [True, False, False, False, False]
    assert table["reason"].tolist() == ["", "empty_mask", "small_mask", "median_hu_out_of_range;fat_in_mask",
                                        "median_hu_out_of_range"]
    assert table.loc[0, "mask_voxels"] == 40 and table.loc[0, "median_hu"] == 100.0
    assert table.loc[0, "fat_fraction"] == pytest.approx(0.1)
    assert reason_counts(table) == {"empty_mask": 1, "fat_in_mask": 1, "median_hu_out_of_range": 2, "small_mask": 1}


def _smooth_cases(n_cases: int = 3, per_case: int = 8, size: int = 16, seed: int = 0):
    """Slices of several 'cases': a per-case smooth pattern, drifting slowly from slice to slice."""
    g = torch.Generator().manual_seed(seed)
    slices, cases = [], []
    for c in range(n_cases):
        base = torch.rand(1, 1, 4, 4, generator=g)
        for k in range(per_case):
            drift = 0.05 * k * torch.rand(1, 1, 4, 4, generator=g)
            slices.append(F.interpolate(base + drift, size=(size, size), mode="bilinear", align_corners=False)[0, 0])
            cases.append(c)
    return torch.stack(slices).clamp(0, 1), np.asarray(cases)


def test_exact_copy_is_flagged_and_noise_is_not(tmp_path):
    train, cases = _smooth_cases()
    noise = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(1))
    samples = torch.cat([train[5:6], train[13:14] + 0.002, noise])
    result = memorisation_check_by_case(samples, train, cases, threshold=1 / 3)
    assert result.pixel.reference_kind == "other_case"
    assert result.near_copy.tolist() == [True, True, False, False]
    assert result.pixel.distances[0] == 0.0 and result.pixel.indices[0] == 5
    assert result.pixel.indices[1] == 13
    assert (result.pixel.ratios[2:] > 1).all()
    assert result.pixel.reference_distances.numel() == len(train)
    summary = result.pixel.summary()
    assert summary["near_copies"] == 2 and summary["min_ratio"] == 0.0
    png = memorisation_histogram(result, tmp_path / "hist.png")
    assert png.stat().st_size > 1000


def test_reference_uses_other_cases_not_neighbouring_slices():
    train, cases = _smooth_cases()
    by_case = memorisation_check_by_case(train[:1], train, cases)
    single = memorisation_check_by_case(train[:1], train, np.zeros(len(train), int))
    assert single.pixel.reference_kind == "leave_one_out"
    # neighbouring slices of one case are far closer than slices of another case
    assert by_case.pixel.reference_scale > 2 * single.pixel.reference_scale


def test_feature_space_is_checked_too():
    train, cases = _smooth_cases()
    result = memorisation_check_by_case(train[2:3], train, cases, feature_fn=lambda x: F.avg_pool2d(x, 4))
    assert result.feature is not None and bool(result.feature.near_copy[0]) and bool(result.near_copy[0])


def test_sizes_must_match():
    train, cases = _smooth_cases()
    with pytest.raises(PipelineError, match="differ in size"):
        memorisation_check_by_case(torch.zeros(1, 8, 8), train, cases)
