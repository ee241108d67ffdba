"""prepare_ct.py edges (issue 13, item 5): --out on a file, and what third-party readers print on stderr."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from pancreas_gvae.data.ct.manifest import redact, redacted_stderr
from pancreas_gvae.pipelines.prepare_ct import main


def test_out_is_an_existing_file(cohort_root, tmp_path, capsys):
    target = tmp_path / "not_a_folder"
    target.write_text("x")
    for out in (target, target / "sub"):  # the file itself, or a folder below it
        assert main(["--data-root", str(cohort_root), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: --out ") and "Traceback" not in err
        assert "NotADirectoryError" not in err
    assert target.read_text() == "x"


def test_redacted_stderr_cuts_absolute_paths_from_c_and_python_writes(tmp_path, capfd):
    secret = tmp_path / "data" / "PANCREAS_0001" / "1.2.840.113619.2.55.3.604688119" / "IM001.dcm"
    with redacted_stderr([tmp_path / "data"], prefix="case: "):
        os.write(2, f"gdcm: cannot read {secret}: truncated\n".encode())  # as a C library writes
        print(f"warning: {secret} ends early", file=sys.stderr)  # as a Python warning does
        os.write(2, b"reader: /opt/elsewhere/lib/src/reader.cxx:42: failed\n")
    err = capfd.readouterr().err
    assert str(tmp_path) not in err and "/opt/elsewhere" not in err and "113619" not in err
    assert "case: gdcm: cannot read PANCREAS_0001/<uid>/IM001.dcm: truncated" in err
    assert "case: warning: PANCREAS_0001/<uid>/IM001.dcm ends early" in err
    assert "case: reader: reader.cxx:42: failed" in err


def test_reader_stderr_for_a_truncated_file_is_redacted(cohort_root, tmp_path, synth, capfd, monkeypatch):
    """A truncated NIfTI whose reader prints its absolute path on stderr (as C readers do) before failing."""
    import nibabel as nib

    case = synth.write_case(tmp_path / "src", "src")
    affine = synth.ras_affine(case.pixel, 2.5, case.origin, float(case.z[0]))
    image = synth.write_nifti(cohort_root / "bad.nii.gz", synth.nifti_label_array(case.hu).astype(np.float32), affine)
    synth.write_nifti(cohort_root / "bad_label.nii.gz", synth.nifti_label_array(case.mask), affine)
    image.write_bytes(image.read_bytes()[:-400])
    real_load = nib.load

    def noisy_load(path, *args, **kwargs):
        os.write(2, f"nifti reader: {os.path.abspath(path)}: premature end of data\n".encode())
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(nib, "load", noisy_load)
    assert main(["--data-root", str(cohort_root), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    captured = capfd.readouterr()
    assert str(cohort_root) not in captured.err and str(cohort_root) not in captured.out.replace(
        str(tmp_path / "out"), "")
    assert "bad: nifti reader: bad.nii.gz: premature end of data" in captured.err
    assert "bad: truncated_file: cannot read the image (bad.nii.gz)" in captured.out


def test_truncated_compressed_dicom_gets_a_reason_and_no_path_on_stderr(cohort_root, tmp_path, make_case, capfd):
    import pydicom
    from pydicom.encaps import encapsulate, generate_fragments
    from pydicom.uid import RLELossless

    from pancreas_gvae.data.ct.prepare import prepare_dataset

    case = make_case(cohort_root, "bad")
    ds = pydicom.dcmread(case.files[4])
    ds.compress(RLELossless)  # pydicom's own encoder
    fragment = next(generate_fragments(ds.PixelData))
    ds.PixelData = encapsulate([fragment[: len(fragment) // 3]])  # the codestream ends early, the file is whole
    ds.save_as(case.files[4])
    df = prepare_dataset(cohort_root, tmp_path / "out", progress=False).set_index("case_id")
    assert df.loc["good", "status"] == "ok"
    assert df.loc["bad", "status"] == "excluded"
    assert df.loc["bad", "reason"].split(":")[0] in ("unreadable_file", "truncated_file"), df.loc["bad", "reason"]
    assert str(tmp_path) not in df.loc["bad", "reason"] and "ITK-source" not in df.loc["bad", "reason"]
    assert str(tmp_path) not in capfd.readouterr().err


@pytest.mark.parametrize("text", ["1/2 of the voxels", "HU/mm", "relative/path.nii.gz"])
def test_redact_leaves_non_paths_alone(text):
    assert redact(text) == text
