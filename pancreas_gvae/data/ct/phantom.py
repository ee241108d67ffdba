"""Synthetic abdominal CT phantom cohort laid out like the NIH / TCIA Pancreas-CT download.

This is the project's embedded default data: it lets every pipeline run end to end (and its tests
pass) without the real collection. :func:`make_phantom_cohort` writes::

    OUT/Pancreas-CT/PANCREAS_0001/01-01-2000-PANCREAS0001-Pancreas-<5>/Pancreas-<5>/1-001.dcm ...
    OUT/TCIA_pancreas_labels-02-05-2017/label0001.nii.gz

(``<5>``: the last five digits of the study / series UID, as the NBIA retriever names folders.)

DICOM series
    CT Image Storage, explicit VR little endian, one file per slice, ``1-NNN.dcm`` with NNN the
    InstanceNumber. Instance 1 is the cranial end and ImagePositionPatient z *decreases* by the slice
    interval with each instance (a head-first, cranio-caudal scan); orientation axial
    ``[1, 0, 0, 0, 1, 0]``, so in the usual display the patient's right is on the image's left and
    anterior is at the top. Stored value = HU + 1024 (RescaleIntercept -1024, slope 1), clipped to
    0..4095; odd case numbers store uint16 / BitsStored 12 ("SIEMENS"), even ones int16 / BitsStored 16
    ("Philips"). UIDs are derived from (seed, case, role), so the same seed gives byte-identical files
    (with the same numpy version: numpy does not promise identical random streams across releases).

Geometry per case
    In-plane spacing: a 512-pixel equivalent ``s512`` is drawn from 0.66-0.98 mm (the collection's
    range) and the written spacing is ``s512 * 512 / size`` (via a whole-mm field of view), so a small
    phantom covers the same body as a 512 x 512 scan; at ``size=512`` it is exactly 0.66-0.98 mm.
    Slice thickness is one of 1.5 / 2.0 / 2.5 mm; the slice interval equals the thickness unless
    ``slice_interval`` is given. Default slice count: ``round(80 mm / interval)`` (32-53 slices), a
    short abdominal slab that keeps CPU runs fast; ``slices`` overrides it. The anatomy is laid out
    along the *scanned range* (normalised 0 = cranial end, 1 = caudal end), so the pancreas covers
    roughly the middle 40-55 % of the slices whatever their number.

Label NIfTI (as the NIH labels: binary uint8 on the same ``size x size x D`` grid as the series)
    Array axes ``(i, j, k)`` = (DICOM column, DICOM row, slice) with ``k = 0`` the *caudal* end,
    i.e. ``label[i, j, k] == mask[D - 1 - k, j, i]`` where ``mask`` is ``(instance, row, column)``.
    Affine (RAS, qform and sform code 1), with ``(x0, y0)`` the DICOM ImagePositionPatient x, y (LPS),
    ``dx`` the pixel spacing, ``dz`` the slice interval and ``z_caudal`` the z of the last instance::

        [[-dx,   0,  0, -x0      ],
         [  0, -dx,  0, -y0      ],
         [  0,   0, dz,  z_caudal],
         [  0,   0,  0,  1       ]]      (axis codes L, P, S)

    This is exactly the world geometry ITK / nibabel derive from the DICOM series (LPS -> RAS flips
    x and y), so pairing image and label in world coordinates is exact; see
    :meth:`PhantomGeometry.label_affine` and :func:`mask_to_label_array`.

Anatomy (HU, portal-venous phase): air -1000, a CT table, subcutaneous fat -100, abdominal wall muscle
50, soft-tissue background 35 with bowel loops (fluid or gas), liver ~100 with a gallbladder, spleen
~115, stomach (wall, fluid, gas), kidneys (cortex ~170, medulla ~120, sinus fat), psoas and paraspinal
muscles, vertebra (cortex 700, cancellous 280, canal, posterior arch), ribs, aorta ~170, IVC, SMA,
SMV/portal vein, splenic vein, duodenum, and a pancreas (~100 HU; head right of the SMV near the
duodenum and lower, tail toward the splenic hilum and higher) in a fat halo. Positions, sizes and the
in-plane rotation vary with the seed; correlated Gaussian noise of 10-18 HU and a ~0.6 mm smoothing
(scaled to the pixel size) follow. Case ``n`` depends only on ``(seed, n)``, not on ``start_index``.
"""

from __future__ import annotations

import gzip
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pancreas_gvae.data.ct.phantom_anatomy import build_anatomy, gauss_kernel, render_slice, smooth
from pancreas_gvae.errors import PipelineError

COLLECTION_DIR = "Pancreas-CT"
LABEL_DIR = "TCIA_pancreas_labels-02-05-2017"
DEFAULT_BODY_LENGTH_MM = 80.0
RESCALE_INTERCEPT = -1024
_MIN_SIZE, _MAX_SIZE = 32, 2048
_MIN_SLICES = 8
_SMOOTH_SIGMA_MM = 0.6
_STUDY_DATE = "20000101"  # an obviously synthetic date; the folder name repeats it as 01-01-2000


