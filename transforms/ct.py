"""MONAI dictionary transforms for CT: the deterministic (cached) chain and the random sampling chain.

Deterministic chain (:func:`build_preprocess_chain`), on ``{"image": <ordered DICOM files> | <NIfTI path> |
<MetaTensor>, "label": <NIfTI path> | <MetaTensor>}`` (a MetaTensor: a 2D slice set's stacked slices)::

    LoadCTd            DICOM: MONAI's ITKReader on our ordered file list; NIfTI: nibabel; channel first;
                       the affines must be invertible and unsheared
    InputIntensityd    the cohort's input intensity mapping (HU as stored, or display values of a window)
    CheckImaged        finite voxels, plausible HU; records the HU range (and notes far outliers)
    PairLabeld         label values -> pancreas mask, extent check, resample onto the image grid in WORLD space
    CheckLabelHUd      HU under the mask must be soft tissue (catches a mis-paired label)
    Orientationd       RAS
    BodyCropd          body box (CropForegroundd's box, computed faster): voxels above ``body_threshold_hu`` + margin
    SeparableSpacingd  target spacing (mm), linear for the image, nearest for the mask
    ScaleIntensityRanged  HU window -> [0, 1], clipped

An image-only case (no label) runs the chain on ``image`` alone, without the two label steps.
Every check raises :class:`~pancreas_gvae.data.ct.checks.CaseExcluded`; MONAI wraps errors raised inside
``Compose`` in a RuntimeError, so callers use :func:`unwrap_exclusion` to get it back. Non-fatal findings
are appended to ``d["qc"]["notes"]``.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import itk
import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ITKReader, MetaTensor
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    Orientationd,
    RandCropByPosNegLabeld,
    ScaleIntensityRanged,
    SpatialPadd,
)
from monai.utils import ensure_tuple

from pancreas_gvae.data.ct.checks import (
    CaseExcluded,
    check_affine,
    check_finite,
    check_hu_scale,
    check_label_hu,
    hu_outlier_note,
    label_hu_stats,
)
from pancreas_gvae.data.ct.config import DataConfig, InputIntensityConfig
from pancreas_gvae.data.ct.pairing import (
    check_label_extent,
    non_integer_label_note,
    pancreas_mask,
    resample_label_to_image,
)
from pancreas_gvae.transforms.spatial import BodyCropd, SeparableSpacingd, affine_of, spacing_of

QC_KEY = "qc"  # per-case numbers the checks measured (HU range, label stats), for the manifest
_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # explicit, so MONAI does not warn about its default


class DicomSeriesReader(ITKReader):
    """MONAI's ITKReader, fed an explicit ordered list of slice files instead of a folder.

    On a folder ITKReader lets GDCM group and order the files (first series UID wins); we pass the series
    chosen and ordered by :func:`pancreas_gvae.data.ct.dicom_series.scan_dicom_files` so both are explicit and
    reported. ITK's GDCM decodes compressed transfer syntaxes (JPEG 2000 included). Only spacing is kept
    as metadata: DICOM tags (patient name, dates, UIDs) never enter the MetaTensor.
    """

    def verify_suffix(self, filename) -> bool:
        return len(ensure_tuple(filename)) > 1

    def read(self, data, **kwargs):
        files = [str(f) for f in ensure_tuple(data)]
        if len(files) == 1 and Path(files[0]).is_dir():
            return super().read(files[0], **kwargs)
        return itk.imread(files, **{**self.kwargs, **kwargs})  # ImageSeriesReader, in the given order

    def _get_meta_dict(self, img) -> dict:
        return {"spacing": np.asarray(img.GetSpacing())}


def unwrap_exclusion(err: BaseException) -> CaseExcluded | None:
    """The CaseExcluded behind an error (MONAI's Compose re-raises as RuntimeError ``from`` the original)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, CaseExcluded):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _is_nifti(value: Any) -> bool:
    return isinstance(value, (str, Path)) and str(value).lower().endswith((".nii", ".nii.gz"))


def load_dicom_series(files: Sequence[str]) -> MetaTensor:
    """An ordered slice list as a ``(1, i, j, k)`` float32 HU MetaTensor with its RAS affine.

    MONAI's ITKReader reads the pixels and gives the affine; we skip ``LoadImage``/``get_data``, whose
    copies to C order took 2.2 s of 2.6 s for a 512x512x250 series here. The tensor is a strided view of
    ITK's slice-major buffer: (i, j, k) indexing as MONAI expects, memory laid out (k, j, i).
    """
    reader = DicomSeriesReader()
    img = reader.read(list(files))
    buffer = np.asarray(itk.array_view_from_image(img), dtype=np.float32)  # (k, j, i), rescaled to HU by GDCM
    affine = reader._get_affine(img, lps_to_ras=True)
    return MetaTensor(torch.from_numpy(buffer.T)[None], affine=torch.as_tensor(affine))


def load_nifti(path: str | Path, *, dtype=np.float32) -> MetaTensor:
    """A NIfTI volume as a ``(1, i, j, k)`` MetaTensor with nibabel's affine (sform if set, else qform).

    nibabel directly, for the same reason as above: MONAI's LoadImage copies the Fortran-ordered array
    to C order several times. ``dtype=None`` keeps the stored type (labels).
    """
    nii = nib.load(str(path))
    arr = np.asanyarray(nii.dataobj)
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise CaseExcluded("unreadable_file", f"{Path(path).name} is not a 3D volume: shape {arr.shape}")
    if dtype is not None:
        arr = arr.astype(dtype, order="K", copy=False)
    return MetaTensor(torch.from_numpy(arr)[None], affine=torch.as_tensor(nii.affine, dtype=torch.float64))


def _note(d: dict, text: str | None) -> None:
    if text:
        d.setdefault(QC_KEY, {}).setdefault("notes", []).append(text)


def _reader_message(err: BaseException) -> str:
    """One line for a reader error: ITK's "ITK ERROR: Class(0x..): text" line rather than its source location."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    itk_error = [line for line in lines if line.startswith("ITK ERROR:")]
    text = itk_error[0].removeprefix("ITK ERROR:").strip() if itk_error else (lines[0] if lines else "")
    return f"{type(err).__name__}: {re.sub(r'[(]0x[0-9a-fA-F]+[)]', '', text)}"[:200]


class LoadCTd(MapTransform):
    """Load ``image`` (ordered DICOM file list or NIfTI path) as float32 HU and ``label`` (NIfTI) as stored.

    Each affine must be invertible with perpendicular axes (:func:`check_affine`: ``degenerate_affine``,
    ``sheared_geometry`` within ``max_shear_degrees``), before anything inverts or resamples it.
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), label_key: str = "label",
                 allow_missing_keys: bool = False, max_shear_degrees: float = 1.0):
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.max_shear_degrees = float(max_shear_degrees)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            src = d[key]
            if isinstance(src, MetaTensor):  # already read: a 2D slice set's stack (pancreas_gvae.data.ct.slice_sets)
                check_affine(affine_of(src), f"{key} (slice stack)", self.max_shear_degrees)
                continue
            is_dicom = isinstance(src, (list, tuple))
            if not is_dicom and not _is_nifti(src):
                raise CaseExcluded("unreadable_file", f"{key}: not a DICOM file list or NIfTI path: {src!r}")
            what = "DICOM series" if is_dicom else Path(src).name
            try:
                if is_dicom:
                    d[key] = load_dicom_series(src)
                else:
                    d[key] = load_nifti(src, dtype=None if key == self.label_key else np.float32)
            except CaseExcluded:
                raise
            except (EOFError, OSError, ValueError, RuntimeError, TypeError, zlib.error,
                    nib.filebasedimages.ImageFileError) as err:
                text = _reader_message(err)
                kind = "truncated_file" if isinstance(err, EOFError) or "ended before" in text else "unreadable_file"
                raise CaseExcluded(kind, f"cannot read the {key} ({what}): {text}") from err
            check_affine(affine_of(d[key]), f"{key} ({what})", self.max_shear_degrees)
        return d


