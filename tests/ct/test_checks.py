"""Each bad input gives a named reason in the manifest, and the good case of the same run is still prepared."""

from __future__ import annotations

import numpy as np
import pytest

from pancreas_gvae.data.ct.checks import REASONS, CaseExcluded, check_label_hu, check_slice_positions, label_hu_stats
from pancreas_gvae.data.ct.config import CheckConfig
from pancreas_gvae.data.ct.prepare import prepare_dataset


def run(root, tmp_path, **kw):
    df = prepare_dataset(root, tmp_path / "out", layout="folder", progress=False, **kw)
    return df.set_index("case_id")


def assert_excluded(df, case: str, reason: str):
    assert df.loc["good", "status"] == "ok", df.loc["good", "reason"]
    row = df.loc[case]
    assert row["status"] == "excluded"
    assert row["reason"].startswith(reason + ":"), row["reason"]
    assert reason in REASONS


def test_good_case_alone_is_ok(cohort_root, tmp_path):
    df = run(cohort_root, tmp_path)
    row = df.loc["good"]
    assert row["status"] == "ok" and row["reason"] == ""
    assert 90 <= row["label_median_hu"] <= 110
    assert (tmp_path / "out" / "manifest.csv").is_file()
    assert (tmp_path / "out" / "cache" / "good" / "image.npy").is_file()


def test_truncated_dicom(cohort_root, tmp_path, make_case):
    case = make_case(cohort_root, "bad")
    f = case.files[5]
    f.write_bytes(f.read_bytes()[:-700])
    df = run(cohort_root, tmp_path)
    assert_excluded(df, "bad", "truncated_file")
    assert f.name in df.loc["bad", "reason"]


def test_dicom_without_pixel_data(cohort_root, tmp_path, make_case):
    import pydicom

    case = make_case(cohort_root, "bad")
    ds = pydicom.dcmread(case.files[3])
    del ds.PixelData
    ds.save_as(case.files[3])
    df = run(cohort_root, tmp_path)
    assert_excluded(df, "bad", "no_pixel_data")


def test_two_series_in_one_folder_takes_the_largest_ct(cohort_root, tmp_path, make_case):
    make_case(cohort_root, "two", n=14, series_number=3)
    make_case(cohort_root, "two", n=9, series_number=7, label=False, z0=-400.0,
              names=[f"B{i:03d}.dcm" for i in range(1, 10)])
    df = run(cohort_root, tmp_path)
    row = df.loc["two"]
    assert row["status"] == "ok", row["reason"]
    assert row["n_slices"] == 14
    assert row["notes"].startswith("multiple_series:")
    assert "took series 3" in row["notes"] and "largest axial CT" in row["notes"] and "series 7" in row["notes"]


def test_missing_slice(cohort_root, tmp_path, make_case):
    case = make_case(cohort_root, "bad")
    case.files[6].unlink()
    df = run(cohort_root, tmp_path)
    assert_excluded(df, "bad", "missing_slices")
    assert "1 slice(s) missing" in df.loc["bad", "reason"]


def test_mr_series(cohort_root, tmp_path, make_case):
    make_case(cohort_root, "bad", modality="MR")
    df = run(cohort_root, tmp_path)
    assert_excluded(df, "bad", "not_ct")
    assert "MR" in df.loc["bad", "reason"]


def test_label_of_another_shape(cohort_root, tmp_path, make_case, synth):
    case = make_case(cohort_root, "bad", label=False)
    short = case.mask[:8]  # the label covers 8 of the 12 slices
    synth.write_nifti(case.folder / "labels.nii.gz", synth.nifti_label_array(short),
                synth.ras_affine(case.pixel, 2.5, case.origin, float(case.z[0])))
    df = run(cohort_root, tmp_path)
    assert_excluded(df, "bad", "label_extent_mismatch")


def test_empty_label(cohort_root, tmp_path, make_case):
    make_case(cohort_root, "bad", pancreas=False)
    df = run(cohort_root, tmp_path)
    assert_excluded(df, "bad", "empty_label")


