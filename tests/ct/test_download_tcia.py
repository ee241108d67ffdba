"""The TCIA downloader against a canned NBIA API on 127.0.0.1: layout, duplicates, corrupt zips, resume."""

from __future__ import annotations

import csv
import io
import json
import socket
import threading
import urllib.parse
import zipfile
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pancreas_gvae.data.ct.tcia import COMPLETE_MARKER, list_series
from pancreas_gvae.errors import PipelineError
from pancreas_gvae.pipelines.download_tcia import main

STUDY = {p: generate_uid(entropy_srcs=["study", p]) for p in ("PANCREAS_0001", "PANCREAS_0002", "PANCREAS_0025")}
A, B, C, D, SEG = (generate_uid(entropy_srcs=["series", n]) for n in "ABCDS")
# A, B: good CT series; C: corrupt for its first 3 downloads; D: belongs to the duplicate PANCREAS_0025.
LISTING = [
    {"PatientID": "PANCREAS_0001", "StudyInstanceUID": STUDY["PANCREAS_0001"], "SeriesInstanceUID": A,
     "Modality": "CT", "SeriesDescription": "Pancreas", "ImageCount": 3},
    {"PatientID": "PANCREAS_0001", "StudyInstanceUID": STUDY["PANCREAS_0001"], "SeriesInstanceUID": SEG,
     "Modality": "SEG", "SeriesDescription": "Segmentation", "ImageCount": 1},
    {"PatientID": "PANCREAS_0002", "StudyInstanceUID": STUDY["PANCREAS_0002"], "SeriesInstanceUID": B,
     "Modality": "CT", "SeriesDescription": "Pancreas", "ImageCount": "2"},
    {"PatientID": "PANCREAS_0002", "StudyInstanceUID": STUDY["PANCREAS_0002"], "SeriesInstanceUID": C,
     "Modality": "CT", "SeriesDescription": "Pancreas", "ImageCount": 2},
    {"PatientID": "PANCREAS_0025", "StudyInstanceUID": STUDY["PANCREAS_0025"], "SeriesInstanceUID": D,
     "Modality": "CT", "SeriesDescription": "Pancreas", "ImageCount": 2},
]


