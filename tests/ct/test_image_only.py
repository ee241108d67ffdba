"""Image-only cases (issue 13, item 1): ``labels.require_label: false`` prepares cases without a label, with every
image check, and the slice dataset serves them with ``has_label`` 0 and an all-zero label."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from pancreas_gvae.data.ct.config import DataConfig
from pancreas_gvae.data.ct.manifest import format_summary, read_manifest
from pancreas_gvae.data.ct.prepare import prepare_dataset
from pancreas_gvae.transforms.cache import load_cached_case
from pancreas_gvae.transforms.slice_dataset import CTSliceDataset, list_slices


def unlabelled_config() -> DataConfig:
    cfg = DataConfig()
    cfg.labels.require_label = False
    return cfg


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, synth):
    """good (labelled DICOM), dicom_only (a DICOM series, no label), nifti_only (a NIfTI, no label), nan_only (no
    label and a NaN voxel: the image checks still run)."""
    root = tmp_path_factory.mktemp("mixed") / "data"
    synth.write_case(root, "good", n=16)
    synth.write_case(root, "dicom_only", n=16, label=False, seed=1)
    src = synth.write_case(root.parent / "src", "src", n=16, seed=2)
    affine = synth.ras_affine(src.pixel, 2.5, src.origin, float(src.z[0]))
    hu = synth.nifti_label_array(src.hu).astype(np.float32)
    synth.write_nifti(root / "nifti_only.nii.gz", hu, affine)
    hu[3, 3, 3] = np.nan
    synth.write_nifti(root / "nan_only.nii.gz", hu, affine)
    out = root.parent / "out"
    df = prepare_dataset(root, out, config=unlabelled_config(), progress=False)
    return root, out, df.set_index("case_id")


def test_unlabelled_cases_prepare_fully(mixed):
    _, out, df = mixed
    for case_id in ("dicom_only", "nifti_only"):
        row = df.loc[case_id]
        assert row["status"] == "ok", row["reason"]
        assert not row["has_label"] and row["label_path"] == ""
        assert row["hu_min"] < -500 and row["hu_max"] > 0 and row["cache_shape"]
        assert row["pancreas_slice_count"] == 0 and row["pancreas_slices"] == ""
        cached = load_cached_case(out / "cache" / case_id)
        assert not cached.has_label and not (out / "cache" / case_id / "label.npy").exists()
        assert cached.label.shape == cached.image.shape and not cached.label.any()
    assert df.loc["good", "has_label"] and df.loc["good", "status"] == "ok" and df.loc["good", "label_voxels"] > 0
    assert df.loc["nan_only", "reason"].startswith("non_finite_voxels:")  # image checks still apply
    back = read_manifest(out).set_index("case_id")
    assert str(back.loc["dicom_only", "has_label"]) == "False" and back.loc["dicom_only", "label_voxels"] == ""
    text = format_summary(back.reset_index())
    assert "4 case(s): 3 ok, 1 excluded (0 reused from the cache; 2 image-only, without a label)" in text


def test_resume_reuses_unlabelled_cases(mixed):
    root, out, _ = mixed
    again = prepare_dataset(root, out, config=unlabelled_config(), progress=False).set_index("case_id")
    assert again.loc["dicom_only", "from_cache"] and again.loc["nifti_only", "from_cache"]


def test_labelled_only_run_excludes_them_with_the_reason(mixed, tmp_path):
    root, _, _ = mixed
    df = prepare_dataset(root, tmp_path / "out", progress=False).set_index("case_id")
    assert df.loc["good", "status"] == "ok"
    for case_id in ("dicom_only", "nifti_only"):
        assert df.loc[case_id, "status"] == "excluded"
        assert df.loc[case_id, "reason"].startswith("missing_label:") and "require_label" in df.loc[case_id, "reason"]


def test_slice_dataset_serves_a_mixed_cohort(mixed):
    _, out, df = mixed
    slices = list_slices(out, df.reset_index())
    assert set(slices.loc[~slices["has_label"], "case_id"]) == {"dicom_only", "nifti_only"}
    assert not slices.loc[~slices["has_label"], "has_pancreas"].any()
    ds = CTSliceDataset(out, df.reset_index(), size=32, pos_fraction=0.5, seed=0, samples_per_epoch=120, fov_mm=200)
    items = [ds[i] for i in range(len(ds))]
    flags = {it["case_id"]: float(it["has_label"]) for it in items}
    assert flags.get("good") == 1.0 and flags.get("dicom_only") == 0.0 and flags.get("nifti_only") == 0.0
    for it in items:
        assert it["has_label"].dtype == torch.float32 and it["has_label"].shape == ()
        if it["has_label"] == 0:
            assert not it["label"].any()
    share = np.mean([bool(it["label"].any()) for it in items])
    assert share == pytest.approx(0.5, abs=0.05)  # pos_fraction: slices known to hold pancreas
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert batch["has_label"].shape == (8,)


def test_slice_dataset_of_image_only_cases_alone(mixed):
    _, out, df = mixed
    ds = CTSliceDataset(out, df.reset_index(), size=32, pos_fraction=0.5, cases=["dicom_only"], fit="crop")
    assert len(ds) == 16 and all(float(ds[i]["has_label"]) == 0.0 for i in range(len(ds)))


def test_tcia_case_without_its_label_file(tmp_path):
    phantom = pytest.importorskip("pancreas_gvae.data.ct.phantom")
    root = tmp_path / "tcia"
    phantom.make_phantom_cohort(root, cases=1, size=48, slices=16)
    shutil.rmtree(root / "TCIA_pancreas_labels-02-05-2017")
    excluded = prepare_dataset(root, tmp_path / "a", progress=False).set_index("case_id").loc["PANCREAS_0001"]
    assert excluded["reason"].startswith("missing_label: label0001.nii.gz not in")
    row = prepare_dataset(root, tmp_path / "b", config=unlabelled_config(), progress=False).iloc[0]
    assert row["status"] == "ok" and not row["has_label"], row["reason"]