def test_nan_in_nifti(cohort_root, tmp_path, make_case, synth):
    case = make_case(cohort_root / "_tmp", "src")
    hu = synth.nifti_label_array(case.hu).astype(np.float32)
    hu[5, 5, 5] = np.nan
    affine = synth.ras_affine(case.pixel, 2.5, case.origin, float(case.z[0]))
    synth.write_nifti(cohort_root / "bad.nii.gz", hu, affine)
    synth.write_nifti(cohort_root / "bad_label.nii.gz", synth.nifti_label_array(case.mask), affine)
    import shutil

    shutil.rmtree(cohort_root / "_tmp")
    df = run(cohort_root, tmp_path)
    assert_excluded(df, "bad", "non_finite_voxels")


def test_unreadable_dicom_file(cohort_root, tmp_path, make_case):
    case = make_case(cohort_root, "bad")
    (case.files[0].parent / "IM999.dcm").write_bytes(b"this is not a DICOM file at all" * 10)
    df = run(cohort_root, tmp_path)
    assert_excluded(df, "bad", "unreadable_file")
    assert "IM999.dcm" in df.loc["bad", "reason"]


def test_unreadable_nifti(cohort_root, tmp_path):
    (cohort_root / "bad.nii.gz").write_bytes(b"\x1f\x8b garbage, not gzip")
    (cohort_root / "bad_label.nii.gz").write_bytes(b"\x1f\x8b garbage")
    df = run(cohort_root, tmp_path)
    assert_excluded(df, "bad", "unreadable_file")


def test_non_uniform_spacing(cohort_root, tmp_path, make_case):
    z = -150.0 + 2.5 * np.arange(12)
    z[4:] += 0.9  # one gap of 3.4 mm among 2.5 mm gaps
    make_case(cohort_root, "bad", z=z)
    df = run(cohort_root, tmp_path)
    assert_excluded(df, "bad", "non_uniform_spacing")


def test_gantry_tilt_sheared_positions(cohort_root, tmp_path, make_case):
    make_case(cohort_root, "bad", shear_deg=15.0)
    df = run(cohort_root, tmp_path)
    assert_excluded(df, "bad", "gantry_tilt")


def test_gantry_tilt_tag(cohort_root, tmp_path, make_case):
    make_case(cohort_root, "bad", tilt=12.0)
    df = run(cohort_root, tmp_path)
    assert_excluded(df, "bad", "gantry_tilt")
    assert "GantryDetectorTilt 12" in df.loc["bad", "reason"]


def test_sagittal_series_is_not_axial(cohort_root, tmp_path, make_case):
    make_case(cohort_root, "bad", iop=(0, 1, 0, 0, 0, -1))
    df = run(cohort_root, tmp_path)
    assert_excluded(df, "bad", "not_axial")


def test_label_on_the_wrong_tissue(cohort_root, tmp_path, make_case, synth):
    case = make_case(cohort_root, "bad", label=False)
    wrong = np.zeros_like(case.mask)
    wrong[3:9, 1:5, 1:5] = 1  # a corner of the field of view: air
    synth.write_nifti(case.folder / "labels.nii.gz", synth.nifti_label_array(wrong),
                synth.ras_affine(case.pixel, 2.5, case.origin, float(case.z[0])))
    df = run(cohort_root, tmp_path)
    assert_excluded(df, "bad", "label_hu_check")
    assert "air" in df.loc["bad", "reason"]


def test_missing_label(cohort_root, tmp_path, make_case):
    make_case(cohort_root, "bad", label=False)
    df = run(cohort_root, tmp_path)
    assert_excluded(df, "bad", "missing_label")


def test_case_folder_without_images(cohort_root, tmp_path):
    (cohort_root / "bad").mkdir()
    (cohort_root / "bad" / "notes.txt").write_text("nothing here")
    df = run(cohort_root, tmp_path)
    assert_excluded(df, "bad", "no_image")


# ------------------------------------------------------------------ pure checks


