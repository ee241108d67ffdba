"""Real CTs from ../shared/data/ct: JPEG 2000 decoding, world pairing lands the pancreas on soft tissue."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pancreas_gvae.data.ct.checks import CaseExcluded, check_label_hu, label_hu_stats
from pancreas_gvae.data.ct.config import CheckConfig
from pancreas_gvae.data.ct.dicom_series import scan_dicom_folder
from pancreas_gvae.data.ct.pairing import pancreas_mask, resample_label_to_image
from pancreas_gvae.transforms.cache import load_cached_case
from pancreas_gvae.transforms.ct import LoadCTd

PANCREAS = 7  # TotalSegmentator class table


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    ct = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ct"  # as the ct_dir fixture
    if not ct.exists():
        pytest.skip(f"real data not found at {ct} (expected ../shared/data beside the project)")
    out = tmp_path_factory.mktemp("real")
    from pancreas_gvae.pipelines.prepare_ct import main

    assert main(["--data-root", str(ct), "--out", str(out), "--pancreas-label", str(PANCREAS), "--no-progress"]) == 0
    from pancreas_gvae.data.ct.manifest import read_manifest

    return ct, out, read_manifest(out).set_index("case_id")


def test_both_real_cases_are_prepared_on_soft_tissue(prepared):
    _, out, df = prepared
    assert list(df.index) == ["abdomen-3mm", "abdomen-dicom"]
    assert (df["status"] == "ok").all(), df["reason"].to_dict()
    for case_id, row in df.iterrows():
        assert -30 <= row["label_median_hu"] <= 250, case_id
        assert row["label_air_fraction"] == 0.0
        cached = load_cached_case(out / "cache" / case_id)
        assert cached.image.dtype == np.float16 and 0.0 <= float(cached.image.min()) <= float(cached.image.max()) <= 1.0
        assert cached.label.sum() > 0
    assert df.loc["abdomen-3mm", "pancreas_slice_count"] == 18  # the data README: pancreas on 18 of 30 slices
    assert df.loc["abdomen-dicom", "label_median_hu"] > 30  # contrast-enhanced pancreas


def test_jpeg2000_series_decodes(ct_dir):
    folder = ct_dir / "abdomen-dicom" / "dicom"
    ds = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
    series = scan_dicom_folder(folder, CheckConfig())
    assert len(series.files) == 20 and series.interval == pytest.approx(2.0) and series.thickness == 3.0
    image = LoadCTd(["image"])({"image": series.files})["image"]
    assert tuple(image.shape) == (1, 512, 512, 20)
    hu = image.numpy()
    assert hu.min() == pytest.approx(-1024, abs=1) and 1000 < hu.max() < 3100  # HU after rescale, bone present
    # the reader kept our order: its affine is the one the headers give
    np.testing.assert_allclose(image.affine.numpy(), series.affine_ras(), atol=1e-3)


def test_world_pairing_beats_naive_index_pairing(ct_dir):
    """The label NIfTI stores y flipped relative to the DICOM reader: only the affines line them up."""
    case = ct_dir / "abdomen-dicom"
    series = scan_dicom_folder(case / "dicom", CheckConfig())
    image = LoadCTd(["image"])({"image": series.files})["image"]
    hu = image.numpy()[0]
    lab = nib.load(case / "labels.nii.gz")
    mask = pancreas_mask(np.asarray(lab.dataobj), [PANCREAS])
    assert mask.shape == hu.shape  # same array shape, so naive pairing "works" silently

    world = resample_label_to_image(mask, lab.affine, image.affine.numpy(), hu.shape)
    good = label_hu_stats(hu, world)
    check_label_hu(good, CheckConfig())
    assert 30 <= good["label_median_hu"] <= 150 and good["label_fat_fraction"] < 0.05

    naive = label_hu_stats(hu, mask)  # array index pairing
    assert naive["label_air_fraction"] > 0.05  # part of the mask lands in bowel / stomach gas
    with pytest.raises(CaseExcluded) as err:
        check_label_hu(naive, CheckConfig())
    assert err.value.reason == "label_hu_check"


def test_resume_reuses_real_cases(prepared, capsys):
    ct, out, _ = prepared
    from pancreas_gvae.pipelines.prepare_ct import main

    assert main(["--data-root", str(ct), "--out", str(out), "--pancreas-label", "7", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "2 ok, 0 excluded (2 reused from the cache)" in printed
