"""The manifest: one row per case, ``ok`` or ``excluded`` with a reason (columns in docs/data.md).

Nothing patient-identifying goes in: case ids are TCIA's de-identified ids, MSD file names, folder names or
the patient key of a 2D slice set (``source_slices`` names its slices; neither is a shareable column); source paths stop at the case folder (NBIA study/series folder names carry dates and UIDs); any
UID-like string in a message is masked.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
from pathlib import Path

import pandas as pd

from pancreas_gvae.atomic import write_csv

MANIFEST_NAME = "manifest.csv"
COLUMNS = [
    "case_id", "layout", "status", "reason", "notes", "has_label", "input_intensity", "image_path", "label_path",
    "shape", "spacing", "slice_thickness", "slice_interval", "n_slices", "source_slices", "vendor",
    "hu_min", "hu_max", "label_voxels", "label_median_hu", "label_air_fraction", "label_fat_fraction",
    "pancreas_slices", "pancreas_slice_count", "cache_shape", "cache_spacing", "cache_path",
    "config_hash", "from_cache", "seconds",
]
_UID = re.compile(r"\b\d+(?:\.\d+){4,}\b")  # DICOM UIDs: dotted digit strings
# An absolute path of two or more parts (not part of a word, a number or a relative path): keep its last part.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/-])/(?:[^/\s'\"():,;]+/)+([^/\s'\"():,;]+)")


def redact(text: str, roots: list[Path] | None = None) -> str:
    """Mask UIDs and make absolute paths relative to ``roots`` in a message; any other absolute path (a labels
    folder elsewhere, a library's source file) is cut to its last part."""
    for root in roots or []:
        if root is None:
            continue
        text = text.replace(str(Path(root).resolve()) + "/", "").replace(str(root).rstrip("/") + "/", "")
    return _UID.sub("<uid>", _ABSOLUTE_PATH.sub(r"\1", text))


@contextlib.contextmanager
def redacted_stderr(roots: list[Path] | None = None, prefix: str = ""):
    """Collect what is written to file descriptor 2 inside the block (ITK/GDCM/OpenJPEG messages from C,
    Python warnings, log lines) and write it out afterwards through :func:`redact`, each line after ``prefix``.

    Third-party readers print file paths and decoder messages straight to stderr; this keeps the messages
    and drops the absolute paths and UIDs.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (embedded interpreter): nothing to redirect
        yield
        return
    # Python's sys.stderr is redirected as well: it is not always file descriptor 2 (a test's capture, an IDE).
    collected = []
    try:
        with tempfile.TemporaryFile() as sink, contextlib.redirect_stderr(io.StringIO()) as python_side:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                collected.append(sink.read().decode("utf-8", errors="replace") + python_side.getvalue())
    finally:  # after the block, with sys.stderr restored
        text = "".join(collected)
        if text.strip():
            lines = [prefix + line for line in redact(text, roots).splitlines() if line.strip()]
            sys.stderr.write("\n".join(lines) + "\n")
            sys.stderr.flush()


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
    """Write ``manifest.csv`` through a temporary file unique to this process (then renamed: never half-written)."""
    return write_csv(df, Path(out_dir) / MANIFEST_NAME)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read ``manifest.csv`` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    return pd.read_csv(path, dtype={"case_id": str, "reason": str, "notes": str, "source_slices": str},
                       keep_default_na=False)


def _is_true(values: pd.Series) -> pd.Series:
    """True/False in a fresh manifest, "True"/"False" (or blank) in one read back from CSV."""
    return values.astype(str).str.lower().isin(["true", "1", "1.0"])


def _number(value, fmt: str) -> str:
    """A number for the summary table; blank for "", None or NaN (excluded rows, image-only cases)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return ""
    return "" if v != v else fmt.format(v)


def format_summary(df: pd.DataFrame) -> str:
    """A short table of the ok cases and the list of excluded ones with their reasons."""
    ok = df[df["status"] == "ok"]
    excluded = df[df["status"] != "ok"]
    unlabelled = int((~_is_true(ok["has_label"]) & (ok["has_label"].astype(str) != "")).sum()) if len(ok) else 0
    lines = [f"{len(df)} case(s): {len(ok)} ok, {len(excluded)} excluded"
             f" ({int(_is_true(ok['from_cache']).sum())} reused from the cache"
             + (f"; {unlabelled} image-only, without a label)" if unlabelled else ")")]
    if len(ok):
        table = ok[["case_id", "shape", "spacing", "vendor", "label_voxels", "label_median_hu",
                    "pancreas_slices", "cache_shape"]].copy()
        table["label_median_hu"] = table["label_median_hu"].map(lambda v: _number(v, "{:.0f}"))
        # float() first: a manifest read back from CSV with excluded rows holds "226.0" and "".
        table["label_voxels"] = table["label_voxels"].map(lambda v: _number(v, "{:.0f}"))
        lines.append(table.fillna("").to_string(index=False))
    if len(excluded):
        lines.append("excluded:")
        lines += [f"  {r.case_id}: {r.reason}" for r in excluded.itertuples()]
    noted = ok[ok["notes"].astype(str).str.len() > 0] if len(ok) else ok
    if len(noted):
        lines.append("notes:")
        lines += [f"  {r.case_id}: {r.notes}" for r in noted.itertuples()]
    return "\n".join(lines)