@pytest.mark.parametrize(
    ("positions", "reason"),
    [
        ([0, 1, 2, 3, 5, 6, 7, 8, 9, 10], "missing_slices"),
        ([0, 1, 2, 3, 4, 4, 5, 6, 7, 8], "duplicate_slices"),
        ([0, 1, 2, 3, 4.5, 5.5, 6.5, 7.5, 8.5, 9.5], "non_uniform_spacing"),
        ([0, 1, 2, 3], "too_few_slices"),
    ],
)
def test_slice_position_reasons(positions, reason):
    with pytest.raises(CaseExcluded) as err:
        check_slice_positions(np.asarray(positions, dtype=float), CheckConfig())
    assert err.value.reason == reason


def test_slice_positions_tolerate_rounding():
    pos = np.arange(20) * 0.8 + np.random.default_rng(0).uniform(-0.02, 0.02, 20)
    assert check_slice_positions(np.sort(pos), CheckConfig()) == pytest.approx(0.8, abs=0.03)


def test_label_hu_check_thresholds():
    hu = np.array([100.0] * 90 + [-900.0] * 10)
    with pytest.raises(CaseExcluded, match="air"):
        check_label_hu(label_hu_stats(hu, np.ones_like(hu)), CheckConfig())
    check_label_hu(label_hu_stats(hu[:90], np.ones(90)), CheckConfig())


# ------------------------------------------------------------------ degenerate geometry (issue 13, item 3)


def _nifti_case(root, name, case, synth, *, image_affine, label_affine=None, label=None, hu=None):
    """``root/name.nii.gz`` + ``root/name_label.nii.gz`` from a synthetic case, with the affines given (sform only:
    nibabel cannot write a qform for a singular or sheared matrix)."""
    import nibabel as nib

    def save(path, array, affine):
        img = nib.Nifti1Image(array, None)
        img.set_sform(affine, code=1)
        nib.save(img, path)

    save(root / f"{name}.nii.gz", synth.nifti_label_array(case.hu if hu is None else hu).astype(np.float32),
         image_affine)
    save(root / f"{name}_label.nii.gz", synth.nifti_label_array(case.mask) if label is None else label,
         image_affine if label_affine is None else label_affine)


@pytest.fixture
def src_case(tmp_path, make_case):
    return make_case(tmp_path / "src", "src")


def test_zero_affine_column_is_degenerate_affine(cohort_root, tmp_path, src_case, synth):
    good = synth.ras_affine(src_case.pixel, 2.5, src_case.origin, float(src_case.z[0]))
    flat = good.copy()
    flat[:3, 2] = 0.0  # the slice axis maps to nothing
    _nifti_case(cohort_root, "bad", src_case, synth, image_affine=flat)
    _nifti_case(cohort_root, "badlabel", src_case, synth, image_affine=good, label_affine=flat)
    df = run(cohort_root, tmp_path)
    assert_excluded(df, "bad", "degenerate_affine")
    assert "image" in df.loc["bad", "reason"] and "singular" in df.loc["bad", "reason"]
    assert_excluded(df, "badlabel", "degenerate_affine")
    assert "label" in df.loc["badlabel", "reason"]
    assert not df["reason"].str.startswith("error").any()


def test_sheared_nifti_affine_is_sheared_geometry(cohort_root, tmp_path, src_case, synth):
    aff = synth.ras_affine(src_case.pixel, 2.5, src_case.origin, float(src_case.z[0]))
    aff[1, 2] = 2.5 * np.tan(np.radians(15))  # slices advance in y as well: a 15 deg shear (gantry tilt)
    _nifti_case(cohort_root, "bad", src_case, synth, image_affine=aff)
    df = run(cohort_root, tmp_path)
    assert_excluded(df, "bad", "sheared_geometry")
    assert "15.0 deg" in df.loc["bad", "reason"]


