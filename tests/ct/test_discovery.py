"""Layouts (TCIA, DOI, MSD, plain folder), label lookup, slice order, and what the manifest may contain."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from pancreas_gvae.data.ct.config import CheckConfig
from pancreas_gvae.data.ct.dicom_series import scan_dicom_folder
from pancreas_gvae.data.ct.discovery import detect_layout, discover
from pancreas_gvae.data.ct.prepare import prepare_dataset
from pancreas_gvae.errors import DataError
from pancreas_gvae.transforms.cache import load_cached_case


@pytest.fixture
def phantom_cohort(tmp_path):
    phantom = pytest.importorskip("pancreas_gvae.data.ct.phantom")
    root = tmp_path / "tcia"
    phantom.make_phantom_cohort(root, cases=2, size=48, slices=16)
    phantom.make_phantom_cohort(root, cases=1, size=48, slices=16, start_index=25)  # the known duplicate
    return root


def test_tcia_layout_with_duplicates_left_out(phantom_cohort, tmp_path, caplog):
    assert detect_layout(phantom_cohort) == "tcia"
    caplog.set_level("INFO")
    df = prepare_dataset(phantom_cohort, tmp_path / "out", progress=False).set_index("case_id")
    assert list(df.index) == ["PANCREAS_0001", "PANCREAS_0002", "PANCREAS_0025"]
    assert (df.loc[["PANCREAS_0001", "PANCREAS_0002"], "status"] == "ok").all()
    assert df.loc["PANCREAS_0025", "status"] == "excluded"
    assert df.loc["PANCREAS_0025", "reason"].startswith("duplicate_case: duplicate of PANCREAS_0002")
    assert "PANCREAS_0025 left out" in caplog.text
    # paths stop at the case folder: NBIA study / series folder names carry dates and UIDs
    assert df.loc["PANCREAS_0001", "image_path"] == "Pancreas-CT/PANCREAS_0001"
    assert df.loc["PANCREAS_0001", "label_path"] == "TCIA_pancreas_labels-02-05-2017/label0001.nii.gz"
    assert 60 <= df.loc["PANCREAS_0001", "label_median_hu"] <= 140


def test_tcia_labels_given_elsewhere(phantom_cohort, tmp_path):
    moved = tmp_path / "elsewhere" / "my_labels"
    shutil.move(str(phantom_cohort / "TCIA_pancreas_labels-02-05-2017"), moved)
    df = prepare_dataset(phantom_cohort, tmp_path / "out", progress=False).set_index("case_id")
    assert df.loc["PANCREAS_0001", "reason"].startswith("missing_label")
    found = discover(phantom_cohort / "Pancreas-CT", labels=moved)  # data root = the collection folder itself
    assert found.layout == "tcia"
    assert [c.label.name for c in found.cases[:2]] == ["label0001.nii.gz", "label0002.nii.gz"]


def test_old_doi_layout(tmp_path, make_case):
    root = tmp_path / "old"
    uid_dir = "1.2.826.0.1.3680043.2.1125.1.38381854871216336385978062044218957"
    case = make_case(root / "DOI" / "PANCREAS_0003" / uid_dir, uid_dir, label=False, subdir="")
    labels = root / "TCIA_pancreas_labels-02-05-2017"
    labels.mkdir()
    shutil.copy(make_case(tmp_path / "tmp", "x").label, labels / "label0003.nii.gz")
    assert detect_layout(root) == "tcia"
    df = prepare_dataset(root, tmp_path / "out", progress=False)
    row = df.set_index("case_id").loc["PANCREAS_0003"]
    assert row["status"] == "ok", row["reason"]
    assert row["image_path"] == "DOI/PANCREAS_0003"
    assert len(case.files) == row["n_slices"]


def test_msd_layout_maps_label_values(tmp_path, synth):
    root = tmp_path / "Task07_Pancreas"
    hu, mask = synth.synth_volume(12, 32)
    label = mask.copy()
    label[:, :, 12:] *= 2  # part of the blob is "tumour" (2)
    affine = synth.ras_affine(4.0, 2.5, (-60.0, -70.0), -150.0)
    synth.write_nifti(root / "imagesTr" / "pancreas_001.nii.gz", synth.nifti_label_array(hu), affine)
    synth.write_nifti(root / "labelsTr" / "pancreas_001.nii.gz", synth.nifti_label_array(label), affine)
    (root / "imagesTr" / "._pancreas_001.nii.gz").write_bytes(b"macOS resource fork")  # as in the MSD tar
    (root / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "pancreas", "2": "cancer"},
        "training": [{"image": "./imagesTr/pancreas_001.nii.gz", "label": "./labelsTr/pancreas_001.nii.gz"}],
    }))
    assert detect_layout(root) == "msd"
    both = prepare_dataset(root, tmp_path / "a", progress=False).set_index("case_id").loc["pancreas_001"]
    only1 = prepare_dataset(root, tmp_path / "b", pancreas_label=1, progress=False).set_index("case_id")
    only1 = only1.loc["pancreas_001"]
    assert both["status"] == "ok" and only1["status"] == "ok"
    assert both["label_voxels"] == int(mask.sum())
    assert only1["label_voxels"] == int((label == 1).sum()) < both["label_voxels"]
    assert "1 pancreas, 2 cancer" in both["notes"]
    assert both["config_hash"] != only1["config_hash"]


def test_folder_layout_naming_rules(tmp_path, synth):
    root = tmp_path / "plain"
    hu, mask = synth.synth_volume(12, 32)
    affine = synth.ras_affine(4.0, 2.5, (-60.0, -70.0), -150.0)
    synth.write_nifti(root / "caseA.nii.gz", synth.nifti_label_array(hu), affine)
    synth.write_nifti(root / "caseA_label.nii.gz", synth.nifti_label_array(mask), affine)
    synth.write_nifti(root / "caseB.nii.gz", synth.nifti_label_array(hu), affine)
    synth.write_nifti(root / "labels" / "caseB.nii.gz", synth.nifti_label_array(mask), affine)
    synth.write_case(root, "caseC")  # caseC/dicom/*.dcm + caseC/labels.nii.gz
    synth.write_nifti(root / "caseD" / "ct.nii.gz", synth.nifti_label_array(hu), affine)
    synth.write_nifti(root / "caseD" / "seg.nii.gz", synth.nifti_label_array(mask), affine)
    found = discover(root)
    assert found.layout == "folder"
    got = {c.case_id: (c.kind, c.label.relative_to(root).as_posix() if c.label else None) for c in found.cases}
    assert got == {
        "caseA": ("nifti", "caseA_label.nii.gz"),
        "caseB": ("nifti", "labels/caseB.nii.gz"),
        "caseC": ("dicom", "caseC/labels.nii.gz"),
        "caseD": ("nifti", "caseD/seg.nii.gz"),
    }


def test_discovery_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        discover(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no cases"):
        discover(tmp_path / "empty")
    with pytest.raises(DataError, match="unknown layout"):
        discover(tmp_path / "empty", layout="nifti")


def test_slices_ordered_by_position_not_name_or_instance(tmp_path, make_case):
    """Shuffled file names and InstanceNumbers must give the same volume as the tidy series."""
    tidy = make_case(tmp_path / "a", "tidy")
    names = [f"{n:05d}.dcm" for n in random.Random(1).sample(range(10000), len(tidy.files))]
    shuffled = make_case(tmp_path / "b", "tidy", names=names)
    import pydicom

    for i, f in enumerate(shuffled.files):  # scramble InstanceNumber as well
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = (i * 7) % len(shuffled.files) + 1
        ds.save_as(f)
    series = scan_dicom_folder(shuffled.folder, CheckConfig())
    assert np.all(np.diff(series.positions) > 0)
    assert [pydicom.dcmread(f).ImagePositionPatient[2] for f in series.files] == sorted(tidy.z)
    df_a = prepare_dataset(tmp_path / "a", tmp_path / "out_a", progress=False)
    df_b = prepare_dataset(tmp_path / "b", tmp_path / "out_b", progress=False)
    assert (df_a["status"] == "ok").all() and (df_b["status"] == "ok").all()
    a = load_cached_case(tmp_path / "out_a" / "cache" / "tidy", mmap=False)
    b = load_cached_case(tmp_path / "out_b" / "cache" / "tidy", mmap=False)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    # and the volume is the one written: slice 0 of the cache is the caudal end (lowest z)
    assert a.affine[2, 3] == pytest.approx(tidy.z[0])


def test_manifest_and_cache_carry_no_patient_identifiers(cohort_root, tmp_path, synth):
    import pydicom

    out = tmp_path / "out"
    prepare_dataset(cohort_root, out, progress=False)
    uid = str(pydicom.dcmread(next((cohort_root / "good" / "dicom").iterdir())).SeriesInstanceUID)
    texts = [(out / "manifest.csv").read_text()] + [p.read_text() for p in out.rglob("meta.json")]
    for text in texts:
        for secret in (synth.patient_name, synth.patient_id, "19700101", "Test General Hospital", "ACC-998877", uid):
            assert secret not in text