class InputIntensityd(MapTransform):
    """Apply the cohort's input intensity mapping (:class:`~pancreas_gvae.data.ct.config.InputIntensityConfig`).

    ``hu``: nothing to do. ``display``: values outside ``display_range`` mean the declaration is wrong
    (``implausible_hu``); with a known ``window`` the values are mapped back to HU in place (the window's
    ends for the range's ends), with an unknown window they stay display values.
    """

    def __init__(self, keys: KeysCollection, intensity: InputIntensityConfig):
        super().__init__(keys)
        self.intensity = intensity

    def __call__(self, data):
        d = dict(data)
        ii = self.intensity
        for key in self.key_iterator(d):
            d.setdefault(QC_KEY, {})["input_intensity"] = ii.describe()
            if ii.kind == "hu":
                continue
            arr = d[key].numpy()
            check_finite(arr, key)
            (d0, d1), (lo, hi) = ii.display_range, (float(arr.min()), float(arr.max()))
            if lo < d0 - 1e-3 or hi > d1 + 1e-3:
                raise CaseExcluded("implausible_hu", f"values span {lo:g}..{hi:g}, outside the declared display "
                                                     f"range {d0:g}..{d1:g} ({ii.describe()})")
            if ii.window is not None:
                w0, w1 = (float(v) for v in ii.window)
                arr -= d0  # in place: the float32 volume is the largest array of the chain
                arr *= (w1 - w0) / (d1 - d0)
                arr += w0
            else:
                _note(d, f"hu_checks_skipped: {ii.describe()}: implausible_hu, hu_outliers and the label HU "
                         f"median / air / fat checks need true HU")
        return d


