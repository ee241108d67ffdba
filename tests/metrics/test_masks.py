"""Issue 11 §2: mask-channel realism metrics on hand-made masks with known features."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from skimage.draw import disk, ellipse

from pancreas_gvae.evaluation import metrics as M
from pancreas_gvae.evaluation.metrics.masks import robust_scale

S = 32


def _disc(r: float, centre=(16, 16), size=S) -> np.ndarray:
    m = np.zeros((size, size), np.float32)
    m[disk(centre, r, shape=(size, size))] = 1
    return m


def _ellipse(r_row: float, r_col: float, centre=(16, 16), size=S) -> np.ndarray:
    m = np.zeros((size, size), np.float32)
    m[ellipse(centre[0], centre[1], r_row, r_col, shape=(size, size))] = 1
    return m


def _two_blobs() -> np.ndarray:
    return np.maximum(_disc(4, (8, 8)), _disc(4, (24, 24)))


def _stack(*masks: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(masks))[:, None]


def _disc_set(radii, size=S) -> torch.Tensor:
    return _stack(*[_disc(r, (size // 2, size // 2), size) for r in radii])


# ----------------------------------------------------------------------------- share and features


def test_share_counts_slices_with_pancreas_and_honours_min_area():
    empty = np.zeros((S, S), np.float32)
    speck = empty.copy()
    speck[3, 3] = 1
    masks = _stack(_disc(5), empty, speck, _ellipse(3, 8))
    assert M.mask_share(masks) == pytest.approx(3 / 4)
    assert M.mask_share(masks, min_area=2) == pytest.approx(2 / 4)
    assert M.mask_share(masks[:, 0]) == pytest.approx(3 / 4)  # (N, H, W) accepted too
    assert math.isnan(M.mask_share(torch.zeros(0, 1, S, S)))


def test_soft_masks_are_thresholded_at_one_half():
    soft = _disc(5) * 0.6 + (1 - _disc(5)) * 0.4  # 0.6 inside, 0.4 outside
    f = M.mask_shape_features(_stack(soft))
    assert f["area"].iloc[0] == _disc(5).sum()


def test_shape_features_of_disc_ellipse_and_two_blobs():
    masks = _stack(_disc(6), _ellipse(3, 10), _two_blobs(), np.zeros((S, S), np.float32))
    f = M.mask_shape_features(masks, pixel_mm=0.5)
    assert list(f["index"]) == [0, 1, 2]  # the empty slice has no row
    disc, ell, blobs = (f.iloc[i] for i in range(3))
    assert disc["area"] == _disc(6).sum()
    assert f["area_mm2"].tolist() == pytest.approx((f["area"] * 0.25).tolist())
    assert disc["eccentricity"] < 0.2
    assert ell["eccentricity"] == pytest.approx(math.sqrt(1 - (3 / 10) ** 2), abs=0.03)
    assert disc["solidity"] > 0.9 and ell["solidity"] > 0.9
    assert (disc["components"], ell["components"], blobs["components"]) == (1, 1, 2)
    # the two blobs as one region: area of both, hull of the union (mostly empty), diagonal spread
    assert blobs["area"] == 2 * _disc(4).sum()
    assert blobs["solidity"] < 0.6
    assert blobs["eccentricity"] > 0.9


def test_components_are_8_connected():
    m = np.zeros((S, S), np.float32)
    m[5, 5] = m[6, 6] = m[7, 7] = 1  # a diagonal line: one component under 8-connectivity, three under 4
    m[20, 20] = 1
    assert M.mask_shape_features(_stack(m))["components"].iloc[0] == 2


def test_robust_scale_falls_back_from_iqr_to_std_to_one():
    assert robust_scale([1, 2, 3, 4, 5]) == pytest.approx(2.0)
    assert robust_scale([1, 1, 1, 1, 1, 1, 1, 9]) == pytest.approx(np.std([1, 1, 1, 1, 1, 1, 1, 9]))
    assert robust_scale([3, 3, 3]) == 1.0


# ----------------------------------------------------------------------------- distances


def test_shape_distance_is_zero_for_identical_sets_and_grows_with_a_shift():
    radii = [3, 4, 5, 6, 7, 8]
    real = _disc_set(radii)
    same = M.mask_shape_distance(real, real.clone())
    assert all(same[f"mask/{f}_w1"] == 0 for f in M.SHAPE_FEATURES)
    assert same["mask/shape_score"] == 0 and same["mask/no_fake_mask"] == 0
    areas = [M.mask_shape_distance(real, _disc_set([r + k for r in radii]))["mask/area_w1"] for k in (1, 2, 3)]
    assert 0 < areas[0] < areas[1] < areas[2]
    # normalised by the real spread: the same shift on a twice-as-wide real set is a smaller distance
    wide = _disc_set([2, 4, 6, 8, 10, 12])
    assert M.mask_shape_distance(wide, _disc_set([r + 1 for r in [2, 4, 6, 8, 10, 12]]))["mask/area_w1"] < areas[0]


def test_shape_score_sees_split_and_elongated_masks():
    real = _stack(*[_disc(r) for r in (4, 5, 6, 7)])
    split = _stack(*[_two_blobs() for _ in range(4)])
    long = _stack(*[_ellipse(2, 10) for _ in range(4)])
    d_split, d_long = M.mask_shape_distance(real, split), M.mask_shape_distance(real, long)
    assert d_split["mask/components_w1"] == pytest.approx(1.0)  # 1 -> 2 components, real spread 0 -> unit 1
    assert d_split["mask/solidity_w1"] > 0.5  # real discs: solidity 1, no spread -> unit 1; blobs ~0.4
    assert d_long["mask/eccentricity_w1"] > 0.9 and d_long["mask/components_w1"] == 0
    assert d_split["mask/shape_score"] > 0.2 and d_long["mask/shape_score"] > 0.2  # vs 0 for identical sets


def test_no_fake_mask_gives_nan_and_a_flag_not_an_exception():
    real = _disc_set([4, 5, 6])
    fake = torch.zeros(3, 1, S, S)
    d = M.mask_shape_distance(real, fake)
    assert d["mask/no_fake_mask"] == 1.0 and d["mask/no_real_mask"] == 0.0
    assert all(math.isnan(d[f"mask/{f}_w1"]) for f in M.SHAPE_FEATURES) and math.isnan(d["mask/shape_score"])
    img = torch.rand(3, 1, S, S)
    s = M.mask_scores(img, real, img, fake)
    assert s["mask/share_fake"] == 0 and s["mask/n_fake_with_mask"] == 0 and s["mask/no_fake_mask"] == 1
    assert math.isnan(s["mask/intensity_w1"]) and math.isnan(s["mask/shape_score"])
    assert M.mask_shape_distance(fake, real)["mask/no_real_mask"] == 1.0


# ----------------------------------------------------------------------------- intensity under the mask


def _images_and_masks(n: int, seed: int, brightness: float = 0.6):
    rng = np.random.default_rng(seed)
    masks = _disc_set(rng.integers(3, 8, n))
    img = torch.from_numpy(rng.uniform(0.0, 0.3, (n, 1, S, S)).astype(np.float32))
    organ = rng.uniform(brightness - 0.1, brightness + 0.1, (n, 1, S, S)).astype(np.float32)
    img = img + masks * torch.from_numpy(organ)
    return img, masks


def test_intensity_distance_zero_for_same_shift_for_shifted_nan_without_mask():
    img, m = _images_and_masks(8, 0)
    assert M.intensity_under_mask_distance(img, m, img.clone(), m.clone()) == 0.0
    # a constant shift of the values under the mask moves the whole distribution: W1 = the shift
    assert M.intensity_under_mask_distance(img, m, img + 0.1, m) == pytest.approx(0.1, abs=1e-6)
    up = M.mask_scores(img, m, img + 0.1, m)
    down = M.mask_scores(img, m, img - 0.1, m)
    assert up["mask/intensity_mean_fake"] - up["mask/intensity_mean_real"] == pytest.approx(0.1, abs=1e-5)
    assert down["mask/intensity_mean_fake"] < down["mask/intensity_mean_real"]
    assert up["mask/intensity_w1"] == pytest.approx(down["mask/intensity_w1"], abs=1e-6)
    # a mask placed on background instead of the bright organ is far off
    shifted = torch.roll(m, shifts=12, dims=-1)
    assert M.intensity_under_mask_distance(img, m, img, shifted) > 0.2
    assert math.isnan(M.intensity_under_mask_distance(img, m, img, torch.zeros_like(m)))


def test_intensity_distance_sees_spread_not_only_the_mean():
    m = torch.zeros(2, 1, S, S)
    m[..., 12:20, 10:22] = 1
    flat = torch.full_like(m, 0.5)
    spread = flat.clone()
    spread[..., :16, :] = 0.3
    spread[..., 16:, :] = 0.7  # upper and lower halves of the mask (4 rows each): same mean, wider
    assert M.intensity_under_mask_distance(flat, m, spread, m) == pytest.approx(0.2, abs=1e-6)


def test_intensity_subsampling_is_seeded():
    img, m = _images_and_masks(8, 0)
    img2, m2 = _images_and_masks(8, 1)
    a = M.intensity_under_mask_distance(img, m, img2, m2, max_pixels=200, seed=3)
    assert a == M.intensity_under_mask_distance(img, m, img2, m2, max_pixels=200, seed=3)
    full = M.intensity_under_mask_distance(img, m, img2, m2)
    assert a == pytest.approx(full, abs=0.03)


def test_shape_mismatch_between_images_and_masks_is_an_error():
    img, m = _images_and_masks(4, 0)
    with pytest.raises(ValueError, match="differ in shape"):
        M.intensity_under_mask_distance(img[:3], m, img, m)


# ----------------------------------------------------------------------------- one flat dict, cheap


def _random_set(n: int, seed: int, size: int = 64):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        if rng.random() < 0.7:
            rr, cc = ellipse(rng.integers(15, 50), rng.integers(15, 50), rng.integers(3, 10), rng.integers(3, 10),
                             shape=(size, size), rotation=rng.uniform(0, np.pi))
            masks[i, 0, rr, cc] = 1
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)), torch.from_numpy(masks)


def test_mask_scores_flat_floats_and_fast_on_256_slices():
    real, fake = _random_set(256, 0), _random_set(256, 1)
    t0 = time.perf_counter()
    s = M.mask_scores(*real, *fake, pixel_mm=0.8)
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"mask_scores took {elapsed:.2f} s on 256 vs 256 slices of 64²"
    assert all(isinstance(v, float) for v in s.values())
    for key in ("mask/share_fake", "mask/share_real", "mask/n_fake_with_mask", "mask/area_w1", "mask/solidity_w1",
                "mask/eccentricity_w1", "mask/components_w1", "mask/shape_score", "mask/intensity_w1",
                "mask/area_median_real_mm2"):
        assert key in s and math.isfinite(s[key]), key
    assert s["mask/n_fake_with_mask"] == pytest.approx(256 * s["mask/share_fake"])
    assert s["mask/area_median_real_mm2"] == pytest.approx(s["mask/area_median_real_px"] * 0.64)
    # same generating process: close; a process with twice the radii: far
    big = _random_set(256, 2)
    big_masks = torch.nn.functional.interpolate(big[1], scale_factor=2)[..., 32:96, 32:96]
    far = M.mask_scores(*real, big[0], big_masks)
    assert s["mask/shape_score"] < 0.5 < far["mask/area_w1"]
