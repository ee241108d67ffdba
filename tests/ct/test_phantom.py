"""The phantom cohort: TCIA layout, valid DICOM, NIH-style labels in the right place, determinism, the command."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from pancreas_gvae.data.ct.phantom import (
    COLLECTION_DIR,
    LABEL_DIR,
    label_path,
    make_phantom_cohort,
    render_phantom_case,
)
from pancreas_gvae.pipelines.make_phantom import main

SIZE = 48


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("phantom")
    return out, make_phantom_cohort(out, cases=3, size=SIZE, seed=7)


def _series(series_dir: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in sorted(series_dir.glob("*.dcm"))]


def test_layout_and_file_counts(cohort):
    out, series_dirs = cohort
    assert [d.relative_to(out).parts[:2] for d in series_dirs] == [
        (COLLECTION_DIR, f"PANCREAS_000{i}") for i in (1, 2, 3)]
    for i, d in enumerate(series_dirs, start=1):
        assert len(d.relative_to(out).parts) == 4  # collection / patient / study / series
        case = render_phantom_case(i, size=SIZE, seed=7)
        files = sorted(p.name for p in d.iterdir())
        assert files == [f"1-{k:03d}.dcm" for k in range(1, case.geometry.slices + 1)]
        assert label_path(out, i) == out / LABEL_DIR / f"label000{i}.nii.gz"
        assert label_path(out, i).is_file()
    assert sorted(p.name for p in (out / LABEL_DIR).iterdir()) == [f"label000{i}.nii.gz" for i in (1, 2, 3)]


def test_dicom_tags(cohort):
    _, series_dirs = cohort
    for i, d in enumerate(series_dirs, start=1):
        dss = _series(d)
        first = dss[0]
        assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert first.file_meta.MediaStorageSOPClassUID == CTImageStorage
        assert first.PatientID == str(first.PatientName) == f"PANCREAS_000{i}"
        assert first.Modality == "CT" and first.KVP == 120 and first.Manufacturer in ("SIEMENS", "Philips")
        assert first.Rows == first.Columns == SIZE
        s512 = float(first.PixelSpacing[0]) * SIZE / 512
        assert 0.66 <= s512 <= 0.98
        assert 1.5 <= float(first.SliceThickness) <= 2.5
        assert len({ds.SOPInstanceUID for ds in dss}) == len(dss)
        for uid in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            assert len({ds[uid].value for ds in dss}) == 1
        for k, ds in enumerate(dss, start=1):
            assert ds.SOPClassUID == CTImageStorage and ds.InstanceNumber == k
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert (ds.RescaleSlope, ds.RescaleIntercept) == (1, -1024)
            assert ds.HighBit == ds.BitsStored - 1 and ds.PixelRepresentation == (0 if ds.BitsStored == 12 else 1)
        # Positions: same x, y; z steps along the slice normal (0, 0, 1) by exactly the slice interval.
        pos = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in dss])
        assert np.ptp(pos[:, :2], axis=0).max() == 0
        np.testing.assert_allclose(np.diff(pos[:, 2]), -float(first.SliceThickness), atol=1e-3)
        hu = first.pixel_array.astype(np.float32) * float(first.RescaleSlope) + float(first.RescaleIntercept)
        assert hu.min() >= -1024 and np.median(hu[0]) < -900  # air in the top row


def test_slice_interval_override(tmp_path):
    [d] = make_phantom_cohort(tmp_path, cases=1, size=32, slices=12, slice_interval=0.8)
    z = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in sorted(d.glob("*.dcm"))]
    assert len(z) == 12
    np.testing.assert_allclose(np.diff(z), -0.8, atol=1e-3)


def _soft_tissue_fraction(image: np.ndarray, mask: np.ndarray) -> float:
    values = image[mask]
    return float(((values >= 40) & (values <= 160)).mean())


def test_label_lines_up_in_world_coordinates(cohort):
    """ITK reads the series, NiBabel the label; after Orientation RAS the mask sits on the pancreas."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

    out, series_dirs = cohort
    load = Compose([
        LoadImaged(keys="image", reader="ITKReader"),
        LoadImaged(keys="label", reader="NibabelReader"),
        EnsureChannelFirstd(keys=["image", "label"]),
        Orientationd(keys=["image", "label"], axcodes="RAS", labels=None),
    ])
    for i, d in enumerate(series_dirs, start=1):
        case = render_phantom_case(i, size=SIZE, seed=7)
        data = load({"image": str(d), "label": str(label_path(out, i))})
        image, label = data["image"][0].numpy(), data["label"][0].numpy()
        np.testing.assert_allclose(data["image"].affine.numpy(), data["label"].affine.numpy(), atol=1e-3)
        mask = label > 0
        assert mask.sum() == case.mask.sum() > 0
        assert 60 <= image[mask].mean() <= 160
        # Exact: RAS index (i, j, k) = (towards patient right, anterior, superior) of the rendered volume.
        np.testing.assert_array_equal(image, case.hu[::-1, ::-1, ::-1].transpose(2, 1, 0))
        np.testing.assert_array_equal(mask, case.mask[::-1, ::-1, ::-1].transpose(2, 1, 0) > 0)
        # The usual naive fixes (flip y, swap x/y) put the mask off the pancreas: far fewer voxels
        # under it are enhanced soft tissue (the mean alone can be fooled by bone).
        assert _soft_tissue_fraction(image, mask) > 0.9
        for wrong in (mask[:, ::-1, :], mask.transpose(1, 0, 2)):
            assert _soft_tissue_fraction(image, wrong) < 0.75


