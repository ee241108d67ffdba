"""Experiment tracking in MLflow."""

from pancreas_gvae.tracking.mlflow_tracker import MlflowTracker, NullTracker

__all__ = ["MlflowTracker", "NullTracker"]
