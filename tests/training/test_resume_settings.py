"""A resumed run does what the user asked: new optimisation settings applied, model changes refused by key,
the same MLflow run continued, and a run the tracking server could not be told about linked and ended later."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from pancreas_gvae.config import load_config
from pancreas_gvae.errors import PipelineError
from pancreas_gvae.tracking import mlflow_tracker
from pancreas_gvae.training.batches import TensorBatches
from pancreas_gvae.training.checkpoint import load_checkpoint
from pancreas_gvae.training.run import train_run

TINY = ["model.image_size=16", "model.channels=[4,8]", "model.latent_dim=4", "train.batch_size=4",
        "train.log_every=1", "train.sample_every=100", "train.checkpoint_every=2", "train.num_samples=4",
        "tracking.log_model=false", "tracking.system_metrics=false"]


def _run(tmp_path, store, *extra, resume=False):
    cfg = load_config(overrides=TINY + [f"tracking.tracking_uri={store}", *extra])
    data = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return train_run(cfg, TensorBatches(data, batch_size=4, seed=0), data[:4], out_dir=tmp_path / "out",
                     run_name="resume-test", resume=resume, progress=False)


def test_resume_applies_new_optimisation_settings_and_prints_them(tmp_path, capsys):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _run(tmp_path, store, "train.steps=2", "train.lr_g=0.001", "train.grad_clip=10")
    assert first.trainer.opt_g.param_groups[0]["lr"] == 0.001
    second = _run(tmp_path, store, "train.steps=4", "train.lr_g=1e-4", "train.lr_d=5e-5", "train.betas=[0.0,0.99]",
                  "train.grad_clip=1", "loss.adversarial_weight=0.5", resume=True)
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "at step 2" in printed
    for line in ("train.lr_g: 0.001 -> 0.0001", "train.steps: 2 -> 4", "train.grad_clip: 10.0 -> 1.0",
                 "loss.adversarial_weight: 0.1 -> 0.5"):
        assert line in printed, printed
    tr = second.trainer
    assert tr.step == 4
    assert [g["lr"] for g in tr.opt_g.param_groups] == [1e-4]
    assert [g["lr"] for g in tr.opt_d.param_groups] == [5e-5]
    assert tr.opt_g.param_groups[0]["betas"] == (0.0, 0.99)
    assert float(tr.grad_norms["e"]) >= 0 and second.run_id == first.run_id, "the same MLflow run goes on"
    state = load_checkpoint(second.checkpoint)
    assert state["config"]["train"]["lr_g"] == 1e-4 and state["opt_g"]["param_groups"][0]["lr"] == 1e-4
    run = MlflowClient(store).get_run(first.run_id)
    assert run.info.status == "FINISHED" and max(m.step for m in MlflowClient(store).get_metric_history(
        first.run_id, "loss/g")) == 4


@pytest.mark.parametrize("change,key", [("model.latent_dim=8", "model.latent_dim"),
                                        ("model.kind=vae", "model.kind"),
                                        ("model.channels=[4,16]", "model.channels")])
def test_resume_refuses_a_model_change_naming_the_key(tmp_path, change, key):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _run(tmp_path, store, "train.steps=2")
    with pytest.raises(PipelineError) as err:
        _run(tmp_path, store, "train.steps=4", change, resume=True)
    message = str(err.value)
    assert key in message and "\n" not in message and "new --out" in message


def test_resume_with_the_server_unreachable_links_and_later_ends_the_orphan(tmp_path, monkeypatch):
    """Server gone at resume: a linked local run continues; once the server answers, the old run is ended."""
    server_db = tmp_path / "server"
    server_db.mkdir()
    server = f"sqlite:///{server_db / 'mlflow.db'}"  # stands in for the remote server
    first = _run(tmp_path, server, "train.steps=2")
    client = MlflowClient(server)
    client.update_run(first.run_id, status="RUNNING")  # as a SIGKILLed run leaves it

    monkeypatch.setattr(mlflow_tracker, "_reachable", lambda uri: uri != server)
    with pytest.warns(UserWarning, match="cannot be reached"):
        second = _run(tmp_path, server, "train.steps=4", resume=True)
    local = second.tracking_uri
    assert local.endswith("out/mlflow.db") and second.run_id != first.run_id
    tags = MlflowClient(local).get_run(second.run_id).data.tags
    assert tags["resumed_from_run"] == first.run_id and tags["resumed_from_tracking_uri"] == server
    assert client.get_run(first.run_id).info.status == "RUNNING", "the server could not be told yet"
    orphans = json.loads((tmp_path / "out" / "mlflow_orphans.json").read_text())
    assert orphans[0]["run_id"] == first.run_id and orphans[0]["continued_in_run"] == second.run_id
    assert load_checkpoint(second.checkpoint)["mlflow_run_id"] == second.run_id

    # Still unreachable at the next resume: the same local run continues (no third, unlinked run).
    with pytest.warns(UserWarning, match="cannot be reached"):
        third = _run(tmp_path, server, "train.steps=6", resume=True)
    assert third.run_id == second.run_id

    monkeypatch.setattr(mlflow_tracker, "_reachable", lambda uri: True)  # the server is back
    tracker = mlflow_tracker.MlflowTracker(tracking_uri=server, experiment="e", run_name="later",
                                           fallback_dir=tmp_path / "out")
    tracker.end()
    orphan = client.get_run(first.run_id)
    assert orphan.info.status == "KILLED" and orphan.data.tags["continued_in_run"] == second.run_id
    assert not (tmp_path / "out" / "mlflow_orphans.json").exists()


def test_divergence_advice_names_only_what_a_resume_applies():
    from pancreas_gvae.models import build_model
    from pancreas_gvae.training.trainer import Trainer

    cfg = load_config(overrides=TINY)
    tr = Trainer(cfg, build_model(cfg.model), torch.device("cpu"))
    bad = torch.rand(4, 1, 16, 16)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(Exception) as err:
        tr.train_step(bad)
    message = str(err.value)
    assert "--resume" in message and "train.lr_g" in message
    assert "model.spectral_norm" in message and "new --out" in message, "a model change is not offered for resume"


def test_a_checkpoint_older_than_a_config_key_resumes_with_its_default(tmp_path, capsys):
    """A checkpoint written before model.latent_prior_components existed resumes (it ran with the default, 0);
    asking it for another value is still a model change, refused by key."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _run(tmp_path, store, "train.steps=2")
    state = load_checkpoint(first.checkpoint)
    del state["config"]["model"]["latent_prior_components"]
    torch.save(state, first.checkpoint)
    with pytest.raises(PipelineError, match="model.latent_prior_components"):
        _run(tmp_path, store, "train.steps=4", "model.latent_prior_components=2", resume=True)
    assert _run(tmp_path, store, "train.steps=4", resume=True).trainer.step == 4
    assert "latent_prior_components" not in capsys.readouterr().out
    state = load_checkpoint(first.checkpoint)
    del state["config"]["model"]["latent_prior_components"]
    torch.save(state, first.checkpoint)
    with pytest.raises(PipelineError, match="model.latent_prior_components"):
        _run(tmp_path, store, "train.steps=6", "model.latent_prior_components=2", resume=True)
