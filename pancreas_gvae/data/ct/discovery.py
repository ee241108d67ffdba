"""Find the cases under a data root: TCIA Pancreas-CT, MSD Task07, a plain folder, or a 2D slice set
(:mod:`pancreas_gvae.data.ct.slice_sets`; docs/data.md).

Discovery only looks at names; nothing is read here. A case that is known to be unusable before reading
(a duplicate, no image) carries its exclusion reason so that it still gets a manifest row. A case without a
label carries ``label_missing`` (why none was found): :func:`mark_missing_labels` excludes it when labels are
required (``labels.require_label``), else it is prepared image-only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pancreas_gvae.data.ct.cases import CaseSource
from pancreas_gvae.data.ct.dicom_series import candidate_files
from pancreas_gvae.errors import DataError

LAYOUTS = ("auto", "tcia", "msd", "folder", "slices")
TCIA_COLLECTION_DIRS = ("Pancreas-CT", "DOI")
TCIA_LABEL_DIR_GLOB = "TCIA_pancreas_labels*"
_TCIA_CASE = re.compile(r"^PANCREAS_(\d{4})$", re.IGNORECASE)
_TCIA_LABEL = re.compile(r"^label(\d{4})\.nii(\.gz)?$", re.IGNORECASE)
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Label file names inside a case folder, and suffixes of a label beside a NIfTI image (<case>_label.nii.gz).
LABEL_STEMS = ("label", "labels", "seg", "segmentation", "mask")
LABEL_SUFFIXES = tuple(f"_{s}" for s in LABEL_STEMS)


@dataclass
class Discovery:
    root: Path
    layout: str
    cases: list[CaseSource]
    labels_dir: Path | None = None


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def _tcia_collections(root: Path) -> list[Path]:
    """Folders that hold PANCREAS_NNNN case folders: the root itself, Pancreas-CT/ or DOI/ (one level down too)."""
    found = []
    for cand in [root, *(root / d for d in TCIA_COLLECTION_DIRS),
                 *(sub / d for sub in _visible_dirs(root) for d in TCIA_COLLECTION_DIRS)]:
        if cand.is_dir() and any(_TCIA_CASE.match(p.name) for p in _visible_dirs(cand)):
            found.append(cand)
    return found


def detect_layout(root: str | Path, slice_set=None) -> str:
    """``msd`` when dataset.json + imagesTr/ exist, ``tcia`` when PANCREAS_NNNN folders exist, ``slices`` for a
    2D slice set (``images/`` + ``masks/`` of 2D files, or a slice manifest with image/mask columns), else
    ``folder``. ``slice_set``: the :class:`~pancreas_gvae.data.ct.config.SliceSetConfig` (defaults if None)."""
    from pancreas_gvae.data.ct.slice_sets import is_slice_set

    root = Path(root)
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        return "msd"
    if _tcia_collections(root):
        return "tcia"
    if is_slice_set(root, slice_set):
        return "slices"
    return "folder"


def discover(data_root: str | Path, *, labels: str | Path | None = None, layout: str = "auto",
             exclude_cases: dict[str, str] | None = None, slice_set=None) -> Discovery:
    """Cases under ``data_root`` in ``layout`` (``auto`` detects it); ``exclude_cases`` maps case id -> why;
    ``slice_set`` configures the ``slices`` layout (defaults if None)."""
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root not found or not a folder: {root}")
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    labels_dir = Path(labels).expanduser() if labels is not None else None
    if labels_dir is not None and not labels_dir.is_dir():
        raise DataError(f"labels folder not found: {labels_dir}")
    resolved = detect_layout(root, slice_set) if layout == "auto" else layout
    if resolved == "slices":
        from pancreas_gvae.data.ct.slice_sets import discover_slices

        cases, labels_dir = discover_slices(root, labels_dir, slice_set)
    else:
        finder = {"tcia": _discover_tcia, "msd": _discover_msd, "folder": _discover_folder}[resolved]
        cases, labels_dir = finder(root, labels_dir)
    seen: set[str] = set()
    for case in cases:
        if case.case_id in seen and case.excluded is None:
            case.excluded = ("ambiguous_image", f"another case already has the id {case.case_id}")
        seen.add(case.case_id)
        why = (exclude_cases or {}).get(case.case_id)
        if why and case.excluded is None:
            case.excluded = ("duplicate_case", why)
    return Discovery(root=root, layout=resolved, cases=cases, labels_dir=labels_dir)


# ----------------------------------------------------------------------------- TCIA


def _find_tcia_labels(root: Path, collections: list[Path]) -> Path | None:
    for base in [root, root.parent, *(c.parent for c in collections)]:
        hits = sorted(p for p in base.glob(TCIA_LABEL_DIR_GLOB) if p.is_dir())
        if hits:
            return hits[0]
    return None


def _discover_tcia(root: Path, labels_dir: Path | None) -> tuple[list[CaseSource], Path | None]:
    collections = _tcia_collections(root)
    if not collections:
        raise DataError(f"no PANCREAS_NNNN case folders under {root} (looked in ., Pancreas-CT/, DOI/)")
    labels_dir = labels_dir or _find_tcia_labels(root, collections)
    label_files: dict[int, Path] = {}
    if labels_dir is not None:
        for p in sorted(labels_dir.rglob("label*.nii*")):  # the archive nests a folder of the same name at times
            m = _TCIA_LABEL.match(p.name)
            if m:
                label_files.setdefault(int(m.group(1)), p)
    cases = []
    for coll in collections:
        for case_dir in _visible_dirs(coll):
            m = _TCIA_CASE.match(case_dir.name)
            if not m:
                continue
            number = int(m.group(1))
            label = label_files.get(number)
            case = CaseSource(f"PANCREAS_{number:04d}", "tcia", case_dir, "dicom", label)
            if label is None:
                where = labels_dir.name if labels_dir is not None else \
                    f"{TCIA_LABEL_DIR_GLOB} beside the data (none found)"
                case.label_missing = f"label{number:04d}.nii.gz not in {where}"
            cases.append(case)
    return sorted(cases, key=lambda c: c.case_id), labels_dir


# ----------------------------------------------------------------------------- MSD


def _discover_msd(root: Path, labels_dir: Path | None) -> tuple[list[CaseSource], Path | None]:
    meta_path = root / "dataset.json"
    labels_dir = labels_dir or root / "labelsTr"
    pairs: list[tuple[Path, Path | None]] = []
    names = ""
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"{meta_path} is not valid JSON: {err}") from err
        names = ", ".join(f"{k} {v}" for k, v in (meta.get("labels") or {}).items())
        for item in meta.get("training") or []:
            image = root / str(item["image"]).removeprefix("./")
            label = root / str(item["label"]).removeprefix("./") if item.get("label") else None
            pairs.append((image, label))
    if not pairs:  # no list in dataset.json: every image in imagesTr, skipping macOS "._" resource forks
        pairs = [(p, labels_dir / p.name) for p in sorted((root / "imagesTr").glob("*.nii*"))
                 if not p.name.startswith(".")]
    cases = []
    for image, label in pairs:
        case = CaseSource(nifti_stem(image), "msd", image, "nifti", label)
        if names:
            case.notes.append(f"MSD labels: {names}")
        if not image.is_file():
            case.excluded = ("no_image", f"{image.name} listed in dataset.json but missing")
        elif label is None or not label.is_file():
            case.label, case.label_missing = None, f"no label {label.name if label else ''} in labelsTr".replace("  ", " ")
        cases.append(case)
    return cases, labels_dir


# ----------------------------------------------------------------------------- plain folder


def _label_in_dir(labels_dir: Path | None, case_id: str) -> Path | None:
    if labels_dir is None:
        return None
    for stem in (case_id, *(case_id + s for s in LABEL_SUFFIXES)):
        for suffix in NIFTI_SUFFIXES:
            if (labels_dir / f"{stem}{suffix}").is_file():
                return labels_dir / f"{stem}{suffix}"
    return None


def _is_label_name(path: Path) -> bool:
    stem = nifti_stem(path).lower()
    return stem in LABEL_STEMS or stem.endswith(LABEL_SUFFIXES)


def _folder_case(case_dir: Path, labels_dir: Path | None) -> CaseSource:
    niftis = sorted(p for p in case_dir.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith("."))
    labels = [p for p in niftis if _is_label_name(p)]
    images = [p for p in niftis if not _is_label_name(p)]
    label = _label_in_dir(labels_dir, case_dir.name) or (labels[0] if len(labels) == 1 else None)
    case = CaseSource(case_dir.name, "folder", case_dir, "dicom", label)
    if len(labels) > 1 and label is None:
        case.excluded = ("missing_label", f"several label files, none chosen: {', '.join(p.name for p in labels)}")
    if len(images) == 1:
        case.image, case.kind = images[0], "nifti"
    elif len(images) > 1:
        case.excluded = ("ambiguous_image", f"several NIfTI images: {', '.join(p.name for p in images)}")
    elif not candidate_files(case_dir):
        case.excluded = ("no_image", "no DICOM or NIfTI image in the folder")
    return case


def _discover_folder(root: Path, labels_dir: Path | None) -> tuple[list[CaseSource], Path | None]:
    if labels_dir is None and (root / "labels").is_dir():
        labels_dir = root / "labels"
    cases = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith((".", "__")) or (labels_dir is not None and entry.resolve() == labels_dir.resolve()):
            continue
        if entry.is_dir():
            cases.append(_folder_case(entry, labels_dir))
        elif entry.is_file() and is_nifti(entry) and not _is_label_name(entry):
            case_id = nifti_stem(entry)
            label = _label_in_dir(labels_dir, case_id) or next(
                (root / f"{case_id}{s}{x}" for s in LABEL_SUFFIXES for x in NIFTI_SUFFIXES
                 if (root / f"{case_id}{s}{x}").is_file()), None)
            cases.append(CaseSource(case_id, "folder", entry, "nifti", label))
    if not cases:
        raise DataError(f"no cases under {root}: expected one sub-folder (DICOM series) or NIfTI file per case")
    return cases, labels_dir


def mark_missing_labels(cases: list[CaseSource]) -> None:
    """A case without a label cannot give labelled slices: exclude it (unless something else already did)."""
    for case in cases:
        if case.excluded is None and case.label is None:
            detail = case.label_missing or "no label file found (see docs/data.md for the naming rules)"
            case.excluded = ("missing_label", f"{detail} (labels.require_label is true)")
