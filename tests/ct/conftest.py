"""Small synthetic DICOM series and labels for the CT data tests (each case writes in milliseconds).

A case is an abdomen-like slab: air, a body ellipse with a fat rim and soft tissue, and a 100 HU
"pancreas" blob off-centre and anterior (so a flipped pairing lands on other tissue or air). Slices go
cranial -> caudal by InstanceNumber, as scanners write them; the label is stored as the NIH labels are
(column, row, slice from caudal) with the RAS affine the DICOM geometry implies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

FAKE_PATIENT_NAME = "Doe^Jane"
FAKE_PATIENT_ID = "SECRET-PID-4711"


@dataclass
class SynthCase:
    folder: Path  # the case folder (series in ``dicom/``, label ``labels.nii.gz``)
    files: list[Path]  # DICOM files in InstanceNumber order (cranial first)
    hu: np.ndarray  # (slice, row, col), slice 0 = caudal (ascending z)
    mask: np.ndarray
    z: np.ndarray  # slice positions (mm), ascending
    pixel: float
    origin: tuple[float, float]  # IPP x, y (LPS)
    label: Path | None = None


def synth_volume(n: int, size: int, *, seed: int = 0, pancreas: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[0:size, 0:size].astype(np.float32)
    q = ((rr - size * 0.5) / (size * 0.32)) ** 2 + ((cc - size * 0.5) / (size * 0.42)) ** 2
    sl = np.full((size, size), -1000.0, dtype=np.float32)
    sl[q <= 1.0] = -100.0
    sl[q <= 0.75] = 40.0
    hu = np.repeat(sl[None], n, axis=0)
    mask = np.zeros((n, size, size), dtype=np.uint8)
    if pancreas:
        blob = ((rr - size * 0.36) ** 2 + (cc - size * 0.40) ** 2) <= (size * 0.09) ** 2
        for k in range(n // 4, n - n // 4):
            mask[k][blob] = 1
    hu[mask > 0] = 100.0
    hu += rng.normal(0, 5, hu.shape).astype(np.float32)
    return np.rint(hu).astype(np.int16), mask


def nifti_label_array(mask: np.ndarray) -> np.ndarray:
    """(slice ascending, row, col) -> NIfTI (col, row, slice ascending)."""
    return np.ascontiguousarray(mask.transpose(2, 1, 0))


def ras_affine(pixel: float, interval: float, origin: tuple[float, float], z0: float) -> np.ndarray:
    """RAS affine of a (col, row, slice ascending) array on the DICOM grid (LPS x, y flipped)."""
    x0, y0 = origin
    return np.array([[-pixel, 0, 0, -x0], [0, -pixel, 0, -y0], [0, 0, interval, z0], [0, 0, 0, 1]], dtype=float)


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def slice_dataset(pixels: np.ndarray, *, position, iop=(1, 0, 0, 0, 1, 0), pixel: float, thickness: float,
                  instance: int, series_uid: str, series_number: int = 1, modality: str = "CT",
                  manufacturer: str = "PHANTOMCO", tilt: float | None = None) -> Dataset:
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Manufacturer = manufacturer
    ds.PatientName = FAKE_PATIENT_NAME
    ds.PatientID = FAKE_PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.InstitutionName = "Test General Hospital"
    ds.AccessionNumber = "ACC-998877"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.ImageOrientationPatient = [str(v) for v in iop]
    ds.PixelSpacing = [f"{pixel:g}", f"{pixel:g}"]
    ds.SliceThickness = f"{thickness:g}"
    if tilt is not None:
        ds.GantryDetectorTilt = f"{tilt:g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.PixelData = pixels.astype("<i2").tobytes()
    return ds


def write_case(root: Path, name: str, *, n: int = 12, size: int = 32, pixel: float = 4.0, interval: float = 2.5,
               z0: float = -150.0, origin: tuple[float, float] = (-60.0, -70.0), modality: str = "CT",
               iop=(1, 0, 0, 0, 1, 0), series_uid: str | None = None, series_number: int = 1,
               z: np.ndarray | None = None, shear_deg: float = 0.0, tilt: float | None = None,
               names: list[str] | None = None, label: bool = True, pancreas: bool = True, seed: int = 0,
               subdir: str = "dicom") -> SynthCase:
    """A case folder ``root/name`` with ``dicom/IMnnn.dcm`` (IM001 = cranial) and ``labels.nii.gz``."""
    folder = root / name
    series_dir = folder / subdir
    series_dir.mkdir(parents=True, exist_ok=True)
    zs = np.asarray(z, dtype=float) if z is not None else z0 + interval * np.arange(n)
    n = len(zs)
    hu, mask = synth_volume(n, size, seed=seed, pancreas=pancreas)
    uid = series_uid or generate_uid()
    shear = math.tan(math.radians(shear_deg))
    files = []
    for k in range(n - 1, -1, -1):  # cranial (highest z) first
        instance = n - k
        pos = (origin[0], origin[1] + shear * (zs[k] - zs[0]), zs[k])
        ds = slice_dataset(hu[k], position=pos, iop=iop, pixel=pixel, thickness=interval, instance=instance,
                           series_uid=uid, series_number=series_number, modality=modality, tilt=tilt)
        fname = names[instance - 1] if names else f"IM{instance:03d}.dcm"
        path = series_dir / fname
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    case = SynthCase(folder, files, hu, mask, zs, pixel, origin)
    if label:
        case.label = write_nifti(folder / "labels.nii.gz", nifti_label_array(mask),
                                 ras_affine(pixel, float(np.median(np.diff(zs))), origin, float(zs[0])))
    return case


@pytest.fixture(scope="session")
def make_case():
    """``make_case(root, name, **options)`` -> :class:`SynthCase` (see :func:`write_case`)."""
    return write_case


@pytest.fixture(scope="session")
def synth() -> SimpleNamespace:
    """The helpers of this module (a fixture, since two conftest modules cannot both be imported by name)."""
    return SimpleNamespace(write_case=write_case, write_nifti=write_nifti, ras_affine=ras_affine,
                           nifti_label_array=nifti_label_array, synth_volume=synth_volume,
                           slice_dataset=slice_dataset, patient_name=FAKE_PATIENT_NAME, patient_id=FAKE_PATIENT_ID)


@pytest.fixture
def cohort_root(tmp_path: Path) -> Path:
    """A folder-layout cohort with one good case, ``good``; tests add a broken case beside it."""
    root = tmp_path / "data"
    write_case(root, "good")
    return root