def case_id(index: int) -> str:
    """TCIA-style de-identified ID of case ``index``: 1 -> ``PANCREAS_0001``."""
    return f"PANCREAS_{index:04d}"


def label_path(out_dir: str | Path, index: int) -> Path:
    """Where the NIH-style label of case ``index`` lives under a cohort folder."""
    return Path(out_dir) / LABEL_DIR / f"label{index:04d}.nii.gz"


@dataclass(frozen=True)
class PhantomGeometry:
    """Voxel grid of one series. ``origin``: LPS mm of pixel (row 0, column 0) of instance 1."""

    size: int
    slices: int
    pixel_spacing: float
    slice_thickness: float
    slice_interval: float
    origin: tuple[float, float, float]

    def position(self, instance: int) -> tuple[float, float, float]:
        """ImagePositionPatient (LPS mm) of 1-based ``instance``; z falls toward the feet."""
        x, y, z = self.origin
        return (x, y, round(z - (instance - 1) * self.slice_interval, 4))

    def label_affine(self) -> np.ndarray:
        """RAS affine of the label array (axes column, row, caudal-to-cranial slice)."""
        x0, y0, _ = self.origin
        dx, dz = self.pixel_spacing, self.slice_interval
        z_caudal = self.position(self.slices)[2]
        return np.array([[-dx, 0, 0, -x0], [0, -dx, 0, -y0], [0, 0, dz, z_caudal], [0, 0, 0, 1]], dtype=float)


@dataclass
class PhantomCase:
    """One rendered case: ``hu`` int16 and ``mask`` uint8, both ``(instance, row, column)``."""

    index: int
    seed: int
    geometry: PhantomGeometry
    hu: np.ndarray
    mask: np.ndarray
    manufacturer: str
    patient_sex: str

    @property
    def case_id(self) -> str:
        return case_id(self.index)

    def pancreas_instances(self) -> range:
        """1-based instance numbers that hold pancreas (a contiguous range by construction)."""
        hit = np.flatnonzero(self.mask.reshape(self.mask.shape[0], -1).any(axis=1))
        return range(int(hit[0]) + 1, int(hit[-1]) + 2) if hit.size else range(0)


def mask_to_label_array(mask: np.ndarray) -> np.ndarray:
    """``(instance, row, column)`` mask -> NIfTI label array ``(column, row, slice caudal->cranial)``."""
    return np.ascontiguousarray(mask[::-1].transpose(2, 1, 0)).astype(np.uint8)


# --------------------------------------------------------------------------- rendering and writing


def _check(*, size: int, slices: int | None, slice_interval: float | None) -> None:
    if not _MIN_SIZE <= size <= _MAX_SIZE:
        raise PipelineError(f"phantom size must be {_MIN_SIZE}..{_MAX_SIZE} pixels, got {size}")
    if slices is not None and slices < _MIN_SLICES:
        raise PipelineError(f"phantom needs at least {_MIN_SLICES} slices (pancreas on a subset), got {slices}")
    if slice_interval is not None and not 0.1 <= slice_interval <= 10.0:
        raise PipelineError(f"slice interval must be 0.1..10 mm, got {slice_interval}")


def render_phantom_case(index: int, *, size: int = 64, slices: int | None = None, seed: int = 0,
                        slice_interval: float | None = None) -> PhantomCase:
    """Render case ``index`` in memory (deterministic in ``(seed, index)``); nothing is written."""
    _check(size=size, slices=slices, slice_interval=slice_interval)
    rng = np.random.default_rng([seed, index])
    fov_mm = round(rng.uniform(0.66, 0.98) * 512)  # whole-mm field of view, as scanners choose it
    dx = float(f"{fov_mm / size:.10g}")
    thickness = float(rng.choice([1.5, 2.0, 2.5]))
    interval = float(slice_interval) if slice_interval is not None else thickness
    n = slices if slices is not None else max(_MIN_SLICES, round(DEFAULT_BODY_LENGTH_MM / interval))
    half = (size - 1) / 2 * dx
    origin = (round(-half + rng.uniform(-5, 5), 4), round(-half + rng.uniform(-40, 10), 4),
              round(rng.uniform(-250, 50), 1))
    geom = PhantomGeometry(size, n, dx, thickness, interval, origin)
    sex = "M" if rng.random() < 0.66 else "F"
    anat = build_anatomy(rng, size, dx)

    kernel = gauss_kernel(_SMOOTH_SIGMA_MM / dx)
    noise_gain = anat.noise_hu / float((kernel**2).sum())  # smoothing shrinks white noise by sum(w^2)
    hu = np.empty((n, size, size), dtype=np.int16)
    mask = np.empty((n, size, size), dtype=np.uint8)
    for k in range(n):
        img, m = render_slice(anat, (k + 0.5) / n)
        img += rng.standard_normal(img.shape, dtype=np.float32) * noise_gain
        img = smooth(img, kernel)
        hu[k] = np.clip(np.rint(img), RESCALE_INTERCEPT, 4095 + RESCALE_INTERCEPT)
        mask[k] = m
    manufacturer = "SIEMENS" if index % 2 else "Philips"
    return PhantomCase(index, seed, geom, hu, mask, manufacturer, sex)