def test_label_file_format(cohort):
    out, series_dirs = cohort
    img = nib.load(label_path(out, 1))
    case = render_phantom_case(1, size=SIZE, seed=7)
    assert img.get_data_dtype() == np.uint8 and img.shape == (SIZE, SIZE, case.geometry.slices)
    assert set(np.unique(np.asarray(img.dataobj))) == {0, 1}
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    # Slices without pancreas are empty in the file too (label k = 0 is the last, most caudal instance).
    has_label = np.asarray(img.dataobj).any(axis=(0, 1))[::-1]
    r = case.pancreas_instances()
    assert has_label.sum() == len(r) and has_label[r.start - 1:r.stop - 1].all()
    assert not has_label[0] and not has_label[-1]
    first = pydicom.dcmread(series_dirs[0] / "1-001.dcm")
    x0, y0, z_top = (float(v) for v in first.ImagePositionPatient)
    # Voxel (0, 0, D-1) is pixel (row 0, column 0) of instance 1; RAS = (-x, -y, z) of the LPS position.
    np.testing.assert_allclose(img.affine @ [0, 0, case.geometry.slices - 1, 1], [-x0, -y0, z_top, 1], atol=1e-3)


def test_hu_and_pancreas_range():
    case = render_phantom_case(1, size=64, seed=3)
    mask = case.mask > 0
    assert 80 <= case.hu[mask].mean() <= 120  # enhanced pancreas, soft tissue
    assert case.hu.min() >= -1024 and case.hu.max() > 400  # air and bone
    r = case.pancreas_instances()
    assert 1 < r.start and r.stop - 1 < case.geometry.slices  # not on every slice
    per_slice = mask.reshape(len(mask), -1).any(axis=1)
    assert per_slice[r.start - 1:r.stop - 1].all() and per_slice.sum() == len(r)  # contiguous
    # Liver on the patient's right (low column numbers) above the pancreas: bright, large.
    top = case.hu[1]
    half = top.shape[1] // 2
    assert (top[:, :half] > 70).sum() > 2 * (top[:, half:] > 70).sum()


def test_deterministic_per_seed(tmp_path):
    a = make_phantom_cohort(tmp_path / "a", cases=2, size=32, seed=5)
    b = make_phantom_cohort(tmp_path / "b", cases=2, size=32, seed=5)
    c = make_phantom_cohort(tmp_path / "c", cases=2, size=32, seed=6)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert [d.relative_to(tmp_path / "a") for d in a] != [d.relative_to(tmp_path / "c") for d in c]
    px_a = pydicom.dcmread(a[0] / "1-010.dcm").pixel_array
    px_c = pydicom.dcmread(c[0] / "1-010.dcm").pixel_array
    assert px_a.shape != px_c.shape or not np.array_equal(px_a, px_c)
    # Case n depends on (seed, n) only: starting elsewhere reproduces the same case 2.
    d = make_phantom_cohort(tmp_path / "d", cases=1, size=32, seed=5, start_index=2)
    assert d[0].relative_to(tmp_path / "d") == a[1].relative_to(tmp_path / "a")


def test_refuses_to_overwrite_without_flag(tmp_path):
    from pancreas_gvae.errors import PipelineError

    make_phantom_cohort(tmp_path, cases=1, size=32)
    with pytest.raises(PipelineError, match="already exists"):
        make_phantom_cohort(tmp_path, cases=1, size=32)
    make_phantom_cohort(tmp_path, cases=1, size=32, overwrite=True)


def test_command(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--cases", "2", "--size", "32", "--seed", "1", "--slices", "10"]) == 0
    assert "PANCREAS_0002" in capsys.readouterr().out
    assert len(list((tmp_path / COLLECTION_DIR / "PANCREAS_0002").rglob("*.dcm"))) == 10
    assert main(["--out", str(tmp_path), "--size", "8"]) == 2
    assert "size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--slices" in capsys.readouterr().out
