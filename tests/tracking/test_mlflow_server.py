"""The CT job against a real MLflow tracking server over HTTP (project issue 7).

A ``mlflow server`` subprocess on 127.0.0.1 (sqlite backend, proxied artifacts in a temporary folder)
receives a short CT run: metrics, sample grids, synthetic NIfTI slices and the EMA generator all travel
over HTTP, and the generator is registered as a model version. The fixture stops the server's whole
process group on teardown, also when the server never came up or the test failed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from pancreas_gvae.config import load_config
from pancreas_gvae.data.ct.config import data_config
from pancreas_gvae.training import ct
from pancreas_gvae.pipelines import train_ct

TINY = ["--set", "data.phantom.cases=3", "--set", "data.phantom.size=64", "--batch-size", "8",
        "--set", "model.channels=[8,16,32]", "--set", "model.latent_dim=8", "--set", "train.log_every=1",
        "--set", "train.sample_every=2", "--set", "train.checkpoint_every=2", "--set", "data.nifti_samples=2",
        "--set", "data.monitor={n_samples: 16, n_real: 32, segmenter_steps: 3}",
        "--set", "train.num_samples=8", "--set", "tracking.system_metrics=false"]
EXPERIMENT = "pancreas-gvae-ct"
MODEL_NAME = "pgvae-test-generator"
# Start-up takes 5-40 s on a loaded 2-core machine (the first start creates the sqlite schema).
STARTUP_TIMEOUT_S = float(os.environ.get("PGVAE_TEST_MLFLOW_STARTUP_S", "120"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    uri: str
    artifacts: Path
    proc: subprocess.Popen
    log: Path

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Poll ``/health`` until it answers 200; fail with the server's log if it exits or times out."""
        deadline = time.monotonic() + timeout
        while not _healthy(self.uri):
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited with code {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer {self.uri}/health within {timeout:.0f} s:\n"
                            f"{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen) -> list[str]:
    """Terminate the server's process group (uvicorn workers included); SIGKILL what is left. Returns survivors."""
    try:
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = [proc.pid]
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)  # start_new_session: the group id is the server's pid
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            if not any(_alive(p) for p in family):
                return []
            time.sleep(0.2)  # the server is gone; its workers are still shutting down
    return [_describe(p) for p in family if _alive(p)]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(pid: int) -> str:
    try:
        return f"{pid}: {' '.join(psutil.Process(pid).cmdline())}"
    except psutil.Error:
        return str(pid)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A started server; call ``wait_ready()`` before using it (so a test can prepare data meanwhile)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = root / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runners
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
           "--serve-artifacts", "--artifacts-destination", str(root / "artifacts")]
    previous_uri = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root, env=env,
                                start_new_session=True)
    try:
        yield Server(f"http://127.0.0.1:{port}", root / "artifacts", proc, log)
    finally:
        survivors = _stop(proc)
        mlflow.set_tracking_uri(previous_uri)  # train_ct points the process-wide URI at the server
        assert not survivors, f"mlflow server processes left behind: {survivors}"


def _prepare_phantom(argv: list[str], out: Path) -> None:
    """What ``train_ct.main(argv)`` does before it contacts MLflow: make and prepare the phantom cohort."""
    args = train_ct.parse_args(argv)
    cfg = load_config(args.config, train_ct._cli_overrides(args))
    ct.ensure_phantom(out / "phantom", cfg.data.get("phantom", {}))
    ct.prepare(out / "phantom", out / "prepared", data_config(cfg), labels=None, layout="auto",
               pancreas_label=None, workers=1)


@pytest.mark.slow
def test_ct_run_over_http_logs_images_nifti_and_a_registered_model(mlflow_server, tmp_path, monkeypatch):
    # The tracker sets these with setdefault for remote stores; keep them from leaking into other tests.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    out = tmp_path / "out"
    argv = ["--out", str(out), "--tracking-uri", mlflow_server.uri, *TINY, "--steps", "2", "--register", MODEL_NAME]
    _prepare_phantom(argv, out)  # while the server starts; train_ct reuses the cache
    mlflow_server.wait_ready()
    assert train_ct.main(argv) == 0, mlflow_server.log_tail()
    assert not (out / "mlflow.db").exists(), "the run fell back to the local store: the server was not used"

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "gvae-ct"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), "artifacts must be proxied by the server"
    assert run.data.params["model.in_channels"] == "2"
    assert [m.step for m in client.get_metric_history(run_id, "loss/g")] == [1, 2]

    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert any("samples+step+2" in p and p.endswith(".png") for p in images), images
    assert any("reconstructions+step+2" in p and p.endswith(".png") for p in images), images
    final = {Path(a.path).name for a in client.list_artifacts(run_id, "final")}
    assert {"samples.png", "reconstructions.png", "synthetic_overlay.png"} <= final
    nifti = sorted(Path(a.path).name for a in client.list_artifacts(run_id, "synthetic_nifti"))
    assert nifti == ["synthetic_0000_image.nii.gz", "synthetic_0000_mask.nii.gz",
                     "synthetic_0001_image.nii.gz", "synthetic_0001_mask.nii.gz"]
    local = Path(client.download_artifacts(run_id, "synthetic_nifti", str(tmp_path / "dl")))
    assert (local / "synthetic_0000_image.nii.gz").stat().st_size > 0
    # uploaded over HTTP into the server's artifact destination, not written by the client
    assert list(mlflow_server.artifacts.rglob("synthetic_0000_mask.nii.gz"))
    assert client.download_artifacts(run_id, "config.yaml", str(tmp_path / "cfg"))

    mlflow.set_tracking_uri(mlflow_server.uri)
    (logged,) = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    assert logged.source_run_id == run_id and logged.name == "generator"
    generator = mlflow.pytorch.load_model(logged.model_uri)
    with torch.no_grad():
        x = generator(torch.randn(3, 8))
    assert x.shape == (3, 2, 64, 64) and torch.isfinite(x).all()

    registered = client.get_registered_model(MODEL_NAME)
    assert registered.name == MODEL_NAME
    (version,) = client.search_model_versions(f"name='{MODEL_NAME}'")
    assert version.version == "1" and version.run_id == run_id and version.status == "READY"
    assert logged.model_id in version.source, "the version points at the run's logged model"
    again = mlflow.pytorch.load_model(f"models:/{MODEL_NAME}/1")
    with torch.no_grad():
        assert again(torch.zeros(1, 8)).shape == (1, 2, 64, 64)
