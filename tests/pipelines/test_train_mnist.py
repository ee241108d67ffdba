"""The MNIST smoke job end to end on real data, tracked in a temporary MLflow sqlite store."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pancreas_gvae.pipelines import train_mnist

FAST = ["--steps", "4", "--batch-size", "16", "--set", "model.channels=[8,16]", "--set", "model.latent_dim=8",
        "--set", "train.log_every=1", "--set", "train.sample_every=2", "--set", "train.checkpoint_every=2",
        "--set", "train.num_samples=16"]


def _run(tmp_path, data_dir, *extra):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--data-dir", str(data_dir), "--out", str(tmp_path / "out"), "--tracking-uri", uri, *FAST, *extra]
    return train_mnist.main(argv), uri


@pytest.mark.parametrize("model", ["gvae", "vae", "gan"])
def test_each_model_trains_on_real_mnist(tmp_path, mnist_dir, model):
    code, uri = _run(tmp_path, mnist_dir, "--model", model, "--set", "tracking.log_model=false")
    assert code == 0
    assert (tmp_path / "out" / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "out" / "samples.png").is_file()


def test_mlflow_run_has_config_losses_images_and_model(tmp_path, fashion_dir):
    code, uri = _run(tmp_path, fashion_dir, "--dataset", "fashion-mnist")
    assert code == 0
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("pancreas-gvae-smoke")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "gvae-fashion-mnist"
    assert run.info.status == "FINISHED"
    assert run.data.params["model.kind"] == "gvae"
    assert run.data.params["train.steps"] == "4"
    assert run.data.params["data.dataset"] == "fashion-mnist"
    history = client.get_metric_history(run.info.run_id, "loss/d")
    assert [m.step for m in history] == [1, 2, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "final", "images"} <= artifacts
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("samples" in p and "+step+2+" in p for p in images), images
    assert any("reconstructions" in p and "+step+4+" in p for p in images), images
    models = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    assert [m.name for m in models] == ["generator"]
    generator = mlflow.pytorch.load_model(models[0].model_uri)
    import torch

    assert generator(torch.zeros(2, 8)).shape == (2, 1, 28, 28)


def test_resume_continues_the_same_mlflow_run(tmp_path, mnist_dir):
    code, uri = _run(tmp_path, mnist_dir, "--set", "tracking.log_model=false")
    assert code == 0
    code, _ = _run(tmp_path, mnist_dir, "--set", "tracking.log_model=false", "--resume", "--steps", "6")
    assert code == 0
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("pancreas-gvae-smoke").experiment_id])
    assert len(runs) == 1
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss/d")] == [1, 2, 3, 4, 5, 6]


def test_missing_data_is_one_clear_error(tmp_path, capsys):
    code, _ = _run(tmp_path, tmp_path / "nowhere")
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err
    assert "t10k-images-idx3-ubyte.gz" in err


def test_corrupt_file_is_named(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    (data / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    code, _ = _run(tmp_path, data)
    assert code == 2
    assert "t10k-" in capsys.readouterr().err


def test_help_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_mnist.main(["--help"])
    assert exit_info.value.code == 0
    assert "--tracking-uri" in capsys.readouterr().out


def test_per_epoch_metrics_are_logged(tmp_path, fashion_dir):
    # 1,000 training images (the subset's train split) / batch 300 = 3 steps per epoch: steps 3 and 6 close one
    code, uri = _run(tmp_path, fashion_dir, "--dataset", "fashion-mnist", "--set", "tracking.log_model=false",
                     "--steps", "6", "--batch-size", "300")
    assert code == 0
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pancreas-gvae-smoke").experiment_id])
    history = client.get_metric_history(run.info.run_id, "epoch/loss/d")
    assert [m.step for m in history] == [3, 6]
