"""The trained generator outside training: rebuilt from a checkpoint (EMA weights by default) or loaded from
an MLflow training run, and the geometry (pixel spacing, HU window) of the slices it was trained on.

Used by every consumer of a trained model: sampling, the MONAI Bundle export, the segmentation experiment.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pancreas_gvae.config import Config, ModelConfig, default_tracking_uri
from pancreas_gvae.errors import PipelineError
from pancreas_gvae.models.networks import Generator


def generator_kwargs(model: ModelConfig) -> dict[str, Any]:
    """The keyword arguments :class:`~pancreas_gvae.models.gvae.GenerativeModel` builds its generator with."""
    return {
        "spatial_dims": int(model.spatial_dims),
        "out_channels": int(model.in_channels),
        "image_size": int(model.image_size),
        "channels": [int(c) for c in model.channels],
        "latent_dim": int(model.latent_dim),
        "num_res_units": int(model.num_res_units),
        "norm": model.generator_norm,
        "upsample": model.generator_upsample,
        "prior_components": model.prior_components,
    }


def generator_state_from_checkpoint(state: dict[str, Any], *, weights: str = "ema") -> dict[str, torch.Tensor]:
    """The generator's state_dict from a training checkpoint (:meth:`Trainer.state_dict`).

    ``weights="ema"``: the EMA generator (``AveragedModel`` keys ``module.*``; ``n_averaged`` dropped), the
    one to ship. ``weights="model"``: the raw generator of ``GenerativeModel`` (keys ``generator.*``).
    """
    if weights == "ema":
        raw, prefix = state.get("ema"), "module."
    elif weights == "model":
        raw, prefix = state.get("model"), "generator."
    else:
        raise PipelineError(f"weights must be 'ema' or 'model', got {weights!r}")
    if not raw:
        raise PipelineError(f"the checkpoint has no {weights!r} weights (keys: {', '.join(sorted(state))})")
    out = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    if not out:
        raise PipelineError(f"the checkpoint's {weights!r} entry holds no '{prefix}*' keys; "
                            "is it a training checkpoint?")
    return out


def generator_from_checkpoint(path: str | Path, *, weights: str = "ema") -> tuple[Generator, Config]:
    """Rebuild the (EMA) generator of a training checkpoint on the CPU, in eval mode, with its config."""
    from pancreas_gvae.training.checkpoint import load_checkpoint

    return generator_from_state(load_checkpoint(path, map_location="cpu"), weights=weights, what=f"checkpoint {path}")


def generator_from_state(state: Any, *, weights: str = "ema", what: str = "checkpoint") -> tuple[Generator, Config]:
    """The generator of an already loaded training checkpoint (``Trainer.state_dict()``), strictly loaded."""
    if not isinstance(state, dict) or "config" not in state:
        raise PipelineError(f"{what} holds no 'config'; is it a training checkpoint (OUT/checkpoints/last.pt)?")
    config = Config.from_dict(state["config"])
    generator = Generator(**generator_kwargs(config.model))
    load_strict(generator, generator_state_from_checkpoint(state, weights=weights), what=what)
    return generator.eval(), config


class Geometry(NamedTuple):
    spacing: tuple[float, ...] | None
    window: tuple[float, float] | None
    notes: tuple[str, ...]  # where each value came from, for the user


def infer_geometry(config: Config) -> Geometry:
    """Pixel spacing and HU window of the CT training slices, from ``config.data["ct"]`` (defaults filled in).

    ``sampling.fit = resize`` with ``sampling.fov_mm``: ``fov_mm / slice_size`` mm per pixel (as the training
    job's own NIfTI samples); ``fit = crop``: ``preprocess.spacing`` (x, y) where set. The window is
    ``preprocess.hu_window``. A config without a ``ct`` data section (MNIST) gives ``None`` for both.
    """
    if "ct" not in (config.data or {}):
        return Geometry(None, None, ())
    from pancreas_gvae.data.ct.config import data_config, slice_spacing_mm  # the CT data layer; not needed for MNIST

    data = data_config(config)
    window: tuple[float, float] | None
    if data.preprocess.input_intensity.true_hu:
        window = tuple(float(v) for v in data.preprocess.hu_window)
        notes = [f"window [{window[0]:g}, {window[1]:g}] HU from data.ct.preprocess.hu_window"]
    else:  # e.g. 8-bit slices of an unstated window: there is no HU to map back to
        window = None
        notes = ["no HU window: the training data were display values of an unknown window "
                 "(data.ct.preprocess.input_intensity); the CT channel stays in [0, 1]"]
    spacing = slice_spacing_mm(data) if config.model.spatial_dims == 2 else None
    if spacing is not None:
        notes.append(f"spacing {spacing[0]:g} x {spacing[1]:g} mm from data.ct.sampling.fov_mm / slice_size "
                     "(fit = resize) or data.ct.preprocess.spacing (fit = crop)")
    if data.sampling.centre == "pancreas":
        notes.append("the training window was centred on each slice's pancreas (data.ct.sampling.centre): a slice's "
                     "origin is not a fixed place in a patient")
    return Geometry(spacing, window, tuple(notes))


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], *, what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise PipelineError(f"{what} does not match the generator that config.model describes: "
                            f"{first[1].strip() if len(first) > 1 else first[0]}") from None


# ------------------------------------------------------------------------ a generator to sample from


@dataclass
class LoadedGenerator:
    generator: torch.nn.Module  # eval mode, CPU
    config: Config
    source: str  # "checkpoint" | "mlflow_run"
    source_run_id: str | None = None
    experiment: str | None = None  # the source run's experiment name, where known
    tracking_uri: str | None = None  # where the source run lives, where known


def _check_generator(generator: torch.nn.Module, config: Config, what: str) -> torch.nn.Module:
    m = config.model
    if m.mask_channels != 1:
        raise PipelineError(f"{what} was trained without a pancreas-mask channel (model.mask_channels = "
                            f"{m.mask_channels}); sampling CT/mask pairs needs a CT model (pipelines/train_ct.py)")
    generator = generator.eval().cpu()
    with torch.no_grad():
        shape = tuple(generator(torch.zeros(1, m.latent_dim)).shape)
    expected = (1, m.in_channels, *[m.image_size] * m.spatial_dims)
    if shape != expected or m.spatial_dims != 2:
        raise PipelineError(f"{what}: the generator returns {shape}, expected 2D slices {expected}")
    return generator


def load_from_checkpoint(path: str | Path) -> LoadedGenerator:
    """The EMA generator of a training checkpoint (``OUT/checkpoints/last.pt``) and its config."""
    from pancreas_gvae.training.checkpoint import load_checkpoint

    what = f"checkpoint {Path(path)}"
    state = load_checkpoint(path, map_location="cpu")  # PipelineError when missing or unreadable
    generator, config = generator_from_state(state, weights="ema", what=what)
    return LoadedGenerator(_check_generator(generator, config, what), config, "checkpoint",
                           source_run_id=state.get("mlflow_run_id"), experiment=config.tracking.experiment)


def _check_store(uri: str) -> None:
    """A sqlite store must exist: MLflow would silently create an empty one."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_file():
            raise PipelineError(f"no MLflow store at {db} (tracking URI {uri}); pass --tracking-uri")


def load_from_run(run_id: str, tracking_uri: str | None = None) -> LoadedGenerator:
    """The generator logged by an MLflow training run (its logged model ``models:/<id>``) and the run's
    ``config.yaml`` artifact."""
    import mlflow
    import mlflow.pytorch
    import yaml
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    _check_store(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise PipelineError(f"MLflow run {run_id!r} not found in {uri}") from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, "config.yaml", tmp)
            raw = yaml.safe_load(Path(local).read_text())
        except Exception:  # noqa: BLE001 - missing artifact, unreadable store: one line for the user
            raise PipelineError(f"MLflow run {run_id} has no readable config.yaml artifact; is it a pancreas-gvae "
                                "training run?") from None
    config = Config.from_dict(raw)
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id='{run_id}'")
    models = sorted(models, key=lambda m: (m.name != "generator", -(m.creation_timestamp or 0)))
    if not models:
        raise PipelineError(f"MLflow run {run_id} logged no generator model (trained with tracking.log_model=false?); "
                            "sample from its checkpoint instead: --checkpoint OUT/checkpoints/last.pt")
    mlflow.set_tracking_uri(uri)
    try:
        generator = mlflow.pytorch.load_model(models[0].model_uri, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any failure to restore the model is the user's to see, in one line
        raise PipelineError(f"could not load the generator {models[0].model_uri} of run {run_id}: "
                            f"{type(err).__name__}: {err}") from None
    experiment = client.get_experiment(run.info.experiment_id).name
    return LoadedGenerator(_check_generator(generator, config, f"MLflow run {run_id}"), config, "mlflow_run",
                           source_run_id=run_id, experiment=experiment, tracking_uri=uri)


# ---------------------------------------------------------------------------------------------- sampling
