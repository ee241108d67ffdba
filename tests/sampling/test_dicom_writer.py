"""The synthetic-slice DICOM writer: tags, new unique UIDs, HU round trip through the rescale, spacing."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage

from pancreas_gvae.synthesis.dicom import SYNTHETIC_STATEMENT, hu_from_dataset, write_dicom_pairs

PX = 5.0
WINDOW = (-125.0, 275.0)


@pytest.fixture
def pairs(tmp_path):
    rng = np.random.default_rng(0)
    ct = rng.uniform(*WINDOW, size=(3, 16, 20)).astype(np.float32)
    mask = (rng.random((3, 16, 20)) > 0.7).astype(np.uint8)
    written = write_dicom_pairs(ct, mask, tmp_path / "dicom", pixel_mm=PX, window=WINDOW)
    return ct, mask, written


def test_two_files_per_pair_with_the_synthetic_statement(pairs):
    ct, mask, written = pairs
    assert len(written) == 3
    for pair in written:
        img, msk = pydicom.dcmread(pair.image), pydicom.dcmread(pair.mask)
        for ds in (img, msk):
            assert ds.SOPClassUID == CTImageStorage and ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
            assert str(ds.PatientName) == "SYNTHETIC" and ds.PatientID == "SYNTHETIC"
            assert ds.BurnedInAnnotation == "NO"
            assert "SYNTHETIC" in ds.SeriesDescription and "not a patient" in ds.SeriesDescription
            assert SYNTHETIC_STATEMENT in ds.ImageComments and "[-125, 275]" in ds.ImageComments
            assert ds.PatientIdentityRemoved == "YES"
            for empty in ("PatientBirthDate", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName"):
                assert ds.get(empty, "") == "", empty
            assert "InstitutionName" not in ds and "ContentDate" not in ds and "AcquisitionDate" not in ds
            assert [float(v) for v in ds.PixelSpacing] == [PX, PX]
            assert (ds.Rows, ds.Columns) == (16, 20)
        assert list(msk.ImageType)[-1] == "MASK" and msk.RescaleType == "US"
        assert img.RescaleType == "HU" and float(img.RescaleSlope) == 1.0
        assert msk.ReferencedImageSequence[0].ReferencedSOPInstanceUID == img.SOPInstanceUID
        assert msk.FrameOfReferenceUID == img.FrameOfReferenceUID


def test_hu_round_trip_within_one_hu_and_exact_mask(pairs):
    ct, mask, written = pairs
    for k, pair in enumerate(written):
        hu = hu_from_dataset(pydicom.dcmread(pair.image))
        assert hu.shape == ct[k].shape
        assert np.abs(hu - ct[k]).max() <= 0.5 + 1e-4
        back = pydicom.dcmread(pair.mask).pixel_array
        np.testing.assert_array_equal(back, mask[k])


def test_uids_are_unique_and_new_for_every_export(tmp_path, pairs):
    ct, mask, first = pairs
    second = write_dicom_pairs(ct, mask, tmp_path / "again", pixel_mm=PX, window=WINDOW)

    def uids(written):
        out = set()
        for pair in written:
            for path in (pair.image, pair.mask):
                ds = pydicom.dcmread(path)
                out |= {ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID, ds.StudyInstanceUID}
        return out

    a, b = uids(first), uids(second)
    assert not a & b, "a second export of the same pixels gets new UIDs"
    sops = [u for p in first for u in p.sop_instance_uids]
    series = [u for p in first for u in p.series_instance_uids]
    frames = [p.frame_of_reference_uid for p in first]
    assert len(set(sops)) == 6 and len(set(series)) == 6 and len(set(frames)) == 3
    assert len(a) == 6 + 6 + 3 + 1  # one study per export
    assert all(len(u) <= 64 for u in a)


def test_out_of_range_hu_is_clipped_and_anisotropic_spacing(tmp_path):
    ct = np.array([[[-3000.0, 5000.0], [0.4, -0.6]]], dtype=np.float32)
    (pair,) = write_dicom_pairs(ct, np.zeros_like(ct, np.uint8), tmp_path, pixel_mm=(0.7, 0.9))
    ds = pydicom.dcmread(pair.image)
    np.testing.assert_allclose(hu_from_dataset(ds), [[-1024, 3071], [0, -1]])
    assert [float(v) for v in ds.PixelSpacing] == [0.7, 0.9]
    assert "WindowCenter" not in ds


def test_shapes_must_agree(tmp_path):
    with pytest.raises(ValueError):
        write_dicom_pairs(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)), tmp_path, pixel_mm=1.0)
