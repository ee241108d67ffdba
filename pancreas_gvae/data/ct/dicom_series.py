"""Header pre-scan of a DICOM folder: pick the series, order its slices, and check its geometry.

Only headers are parsed (pydicom, pixel data deferred), so a broken case fails in well under a second and
the pixel reader (MONAI's ITKReader, see ``transforms/ct.py``) gets an explicit, checked, ordered file list.
We order slices ourselves, by ImagePositionPatient projected on the slice normal, because file names and
InstanceNumber are not reliable (and MONAI's PydicomReader sorts by InstanceNumber).
"""

from __future__ import annotations

import math
import struct
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag

from pancreas_gvae.data.ct.checks import CaseExcluded, check_axial, check_orientation, check_slice_positions, check_tilt
from pancreas_gvae.data.ct.config import CheckConfig

_PIXEL_DATA = Tag(0x7FE0, 0x0010)
_UNDEFINED_LENGTH = 0xFFFFFFFF
# Files in a series folder that are certainly not DICOM slices.
NON_DICOM_SUFFIXES = (".nii", ".nii.gz", ".txt", ".csv", ".json", ".xml", ".md", ".pdf", ".zip", ".png", ".jpg",
                      ".yaml", ".yml", ".py", ".log", ".npy", ".npz")


@dataclass
class _Header:
    path: Path
    modality: str
    series_uid: str
    series_number: int | None
    rows: int | None
    cols: int | None
    iop: tuple[float, ...] | None
    ipp: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    gantry_tilt: float
    manufacturer: str
    has_pixels: bool
    localizer: bool

    def group_key(self) -> tuple:
        iop = tuple(round(v, 3) for v in self.iop) if self.iop else None
        return (self.series_uid, self.modality, iop, self.rows, self.cols)


@dataclass
class DicomSeries:
    """The chosen series: files ordered by position along the slice normal (ascending), and its geometry."""

    files: tuple[str, ...]
    positions: np.ndarray  # mm along ``normal``, ascending
    normal: np.ndarray  # row x column direction cosines (LPS)
    iop: tuple[float, ...]
    first_position: np.ndarray  # ImagePositionPatient (LPS) of files[0]
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    interval: float
    thickness: float | None
    rows: int
    cols: int
    modality: str
    manufacturer: str
    notes: list[str] = field(default_factory=list)

    def affine_ras(self) -> np.ndarray:
        """Affine of the array (column i, row j, slice k) in RAS mm, as the headers say (ITK / MONAI convention)."""
        row_dir, col_dir = np.array(self.iop[:3]), np.array(self.iop[3:])
        lps = np.eye(4)
        lps[:3, 0] = row_dir * self.pixel_spacing[1]
        lps[:3, 1] = col_dir * self.pixel_spacing[0]
        lps[:3, 2] = self.normal * self.interval
        lps[:3, 3] = self.first_position
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def candidate_files(folder: Path) -> list[Path]:
    """Every regular, non-hidden file under ``folder`` that might be a DICOM slice, sorted."""
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            if not p.name.lower().endswith(NON_DICOM_SUFFIXES):
                out.append(p)
    return out


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n and all(math.isfinite(v) for v in vals) else None


