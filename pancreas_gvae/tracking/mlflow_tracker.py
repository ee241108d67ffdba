"""A small MLflow wrapper for a training run.

MONAI's ``MLFlowHandler`` targets Ignite engines and defaults to a ``./mlruns`` file
store, which MLflow 3.13+ refuses; this loop is plain PyTorch, so it talks to MLflow
directly with ``sqlite:///mlflow.db`` as the default store.

A remote tracking server that cannot be reached, at the start or mid-run, never stops
training: the tracker warns once and continues in a local sqlite store under the
output folder (a new run tagged with the one it replaces). The run left behind on the
server is an *orphan* (still RUNNING there): it is written to ``OUT/mlflow_orphans.json``
and, as soon as its server answers again (at the end of this run or at the start of a
later one in the same OUT), tagged with the run that continued it and ended as KILLED.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.parse
import warnings
from pathlib import Path
from typing import Any, Callable

import mlflow
import numpy as np
import yaml
from mlflow.tracking import MlflowClient

from pancreas_gvae.config import flatten

# Params longer than this are cut by the tracking store; the whole config is also an artifact.
_MAX_PARAM_LEN = 500


@contextlib.contextmanager
def ends_by_outcome(client: MlflowClient, run_id: str):
    """End ``run_id`` when the block exits: FINISHED, KILLED when stopped (Ctrl-C, or SIGTERM as
    ``errors.Terminated``: a stop, not a failure) or FAILED on an error; the exception goes on."""
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(run_id, status=status)


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def redact_uri(uri: str) -> str:
    """The URI without user:password, for tags and messages."""
    parts = urllib.parse.urlsplit(uri)
    if not (parts.username or parts.password):
        return uri  # unchanged (urlunsplit would also drop the slashes of sqlite:////abs/path)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def _reachable(uri: str) -> bool:
    """Is a remote tracking server answering? Local stores (sqlite, file) are always used as given."""
    if not _is_remote(uri):
        return True
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        return True
    except Exception:  # noqa: BLE001 - any failure to talk to the server means: fall back
        return False
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class MlflowTracker:
    def __init__(self, *, tracking_uri: str, experiment: str, run_name: str, fallback_dir: str | Path = ".",
                 resume_run_id: str | None = None, tags: dict[str, str] | None = None,
                 system_metrics: bool = False):
        self.experiment = experiment
        self.run_name = run_name
        self.tags = dict(tags or {})
        self.system_metrics = system_metrics
        self.fallback_uri = f"sqlite:///{Path(fallback_dir).resolve() / 'mlflow.db'}"
        self._orphans_file = Path(fallback_dir) / "mlflow_orphans.json"
        self._config: dict[str, Any] | None = None
        self.settle_orphans()
        orphan = None
        if not _reachable(tracking_uri):
            self._warn(tracking_uri)
            if resume_run_id and self._continuation_in_fallback(resume_run_id) == resume_run_id:
                pass  # an earlier resume fell back already: that local run goes on
            elif resume_run_id:
                # The run to continue lives on the server: link a run in the local store to it.
                self.tags["resumed_from_run"] = resume_run_id
                self.tags["resumed_from_tracking_uri"] = redact_uri(tracking_uri)
                orphan = {"tracking_uri": tracking_uri, "run_id": resume_run_id}
                resume_run_id = self._continuation_in_fallback(resume_run_id)
            tracking_uri = self.fallback_uri
        self._start(tracking_uri, resume_run_id)
        if orphan:
            self._add_orphan(orphan)

    def _start(self, uri: str, resume_run_id: str | None) -> None:
        if _is_remote(uri):
            # MLflow's default retries a dead server for minutes per call; fail fast and fall back instead.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.tracking_uri = uri
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(self.experiment)
        if resume_run_id and not self._run_exists(resume_run_id):
            self.tags.setdefault("resumed_from_run", resume_run_id)  # lives in another store: link it
            resume_run_id = None
        self.run = mlflow.start_run(run_id=resume_run_id, run_name=None if resume_run_id else self.run_name,
                                    tags=self.tags, log_system_metrics=self.system_metrics)
        self.run_id = self.run.info.run_id

    def _warn(self, uri: str) -> None:
        warnings.warn(f"MLflow tracking server {uri} cannot be reached; logging to {self.fallback_uri} instead. "
                      f"Training goes on; view it with: mlflow ui --backend-store-uri {self.fallback_uri}",
                      stacklevel=3)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run one logging call; if a remote server fails, switch to the local store and retry there."""
        try:
            return fn()
        except Exception:
            if not _is_remote(self.tracking_uri):
                raise
            self._warn(self.tracking_uri)
            lost = self.run_id
            try:
                mlflow.end_run(status="FAILED")
            except Exception:  # noqa: BLE001 - the server is gone; nothing more to tell it
                pass
            self.tags["replaces_run"] = lost
            orphan = {"tracking_uri": self.tracking_uri, "run_id": lost}
            self._start(self.fallback_uri, None)
            self._add_orphan(orphan)
            if self._config is not None:
                self._log_config(self._config)
            return fn()

    def _continuation_in_fallback(self, run_id: str) -> str | None:
        """``run_id`` itself if it is in the local store, else a local run that continues it, else None."""
        try:
            client = MlflowClient(tracking_uri=self.fallback_uri)
            try:
                return client.get_run(run_id).info.run_id
            except Exception:  # noqa: BLE001 - not a local run
                pass
            experiment = client.get_experiment_by_name(self.experiment)
            if experiment is None:
                return None
            runs = client.search_runs([experiment.experiment_id], f"tags.resumed_from_run = '{run_id}'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
            return runs[0].info.run_id if runs else None
        except Exception:  # noqa: BLE001 - no usable local store yet: start a new run
            return None

    def _read_orphans(self) -> list[dict[str, str]]:
        try:
            return json.loads(self._orphans_file.read_text())
        except (OSError, ValueError):
            return []

    def _add_orphan(self, orphan: dict[str, str]) -> None:
        orphans = [o for o in self._read_orphans() if o["run_id"] != orphan["run_id"]]
        orphans.append(orphan | {"continued_in_run": self.run_id, "continued_in_tracking_uri": self.tracking_uri})
        self._orphans_file.parent.mkdir(parents=True, exist_ok=True)
        self._orphans_file.write_text(json.dumps(orphans, indent=1))

    def settle_orphans(self) -> None:
        """End runs left RUNNING on a server that was unreachable, once it answers: tag the continuation, KILLED."""
        orphans = self._read_orphans()
        if not orphans:
            return
        left = []
        for orphan in orphans:
            uri = orphan["tracking_uri"]
            try:
                if not _reachable(uri):
                    raise ConnectionError(uri)
                client = MlflowClient(tracking_uri=uri)
                client.set_tag(orphan["run_id"], "continued_in_run", orphan["continued_in_run"])
                client.set_tag(orphan["run_id"], "continued_in_tracking_uri",
                               redact_uri(orphan["continued_in_tracking_uri"]))
                if client.get_run(orphan["run_id"]).info.status == "RUNNING":
                    client.set_terminated(orphan["run_id"], status="KILLED")
            except Exception:  # noqa: BLE001 - still unreachable (or gone): try again next time
                left.append(orphan)
        if left:
            self._orphans_file.write_text(json.dumps(left, indent=1))
        else:
            self._orphans_file.unlink(missing_ok=True)

    @staticmethod
    def _run_exists(run_id: str) -> bool:
        try:
            mlflow.get_run(run_id)
            return True
        except Exception:  # noqa: BLE001
            return False

    def _log_config(self, cfg: dict[str, Any]) -> None:
        params = {k: str(v)[:_MAX_PARAM_LEN] for k, v in flatten(cfg).items()}
        existing = mlflow.get_run(self.run_id).data.params
        fresh = {k: v for k, v in params.items() if k not in existing}
        if fresh:
            mlflow.log_params(fresh)
        mlflow.log_text(yaml.safe_dump(cfg, sort_keys=False), "config.yaml")

    def log_config(self, cfg: dict[str, Any]) -> None:
        self._config = cfg
        self._call(lambda: self._log_config(cfg))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._call(lambda: mlflow.log_metrics(metrics, step=step))

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        self._call(lambda: mlflow.log_image(image, key=key, step=step))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(lambda: mlflow.log_artifact(str(path), artifact_path=artifact_path))

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self._call(lambda: mlflow.log_artifacts(str(folder), artifact_path=artifact_path))

    def log_dataset(self, frame, *, name: str, context: str) -> None:
        """A table (the de-identified manifest) as an MLflow dataset input of the run."""
        import mlflow.data

        self._call(lambda: mlflow.log_input(mlflow.data.from_pandas(frame, name=name), context=context))

    def log_generator(self, module, *, latent_dim: int, name: str = "generator",
                      register_name: str | None = None) -> None:
        """Log ``G`` as an MLflow PyTorch model: input latent codes ``(N, latent_dim)``, output logits."""
        import mlflow.pytorch
        import torch

        example = np.zeros((2, latent_dim), dtype=np.float32)
        self._call(lambda: mlflow.pytorch.log_model(
            module, name=name, registered_model_name=register_name, serialization_format="pickle",
            input_example=example, pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "monai"]))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call(lambda: mlflow.set_tags(tags))

    def end(self, status: str = "FINISHED") -> None:
        try:
            mlflow.end_run(status=status)
        except Exception:  # noqa: BLE001 - ending a run on a server that went away must not mask the result
            if not _is_remote(self.tracking_uri):
                raise
        self.settle_orphans()


class NullTracker:
    """Used on ranks other than 0 and in tests that do not need MLflow."""

    run_id = None
    tracking_uri = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
