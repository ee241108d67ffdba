"""Download a TCIA collection (Pancreas-CT by default) through the public NBIA REST API v1.

Only the standard library is used. The collection is listed with
``{base}/getSeries?Collection=...&format=json`` and each CT series fetched as a zip from
``{base}/getImage?SeriesInstanceUID=...``. What lands on disk::

    OUT/Pancreas-CT/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/*.dcm   (+ a .complete marker)
    OUT/series.csv    PatientID, StudyInstanceUID, SeriesInstanceUID, ImageCount, Path

Privacy: TCIA PatientIDs (``PANCREAS_0001``) and UIDs are the collection's already de-identified
identifiers; no other DICOM field is read or written.

Robustness: the zip goes to a temporary file that is renamed when complete; it is checked
(``ZipFile.testzip`` and the number of ``.dcm`` files against ``ImageCount``) before extraction into a
temporary folder, which is renamed into place before the ``.complete`` marker is written. A series with
the marker is skipped, so an interrupted run resumes. A bad download is retried, then reported by series
and patient while the other series go on. In Pancreas-CT, PANCREAS_0025 and PANCREAS_0070 (the scan of
PANCREAS_0002 cropped differently; removed in version 2 of the collection) are skipped unless asked for.
"""

from __future__ import annotations

import csv
import http.client
import json
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from tqdm import tqdm

from pancreas_gvae.errors import PipelineError

DEFAULT_BASE_URL = "https://services.cancerimagingarchive.net/nbia-api/services/v1"
DEFAULT_COLLECTION = "Pancreas-CT"
DUPLICATE_CASES = {"Pancreas-CT": {"PANCREAS_0025": "PANCREAS_0002", "PANCREAS_0070": "PANCREAS_0002"}}
COMPLETE_MARKER = ".complete"
SERIES_TABLE = "series.csv"
_TABLE_FIELDS = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "ImageCount", "Path"]
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class SeriesInfo:
    """One series as listed by ``getSeries`` (only the fields this module uses)."""

    patient_id: str
    study_uid: str
    series_uid: str
    modality: str
    image_count: int | None = None
    description: str = ""

    def folder(self, out_dir: Path, collection: str) -> Path:
        return out_dir / collection / self.patient_id / self.study_uid / self.series_uid


@dataclass
class DownloadReport:
    downloaded: list[SeriesInfo] = field(default_factory=list)
    skipped: list[SeriesInfo] = field(default_factory=list)  # already complete on disk
    failed: list[tuple[SeriesInfo, str]] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)  # notices: duplicates, non-CT series

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        lines = [f"downloaded {len(self.downloaded)}, skipped {len(self.skipped)} (already complete), "
                 f"failed {len(self.failed)}"]
        lines += [f"  FAILED {s.series_uid} ({s.patient_id}): {reason}" for s, reason in self.failed]
        return "\n".join(lines)


