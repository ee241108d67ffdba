"""One discovered case: where its image and label live, and what discovery already knows about it.

Shared by :mod:`pancreas_gvae.data.ct.discovery` (DICOM / NIfTI layouts) and :mod:`pancreas_gvae.data.ct.slice_sets`
(2D slice sets), which both produce it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class CaseSource:
    """Where one case's image and label live. ``image`` is a DICOM folder (kind ``dicom``) or a NIfTI file."""

    case_id: str
    layout: str
    image: Path | None
    kind: str  # dicom | nifti | slices
    label: Path | None
    excluded: tuple[str, str] | None = None  # (reason code, detail) known from names alone
    notes: list[str] = field(default_factory=list)
    label_missing: str = ""  # why no label was found (label is None): missing_label's detail
    slices: list = field(default_factory=list)  # kind slices: the patient's SliceSource entries, in order