class CheckImaged(MapTransform):
    """Finite voxels and a Hounsfield-looking value range (on the window's terms for windowed data; skipped for
    display values of an unknown window); the range goes to ``d["qc"]``, far outliers to its notes."""

    def __init__(self, keys: KeysCollection, intensity: InputIntensityConfig | None = None,
                 outlier_range: Sequence[float] = (-4096.0, 32767.0)):
        super().__init__(keys)
        self.intensity = intensity or InputIntensityConfig()
        self.outlier_range = list(outlier_range)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            arr = d[key].numpy() if isinstance(d[key], torch.Tensor) else np.asarray(d[key])
            check_finite(arr, key)
            lo, hi = float(arr.min()), float(arr.max())
            if self.intensity.true_hu:
                check_hu_scale(lo, hi, self.intensity.hu_floor)
                _note(d, hu_outlier_note(arr, lo, hi, self.outlier_range))
            d.setdefault(QC_KEY, {}).update(hu_min=lo, hu_max=hi, shape=list(arr.shape[1:]),
                                            spacing=spacing_of(d[key]))
        return d


class PairLabeld(MapTransform):
    """Map label values to a 0/1 pancreas mask and put it on the image grid through both affines.

    The extent check comes first: a label covering another box (other shape or field of view) is refused,
    not silently cropped or padded.
    """

    def __init__(self, pancreas_values: Sequence[int], extent_tolerance_mm: float, image_key: str = "image",
                 label_key: str = "label"):
        super().__init__([label_key])
        self.values = [int(v) for v in pancreas_values]
        self.tol = float(extent_tolerance_mm)
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data):
        d = dict(data)
        image, label = d[self.image_key], d[self.label_key]
        lab = label.numpy()[0]
        check_finite(lab, "label")
        _note(d, non_integer_label_note(lab))
        img_aff, lab_aff = affine_of(image), affine_of(label)
        img_shape = tuple(image.shape[1:])
        check_label_extent(img_aff, img_shape, lab_aff, lab.shape, self.tol)
        mask = pancreas_mask(lab, self.values)
        on_grid = resample_label_to_image(mask, lab_aff, img_aff, img_shape)
        d[self.label_key] = MetaTensor(torch.from_numpy(on_grid[None]), affine=image.affine.clone(),
                                       meta={k: v for k, v in image.meta.items() if k != "affine"})
        d.setdefault(QC_KEY, {})["label_source_voxels"] = int(mask.sum())
        return d


