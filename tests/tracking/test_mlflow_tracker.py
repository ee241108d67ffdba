import contextlib
import socket

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pancreas_gvae.tracking import MlflowTracker
from pancreas_gvae.tracking.mlflow_tracker import ends_by_outcome


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_falls_back_to_local_sqlite(tmp_path):
    dead = f"http://127.0.0.1:{_free_port()}"
    with pytest.warns(UserWarning, match="cannot be reached"):
        tracker = MlflowTracker(tracking_uri=dead, experiment="e", run_name="r", fallback_dir=tmp_path)
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.end()
    assert tracker.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    run = MlflowClient(tracker.tracking_uri).get_run(tracker.run_id)
    assert run.data.metrics["loss"] == 1.0 and run.info.status == "FINISHED"


def test_server_lost_mid_run_switches_to_local_store_and_keeps_logging(tmp_path):
    remote_db = tmp_path / "remote"
    remote_db.mkdir()
    tracker = MlflowTracker(tracking_uri=f"sqlite:///{remote_db / 'mlflow.db'}", experiment="e", run_name="r",
                            fallback_dir=tmp_path)
    tracker.log_config({"train": {"steps": 3}})
    first = tracker.run_id
    tracker.tracking_uri = "http://pretend-remote:5000"  # as if this run lived on a server
    calls = {"n": 0}
    real = mlflow.log_metrics

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("server went away")
        return real(*args, **kwargs)

    mlflow.log_metrics = flaky
    try:
        with pytest.warns(UserWarning, match="cannot be reached"):
            tracker.log_metrics({"loss": 2.0}, step=2)
    finally:
        mlflow.log_metrics = real
    tracker.end()
    assert tracker.run_id != first
    run = MlflowClient(tracker.fallback_uri).get_run(tracker.run_id)
    assert run.data.metrics["loss"] == 2.0
    assert run.data.params["train.steps"] == "3", "the config is logged again in the fallback run"
    assert run.data.tags["replaces_run"] == first


@pytest.mark.parametrize("raised, status", [(None, "FINISHED"), (KeyboardInterrupt, "KILLED"),
                                            (ValueError, "FAILED")])
def test_a_parent_run_ends_by_how_its_block_ends(tmp_path, raised, status):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    with pytest.raises(raised) if raised else contextlib.nullcontext():
        with ends_by_outcome(client, run_id):
            if raised:
                raise raised
    assert client.get_run(run_id).info.status == status
