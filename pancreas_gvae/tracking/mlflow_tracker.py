"""A small MLflow wrapper for a training run.

MONAI's ``MLFlowHandler`` targets Ignite engines and defaults to a ``./mlruns`` file
store, which MLflow 3.13+ refuses; this loop is plain PyTorch, so it talks to MLflow
directly with ``sqlite:///mlflow.db`` as the default store.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml
from mlflow.tracking import MlflowClient

from pancreas_gvae.config import flatten

# Params longer than this are cut by the tracking store; the whole config is also an artifact.
_MAX_PARAM_LEN = 500


def _reachable(uri: str) -> bool:
    """Is a remote tracking server answering? Local stores (sqlite, file) are always used as given."""
    if not uri.startswith(("http://", "https://")):
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
        if not _reachable(tracking_uri):
            fallback = f"sqlite:///{Path(fallback_dir).resolve() / 'mlflow.db'}"
            warnings.warn(f"MLflow tracking server {tracking_uri} cannot be reached; logging to {fallback} instead. "
                          "Nothing is lost: copy the run later with `mlflow` export tools or re-point the UI there.",
                          stacklevel=2)
            tracking_uri = fallback
            resume_run_id = None
        self.tracking_uri = tracking_uri
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)
        if resume_run_id and not self._run_exists(resume_run_id):
            resume_run_id = None
        self.run = mlflow.start_run(run_id=resume_run_id, run_name=None if resume_run_id else run_name,
                                    tags=tags, log_system_metrics=system_metrics)
        self.run_id = self.run.info.run_id

    @staticmethod
    def _run_exists(run_id: str) -> bool:
        try:
            mlflow.get_run(run_id)
            return True
        except Exception:  # noqa: BLE001
            return False

    def log_config(self, cfg: dict[str, Any]) -> None:
        params = {k: str(v)[:_MAX_PARAM_LEN] for k, v in flatten(cfg).items()}
        existing = mlflow.get_run(self.run_id).data.params
        fresh = {k: v for k, v in params.items() if k not in existing}
        if fresh:
            mlflow.log_params(fresh)
        mlflow.log_text(yaml.safe_dump(cfg, sort_keys=False), "config.yaml")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        mlflow.log_metrics(metrics, step=step)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        mlflow.log_image(image, key=key, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifacts(str(folder), artifact_path=artifact_path)

    def log_generator(self, module, *, latent_dim: int, name: str = "generator",
                      register_name: str | None = None) -> None:
        """Log ``G`` as an MLflow PyTorch model: input latent codes ``(N, latent_dim)``, output logits."""
        import mlflow.pytorch
        import torch

        example = np.zeros((2, latent_dim), dtype=np.float32)
        mlflow.pytorch.log_model(module, name=name, registered_model_name=register_name,
                                 serialization_format="pickle", input_example=example,
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "monai"])

    def log_dataset(self, frame, *, name: str, context: str) -> None:
        """A table (the de-identified manifest) as an MLflow dataset input of the run."""
        import mlflow.data

        mlflow.log_input(mlflow.data.from_pandas(frame, name=name), context=context)

    def set_tags(self, tags: dict[str, str]) -> None:
        mlflow.set_tags(tags)

    def end(self, status: str = "FINISHED") -> None:
        mlflow.end_run(status=status)


class NullTracker:
    """Used on ranks other than 0 and in tests that do not need MLflow."""

    run_id = None
    tracking_uri = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