def test_zero_orientation_vector_is_invalid_orientation(cohort_root, tmp_path, make_case):
    import warnings

    make_case(cohort_root, "bad", iop=(1, 0, 0, 0, 0, 0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = run(cohort_root, tmp_path)
    assert_excluded(df, "bad", "invalid_orientation")
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]


@pytest.mark.parametrize(("affine", "reason"), [
    (np.diag([1.0, 1.0, 0.0, 1.0]), "degenerate_affine"),
    (np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]], dtype=float), "degenerate_affine"),
    (np.diag([1.0, np.nan, 1.0, 1.0]), "degenerate_affine"),
    (np.array([[1, 0.2, 0, 0], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]], dtype=float), "sheared_geometry"),
])
def test_check_affine_reasons(affine, reason):
    from pancreas_gvae.data.ct.checks import check_affine

    with pytest.raises(CaseExcluded) as err:
        check_affine(affine, "image", 1.0)
    assert err.value.reason == reason
    check_affine(np.diag([-0.7, -0.7, 2.5, 1.0]), "image", 1.0)  # flips and anisotropy are fine


@pytest.mark.parametrize("iop", [(1, 0, 0, 0, 0, 0), (1, 0, 0, 0.2, 1, 0), (2, 0, 0, 0, 2, 0)])
def test_check_orientation_reasons(iop):
    from pancreas_gvae.data.ct.checks import check_orientation

    with pytest.raises(CaseExcluded) as err:
        check_orientation(iop, CheckConfig())
    assert err.value.reason == "invalid_orientation"
    check_orientation((1, 0, 0, 0, 0.99999, -0.0044), CheckConfig())  # rounding in real headers passes


# ------------------------------------------------------------------ quiet acceptances made visible (item 4)


def test_float_label_with_non_integer_values_is_noted(cohort_root, tmp_path, src_case, synth):
    aff = synth.ras_affine(src_case.pixel, 2.5, src_case.origin, float(src_case.z[0]))
    label = synth.nifti_label_array(src_case.mask).astype(np.float32) * 7.0  # pancreas = 7
    rng = np.random.default_rng(0)
    inside = label == 7.0
    label[inside] += rng.uniform(-0.4, 0.4, int(inside.sum())).astype(np.float32)  # 6.6 .. 7.4
    _nifti_case(cohort_root, "floaty", src_case, synth, image_affine=aff, label=label)
    good = synth.write_case(tmp_path / "src7", "good")  # the good case with its label as 7, too
    label7 = synth.nifti_label_array(good.mask) * 7
    synth.write_nifti(cohort_root / "good" / "labels.nii.gz", label7, aff)
    df = run(cohort_root, tmp_path, pancreas_label=7)
    row = df.loc["floaty"]
    assert row["status"] == "ok", row["reason"]
    assert row["label_voxels"] == int(src_case.mask.sum())  # rounded, every pancreas voxel kept
    assert "label_not_integer:" in row["notes"] and "6.6" in row["notes"] and "7.4" in row["notes"]
    assert "label_not_integer" not in str(df.loc["good", "notes"])


def test_voxels_far_outside_ct_range_are_noted(cohort_root, tmp_path, src_case, synth):
    aff = synth.ras_affine(src_case.pixel, 2.5, src_case.origin, float(src_case.z[0]))
    hu = src_case.hu.astype(np.float32)
    hu[2, 3, 4] = 1e9
    hu[5, 6, 7] = 1e9
    _nifti_case(cohort_root, "spiky", src_case, synth, image_affine=aff, hu=hu)
    df = run(cohort_root, tmp_path)
    row = df.loc["spiky"]
    assert row["status"] == "ok", row["reason"]
    assert "hu_outliers: 2 voxel(s) outside [-4096, 32767] HU" in row["notes"]
    assert row["hu_max"] == pytest.approx(1e9)
    assert "hu_outliers" not in str(df.loc["good", "notes"])


def test_every_reason_and_note_is_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "data.md").read_text()
    for code in REASONS:
        assert f"| `{code}` |" in doc, code
    for note in ("label_not_integer", "hu_outliers", "hu_checks_skipped", "label_air_fraction_skipped"):
        assert f"`{note}" in doc, note
