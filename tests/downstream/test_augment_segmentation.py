"""Issue 6, downstream half: case-level split, no test case in the generator's data, metric sanity, CLI plumbing."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from pancreas_gvae import segmentation as seg
from pancreas_gvae.errors import PipelineError

TINY_GVAE = ["--set", "model.channels=[8,16,32]", "--set", "model.latent_dim=8", "--set", "train.batch_size=4",
             "--set", "train.sample_every=1000", "--set", "train.checkpoint_every=1000", "--set", "train.num_samples=4",
             "--set", "data.ct.sampling.slice_size=32", "--set", "model.image_size=32"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """4 phantom cases at 64 px, prepared with the CT-64 data config (slices fitted to 32 px for speed)."""
    from pancreas_gvae.config import load_config
    from pancreas_gvae.ct.phantom import make_phantom_cohort
    from pancreas_gvae.ct.prepare import prepare_dataset
    from pancreas_gvae.training import ct

    root = tmp_path_factory.mktemp("seg")
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "ct_64.yaml",
                      ["model.channels=[8,16,32]", "model.latent_dim=8", "model.image_size=32",
                       "data.ct.sampling.slice_size=32", "train.batch_size=4", "tracking.log_model=false",
                       "tracking.system_metrics=false"])
    make_phantom_cohort(root / "phantom", cases=4, size=64, seed=0)
    data = ct.data_config(cfg)
    manifest = prepare_dataset(root / "phantom", root / "prepared", config=data, progress=False)
    return root, cfg, manifest


def test_split_is_by_case_without_overlap_and_fractions_stay_in_train():
    ids = [f"PANCREAS_{i:04d}" for i in range(1, 11)]
    split = seg.split_cases(ids, test_fraction=0.4, seed=3)
    assert not set(split.train) & set(split.test)
    assert sorted(split.train + split.test) == ids and len(split.test) == 4
    assert seg.split_cases(ids, test_fraction=0.4, seed=3) == split  # fixed by the seed
    for f in (0.01, 0.1, 0.5, 1.0):
        sub = seg.subset_cases(split.train, f, seed=1)
        assert 1 <= len(sub) <= len(split.train) and set(sub) <= set(split.train)
    assert set(seg.subset_cases(split.train, 0.5, 2)) <= set(seg.subset_cases(split.train, 1.0, 2))
    with pytest.raises(PipelineError):
        seg.CaseSplit(train=["a", "b"], test=["b"])
    two = seg.split_cases(["a", "b"], test_fraction=0.5, seed=0)
    assert len(two.train) == len(two.test) == 1


@pytest.mark.slow  # the first MONAI metrics import alone takes ~20 s on the loaded 2-core box
def test_perfect_prediction_scores_dice_1_and_hd95_0():
    label = torch.zeros(3, 1, 32, 32)
    label[0, 0, 8:16, 8:16] = 1
    label[1, 0, 10:20, 5:9] = 1  # slice 2: no pancreas
    res = seg.evaluate_predictions(label.clone(), label, pixel_mm=2.0)
    assert res["dice"] == pytest.approx(1.0) and res["hd95"] == pytest.approx(0.0)
    assert res["dice_all"] == pytest.approx(1.0) and res["n_pancreas_slices"] == 2
    empty = seg.evaluate_predictions(torch.zeros_like(label), label, pixel_mm=2.0)
    assert empty["dice"] == pytest.approx(0.0)
    assert empty["hd95"] == pytest.approx(2.0 * (32**2 + 32**2) ** 0.5)  # missed organ: the image diagonal
    shifted = torch.roll(label, 2, dims=-1)
    assert seg.evaluate_predictions(shifted, label, pixel_mm=2.0)["hd95"] == pytest.approx(4.0)


def test_batches_mix_synthetic_at_the_ratio_with_the_same_size():
    assert seg.split_batch(16, 0.0) == (16, 0)
    assert seg.split_batch(16, 1.0) == (8, 8)
    assert seg.split_batch(16, 0.5) == (11, 5)
    assert seg.split_batch(4, 100.0) == (1, 3)


def test_generator_only_ever_sees_training_cases(cohort, tmp_path, monkeypatch):
    root, cfg, manifest = cohort
    split = seg.split_cases(seg.ok_cases(manifest), test_fraction=0.5, seed=0)
    seen = {}

    def fake_train_run(cfg, batches, preview, **kw):  # record what the generator would be trained on
        seen["cases"] = set(batches.dataset.case_ids)
        seen["slices"] = set(batches.dataset.slices["case_id"])

        class R:
            checkpoint = Path(kw["out_dir"]) / "checkpoints" / "last.pt"
        return R()

    import pancreas_gvae.training.run as run_mod
    monkeypatch.setattr(run_mod, "train_run", fake_train_run)
    seg.train_generator(root / "prepared", manifest, split, cfg, tmp_path / "gen", progress=False)
    assert seen["cases"] == set(split.train) and not seen["slices"] & set(split.test)
    recorded = json.loads((tmp_path / "gen" / "split.json").read_text())
    assert set(recorded["train"]) == set(split.train)
    ckpt = tmp_path / "gen" / "checkpoints" / "last.pt"
    assert seg.check_generator_split(ckpt, split) == "ok"
    flipped = seg.CaseSplit(train=split.test, test=split.train)
    with pytest.raises(PipelineError, match="leak"):
        seg.check_generator_split(ckpt, flipped)
    assert seg.check_generator_split(tmp_path / "elsewhere" / "last.pt", split) == "unverified"


@pytest.mark.slow
def test_cli_writes_both_arms_plot_and_mlflow_runs(cohort, tmp_path):
    from mlflow.tracking import MlflowClient

    from pancreas_gvae.models import build_model
    from pancreas_gvae.training.checkpoint import save_checkpoint
    from pancreas_gvae.training.trainer import Trainer
    from pipelines import augment_segmentation

    root, cfg, manifest = cohort
    trainer = Trainer(cfg, build_model(cfg.model), torch.device("cpu"))  # untrained: plumbing only
    ckpt = save_checkpoint(trainer.state_dict(), tmp_path / "gen" / "last.pt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    code = augment_segmentation.main([
        "--prepared", str(root / "prepared"), "--checkpoint", str(ckpt), "--fractions", "0.5,1.0",
        "--seeds", "0", "--steps", "2", "--batch-size", "4", "--synthetic-ratio", "1",
        "--unet-channels", "4,8,16", "--test-fraction", "0.5", "--out", str(out), "--tracking-uri", uri])
    assert code == 0
    df = pd.read_csv(out / "dice.csv")
    assert set(df["arm"]) == {"real", "real+synthetic"} and sorted(set(df["fraction"])) == [0.5, 1.0]
    assert len(df) == 4
    assert {"fraction", "arm", "seed", "n_train_cases", "n_real_slices", "n_synthetic", "dice", "hd95"} <= set(df)
    assert (df.loc[df["arm"] == "real", "n_synthetic"] == 0).all()
    assert (df.loc[df["arm"] != "real", "n_synthetic"] > 0).all()
    assert df["dice"].between(0, 1).all()
    assert df.groupby("fraction")["n_train_cases"].first().to_dict() == {0.5: 1, 1.0: 2}  # of 2 train cases
    assert (out / "dice.png").stat().st_size > 0
    split = json.loads((out / "split.json").read_text())
    assert not set(split["train"]) & set(split["test"])
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("pancreas-gvae-segmentation")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    assert parents[0].data.tags["leakage_check"] == "unverified"  # this checkpoint has no split.json
    text = str([r.data.params for r in runs]) + str([r.data.tags for r in runs])
    assert "PANCREAS_" not in text  # case ids never reach MLflow