def _open(url: str, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": "pancreas-gvae"})
    return urllib.request.urlopen(request, timeout=timeout)


def _series_from_json(item: dict) -> SeriesInfo:
    count = item.get("ImageCount")
    try:
        count = int(count) if count not in (None, "") else None
    except (TypeError, ValueError):
        count = None
    return SeriesInfo(patient_id=str(item.get("PatientID", "")), study_uid=str(item.get("StudyInstanceUID", "")),
                      series_uid=str(item.get("SeriesInstanceUID", "")), modality=str(item.get("Modality", "")),
                      image_count=count, description=str(item.get("SeriesDescription", "")))


def list_series(collection: str = DEFAULT_COLLECTION, *, base_url: str = DEFAULT_BASE_URL,
                timeout: float = 60.0) -> list[SeriesInfo]:
    """All series of ``collection`` as listed by ``getSeries``; unreachable service -> PipelineError."""
    url = f"{base_url.rstrip('/')}/getSeries?" + urllib.parse.urlencode({"Collection": collection, "format": "json"})
    try:
        with _open(url, timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as err:
        raise PipelineError(f"TCIA service at {url} answered HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, socket.timeout, OSError) as err:
        reason = getattr(err, "reason", err)
        raise PipelineError(f"cannot reach the TCIA service at {url}: {reason}") from None
    try:
        items = json.loads(body.decode("utf-8")) if body.strip() else []
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PipelineError(f"TCIA service at {url} did not return JSON: {err}") from None
    if not isinstance(items, list):
        raise PipelineError(f"TCIA service at {url} returned {type(items).__name__}, expected a list of series")
    series = [_series_from_json(item) for item in items if isinstance(item, dict)]
    for s in series:  # the IDs become folder names: refuse anything that could escape OUT
        if not (_SAFE_NAME.match(s.patient_id) and _UID.match(s.study_uid) and _UID.match(s.series_uid)):
            raise PipelineError(f"TCIA service at {url} listed a series with unusable IDs: "
                                f"patient {s.patient_id!r}, study {s.study_uid!r}, series {s.series_uid!r}")
    return series


def _fetch_zip(url: str, dest: Path, timeout: float) -> None:
    """Stream ``url`` into ``dest`` through a temporary file renamed at the end."""
    part = dest.with_name(dest.name + ".part")
    try:
        with _open(url, timeout) as response, open(part, "wb") as fh:
            shutil.copyfileobj(response, fh, _CHUNK)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def _check_zip(path: Path, expected: int | None) -> list[zipfile.ZipInfo]:
    """The ``.dcm`` members of a sound zip; raises ValueError naming the problem otherwise."""
    try:
        with zipfile.ZipFile(path) as zf:
            try:
                bad = zf.testzip()
            except (zlib.error, EOFError) as err:  # damaged deflate data escapes testzip's own check
                raise ValueError(f"corrupt data in the zip ({err})") from None
            if bad is not None:
                raise ValueError(f"corrupt member {bad!r} in the zip")
            members = [m for m in zf.infolist() if not m.is_dir() and m.filename.lower().endswith(".dcm")]
    except zipfile.BadZipFile as err:
        raise ValueError(f"not a valid zip ({err})") from None
    if not members:
        raise ValueError("the zip holds no .dcm files")
    if expected is not None and len(members) != expected:
        raise ValueError(f"the zip holds {len(members)} .dcm files, ImageCount says {expected}")
    names = [Path(m.filename).name for m in members]
    if len(set(names)) != len(names):
        raise ValueError("the zip holds .dcm files with the same name in different folders")
    return members


def _extract(path: Path, members: list[zipfile.ZipInfo], dest: Path) -> None:
    """Extract flat (base names only, so no member can write outside ``dest``)."""
    dest.mkdir(parents=True)
    with zipfile.ZipFile(path) as zf:
        for m in members:
            with zf.open(m) as src, open(dest / Path(m.filename).name, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)


def download_series(series: SeriesInfo, series_dir: Path, *, base_url: str = DEFAULT_BASE_URL,
                    attempts: int = 3, timeout: float = 300.0, retry_delay: float = 2.0) -> int:
    """Fetch, verify and extract one series into ``series_dir``; returns its file count.

    Raises RuntimeError with the last reason once ``attempts`` downloads have failed.
    """
    url = f"{base_url.rstrip('/')}/getImage?" + urllib.parse.urlencode({"SeriesInstanceUID": series.series_uid})
    series_dir.parent.mkdir(parents=True, exist_ok=True)
    zip_path = series_dir.parent / f".{series.series_uid}.zip"
    staging = series_dir.parent / f".{series.series_uid}.extract"
    reason = "no attempt made"
    for attempt in range(1, max(1, attempts) + 1):
        shutil.rmtree(staging, ignore_errors=True)
        try:
            _fetch_zip(url, zip_path, timeout)
            members = _check_zip(zip_path, series.image_count)
            _extract(zip_path, members, staging)
            if series_dir.exists():  # an earlier, incomplete attempt
                shutil.rmtree(series_dir)
            os.replace(staging, series_dir)
            (series_dir / COMPLETE_MARKER).write_text(f"{len(members)}\n")
            return len(members)
        except urllib.error.HTTPError as err:
            reason = f"HTTP {err.code} {err.reason}"
        except (urllib.error.URLError, socket.timeout, ConnectionError, http.client.HTTPException) as err:
            reason = f"network error: {getattr(err, 'reason', err)}"
        except ValueError as err:
            reason = str(err)
        finally:
            zip_path.unlink(missing_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
        if attempt < attempts and retry_delay > 0:
            time.sleep(retry_delay * attempt)
    raise RuntimeError(f"{reason} (after {max(1, attempts)} attempts)")


def is_complete(series_dir: Path) -> bool:
    return (series_dir / COMPLETE_MARKER).is_file()


def _read_table(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {row["SeriesInstanceUID"]: row for row in csv.DictReader(fh) if row.get("SeriesInstanceUID")}


def write_series_table(out_dir: Path, collection: str, series: Iterable[SeriesInfo]) -> Path:
    """Merge complete series into ``OUT/series.csv`` (rows of series no longer complete are dropped)."""
    path = out_dir / SERIES_TABLE
    rows = _read_table(path)
    for s in series:
        folder = s.folder(out_dir, collection)
        count = sum(1 for p in folder.iterdir() if p.suffix.lower() == ".dcm")
        rows[s.series_uid] = {"PatientID": s.patient_id, "StudyInstanceUID": s.study_uid,
                              "SeriesInstanceUID": s.series_uid, "ImageCount": str(count),
                              "Path": folder.relative_to(out_dir).as_posix()}
    keep = [r for r in rows.values() if r.get("Path") and is_complete(out_dir / r["Path"])]
    keep.sort(key=lambda r: (r["PatientID"], r["StudyInstanceUID"], r["SeriesInstanceUID"]))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_TABLE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(keep)
    os.replace(tmp, path)
    return path


def download_collection(out_dir: str | Path, *, collection: str = DEFAULT_COLLECTION,
                        base_url: str = DEFAULT_BASE_URL, patients: Iterable[str] | None = None,
                        include_duplicates: bool = False, attempts: int = 3, timeout: float = 300.0,
                        retry_delay: float = 2.0, progress: bool = True,
                        log: Callable[[str], None] = print) -> DownloadReport:
    """Download every CT series of ``collection`` (or of ``patients``) into the NBIA layout under ``out_dir``."""
    out_dir = Path(out_dir)
    if attempts < 1:
        raise PipelineError(f"attempts must be at least 1, got {attempts}")
    report = DownloadReport()
    series = list_series(collection, base_url=base_url, timeout=min(timeout, 120.0))
    if not series:
        raise PipelineError(f"TCIA lists no series for collection {collection!r} at {base_url}")

    if patients is not None:
        wanted = {p.strip() for p in patients if p.strip()}
        missing = sorted(wanted - {s.patient_id for s in series})
        if missing:
            raise PipelineError(f"not in collection {collection}: {', '.join(missing)}")
        series = [s for s in series if s.patient_id in wanted]

    duplicates = DUPLICATE_CASES.get(collection, {})
    if not include_duplicates:
        for pid in sorted({s.patient_id for s in series} & duplicates.keys()):
            note = (f"skipping {pid}: the same scan as {duplicates[pid]} cropped differently, removed in version 2 "
                    f"of {collection} (use --include-duplicates to keep it)")
            report.excluded.append(note)
            log(note)
        series = [s for s in series if s.patient_id not in duplicates]

    non_ct = [s for s in series if s.modality.upper() != "CT"]
    for s in non_ct:
        report.excluded.append(f"not CT ({s.modality or 'no modality'}): {s.series_uid} ({s.patient_id})")
    if non_ct:
        log(f"ignoring {len(non_ct)} series that are not CT")
    series = [s for s in series if s.modality.upper() == "CT"]
    n_patients = len({s.patient_id for s in series})
    log(f"{collection}: {len(series)} CT series of {n_patients} patients to fetch into {out_dir / collection}")

    out_dir.mkdir(parents=True, exist_ok=True)
    for s in tqdm(series, desc="series", unit="series", disable=not progress):
        folder = s.folder(out_dir, collection)
        if is_complete(folder):
            report.skipped.append(s)
            continue
        try:
            download_series(s, folder, base_url=base_url, attempts=attempts, timeout=timeout,
                            retry_delay=retry_delay)
            report.downloaded.append(s)
        except RuntimeError as err:
            report.failed.append((s, str(err)))
        except OSError as err:  # the local disk, not the network: nothing later will fare better
            raise PipelineError(f"cannot write series {s.series_uid} ({s.patient_id}) under {folder}: {err}") from None
    write_series_table(out_dir, collection, report.downloaded + report.skipped)
    return report
