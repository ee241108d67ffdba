"""The 2D slice-set layout (``--layout slices``): one case per patient from a folder of 2D images + masks, the same
checks, cache and slice dataset as the volume layouts, bad slices dropped with named reasons, split by patient."""

from __future__ import annotations

import dataclasses

import csv
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pancreas_gvae.data.ct.config import DataConfig, InputIntensityConfig, config_hash, load_data_config
from pancreas_gvae.data.ct.discovery import detect_layout, discover
from pancreas_gvae.data.ct.manifest import read_manifest
from pancreas_gvae.data.ct.prepare import prepare_dataset
from pancreas_gvae.errors import DataError, PipelineError
from pancreas_gvae.transforms.cache import load_cached_case
from pancreas_gvae.transforms.slice_dataset import CTSliceDataset, list_slices

REPO = Path(__file__).resolve().parents[2]
NIH = REPO.parent / "shared" / "data" / "nih-pancreas-2d"
SIZE = 48


def display_slice(seed: int = 0, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """An 8-bit display slice (air 0, body 110, pancreas 170 in the upper left: anterior, patient right) + mask."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[0:size, 0:size]
    body = ((rr - size / 2) / (size * 0.4)) ** 2 + ((cc - size / 2) / (size * 0.45)) ** 2 <= 1
    blob = (rr - size * 0.35) ** 2 + (cc - size * 0.32) ** 2 <= (size * 0.1) ** 2
    img = np.where(body, 110, 0) + rng.integers(0, 4, (size, size))
    img[blob] = 170
    return img.astype(np.uint8), blob.astype(np.uint8)


def nih_config(**slice_set) -> DataConfig:
    cfg = DataConfig()
    cfg.preprocess.input_intensity = InputIntensityConfig(kind="display", window=None)
    for key, value in slice_set.items():
        setattr(cfg.slice_set, key, value)
    return cfg


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, array)
    else:
        Image.fromarray(array, mode).save(path)
    return path


def rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def write_manifest(root: Path, rows: list[tuple[str, str, int]]) -> None:
    with (root / "manifest.csv").open("w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["slice", "patient", "source_index"])
        w.writerows(rows)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Patients with good and bad slices (NIH naming, manifest with an order column), prepared once."""
    root = tmp_path_factory.mktemp("slices") / "data"
    img, msk = display_slice()
    rows = []

    def add(patient, index, *, image=None, mask=None, ext=".png", mask_ext=".png", order=None):
        name = f"{patient}-{index}"
        rows.append((name, patient, index if order is None else order))
        if image is not None:
            save(root / "images" / f"{name}{ext}", image)
        if mask is not None:
            save(root / "masks" / f"{name}{mask_ext}", mask)
        return name

    # good: three PNG slices; the order column (not the name) decides the stack order
    for index, order in ((7, 30), (12, 10), (9, 20)):
        add("PANCREAS_0001", index, image=display_slice(index)[0], mask=msk * 255, order=order)
    # one good JPEG (RGB, equal channels) and one bad slice of each kind: the patient goes on with one slice
    add("PANCREAS_0002", 1, image=rgb(img), mask=msk * 255, ext=".jpg")
    (root / "images" / "PANCREAS_0002-2.png").write_bytes(b"this is not a PNG file")
    rows.append(("PANCREAS_0002-2", "PANCREAS_0002", 2))
    save(root / "masks" / "PANCREAS_0002-2.png", msk * 255)
    colour = rgb(img)
    colour[..., 0] = 255 - colour[..., 0]
    add("PANCREAS_0002", 3, image=colour, mask=msk * 255)
    add("PANCREAS_0002", 4, image=img)  # no mask
    add("PANCREAS_0002", 5, image=img, mask=np.zeros((SIZE, SIZE + 4), np.uint8))  # mask of another shape
    add("PANCREAS_0002", 6, image=np.stack([img, img]), mask=msk, ext=".npy", mask_ext=".npy")  # 3D array
    add("PANCREAS_0002", 8)  # listed, no file
    nan_image = img.astype(np.float32)
    nan_image[0, 0] = np.nan
    add("PANCREAS_0002", 10, image=nan_image, mask=msk, ext=".npy", mask_ext=".npy")
    # every slice unreadable: the patient is excluded
    for index in (1, 2):
        rows.append((f"PANCREAS_0003-{index}", "PANCREAS_0003", index))
        (root / "images" / f"PANCREAS_0003-{index}.jpg").write_bytes(b"\xff\xd8 truncated")
        save(root / "masks" / f"PANCREAS_0003-{index}.png", msk * 255)
    # slices of two sizes
    add("PANCREAS_0004", 1, image=img, mask=msk)
    small_img, small_msk = display_slice(size=40)
    add("PANCREAS_0004", 2, image=small_img, mask=small_msk)
    # all masks empty
    add("PANCREAS_0005", 1, image=img, mask=np.zeros_like(msk))
    # no masks at all
    add("PANCREAS_0006", 1, image=img)
    # .npy float display values and a .npy label map with value 2: any nonzero is pancreas
    add("PANCREAS_0007", 1, image=img.astype(np.float32), mask=msk * 2, ext=".npy", mask_ext=".npy")
    add("PANCREAS_0007", 2, image=img.astype(np.float32), mask=msk * 2, ext=".npy", mask_ext=".npy")
    write_manifest(root, rows)
    out = root.parent / "out"
    df = prepare_dataset(root, out, layout="slices", config=nih_config(), progress=False)
    return root, out, df.set_index("case_id")


def test_auto_detects_the_slice_set(cohort):
    root, _, _ = cohort
    assert detect_layout(root) == "slices"
    found = discover(root)
    assert found.layout == "slices" and [c.case_id for c in found.cases][:2] == ["PANCREAS_0001", "PANCREAS_0002"]


def test_one_ok_case_per_patient_in_the_order_column(cohort):
    _, out, df = cohort
    row = df.loc["PANCREAS_0001"]
    assert row["status"] == "ok", row["reason"]
    assert row["layout"] == "slices" and row["n_slices"] == 3 and row["shape"] == f"{SIZE}x{SIZE}x3"
    assert row["source_slices"] == "PANCREAS_0001-12 PANCREAS_0001-9 PANCREAS_0001-7"  # source_index 10, 20, 30
    assert row["spacing"] == "0.8x0.8x1" and row["input_intensity"] == "display (unknown window) 0..255"
    assert row["image_path"] == "images" and row["label_path"] == "masks"
    assert "hu_checks_skipped" in row["notes"]
    cached = load_cached_case(out / "cache" / "PANCREAS_0001")
    assert cached.image.shape[0] == 3 and cached.slice_voxels.min() > 0
    # stored as published: the pancreas (upper left in the image) is in the upper left of each cached slice
    rows, cols = np.nonzero(np.asarray(cached.label[0]))
    assert rows.mean() < cached.label.shape[1] / 2 and cols.mean() < cached.label.shape[2] / 2
    assert float(np.asarray(cached.image[0], np.float32)[rows, cols].mean()) > 0.6  # 170 / 255 under the mask
    # the stack follows the order column: slice 0 is PANCREAS_0001-12 (its own noise seed)
    assert cached.meta["row"]["source_slices"].split()[0] == "PANCREAS_0001-12"


def test_a_bad_slice_is_dropped_with_its_reason_and_the_patient_goes_on(cohort):
    _, _, df = cohort
    row = df.loc["PANCREAS_0002"]
    assert row["status"] == "ok", row["reason"]
    assert row["n_slices"] == 1 and row["source_slices"] == "PANCREAS_0002-1"
    notes = row["notes"]
    assert "dropped_slices: 7 of 8" in notes
    for name, code in (("PANCREAS_0002-2", "unreadable_file"), ("PANCREAS_0002-3", "not_grayscale"),
                       ("PANCREAS_0002-4", "missing_label"), ("PANCREAS_0002-5", "label_extent_mismatch"),
                       ("PANCREAS_0002-6", "unreadable_file: PANCREAS_0002-6.npy is not a 2D image"),
                       ("PANCREAS_0002-8", "no_image"), ("PANCREAS_0002-10", "non_finite_voxels")):
        assert f"{name} ({code}" in notes, (name, code, notes)


def test_patients_without_a_usable_slice_are_excluded_with_named_reasons(cohort):
    root, _, df = cohort
    reasons = df["reason"].to_dict()
    assert reasons["PANCREAS_0003"].startswith("unreadable_file: no usable slice: 2 of 2 dropped") or \
        reasons["PANCREAS_0003"].startswith("truncated_file: no usable slice: 2 of 2 dropped")
    assert reasons["PANCREAS_0004"].startswith("slice_size_mismatch: slices of 2 sizes: 48x48 (1), 40x40 (1)")
    assert reasons["PANCREAS_0005"].startswith("empty_label:")
    assert reasons["PANCREAS_0006"].startswith("missing_label: no mask for any of its 1 slice(s)")
    assert df.loc["PANCREAS_0007", "status"] == "ok" and df.loc["PANCREAS_0007", "label_voxels"] > 0
    # reasons are a shareable column: counts and codes, never slice names or absolute paths
    for case_id, reason in reasons.items():
        assert f"{case_id}-" not in reason and str(root) not in reason
    assert not df["notes"].str.contains(str(root.parent), regex=False).any()


def test_the_slice_dataset_and_a_patient_split_work_unchanged(cohort):
    _, out, df = cohort
    ok = sorted(df.index[df["status"] == "ok"])
    assert ok == ["PANCREAS_0001", "PANCREAS_0002", "PANCREAS_0007"]
    slices = list_slices(out, read_manifest(out))
    assert len(slices) == 3 + 1 + 2 and slices["has_pancreas"].all()
    ds = CTSliceDataset(out, read_manifest(out), size=32, pos_fraction=None, fov_mm=None)
    item = ds[0]
    assert item["image"].shape == (1, 32, 32) and item["label"].shape == (1, 32, 32) and item["label"].sum() > 0
    with pytest.raises(DataError, match="context_slices=1 needs neighbouring slices"):
        CTSliceDataset(out, read_manifest(out), size=32, context_slices=1)


def test_rerun_reuses_the_cache_and_redoes_a_changed_patient(cohort, tmp_path):
    root, out, first = cohort
    again = prepare_dataset(root, out, layout="slices", config=nih_config(), progress=False).set_index("case_id")
    assert again.loc["PANCREAS_0001", "from_cache"] and again.loc["PANCREAS_0007", "from_cache"]
    path = root / "images" / "PANCREAS_0007-1.npy"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = prepare_dataset(root, out, layout="slices", config=nih_config(), progress=False).set_index("case_id")
    assert not third.loc["PANCREAS_0007", "from_cache"] and third.loc["PANCREAS_0001", "from_cache"]
    # the slice-set settings are part of the cache key of this layout only
    assert config_hash(nih_config(), [1], "slices") != config_hash(nih_config(pixel_mm=0.7), [1], "slices")
    assert config_hash(nih_config(), [1]) == config_hash(nih_config(pixel_mm=0.7), [1])


def test_patients_from_the_file_name_pattern_without_a_manifest(tmp_path):
    root = tmp_path / "set"
    img, msk = display_slice()
    for name in ("caseA_10", "caseA_3", "caseB-1"):
        save(root / "images" / f"{name}.png", img)
        save(root / "masks" / f"{name}.png", msk)
    save(root / "images" / "readme.png", img)  # matches no patient: ignored
    assert detect_layout(root) == "slices"
    df = prepare_dataset(root, tmp_path / "out", config=nih_config(), progress=False).set_index("case_id")
    assert list(df.index) == ["caseA", "caseB"] and (df["status"] == "ok").all()
    assert df.loc["caseA", "source_slices"] == "caseA_3 caseA_10"  # by name, digits as numbers
    # --pancreas-label selects mask values: here the masks are 0/1, so value 2 leaves nothing
    none = prepare_dataset(root, tmp_path / "out2", pancreas_label=2, config=nih_config(), progress=False)
    assert none["reason"].str.startswith("empty_label:").all()


def test_image_only_patients_and_unlabelled_slices(tmp_path):
    root = tmp_path / "set"
    img, msk = display_slice()
    save(root / "images" / "p1-1.png", img)
    save(root / "images" / "p1-2.png", img)
    save(root / "masks" / "p1-1.png", msk)  # p1-2 has no mask: dropped, p1 stays labelled
    save(root / "images" / "p2-1.png", img)  # p2 has no mask at all: image-only
    (root / "masks").mkdir(exist_ok=True)
    cfg = nih_config()
    cfg.labels.require_label = False
    df = prepare_dataset(root, tmp_path / "out", layout="slices", config=cfg, progress=False).set_index("case_id")
    assert df.loc["p1", "has_label"] and df.loc["p1", "n_slices"] == 1
    assert "p1-2 (missing_label" in df.loc["p1", "notes"]
    assert df.loc["p2", "status"] == "ok" and not df.loc["p2", "has_label"]
    assert not load_cached_case(tmp_path / "out" / "cache" / "p2").has_label


def test_settings_a_slice_set_cannot_honour_are_refused(cohort, tmp_path):
    root, _, _ = cohort
    cfg = nih_config()
    cfg.sampling.context_slices = 1
    with pytest.raises(PipelineError, match="context_slices must be 0 for a 2D slice set"):
        prepare_dataset(root, tmp_path / "o1", layout="slices", config=cfg, progress=False)
    cfg = nih_config()
    cfg.preprocess.spacing = [1.0, 1.0, 2.0]
    with pytest.raises(PipelineError, match=r"spacing\[2\] must be null"):
        prepare_dataset(root, tmp_path / "o2", layout="slices", config=cfg, progress=False)
    with pytest.raises(PipelineError, match="pixel_mm"):
        prepare_dataset(root, tmp_path / "o3", layout="slices", config=nih_config(pixel_mm=0), progress=False)


def test_eight_bit_images_declared_as_hu_get_a_hint(tmp_path):
    root = tmp_path / "set"
    img, msk = display_slice()
    save(root / "images" / "p1-1.png", img)
    save(root / "masks" / "p1-1.png", msk)
    df = prepare_dataset(root, tmp_path / "out", layout="slices", progress=False)
    assert df.loc[0, "reason"].startswith("implausible_hu: 8-bit images read as HU")
    assert "kind: display" in df.loc[0, "reason"]


def test_manifest_with_path_columns_and_missing_columns(tmp_path):
    root = tmp_path / "set"
    img, msk = display_slice()
    save(root / "a" / "x1.png", img)
    save(root / "b" / "x1_mask.png", msk)
    (root / "list.csv").write_text("patient,image,mask\nP9,a/x1.png,b/x1_mask.png\n")
    cfg = nih_config(manifest="list.csv")
    assert detect_layout(root, cfg.slice_set) == "slices"
    df = prepare_dataset(root, tmp_path / "out", config=cfg, progress=False).set_index("case_id")
    assert df.loc["P9", "status"] == "ok" and df.loc["P9", "source_slices"] == "x1"
    (root / "list.csv").write_text("who,image,mask\nP9,a/x1.png,b/x1_mask.png\n")
    with pytest.raises(DataError, match="no column 'patient'"):
        prepare_dataset(root, tmp_path / "out", layout="slices", config=cfg, progress=False)


def test_nih_yaml_matches_the_declared_settings():
    cfg = load_data_config(REPO / "configs" / "data" / "nih_slices.yaml")
    ii = cfg.preprocess.input_intensity
    assert (ii.kind, ii.window) == ("display", None) and cfg.sampling.context_slices == 0
    assert cfg.slice_set == dataclasses.replace(DataConfig().slice_set, rows_towards="anterior")


def test_rows_towards_anterior_turns_an_upside_down_set_the_right_way_up(tmp_path):
    """A slice with a bright band at the top (row 0), declared upside down, is stored with the band at the bottom."""
    from pancreas_gvae.data.ct.slice_stacks import slice_affine
    from pancreas_gvae.transforms.cache import to_store_layout

    vol = np.zeros((8, 8, 1), np.float32)
    vol[0] = 1.0  # first image row
    upright, _ = to_store_layout(vol, slice_affine(0.8, "posterior"))
    flipped, _ = to_store_layout(vol, slice_affine(0.8, "anterior"))
    assert upright[0, 0].sum() == 8 and flipped[0, -1].sum() == 8  # (S, P, L): row 0 = most anterior


# ----------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def nih(tmp_path_factory):
    if not (NIH / "manifest.csv").is_file():
        pytest.skip(f"real NIH 2D slices not found at {NIH} (expected ../shared/data/nih-pancreas-2d)")
    out = tmp_path_factory.mktemp("nih") / "prepared"
    from pancreas_gvae.pipelines.prepare_ct import main

    start = time.perf_counter()
    assert main(["--data-root", str(NIH), "--layout", "slices", "--config",
                 str(REPO / "configs" / "data" / "nih_slices.yaml"), "--out", str(out), "--no-progress"]) == 0
    seconds = time.perf_counter() - start
    return out, read_manifest(out), seconds


def test_nih_slices_prepare_as_39_patients(nih):
    import pandas as pd

    out, manifest, seconds = nih
    assert seconds < 60, f"preparing the NIH slices took {seconds:.0f} s"
    assert len(manifest) == 39 and (manifest["status"] == "ok").all(), manifest["reason"].tolist()
    assert manifest["n_slices"].sum() == 351 and (manifest["layout"] == "slices").all()
    # every mask read as published: the pancreas pixels per patient equal the data's own manifest
    source = pd.read_csv(NIH / "manifest.csv")
    expected = source.groupby("patient")["pancreas_pixels"].sum()
    got = manifest.set_index("case_id")["label_voxels"].astype(int)
    assert got.to_dict() == expected.to_dict()
    slices = list_slices(out, manifest)
    assert len(slices) == 351 and slices["has_pancreas"].all()


def test_nih_slice_items_hold_pancreas_and_the_split_is_by_patient(nih):
    from pancreas_gvae.segmentation.splits import split_cases
    from pancreas_gvae.segmentation.unet import load_slices

    out, manifest, _ = nih
    ds = CTSliceDataset(out, manifest, size=128, pos_fraction=None, fit="crop")
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (1, 128, 128) and item["label"].sum() > 0, (item["case_id"], item["slice"])
        assert float(item["has_label"]) == 1.0
    ids = sorted(manifest["case_id"])
    split = split_cases(ids, test_fraction=0.3, seed=0)
    assert not set(split.train) & set(split.test) and sorted(split.train + split.test) == ids
    test = load_slices(out, manifest, split.test, size=64)
    assert set(test.case_id) == set(split.test)
    n_test = int(manifest.set_index("case_id").loc[split.test, "n_slices"].sum())
    assert test.image.shape == (n_test, 1, 64, 64) and test.label.shape == (n_test, 1, 64, 64)