def _read_header(path: Path) -> _Header | None:
    """Parse one file's header; ``None`` for a DICOMDIR. Raises CaseExcluded for unreadable or truncated files."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, defer_size=1024)
        except InvalidDicomError as err:
            raise CaseExcluded("unreadable_file", f"{path.name} is not a DICOM file ({err})") from err
        except (EOFError, OSError, ValueError, KeyError, struct.error) as err:
            kind = "truncated_file" if "end of file" in str(err).lower() or isinstance(err, EOFError) else (
                "unreadable_file")
            raise CaseExcluded(kind, f"{path.name}: {type(err).__name__}: {err}") from err
    if any("end of file" in str(w.message).lower() for w in caught):
        raise CaseExcluded("truncated_file", f"{path.name} ends inside its data")
    media = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    if media == "1.2.840.10008.1.3.10":  # Media Storage Directory (DICOMDIR): an index, not a slice
        return None
    raw = ds._dict.get(_PIXEL_DATA)  # deferred: offset and length only, no pixel bytes read
    has_pixels = raw is not None
    if has_pixels:
        _check_pixel_length(ds, raw, path)
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise CaseExcluded("unreadable_file", f"{path.name} is a multi-frame DICOM (one file per slice expected)")
    image_type = [str(v).upper() for v in (getattr(ds, "ImageType", None) or [])]
    try:
        series_number = int(ds.SeriesNumber) if ds.get("SeriesNumber") not in (None, "") else None
    except (TypeError, ValueError):
        series_number = None
    spacing = _floats(ds.get("PixelSpacing"), 2)
    thickness = ds.get("SliceThickness")
    tilt = ds.get("GantryDetectorTilt")
    return _Header(
        path=path,
        modality=str(ds.get("Modality", "") or "").upper(),
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        series_number=series_number,
        rows=int(ds.Rows) if ds.get("Rows") else None,
        cols=int(ds.Columns) if ds.get("Columns") else None,
        iop=_floats(ds.get("ImageOrientationPatient"), 6),
        ipp=_floats(ds.get("ImagePositionPatient"), 3),
        pixel_spacing=spacing,  # type: ignore[arg-type]
        thickness=float(thickness) if thickness not in (None, "") else None,
        gantry_tilt=float(tilt) if tilt not in (None, "") else 0.0,
        manufacturer=str(ds.get("Manufacturer", "") or "").strip(),
        has_pixels=has_pixels,
        localizer="LOCALIZER" in image_type,
    )


def _check_pixel_length(ds, raw, path: Path) -> None:
    """A native (uncompressed) Pixel Data element must fit in the file and hold every pixel."""
    length = getattr(raw, "length", None)
    tell = getattr(raw, "value_tell", None)
    if length is None or tell is None or length == _UNDEFINED_LENGTH:
        return  # encapsulated (compressed): pydicom warned above if the fragments run past the end
    size = path.stat().st_size
    if tell + length > size:
        raise CaseExcluded(
            "truncated_file",
            f"{path.name}: pixel data needs {length} bytes, the file ends {tell + length - size} short",
        )
    try:
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
    except (AttributeError, TypeError, ValueError):
        return
    if length < expected:
        raise CaseExcluded("truncated_file", f"{path.name}: pixel data has {length} bytes, {expected} expected")


def _plane(iop: tuple[float, ...] | None) -> str:
    if not iop:
        return "no geometry"
    n = np.abs(np.cross(iop[:3], iop[3:]))
    return ("sagittal", "coronal", "axial")[int(np.argmax(n))]


def _describe(headers: list[_Header]) -> str:
    h = headers[0]
    number = f"series {h.series_number}" if h.series_number is not None else "unnumbered series"
    kind = "localizer" if h.localizer else _plane(h.iop)
    return f"{number} ({h.modality or '?'} {kind}, {len(headers)} files)"


def _choose(groups: list[list[_Header]]) -> tuple[list[_Header], str]:
    """The largest axial CT stack wins; the string says why."""

    def score(g: list[_Header]):
        h = g[0]
        return (h.modality == "CT", h.iop is not None and not h.localizer, _plane(h.iop) == "axial", len(g),
                -(h.series_number or 0))

    ranked = sorted(groups, key=score, reverse=True)
    best = ranked[0]
    h = best[0]
    if h.modality == "CT" and _plane(h.iop) == "axial":
        why = "the largest axial CT series"
    elif h.modality == "CT":
        why = "the largest CT series (none is axial)"
    else:
        why = "the largest series (none is CT)"
    return best, why


def scan_dicom_files(files: list[Path], cfg: CheckConfig) -> DicomSeries:
    """Choose and check one series among ``files``; raises :class:`CaseExcluded` with a named reason."""
    if not files:
        raise CaseExcluded("no_image", "no DICOM files found")
    headers = [h for h in (_read_header(Path(f)) for f in files) if h is not None]
    if not headers:
        raise CaseExcluded("no_image", "only a DICOMDIR, no DICOM slices")

    by_key: dict[tuple, list[_Header]] = defaultdict(list)
    for h in headers:
        by_key[h.group_key()].append(h)
    groups = list(by_key.values())
    chosen, why = _choose(groups)
    notes = []
    if len(groups) > 1:
        others = [g for g in groups if g is not chosen]
        notes.append(
            f"multiple_series: {len(groups)} series/stacks in the folder; took {_describe(chosen)}, {why}; "
            f"skipped " + ", ".join(_describe(g) for g in others)
        )

    h0 = chosen[0]
    if h0.modality != "CT":
        raise CaseExcluded("not_ct", f"modality {h0.modality or 'missing'} ({_describe(chosen)})")
    no_pixels = [h.path.name for h in chosen if not h.has_pixels]
    if no_pixels:
        raise CaseExcluded("no_pixel_data", f"{len(no_pixels)} file(s) without Pixel Data, e.g. {no_pixels[0]}")
    if h0.iop is None or any(h.ipp is None for h in chosen):
        raise CaseExcluded("unreadable_file", "slices lack ImagePositionPatient / ImageOrientationPatient")
    check_orientation(h0.iop, cfg)  # before the cross product: a zero vector has no normal
    spacings = {h.pixel_spacing for h in chosen}
    if None in spacings or len({tuple(round(v, 4) for v in s) for s in spacings if s}) > 1:
        raise CaseExcluded("inconsistent_slices",
                           f"pixel spacing differs or is missing: {sorted(map(str, spacings))[:3]}")

    row_dir, col_dir = np.array(h0.iop[:3]), np.array(h0.iop[3:])
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    check_axial(normal, cfg)

    ipp = np.array([h.ipp for h in chosen], dtype=float)
    pos = ipp @ normal
    order = np.argsort(pos, kind="stable")
    pos, ipp = pos[order], ipp[order]
    ordered = [chosen[i] for i in order]
    check_tilt(ipp[0], ipp[-1], normal, [h.gantry_tilt for h in chosen], cfg)
    interval = check_slice_positions(pos, cfg)

    thickness = {h.thickness for h in chosen if h.thickness is not None}
    return DicomSeries(
        files=tuple(str(h.path) for h in ordered),
        positions=pos,
        normal=normal,
        iop=h0.iop,
        first_position=ipp[0],
        pixel_spacing=h0.pixel_spacing,  # type: ignore[arg-type]
        interval=interval,
        thickness=min(thickness) if thickness else None,
        rows=int(h0.rows or 0),
        cols=int(h0.cols or 0),
        modality=h0.modality,
        manufacturer=h0.manufacturer,
        notes=notes,
    )


def scan_dicom_folder(folder: str | Path, cfg: CheckConfig) -> DicomSeries:
    """:func:`scan_dicom_files` over every candidate file below ``folder``."""
    return scan_dicom_files(candidate_files(Path(folder)), cfg)
