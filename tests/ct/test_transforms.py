"""Transforms, cache (invalidation, resume) and the slice dataset."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Spacingd

from pancreas_gvae.data.ct import prepare as prepare_mod
from pancreas_gvae.data.ct.config import DataConfig, config_hash, load_data_config, validate
from pancreas_gvae.data.ct.pairing import resample_label_to_image
from pancreas_gvae.data.ct.prepare import prepare_dataset
from pancreas_gvae.errors import PipelineError
from pancreas_gvae.transforms.cache import case_as_dict, load_cached_case, to_store_layout
from pancreas_gvae.transforms.ct import build_sampling_chain
from pancreas_gvae.transforms.spatial import resample_to_spacing
from pancreas_gvae.transforms.slice_dataset import CTSliceDataset, list_slices

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ config


def test_yaml_config_equals_the_defaults():
    assert load_data_config(REPO / "configs" / "data" / "default.yaml") == DataConfig()


def test_unknown_config_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preprocess:\n  spacingg: [1, 1, 1]\n")
    with pytest.raises(PipelineError, match="spacingg"):
        load_data_config(bad)


def test_config_hash_follows_the_deterministic_settings():
    cfg = DataConfig()
    h = config_hash(cfg, [1])
    assert config_hash(DataConfig(), [1]) == h
    assert config_hash(cfg, [1, 2]) != h
    other = dataclasses.replace(cfg, preprocess=dataclasses.replace(cfg.preprocess, hu_window=[-87, 199]))
    assert config_hash(other, [1]) != h
    sampling_only = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, slice_size=64))
    assert config_hash(sampling_only, [1]) == h  # the random part is not cached


# ------------------------------------------------------------------ geometry


def test_separable_spacing_matches_monai_spacingd():
    rng = np.random.default_rng(0)
    aff = np.diag([0.7, 0.8, 2.5, 1.0])
    aff[:3, 3] = [-40, 10, -100]
    img = MetaTensor(torch.from_numpy(rng.normal(size=(1, 40, 30, 8)).astype(np.float32)), affine=aff)
    ours = resample_to_spacing(img, [1.0, 1.0, None], "linear")
    np.testing.assert_allclose(ours.affine.numpy()[:3, :3], np.diag([1.0, 1.0, 2.5]))
    np.testing.assert_allclose(ours.affine.numpy()[:3, 3], aff[:3, 3])  # the first voxel stays put
    ref = Spacingd("image", pixdim=(1.0, 1.0, -1), mode="bilinear", align_corners=True)({"image": img})["image"]
    n = [min(a, b) for a, b in zip(ours.shape[1:], ref.shape[1:])]
    np.testing.assert_allclose(ref.affine.numpy(), ours.affine.numpy(), atol=1e-6)
    np.testing.assert_allclose(ours[0, : n[0], : n[1]].numpy(), ref[0, : n[0], : n[1]].numpy(), atol=1e-4)


def test_separable_spacing_nearest_keeps_labels_binary():
    lab = MetaTensor(torch.zeros(1, 20, 20, 5, dtype=torch.uint8), affine=np.diag([0.5, 0.5, 2.0, 1.0]))
    lab[0, 5:15, 5:15] = 1
    out = resample_to_spacing(lab, [1.0, 1.0, None], "nearest")
    assert out.dtype == torch.uint8 and set(out.unique().tolist()) == {0, 1}
    assert tuple(out.shape) == (1, 10, 10, 5)


def test_label_resampling_fast_path_equals_scipy_path():
    rng = np.random.default_rng(1)
    label = (rng.random((12, 10, 6)) > 0.7).astype(np.uint8)
    img_aff = np.diag([-2.0, -2.0, 3.0, 1.0])
    img_aff[:3, 3] = [30, 40, -50]
    # the label stores y and z flipped and x/y swapped, with the affine that says so
    stored = np.ascontiguousarray(label.transpose(1, 0, 2)[::-1, :, ::-1])  # stored[a, b, c] = label[b, 9-a, 5-c]
    stored_to_image = np.array([[0, 1, 0, 0], [-1, 0, 0, 9], [0, 0, -1, 5], [0, 0, 0, 1]], dtype=float)
    lab_aff = img_aff @ stored_to_image
    fast = resample_label_to_image(stored, lab_aff, img_aff, label.shape)
    np.testing.assert_array_equal(fast, label)
    nudged = lab_aff.copy()
    nudged[:3, :3] *= 1.0001  # not a pure permutation any more: the scipy path
    slow = resample_label_to_image(stored, nudged, img_aff, label.shape)
    assert (slow != label).mean() < 0.02


@pytest.mark.parametrize("slice_major", [False, True])
def test_body_crop_gives_cropforegroundds_box(slice_major):
    from monai.transforms import CropForegroundd

    from pancreas_gvae.transforms.spatial import BodyCropd

    vol = np.full((40, 60, 50), -1000.0, dtype=np.float32)
    vol[5:30, 10:50, 7:44] = 40.0
    vol[2, 3, 4] = 100.0  # a stray bright voxel widens the box, as it does for MONAI
    arr = np.ascontiguousarray(vol.T).T if slice_major else vol  # same values, (k, j, i) memory order
    img = MetaTensor(torch.from_numpy(arr)[None], affine=np.diag([0.8, 0.8, 2.0, 1.0]))
    ref = CropForegroundd(["image"], source_key="image", select_fn=lambda v: v > -500, margin=4,
                          allow_smaller=True)({"image": img})["image"]
    ours = BodyCropd(["image"], "image", -500, 4)({"image": img})["image"]
    assert torch.equal(ours.as_tensor(), ref.as_tensor())
    np.testing.assert_allclose(ours.affine.numpy(), ref.affine.numpy())


def test_store_layout_keeps_world_coordinates():
    vol = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    aff = np.diag([0.9, 0.8, 2.0, 1.0])
    aff[:3, 3] = [-10, 20, -30]
    out, out_aff = to_store_layout(vol, aff)
    assert out.shape == (6, 5, 4)  # (S, P, L)
    for idx in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:
        value = out[idx]
        src = np.argwhere(vol == value)[0]
        np.testing.assert_allclose(out_aff @ [*idx, 1], aff @ [*src, 1])


# ------------------------------------------------------------------ cache: invalidation and resume


def test_cache_invalidated_by_a_config_change(cohort_root, tmp_path):
    out = tmp_path / "out"
    first = prepare_dataset(cohort_root, out, progress=False).set_index("case_id")
    again = prepare_dataset(cohort_root, out, progress=False).set_index("case_id")
    assert not first.loc["good", "from_cache"] and again.loc["good", "from_cache"]
    cfg = DataConfig()
    cfg.preprocess.hu_window = [-87.0, 199.0]
    changed = prepare_dataset(cohort_root, out, config=cfg, progress=False).set_index("case_id")
    assert not changed.loc["good", "from_cache"]
    assert changed.loc["good", "config_hash"] != first.loc["good", "config_hash"]
    assert load_cached_case(out / "cache" / "good").meta["config_hash"] == changed.loc["good", "config_hash"]


def test_resume_skips_finished_cases(cohort_root, tmp_path, make_case, monkeypatch):
    out = tmp_path / "out"
    prepare_dataset(cohort_root, out, progress=False)
    make_case(cohort_root, "new", seed=3)
    calls = []
    real = prepare_mod.prepare_case
    def spy(case, *args, **kwargs):
        calls.append(case.case_id)
        return real(case, *args, **kwargs)

    monkeypatch.setattr(prepare_mod, "prepare_case", spy)
    df = prepare_dataset(cohort_root, out, progress=False).set_index("case_id")
    assert calls == ["new"]
    assert df.loc["good", "from_cache"] and not df.loc["new", "from_cache"]
    assert (df["status"] == "ok").all()


def test_changed_source_is_redone(cohort_root, tmp_path):
    out = tmp_path / "out"
    prepare_dataset(cohort_root, out, progress=False)
    f = sorted((cohort_root / "good" / "dicom").iterdir())[0]
    f.write_bytes(f.read_bytes() + b"\0\0")  # size changes
    df = prepare_dataset(cohort_root, out, progress=False).set_index("case_id")
    assert not df.loc["good", "from_cache"]


@pytest.mark.slow
def test_parallel_workers_give_the_same_manifest(cohort_root, tmp_path, make_case):
    make_case(cohort_root, "second", seed=5)
    one = prepare_dataset(cohort_root, tmp_path / "one", progress=False)
    two = prepare_dataset(cohort_root, tmp_path / "two", workers=2, progress=False)
    cols = ["case_id", "status", "label_voxels", "cache_shape", "config_hash"]
    assert one[cols].equals(two[cols])


# ------------------------------------------------------------------ dataset


@pytest.fixture(scope="module")
def cache(tmp_path_factory, synth):
    root = tmp_path_factory.mktemp("ds") / "data"
    for i, name in enumerate(["c1", "c2", "c3"]):
        synth.write_case(root, name, n=20, seed=i)  # pancreas on slices 5..14 of 20
    out = root.parent / "out"
    df = prepare_dataset(root, out, progress=False)
    assert (df["status"] == "ok").all()
    return out, df


def test_list_slices(cache):
    out, df = cache
    sl = list_slices(out, df)
    assert len(sl) == 60 and sl["has_pancreas"].sum() == 30
    assert set(list_slices(out, df, cases=["c2"])["case_id"]) == {"c2"}


@pytest.mark.parametrize("fit", ["resize", "crop"])
def test_dataset_shapes_and_ranges(cache, fit):
    out, df = cache
    ds = CTSliceDataset(out, df, size=64, pos_fraction=0.5, context_slices=1, seed=0, fit=fit, fov_mm=200)
    assert len(ds) == 60
    for i in range(0, 60, 7):
        item = ds[i]
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
        assert item["label"].shape == (1, 64, 64) and item["label"].dtype == torch.float32
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert set(item["label"].unique().tolist()) <= {0.0, 1.0}
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert batch["image"].shape == (8, 3, 64, 64)


@pytest.mark.parametrize("pos_fraction", [0.2, 0.8])
def test_pancreas_oversampling_fraction(cache, pos_fraction):
    out, df = cache
    ds = CTSliceDataset(out, df, size=64, pos_fraction=pos_fraction, seed=1, samples_per_epoch=200, fov_mm=200)
    share = np.mean([bool(ds[i]["label"].any()) for i in range(len(ds))])
    assert share == pytest.approx(pos_fraction, abs=0.05)


def test_dataset_is_reproducible_and_epochs_differ(cache):
    out, df = cache
    a = CTSliceDataset(out, df, size=32, seed=7, fit="crop")
    b = CTSliceDataset(out, df, size=32, seed=7, fit="crop")
    np.testing.assert_array_equal(a.order, b.order)
    torch.testing.assert_close(a[3]["image"], b[3]["image"])
    first = a.order.copy()
    a.set_epoch(1)
    assert not np.array_equal(first, a.order)
    a.set_epoch(0)
    np.testing.assert_array_equal(first, a.order)


def test_fit_slice_box_centred_on_the_slice_centre_equals_the_centred_fit():
    from pancreas_gvae.transforms.slice_dataset import fit_slice

    g = torch.Generator().manual_seed(0)
    image, label = torch.rand(1, 100, 120, generator=g), (torch.rand(1, 100, 120, generator=g) > 0.7).float()
    centred = fit_slice(image, label, (1.0, 1.0), 32, 64.0)
    moved = fit_slice(image, label, (1.0, 1.0), 32, 64.0, centre_rc=(50.0, 60.0))
    for a, b in zip(centred, moved):
        torch.testing.assert_close(a, b)


def test_fit_slice_box_beyond_the_edge_is_zero_where_the_slice_ends():
    from pancreas_gvae.transforms.slice_dataset import fit_slice

    image, label = torch.ones(1, 100, 100), torch.ones(1, 100, 100)
    img, lab = fit_slice(image, label, (1.0, 1.0), 20, 40.0, centre_rc=(0.0, 50.0))  # box rows -20..20
    assert img.shape == (1, 20, 20) and lab.shape == (1, 20, 20)
    assert img[:, :10].abs().sum() == 0 and lab[:, :10].sum() == 0  # above the slice: zero
    assert torch.all(img[:, 10:] == 1) and torch.all(lab[:, 10:] == 1)
    img, lab = fit_slice(image, label, (1.0, 1.0), 20, 40.0, centre_rc=(500.0, 500.0))  # wholly outside
    assert img.abs().sum() == 0 and lab.sum() == 0


def test_pancreas_centred_window_follows_the_pancreas(cache):
    out, df = cache
    kw = dict(size=32, pos_fraction=None, seed=0, fov_mm=60.0)
    image_c = CTSliceDataset(out, df, **kw)
    pan_c = CTSliceDataset(out, df, centre="pancreas", **kw)
    jit = CTSliceDataset(out, df, centre="pancreas", centre_jitter_mm=10.0, **kw)
    offsets, jittered = [], []
    for i in range(len(pan_c)):
        a, b, c = image_c[i], pan_c[i], jit[i]
        if not b["label"].any():
            continue
        centroid = torch.nonzero(b["label"][0]).float().mean(0)
        offsets.append(float((centroid - 15.5).abs().max()))
        jittered.append(float((torch.nonzero(c["label"][0]).float().mean(0) - centroid).abs().max()))
        assert b["label"].sum() >= a["label"].sum() * 0.9  # no less pancreas in view than centred (resampling phase aside)
    assert len(offsets) == 30 and max(offsets) <= 1.5  # the pancreas sits at the window centre
    assert 0 < max(jittered) <= 10.0 / (60.0 / 32) + 1.5  # moved, by at most the jitter
    torch.testing.assert_close(jit[5]["image"], CTSliceDataset(out, df, centre="pancreas", centre_jitter_mm=10.0,
                                                               **kw)[5]["image"])  # seeded
    with pytest.raises(ValueError, match="centre"):
        CTSliceDataset(out, df, size=32, fit="crop", centre="pancreas")


def test_pancreas_centre_is_checked_in_the_config():
    cfg = DataConfig()
    cfg.sampling.centre = "liver"
    with pytest.raises(PipelineError, match="sampling.centre"):
        validate(cfg)


def test_every_slice_once_without_oversampling(cache):
    out, df = cache
    ds = CTSliceDataset(out, df, size=32, pos_fraction=None, seed=0)
    assert sorted(ds.order.tolist()) == list(range(60))


def test_context_channels_are_neighbour_slices(cache):
    out, df = cache
    ds = CTSliceDataset(out, df, size=32, pos_fraction=None, context_slices=2, fov_mm=None)
    row = int(np.flatnonzero(ds.order == 0)[0])  # c1 slice 0: the neighbours below are clamped to slice 0
    item = ds[row]
    assert item["case_id"] == "c1" and item["slice"] == 0 and item["image"].shape[0] == 5
    torch.testing.assert_close(item["image"][0], item["image"][2])


def test_sampling_chain_gives_3d_patches(cache):
    out, _ = cache
    cfg = DataConfig()
    cfg.sampling.patch_size = [8, 32, 32]
    cfg.sampling.patch_num_samples = 4
    chain = build_sampling_chain(cfg)
    chain.set_random_state(seed=0)
    patches = chain(case_as_dict(out / "cache" / "c1"))
    assert len(patches) == 4
    for p in patches:
        assert tuple(p["image"].shape) == (1, 8, 32, 32) and tuple(p["label"].shape) == (1, 8, 32, 32)
    assert sum(bool(p["label"].any()) for p in patches) >= 2  # pos:neg = 1:1


def test_dataset_refuses_a_cache_from_another_config(cohort_root, tmp_path):
    import json

    from pancreas_gvae.errors import DataError

    out = tmp_path / "out"
    df = prepare_dataset(cohort_root, out, progress=False)
    meta_path = out / "cache" / "good" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["config_hash"] = "0" * 16
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="another config"):
        CTSliceDataset(out, df)
