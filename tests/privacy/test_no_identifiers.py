"""No identifier from a source DICOM reaches an exported file or MLflow: prepare -> train -> sample, then grep.

A 3-case phantom cohort is rewritten with fake identifiers (patient name, ids, birth date, address, institution,
department, station, device serial number, operator, accession number, referring physician, study id,
study/series/acquisition/content dates, and new study/series/instance/frame-of-reference UIDs, all recorded).
The TCIA folder names stay (the case id PANCREAS_000N is the folder name and, in TCIA, equals the DICOM
PatientID; the study folder names carry a date and UID digits): they are searched for too.
After training (train_ct, 2 steps, tiny model, sqlite store) and sampling from the MLflow run's logged model
(NIfTI + PNG + DICOM, memorisation check on), what both commands printed (stdout, stderr, progress bars),
every exported file, every MLflow param / tag / metric name /
dataset input / artifact path and artifact byte of every run and logged model, the artifact store folder and
the sqlite file are searched (case-insensitively, gzip members decompressed, PNG text chunks read) for each
recorded value. A positive control checks that the same search finds them in the rewritten cohort and the
local prepare manifest.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import pydicom
import pytest
from mlflow.tracking import MlflowClient
from pydicom.uid import generate_uid

from pancreas_gvae.data.ct.phantom import make_phantom_cohort

FAKE = {
    "PatientName": "Doe^Jane^Fake",
    "PatientID": "FAKEPID12345",
    "PatientBirthDate": "19600101",
    "InstitutionName": "Fake General Hospital",
    "InstitutionAddress": "1 Fakestreet, Faketown",
    "AccessionNumber": "ACC99887766",
    "ReferringPhysicianName": "Fakeref^Doctor^Who",
    "StudyDate": "20130527",
    "SeriesDate": "20130527",
    "AcquisitionDate": "20130527",
    "ContentDate": "20130527",
    "StudyID": "FAKESTUDY42",
    "OtherPatientIDs": "FAKEOTHER777",
    "PatientAddress": "2 Fakelane, Faketown",
    "StationName": "FAKESTATION01",
    "DeviceSerialNumber": "FAKESN998877",
    "OperatorsName": "Fakeop^Olivia",
    "InstitutionalDepartmentName": "Fake Radiology Dept",
}
# other spellings a tool might turn the values into
VARIANTS = ["Doe, Jane", "Jane Doe", "Doe Jane", "Fakeref", "1960-01-01", "01-01-1960", "01.01.1960",
            "2013-05-27", "05-27-2013", "27.05.2013", "Fake General", "Fakestreet", "Fakelane", "Fakeop"]

TINY = ["--batch-size", "8", "--set", "model.channels=[8,16,32]", "--set", "model.latent_dim=8",
        "--set", "train.log_every=1", "--set", "train.sample_every=2", "--set", "train.checkpoint_every=2",
        "--set", "data.nifti_samples=2",
        "--set", "data.monitor={n_samples: 16, n_real: 32, segmenter_steps: 3}", "--set", "train.num_samples=4", "--set", "tracking.system_metrics=false"]


def _rewrite_with_fake_identifiers(cohort: Path) -> list[str]:
    """Put fake identifiers and new UIDs into every DICOM file; return every value a leak would show."""
    needles = list(FAKE.values()) + VARIANTS
    series_dirs = sorted({p.parent for p in cohort.rglob("*.dcm")})
    for series_dir in series_dirs:
        study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
        for path in sorted(series_dir.glob("*.dcm")):
            ds = pydicom.dcmread(path)
            needles += [ds.PatientID, str(ds.PatientName), ds.StudyInstanceUID, ds.SeriesInstanceUID,
                        ds.SOPInstanceUID, ds.FrameOfReferenceUID]  # the originals too
            for key, value in FAKE.items():
                setattr(ds, key, value)
            sop = generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
            needles += [sop]
            ds.save_as(path, enforce_file_format=True)
        needles += [study_uid, series_uid, frame_uid]
        # folder names: case id (PANCREAS_0001), NBIA study folder (date, case, UID digits), series folder
        rel = series_dir.relative_to(cohort / "Pancreas-CT").parts
        needles += list(rel) + [rel[0].replace("_", "")]
    return sorted(set(n for n in needles if n))


def _texts(path: Path) -> list[bytes]:
    """The bytes of a file as stored, decompressed where gzip, plus PNG text chunks (zTXt / iTXt inflated)."""
    raw = path.read_bytes()
    out = [raw]
    if raw[:2] == b"\x1f\x8b":
        out.append(gzip.decompress(raw))
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        pos = 8
        while pos + 8 <= len(raw):
            length = int.from_bytes(raw[pos:pos + 4], "big")
            kind, data = raw[pos + 4:pos + 8], raw[pos + 8:pos + 8 + length]
            if kind in (b"tEXt", b"zTXt", b"iTXt"):
                out.append(data)
                if kind == b"zTXt":
                    out.append(zlib.decompress(data.split(b"\0", 1)[1][1:]))
                if kind == b"iTXt":
                    key, rest = data.split(b"\0", 1)
                    if rest[:1] == b"\1":
                        out.append(zlib.decompress(rest.split(b"\0", 3)[-1]))
            pos += 12 + length
    return out


def _find(needles: list[str], blobs: dict[str, list[bytes]]) -> list[str]:
    lowered = [(n, n.lower().encode()) for n in needles]
    hits = []
    for where, parts in blobs.items():
        for part in parts:
            low = part.lower()
            hits += [f"{n!r} in {where}" for n, b in lowered if b in low]
    return sorted(set(hits))


def _files(root: Path) -> dict[str, list[bytes]]:
    return {str(p): _texts(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _mlflow_blobs(uri: str, dst: Path) -> dict[str, list[bytes]]:
    """Everything MLflow holds about every run and logged model, as text or downloaded bytes."""
    client = MlflowClient(uri)
    blobs: dict[str, list[bytes]] = {}
    experiments = client.search_experiments()
    for exp in experiments:
        blobs[f"experiment {exp.experiment_id}"] = [json.dumps([exp.name, exp.tags]).encode()]
        for run in client.search_runs([exp.experiment_id]):
            rid = run.info.run_id
            meta = {"name": run.info.run_name, "params": run.data.params, "tags": run.data.tags,
                    "metric_names": sorted(run.data.metrics)}
            for key in run.data.metrics:
                meta.setdefault("history", []).append([m.step for m in client.get_metric_history(rid, key)])
            for ds_input in run.inputs.dataset_inputs:
                d = ds_input.dataset
                meta.setdefault("datasets", []).append([d.name, d.digest, d.source_type, d.source, d.schema, d.profile,
                                                        [(t.key, t.value) for t in ds_input.tags]])
            paths, stack = [], [""]
            while stack:
                for info in client.list_artifacts(rid, stack.pop() or None):
                    paths.append(info.path)
                    if info.is_dir:
                        stack.append(info.path)
            meta["artifact_paths"] = paths
            blobs[f"run {rid} metadata"] = [json.dumps(meta, default=str).encode()]
            local = Path(client.download_artifacts(rid, "", str(dst / rid)))
            blobs.update({f"run {rid} artifact {k}": v for k, v in _files(local).items()})
        import mlflow.artifacts

        for model in client.search_logged_models([exp.experiment_id]):
            blobs[f"model {model.model_id} metadata"] = [json.dumps(model.to_dictionary(), default=str).encode()]
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location,
                                                             dst_path=str(dst / model.model_id)))
            blobs.update({f"model {model.model_id} artifact {k}": v for k, v in _files(local).items()})
    assert sum(k.startswith("run ") and "artifact" in k for k in blobs) > 10, "artifacts were downloaded"
    return blobs


@pytest.mark.slow
def test_no_source_identifier_reaches_exports_or_mlflow(tmp_path, monkeypatch, capfd):
    from pancreas_gvae.pipelines import sample, train_ct

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands in tmp_path
    cohort = tmp_path / "cohort"
    make_phantom_cohort(cohort, cases=3, size=64, seed=0)
    needles = _rewrite_with_fake_identifiers(cohort)
    assert {"PANCREAS_0001", "FAKEPID12345", "Doe^Jane^Fake"} <= set(needles) and len(needles) > 100
    probe = pydicom.dcmread(next(cohort.rglob("*.dcm")))
    assert probe.PatientID == "FAKEPID12345" and probe.InstitutionName == "Fake General Hospital"

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train_out = tmp_path / "train"
    assert train_ct.main(["--data-root", str(cohort), "--out", str(train_out), "--tracking-uri", uri,
                          "--steps", "2", *TINY]) == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("pancreas-gvae-ct")
    (train_run,) = client.search_runs([exp.experiment_id])

    export = tmp_path / "export"
    assert sample.main(["--run-id", train_run.info.run_id, "--tracking-uri", uri, "--n", "6",
                        "--format", "nifti,png,dicom", "--out", str(export), "--seed", "1",
                        "--memorisation-check", "--prepared", str(train_out / "prepared")]) == 0
    summary = json.loads((export / "summary.json").read_text())
    assert summary["exported"] >= 1 and summary["memorisation"]["training_cases"] == 3
    assert len(list((export / "dicom").glob("*.dcm"))) == 2 * summary["exported"]
    assert len(list((export / "nifti").glob("*.nii.gz"))) == 2 * summary["exported"]
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and any(r.data.tags.get("source_run_id") == train_run.info.run_id for r in runs)

    # positive controls: the search finds the values where they are
    assert any("FAKEPID12345" in h for h in _find(needles, _files(cohort / "Pancreas-CT" / "PANCREAS_0001")))
    assert any("PANCREAS_0001" in h for h in _find(needles, _files(train_out / "prepared")))

    console = capfd.readouterr()  # what both commands printed: a log the operator may paste anywhere
    assert "prepared 3 case(s)" in console.out
    blobs = {**_files(export), **_mlflow_blobs(uri, tmp_path / "downloads"),
             "console stdout": [console.out.encode()], "console stderr": [console.err.encode()]}
    blobs.update({f"store {k}": v for k, v in _files(tmp_path / "mlruns").items()})
    blobs[f"sqlite {tmp_path / 'mlflow.db'}"] = [(tmp_path / "mlflow.db").read_bytes()]
    hits = _find(needles, blobs)
    assert not hits, "source identifiers leaked:\n" + "\n".join(hits[:40])
