"""The manifest: one row per case, ``ok`` or ``excluded`` with a reason (columns in docs/data.md).

Nothing patient-identifying goes in: case ids are TCIA's de-identified ids, MSD file names or folder
names; source paths stop at the case folder (NBIA study/series folder names carry dates and UIDs); any
UID-like string in a message is masked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

MANIFEST_NAME = "manifest.csv"
COLUMNS = [
    "case_id", "layout", "status", "reason", "notes", "image_path", "label_path",
    "shape", "spacing", "slice_thickness", "slice_interval", "n_slices", "vendor",
    "hu_min", "hu_max", "label_voxels", "label_median_hu", "label_air_fraction", "label_fat_fraction",
    "pancreas_slices", "pancreas_slice_count", "cache_shape", "cache_spacing", "cache_path",
    "config_hash", "from_cache", "seconds",
]
_UID = re.compile(r"\b\d+(?:\.\d+){4,}\b")  # DICOM UIDs: dotted digit strings


def redact(text: str, roots: list[Path] | None = None) -> str:
    """Mask UIDs and make absolute paths relative to ``roots`` in a message."""
    for root in roots or []:
        text = text.replace(str(Path(root).resolve()) + "/", "").replace(str(root).rstrip("/") + "/", "")
    return _UID.sub("<uid>", text)


def relative(path: Path | None, root: Path) -> str:
    if path is None:
        return ""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def dims(values, fmt: str = "{:g}") -> str:
    """``(512, 512, 20)`` -> ``512x512x20``."""
    return "x".join(fmt.format(v) for v in values)


def to_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = None
    return df[COLUMNS].sort_values("case_id", kind="stable").reset_index(drop=True)


def write_manifest(df: pd.DataFrame, out_dir: str | Path) -> Path:
    path = Path(out_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".csv.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read ``manifest.csv`` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    return pd.read_csv(path, dtype={"case_id": str, "reason": str, "notes": str}, keep_default_na=False)


def format_summary(df: pd.DataFrame) -> str:
    """A short table of the ok cases and the list of excluded ones with their reasons."""
    ok = df[df["status"] == "ok"]
    excluded = df[df["status"] != "ok"]
    lines = [f"{len(df)} case(s): {len(ok)} ok, {len(excluded)} excluded"
             f" ({int(ok['from_cache'].astype(str).str.lower().isin(['true', '1']).sum())} reused from the cache)"]
    if len(ok):
        table = ok[["case_id", "shape", "spacing", "vendor", "label_voxels", "label_median_hu",
                    "pancreas_slices", "cache_shape"]].copy()
        table["label_median_hu"] = table["label_median_hu"].map(lambda v: f"{float(v):.0f}" if v != "" else "")
        # float() first: a manifest read back from CSV with excluded rows holds "226.0" and "".
        table["label_voxels"] = table["label_voxels"].map(lambda v: f"{int(float(v))}" if v != "" else "")
        lines.append(table.fillna("").to_string(index=False))
    if len(excluded):
        lines.append("excluded:")
        lines += [f"  {r.case_id}: {r.reason}" for r in excluded.itertuples()]
    noted = ok[ok["notes"].astype(str).str.len() > 0] if len(ok) else ok
    if len(noted):
        lines.append("notes:")
        lines += [f"  {r.case_id}: {r.notes}" for r in noted.itertuples()]
    return "\n".join(lines)