class CheckLabelHUd(MapTransform):
    """HU statistics under the paired mask (to ``d["qc"]``), then :func:`check_label_hu`.

    Windowed data (a known display window) cannot tell air below the window floor from fat: the air fraction
    is not measured when the floor is above -500 HU, nor the fat fraction when it is above -50 HU (noted).
    Display values of an unknown window: only the voxel count (``empty_label``) is checked.
    """

    def __init__(self, checks, image_key: str = "image", label_key: str = "label",
                 intensity: InputIntensityConfig | None = None):
        super().__init__([image_key, label_key])
        self.checks, self.image_key, self.label_key = checks, image_key, label_key
        self.intensity = intensity or InputIntensityConfig()

    def __call__(self, data):
        d = dict(data)
        stats = label_hu_stats(d[self.image_key].numpy()[0], d[self.label_key].numpy()[0])
        nan = float("nan")
        if not self.intensity.true_hu:
            stats.update(label_median_hu=nan, label_air_fraction=nan, label_fat_fraction=nan)
        else:
            floor = self.intensity.hu_floor
            skipped = [name for name, bound in (("air", -500.0), ("fat", -50.0)) if floor >= bound]
            for name in skipped:
                stats[f"label_{name}_fraction"] = nan
            if skipped:
                _note(d, f"label_{'_'.join(skipped)}_fraction_skipped: the window floor {floor:g} HU hides "
                         f"{' and '.join(skipped)} below it")
        d.setdefault(QC_KEY, {}).update(stats)
        check_label_hu(stats, self.checks)
        return d


def build_preprocess_chain(cfg: DataConfig, pancreas_values: Sequence[int], *, has_label: bool = True) -> Compose:
    """The deterministic chain (cached per case); see the module docstring for the steps.

    ``has_label=False``: an image-only case (input ``{"image": ...}``), every image check, no label steps.
    """
    p, ii = cfg.preprocess, cfg.preprocess.input_intensity
    keys = ["image", "label"] if has_label else ["image"]
    # Windowed data: air sits at the window floor, so the body is what lies above it; display values of an
    # unknown window are scaled from their display range instead of the HU window.
    if ii.true_hu:
        body_threshold, (lo, hi) = max(p.body_threshold_hu, ii.hu_floor), p.hu_window
    else:
        body_threshold, (lo, hi) = ii.display_range[0], ii.display_range
    label_steps = [
        PairLabeld(pancreas_values, cfg.checks.extent_tolerance_mm),
        CheckLabelHUd(cfg.checks, intensity=ii),
    ] if has_label else []
    return Compose([
        LoadCTd(keys, max_shear_degrees=cfg.checks.max_tilt_degrees),
        InputIntensityd("image", ii),
        CheckImaged("image", ii, cfg.checks.hu_outlier_range),
        *label_steps,
        Orientationd(keys, axcodes=p.orientation, labels=_AXIS_LABELS),
        BodyCropd(keys, source_key="image", threshold=body_threshold, margin=p.body_margin),
        SeparableSpacingd(keys, p.spacing, mode=("linear", "nearest")[: len(keys)]),
        ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
    ])


def build_sampling_chain(cfg: DataConfig) -> Compose:
    """Random part for 3D (or 2D, with a patch depth of 1) patches from a cached case dict.

    Input: :func:`pancreas_gvae.transforms.cache.case_as_dict` (``image``/``label`` as ``(1, slices, rows, cols)``);
    output: ``patch_num_samples`` dicts with ``patch_size`` patches, a ``patch_pos : patch_neg`` share
    centred on pancreas.
    """
    s = cfg.sampling
    return Compose([
        SpatialPadd(["image", "label"], spatial_size=list(s.patch_size)),
        RandCropByPosNegLabeld(["image", "label"], label_key="label", spatial_size=list(s.patch_size),
                               pos=s.patch_pos, neg=s.patch_neg, num_samples=s.patch_num_samples,
                               allow_smaller=True),
        EnsureTyped(["image", "label"], dtype=torch.float32, track_meta=False),
    ])