def _uid(case: PhantomCase, *role: object) -> str:
    return generate_uid(entropy_srcs=["pancreas-gvae-phantom", str(case.seed), str(case.index), *map(str, role)])


def _ds(value: float) -> str:
    """Decimal string of at most 16 characters (DICOM DS)."""
    s = f"{value:.10g}"
    return "0" if s in ("-0", "") else s


def _slice_dataset(case: PhantomCase, instance: int, uids: dict[str, str]) -> Dataset:
    g = case.geometry
    siemens = case.manufacturer == "SIEMENS"
    sop_uid = _uid(case, "sop", instance)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = _STUDY_DATE
    ds.StudyTime = ds.SeriesTime = "000000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = case.manufacturer
    ds.ManufacturerModelName = "Sensation 64" if siemens else "Brilliance 64"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Pancreas"
    ds.SeriesDescription = "Pancreas"
    ds.PatientName = case.case_id
    ds.PatientID = case.case_id
    ds.PatientBirthDate = ""
    ds.PatientSex = case.patient_sex
    ds.PatientIdentityRemoved = "YES"
    ds.BodyPartExamined = "ABDOMEN"
    ds.ContrastBolusAgent = "IV contrast, portal-venous phase (synthetic)"
    ds.SliceThickness = _ds(g.slice_thickness)
    ds.SpacingBetweenSlices = _ds(g.slice_interval)
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    pos = g.position(instance)
    ds.ImagePositionPatient = [_ds(v) for v in pos]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(pos[2])
    ds.ImageComments = "Synthetic phantom (pancreas-gvae); not patient data"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = g.size
    ds.PixelSpacing = [_ds(g.pixel_spacing)] * 2
    ds.BitsAllocated = 16
    ds.BitsStored = 12 if siemens else 16
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0 if siemens else 1
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    stored = case.hu[instance - 1].astype(np.int32) - RESCALE_INTERCEPT
    ds.PixelData = stored.astype("<u2" if siemens else "<i2").tobytes()
    return ds


def write_phantom_case(case: PhantomCase, out_dir: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write one case's DICOM series and label under the cohort folder; returns (series folder, label file)."""
    out_dir = Path(out_dir)
    case_dir = out_dir / COLLECTION_DIR / case.case_id
    if case_dir.exists():
        if not overwrite:
            raise PipelineError(f"{case_dir} already exists; pass overwrite (--overwrite) to replace it")
        shutil.rmtree(case_dir)
    uids = {role: _uid(case, role) for role in ("study", "series", "frame")}
    short = case.case_id.replace("_", "")
    study_dir = case_dir / f"01-01-2000-{short}-Pancreas-{uids['study'][-5:]}"
    series_dir = study_dir / f"Pancreas-{uids['series'][-5:]}"
    series_dir.mkdir(parents=True)
    for instance in range(1, case.geometry.slices + 1):
        ds = _slice_dataset(case, instance, uids)
        ds.save_as(series_dir / f"1-{instance:03d}.dcm", enforce_file_format=True)

    lbl = label_path(out_dir, case.index)
    lbl.parent.mkdir(parents=True, exist_ok=True)
    affine = case.geometry.label_affine()
    img = nib.Nifti1Image(mask_to_label_array(case.mask), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    # gzip with mtime 0 so that the same seed gives byte-identical label files.
    lbl.write_bytes(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))
    return series_dir, lbl


def make_phantom_cohort(out_dir: str | Path, *, cases: int = 4, size: int = 64, slices: int | None = None,
                        seed: int = 0, start_index: int = 1, slice_interval: float | None = None,
                        overwrite: bool = False) -> list[Path]:
    """Write cases ``start_index .. start_index + cases - 1``; returns their DICOM series folders.

    Labels go to :func:`label_path`. See the module docstring for geometry, layout and conventions.
    """
    if cases < 1:
        raise PipelineError(f"need at least one phantom case, got {cases}")
    if start_index < 1 or start_index + cases - 1 > 9999:
        raise PipelineError(f"case numbers must stay within 1..9999, got {start_index}..{start_index + cases - 1}")
    _check(size=size, slices=slices, slice_interval=slice_interval)
    series_dirs = []
    for index in range(start_index, start_index + cases):
        case = render_phantom_case(index, size=size, slices=slices, seed=seed, slice_interval=slice_interval)
        series_dirs.append(write_phantom_case(case, out_dir, overwrite=overwrite)[0])
    return series_dirs