def _dicom_bytes(series_uid: str, instance: int) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid = generate_uid(entropy_srcs=[series_uid, str(instance)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = CTImageStorage, uid, series_uid
    ds.Modality, ds.InstanceNumber = "CT", instance
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.full((4, 4), 1000 + instance, dtype="<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _zip(series_uid: str, n: int, *, corrupt: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for k in range(1, n + 1):
            zf.writestr(f"{series_uid}/1-{k:03d}.dcm", _dicom_bytes(series_uid, k))
        zf.writestr("LICENSE", "CC BY 3.0")
    data = bytearray(buf.getvalue())
    if corrupt:  # flip bytes inside the first member's compressed data: testzip() finds the damage
        first = zipfile.ZipFile(io.BytesIO(bytes(data))).infolist()[0]
        start = first.header_offset + 30 + len(first.filename.encode()) + len(first.extra) + 20
        data[start:start + 10] = bytes(b ^ 0xFF for b in data[start:start + 10])
    return bytes(data)


class _Api:
    """The canned NBIA service; counts getImage hits per series."""

    def __init__(self):
        self.hits: Counter[str] = Counter()
        self.zips = {A: _zip(A, 3), B: _zip(B, 2), C: _zip(C, 2), D: _zip(D, 2)}
        self.bad_c = _zip(C, 2, corrupt=True)
        self.corrupt_c_hits = 3
        self.lock = threading.Lock()

    def handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                url = urllib.parse.urlparse(self.path)
                query = urllib.parse.parse_qs(url.query)
                if url.path.endswith("/getSeries") and query.get("Collection") == ["Pancreas-CT"]:
                    return self._send(json.dumps(LISTING).encode(), "application/json")
                if url.path.endswith("/getImage") and query.get("SeriesInstanceUID", [""])[0] in api.zips:
                    uid = query["SeriesInstanceUID"][0]
                    with api.lock:
                        api.hits[uid] += 1
                        bad = uid == C and api.hits[uid] <= api.corrupt_c_hits
                    return self._send(api.bad_c if bad else api.zips[uid], "application/zip")
                self.send_error(404)

            def _send(self, body: bytes, ctype: str):
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


@pytest.fixture
def api(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    state = _Api()
    server = ThreadingHTTPServer(("127.0.0.1", 0), state.handler())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}/nbia-api/services/v1"
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _run(api, out, *extra) -> int:
    return main(["--out", str(out), "--base-url", api.base_url, "--retry-delay", "0", "--timeout", "10",
                 "--no-progress", *extra])


def _table(out) -> list[dict[str, str]]:
    with open(out / "series.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_download_report_and_resume(api, tmp_path, capsys):
    out = tmp_path / "tcia"
    # Run 1: A and B arrive, C stays corrupt through all 3 attempts, PANCREAS_0025 and SEG are never fetched.
    assert _run(api, out) == 1
    text = capsys.readouterr().out
    assert "skipping PANCREAS_0025" in text and "PANCREAS_0002" in text
    assert "downloaded 2, skipped 0 (already complete), failed 1" in text
    assert f"FAILED {C} (PANCREAS_0002): corrupt" in text
    assert api.hits == {A: 1, B: 1, C: 3}
    series_a = out / "Pancreas-CT" / "PANCREAS_0001" / STUDY["PANCREAS_0001"] / A
    assert sorted(p.name for p in series_a.glob("*.dcm")) == ["1-001.dcm", "1-002.dcm", "1-003.dcm"]
    assert (series_a / COMPLETE_MARKER).is_file() and not (series_a / "LICENSE").exists()
    assert pydicom.dcmread(series_a / "1-002.dcm").InstanceNumber == 2
    assert not (out / "Pancreas-CT" / "PANCREAS_0025").exists()
    assert not (out / "Pancreas-CT" / "PANCREAS_0002" / STUDY["PANCREAS_0002"] / C).exists()
    leftovers = [p.name for p in out.rglob(".*") if p.name != COMPLETE_MARKER]
    assert leftovers == []  # no temporary zip or extraction folder left behind
    rows = _table(out)
    assert [(r["PatientID"], r["SeriesInstanceUID"], r["ImageCount"]) for r in rows] == sorted(
        [("PANCREAS_0001", A, "3"), ("PANCREAS_0002", B, "2")])
    assert set(rows[0]) == {"PatientID", "StudyInstanceUID", "SeriesInstanceUID", "ImageCount", "Path"}

    # Run 2: A and B are skipped, C now downloads cleanly at its first new attempt.
    assert _run(api, out) == 0
    assert "downloaded 1, skipped 2 (already complete), failed 0" in capsys.readouterr().out
    assert api.hits == {A: 1, B: 1, C: 4}
    assert len(_table(out)) == 3

    # Run 3: nothing to do, no image requests at all.
    assert _run(api, out) == 0
    assert "downloaded 0, skipped 3 (already complete), failed 0" in capsys.readouterr().out
    assert api.hits == {A: 1, B: 1, C: 4}

    # A series folder without its marker (interrupted extraction) is fetched again.
    (series_a / COMPLETE_MARKER).unlink()
    (series_a / "1-003.dcm").unlink()
    assert _run(api, out, "--patients", "PANCREAS_0001") == 0
    assert api.hits[A] == 2 and len(list(series_a.glob("*.dcm"))) == 3
    assert len(_table(out)) == 3  # rows of other patients are kept


def test_include_duplicates_and_patient_filter(api, tmp_path, capsys):
    out = tmp_path / "tcia"
    assert _run(api, out, "--patients", "PANCREAS_0025,PANCREAS_0001", "--include-duplicates") == 0
    assert api.hits == {A: 1, D: 1}
    assert "skipping" not in capsys.readouterr().out
    assert _run(api, out, "--patients", "PANCREAS_9999") == 2
    assert "PANCREAS_9999" in capsys.readouterr().err


def test_image_count_mismatch_is_a_failure(api, tmp_path, capsys):
    api.zips[B] = _zip(B, 1)  # the listing says 2
    assert _run(api, tmp_path, "--patients", "PANCREAS_0002", "--attempts", "2") == 1
    assert "holds 1 .dcm files, ImageCount says 2" in capsys.readouterr().out
    assert api.hits[B] == 2


def test_unreachable_service_names_the_url(tmp_path, capsys):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/nbia-api/services/v1"
    assert main(["--out", str(tmp_path), "--base-url", url, "--timeout", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the TCIA service") and f"127.0.0.1:{port}" in err
    with pytest.raises(PipelineError, match="cannot reach"):
        list_series(base_url=url, timeout=5)


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--include-duplicates" in capsys.readouterr().out
