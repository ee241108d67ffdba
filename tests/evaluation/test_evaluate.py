"""Issue 5: the evaluation CLI on tiny settings (real MNIST, temporary MLflow sqlite store) and results.md."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pancreas_gvae.config import load_config
from pancreas_gvae.errors import PipelineError
from pancreas_gvae.evaluation.compare import COLUMNS, METRICS
from pancreas_gvae.evaluation.model_sets import check_resumed_sets
from pancreas_gvae.evaluation.tables import best_per_column, render_markdown, render_runs, summarise
from pancreas_gvae.pipelines import evaluate

ENCODER_ONLY = [m.column for m in METRICS if m.encoder_only]
TINY = ["--steps", "3", "--batch-size", "8", "--n-eval", "16", "--n-val", "8", "--n-memo", "200",
        "--iwae-k", "2", "--feature-steps", "5", "--set", "model.channels=[8,16]", "--set", "model.latent_dim=8",
        "--set", "train.num_samples=8", "--set", "train.sample_every=100", "--set", "train.checkpoint_every=100"]


@pytest.mark.slow
def test_cli_writes_tables_and_nested_mlflow_runs(tmp_path, mnist_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "eval"
    code = evaluate.main(["--dataset", "mnist", "--data-dir", str(mnist_dir), "--models", "gvae,vae,gan",
                          "--seeds", "0", "--out", str(out), "--tracking-uri", uri, "--n-samples", "40", *TINY])
    assert code == 0
    frame = pd.read_csv(out / "results.csv")
    assert list(frame.columns) == COLUMNS
    assert sorted(frame["model"]) == ["gan", "gvae", "vae"] and set(frame["seed"]) == {0} and len(frame) == 3
    gan, vae, gvae = (frame[frame.model == m].iloc[0] for m in ("gan", "vae", "gvae"))
    for c in ENCODER_ONLY:  # blank, not zero, for the GAN; present for the VAE and the GVAE
        assert math.isnan(gan[c]), c
        assert math.isfinite(vae[c]) and math.isfinite(gvae[c]), c
    assert (frame["n_samples"] == 40).all() and (frame["kid_feature_sd"] > 0).all(), "KID subsets < sample set"
    for c in ["mmd2_pixel", "mmd2_feature", "loglik_parzen_nats", "fid_feature", "precision", "recall",
              "modes_covered", "memo_near_copy_frac", "memo_median_nn_ratio", "diversity_ms_ssim"]:
        assert math.isfinite(gan[c]) and math.isfinite(vae[c]), c
    assert (frame["steps"] == 3).all() and (frame["n_eval"] == 16).all()
    md = (out / "results.md").read_text()
    assert "## mnist" in md and "mmd2_pixel ↓" in md and "recon_ssim ↑" in md and "(n=1)" in md

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(evaluate.EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "evaluation"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    pid = parents[0].info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid]
    assert len(children) == 3 and len(runs) == 4
    assert {c.info.run_id for c in children} == set(frame["run_id"])
    vae_run = next(c for c in children if c.data.tags["model"] == "vae")
    assert "eval/elbo_nats" in vae_run.data.metrics and "eval/mmd2_pixel" in vae_run.data.metrics
    gan_run = next(c for c in children if c.data.tags["model"] == "gan")
    assert "eval/elbo_nats" not in gan_run.data.metrics
    assert {a.path for a in client.list_artifacts(pid)} >= {"results.csv", "results.md"}

    # A re-run of the same command keeps the finished rows (resumable) and trains nothing again.
    assert evaluate.main(["--dataset", "mnist", "--data-dir", str(mnist_dir), "--models", "gvae,vae,gan",
                          "--seeds", "0", "--out", str(out), "--tracking-uri", uri, "--n-samples", "40", *TINY]) == 0
    again = pd.read_csv(out / "results.csv")
    assert list(again["run_id"]) == list(frame["run_id"])


@pytest.mark.slow
def test_several_budgets_give_a_learning_curve_from_one_training(tmp_path, mnist_dir):
    """--steps 2,4: each model trains on from its 2-step checkpoint to 4 steps; a row and a table per budget,
    curve PNGs, eval metrics at their step in the one MLflow run; a re-run recomputes nothing."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "eval"
    tiny = [a if a != "3" else "2,4" for a in TINY]
    argv = ["--dataset", "mnist", "--data-dir", str(mnist_dir), "--models", "gvae,gan", "--seeds", "0",
            "--out", str(out), "--tracking-uri", uri, "--n-samples", "40", *tiny,
            "--set", "gvae:loss.feature_recon=7"]  # the GVAE's own weight: one command for both models
    assert evaluate.main(argv) == 0
    frame = pd.read_csv(out / "results.csv")
    assert sorted(zip(frame["model"], frame["steps"])) == [("gan", 2), ("gan", 4), ("gvae", 2), ("gvae", 4)]
    settings = dict(zip(frame["model"], frame["settings"]))
    assert settings["gvae"].endswith("loss.feature_recon=7") and "feature_recon" not in settings["gan"]
    assert "model.latent_dim=8" in settings["gan"]
    client = MlflowClient(tracking_uri=uri)
    params = {m: client.get_run(frame.loc[frame.model == m, "run_id"].iloc[0]).data.params for m in ("gvae", "gan")}
    assert float(params["gvae"]["loss.feature_recon"]) == 7 and float(params["gan"]["loss.feature_recon"]) == 1
    for model, g in frame.groupby("model"):
        assert g["run_id"].nunique() == 1, "the 4-step row continues the 2-step training"
        two, four = (g[g["steps"] == n].iloc[0] for n in (2, 4))
        assert four["train_seconds_cum"] == pytest.approx(two["train_seconds"] + four["train_seconds"], abs=0.2)
    md = (out / "results.md").read_text()
    assert "## mnist, 2 steps" in md and "## mnist, 4 steps" in md
    assert (out / "curve-fid_feature.png").is_file()
    from PIL import Image
    grids = [Image.open(out / f"grid-{n}-s0.png") for n in (2, 4)]  # real | GVAE | GAN at each budget
    assert all(g.width > 2.5 * g.height for g in grids)
    run = MlflowClient(tracking_uri=uri).get_metric_history(frame["run_id"].iloc[0], "eval/fid_feature")
    assert sorted(m.step for m in run) == [2, 4]
    assert evaluate.main(argv) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), frame)
    # a re-run with only the last budget recomputes nothing and keeps the other budget's rows and table
    assert evaluate.main([a if a != "2,4" else "4" for a in argv]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), frame)
    assert "## mnist, 2 steps" in (out / "results.md").read_text()
    # a budget below what a run already trained is refused in one line, not silently mislabelled
    assert evaluate.main([a if a != "2,4" else "3" for a in argv]) != 0
    # so is another --set for a model with finished rows (they would be kept as if made with it)
    assert evaluate.main([*argv[:-1], "gvae:loss.feature_recon=8"]) != 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), frame)
    # --report: results.md and the curves again from results.csv alone (nothing trained), narrowed to two columns
    (out / "results.md").unlink()
    for png in out.glob("curve-*.png"):
        png.unlink()
    assert evaluate.main(["--report", "--out", str(out), "--columns", "fid_feature,recall"]) == 0
    md = (out / "results.md").read_text()
    runs = md.split("## Every run")[1]
    assert "## mnist, 4 steps" in md and runs.count("| mnist |") == 4 and "kid_feature" not in md
    assert sorted(p.name for p in out.glob("curve-*.png")) == [  # against steps and against training seconds
        "curve-fid_feature-seconds.png", "curve-fid_feature.png", "curve-recall-seconds.png", "curve-recall.png"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), frame)
    assert evaluate.main(["--report", "--out", str(out), "--columns", "fid"]) != 0  # a clear error, no trace
    assert evaluate.main(["--report", "--out", str(tmp_path / "none")]) != 0


def test_cumulative_seconds_chain_from_the_row_training_resumed_at_and_are_unknown_without_one():
    rows = [{"dataset": "ct", "model": "gvae", "seed": 0, "steps": 100, "train_seconds_cum": 40.0},
            {"dataset": "ct", "model": "gvae", "seed": 1, "steps": 100, "train_seconds_cum": 55.0},
            {"dataset": "ct", "model": "gvae@N(0,I)", "seed": 0, "steps": 100, "train_seconds_cum": 1.0}]
    assert evaluate._cumulative_seconds(rows, "ct", "gvae", 0, 0, 30.0) == 30.0  # from scratch
    assert evaluate._cumulative_seconds(rows, "ct", "gvae", 0, 100, 30.0) == 70.0  # on from the 100-step row
    assert evaluate._cumulative_seconds(rows, "ct", "gvae", 1, 100, 0.0) == 55.0  # a rescore: the checkpoint's time
    # a killed run continued from its 60-step checkpoint: the seconds before the kill are unknown, not zero
    assert math.isnan(evaluate._cumulative_seconds(rows, "ct", "gvae", 0, 60, 30.0))
    assert math.isnan(evaluate._cumulative_seconds(rows, "ct", "vae", 0, 100, 30.0))  # another model's row is not it


def test_learning_curves_keep_seeds_apart():
    """A curve on seed 0 and a last budget on three seeds: one line per seed, never a mean that joins a one-seed
    point to a three-seed point."""
    frame = pd.DataFrame({"model": ["gvae"] * 4 + ["gan"], "seed": [0, 0, 1, 2, 0],
                          "steps": [750, 1500, 1500, 1500, 750], "fid_feature": [2.0, 1.0, 3.0, 5.0, 4.0]})
    curves = evaluate.learning_curves(frame, "fid_feature")
    assert curves == {"gvae s0": ([750, 1500], [2.0, 1.0]), "gvae s1": ([1500], [3.0]),
                      "gvae s2": ([1500], [5.0]), "gan s0": ([750], [4.0])}
    # against cumulative seconds (equal compute): a row without its time is left out, not drawn at zero
    frame["train_seconds_cum"] = [300.0, 610.5, float("nan"), 640.0, 120.0]
    curves = evaluate.learning_curves(frame, "fid_feature", x="train_seconds_cum")
    assert curves == {"gvae s0": ([300.0, 610.5], [2.0, 1.0]), "gvae s2": ([640.0], [5.0]),
                      "gan s0": ([120.0], [4.0])}


@pytest.mark.slow
def test_priors_score_one_checkpoint_under_several_latent_priors(tmp_path, mnist_dir):
    """--priors: each GVAE checkpoint is scored again, same weights, with codes from N(0, I) and a fitted mixture;
    the GAN is not swept; encoder columns stay blank on the extra rows; a re-run with one more prior trains
    nothing and scores only that prior; a malformed prior is one line, exit 2."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "eval"
    argv = ["--dataset", "mnist", "--data-dir", str(mnist_dir), "--models", "gvae,gan", "--seeds", "0",
            "--out", str(out), "--tracking-uri", uri, "--n-samples", "40", *TINY, "--priors", "0,2:diag"]
    assert evaluate.main(argv) == 0
    frame = pd.read_csv(out / "results.csv")
    assert list(frame["model"]) == ["gvae", "gvae@N(0,I)", "gvae@gmm2-diag", "gan"]
    gvae = frame.set_index("model")
    assert gvae.loc["gvae", "fid_feature"] == pytest.approx(gvae.loc["gvae@N(0,I)", "fid_feature"])  # same codes
    assert gvae.loc["gvae", "fid_feature"] != gvae.loc["gvae@gmm2-diag", "fid_feature"]
    assert gvae.loc["gvae@gmm2-diag", "run_id"] == gvae.loc["gvae", "run_id"]
    for c in ENCODER_ONLY:
        assert math.isfinite(gvae.loc["gvae", c]) and math.isnan(gvae.loc["gvae@gmm2-diag", c]), c
    metrics = MlflowClient(tracking_uri=uri).get_run(gvae.loc["gvae", "run_id"]).data.metrics
    assert {"eval/fid_feature", "eval-N0I/fid_feature", "eval-gmm2-diag/fid_feature"} <= set(metrics)
    assert (out / "grids" / "gvae-gmm2-diag-s0-3.png").is_file()
    assert "gvae@gmm2-diag" in (out / "results.md").read_text()

    assert evaluate.main(argv[:-1] + ["0,2:diag,1"]) == 0
    again = pd.read_csv(out / "results.csv")
    assert list(again["model"]) == list(frame["model"]) + ["gvae@gmm1"]
    pd.testing.assert_frame_equal(again.iloc[:4], frame)
    assert again["train_seconds"].iloc[-1] < 1, "the checkpoint is at its budget: nothing is trained again"
    assert again["train_seconds_cum"].iloc[-1] == pytest.approx(gvae.loc["gvae", "train_seconds_cum"], abs=1), \
        "a prior rescored later carries its checkpoint's training time (the equal-compute curves place it there)"
    assert evaluate.main(argv[:-1] + ["8:banded"]) == 2


@pytest.mark.slow
def test_ct_evaluation_scores_the_mask_with_fidelity_and_tstr(tmp_path):
    """Phantom CT, split by case: mask share/shape/intensity, label fidelity and TSTR next to FD/KID."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "eval"
    code = evaluate.main(["--dataset", "ct", "--models", "gvae", "--seeds", "0", "--out", str(out),
                          "--tracking-uri", uri, "--steps", "3", "--batch-size", "8", "--n-eval", "24",
                          "--n-val", "8", "--n-memo", "200", "--iwae-k", "2", "--feature-steps", "5",
                          "--n-samples", "48", "--seg-steps", "5", "--set", "data.phantom.cases=3",
                          "--set", "data.phantom.size=64", "--set", "model.channels=[8,16,32]",
                          "--set", "model.latent_dim=8", "--set", "train.num_samples=8",
                          "--set", "train.sample_every=100", "--set", "train.checkpoint_every=100"])
    assert code == 0
    row = pd.read_csv(out / "results.csv").iloc[0]
    for c in ("mask_share_fake", "mask_share_real", "tstr_dice", "real_dice", "fid_feature",
              "kid_feature", "kid_feature_sd"):
        assert math.isfinite(row[c]), c
    # After 3 steps no sample carries a mask yet: label fidelity is then undefined (blank), never 0.
    assert math.isfinite(row["fidelity_dice"]) or row["mask_share_fake"] == 0
    assert 0 <= row["mask_share_fake"] <= 1 and row["n_samples"] == 48
    assert row["mask_share_gap"] == pytest.approx(abs(row["mask_share_fake"] - row["mask_share_real"]))
    # held-out slices drawn with the training draw's pancreas share (0.6); 24 of the 32 drawn are scored
    assert abs(row["mask_share_real"] - 0.6) < 0.15, "held-out drawn like training"


def _hand_made() -> pd.DataFrame:
    nan = float("nan")
    rows = []
    for seed, (g, v, a) in enumerate([(0.10, 0.20, 0.30), (0.12, 0.22, 0.28)]):
        rows += [
            {"dataset": "mnist", "model": "gvae", "seed": seed, "mmd2_pixel": g, "recon_ssim": 0.5, "precision": 0.9},
            {"dataset": "mnist", "model": "vae", "seed": seed, "mmd2_pixel": v, "recon_ssim": 0.7, "precision": 0.2},
            {"dataset": "mnist", "model": "gan", "seed": seed, "mmd2_pixel": a, "recon_ssim": nan, "precision": 0.4},
        ]
    rows.append({"dataset": "ct", "model": "gan", "seed": 0, "mmd2_pixel": 0.01, "recon_ssim": nan, "precision": 0.1})
    rows.append({"dataset": "ct", "model": "vae", "seed": 0, "mmd2_pixel": 0.02, "recon_ssim": 0.8, "precision": 0.1})
    return pd.DataFrame(rows)


def test_best_per_column_respects_direction_blanks_and_datasets():
    best = best_per_column(summarise(_hand_made()))
    assert best[("mnist", "mmd2_pixel")] == {"gvae"}  # lower is better
    assert best[("mnist", "recon_ssim")] == {"vae"}  # higher is better; the GAN's blank is not a candidate
    assert best[("mnist", "precision")] == {"gvae"}
    assert best[("ct", "mmd2_pixel")] == {"gan"}  # per dataset, not across datasets
    assert best[("ct", "precision")] == {"gan", "vae"}  # ties are all best
    assert ("mnist", "elbo_nats") not in best  # a column with no values has no best
    assert ("ct", "recon_ssim") not in best  # one model valued (the GAN has no recon): nothing to beat, no bold


def test_results_md_marks_best_with_mean_sd_and_n():
    md = render_markdown(_hand_made())
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    mnist = md.split("## mnist")[1].split("## ct")[0]
    line = {ln.split("|")[1].strip(): ln.split("|") for ln in mnist.splitlines() if ln.startswith("| ")}
    header = [h.strip() for h in line["model"]]
    col = header.index("mmd2_pixel ↓")
    assert line["gvae"][col].strip() == "**0.1100 ± 0.0141 (n=2)**"
    assert line["vae"][col].strip() == "0.2100 ± 0.0141 (n=2)"
    ssim = header.index("recon_ssim ↑")
    assert line["vae"][ssim].strip().startswith("**0.7000") and line["gan"][ssim].strip() == ""
    assert "elbo_nats" not in mnist  # columns without any value are left out
    assert "↑" in md and "↓" in md and rows


def test_every_run_table_lists_each_row_in_curve_order_with_blanks():
    frame = _hand_made().assign(steps=100, train_seconds_cum=12.4)
    runs = render_runs(frame, columns=["mmd2_pixel", "recon_ssim"])
    lines = [ln.split("|")[1:-1] for ln in runs.splitlines() if ln.startswith("| ")]
    header, body = [c.strip() for c in lines[0]], [[c.strip() for c in ln] for ln in lines[1:]]
    assert header == ["dataset", "model", "seed", "steps", "train_seconds_cum", "mmd2_pixel ↓", "recon_ssim ↑"]
    assert [(r[0], r[1], r[2]) for r in body] == [("mnist", "gvae", "0"), ("mnist", "gvae", "1"), ("mnist", "vae", "0"),
                                                  ("mnist", "vae", "1"), ("mnist", "gan", "0"), ("mnist", "gan", "1"),
                                                  ("ct", "vae", "0"), ("ct", "gan", "0")]  # one model order
    assert body[0][3:] == ["100", "12", "0.1000", "0.5000"] and body[4][-1] == ""  # the GAN's blank stays blank
    with pytest.raises(ValueError, match="unknown metric"):
        render_runs(frame, columns=["fid"])


def test_mask_columns_of_real_slices_scored_as_samples_are_perfect():
    """Held-out slices scored as if they were samples: same share, zero shape/intensity distance, the
    segmenter's Dice on them as label fidelity; shuffled masks lower fidelity (the metric can fail)."""
    import torch

    from pancreas_gvae.segmentation import unet as S
    from pancreas_gvae.evaluation.compare import EvalData, SegmentationRefs, mask_columns

    g = torch.Generator().manual_seed(0)
    n, size = 48, 32
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centres = torch.randint(10, 22, (n, 2), generator=g)
    mask = (((yy - centres[:, 0, None, None]) / 6.0) ** 2 + ((xx - centres[:, 1, None, None]) / 4.0) ** 2 < 1)
    mask[: n // 4] = False  # some slices without pancreas
    img = (torch.rand(n, size, size, generator=g) * 0.2 + 0.2 + 0.5 * mask).clamp(0, 1)
    test = torch.stack([img, mask.float()], 1)
    real = S.SliceSet(test[:, :1], test[:, 1:], ["real"] * n)
    torch.set_num_threads(1)
    segmenter, _ = S.train_unet(real, None, steps=60, batch_size=16, ratio=0.0, seed=0, lr=1e-2,
                                channels=(8, 16, 32))
    refs = SegmentationRefs(segmenter, real, real, steps=20, pixel_mm=1.0, real_dice=float("nan"))
    data = EvalData("ct", test=test, val=test, memo_train=test, feature_fn=lambda x: x.flatten(1),
                    feature_net="none", image_channels=slice(0, 1), mask_channels=1, segmentation=refs)
    same = mask_columns(test, test, data, seed=0)
    assert same["mask_share_fake"] == same["mask_share_real"] == 0.75
    assert same["mask_shape_score"] == 0 and same["mask_intensity_w1"] == 0
    assert same["fidelity_dice"] > 0.7 and math.isfinite(same["tstr_dice"])
    shuffled = test.clone()
    shuffled[:, 1] = test[torch.roll(torch.arange(n), 1), 1]
    assert mask_columns(test, shuffled, data, seed=0)["fidelity_dice"] < same["fidelity_dice"] - 0.3


def test_a_model_prefixed_set_applies_to_that_model_only():
    args = evaluate.parse_args(["--dataset", "ct", "--steps", "10", "--out", "o", "--tracking-uri", "sqlite:///m.db",
                                "--set", "train.lr_g=0.001", "--set", "gvae:loss.feature_recon=100"])
    gvae, gan = (evaluate._overrides(args, m, 0) for m in ("gvae", "gan"))
    assert "loss.feature_recon=100" in gvae and not any("feature_recon" in o for o in gan)
    assert "train.lr_g=0.001" in gvae and "train.lr_g=0.001" in gan
    assert "tracking.tracking_uri=sqlite:///m.db" in gan  # a ':' inside a value is no prefix
    shared = evaluate._overrides(args, "gvae", 0, shared_only=True)
    assert "train.lr_g=0.001" in shared and not any("feature_recon" in o for o in shared)
    # the GVAE of a three-model command gets the config of a GVAE-only command with a plain --set
    alone = evaluate.parse_args(["--dataset", "ct", "--steps", "10", "--out", "o", "--tracking-uri", "sqlite:///m.db",
                                 "--models", "gvae", "--set", "train.lr_g=0.001", "--set", "loss.feature_recon=100"])
    config = evaluate.REPO / "configs" / "ct_nih2d.yaml"
    assert load_config(config, gvae).to_dict() == load_config(config, evaluate._overrides(alone, "gvae", 0)).to_dict()
    assert load_config(config, gan).loss.feature_recon == 1.0


@pytest.mark.parametrize("item, message", [("gan:loss.beta_kl=2", "not one of --models"),
                                           ("gvae:data.sampling.slice_size=32", "shared by every model")])
def test_a_model_prefix_outside_the_command_or_on_the_data_is_refused_in_one_line(tmp_path, item, message, capsys):
    argv = ["--dataset", "mnist", "--models", "gvae,vae", "--steps", "2", "--out", str(tmp_path / "e"),
            "--set", item]
    assert evaluate.main(argv) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "e").exists()  # refused before anything is written


def test_resuming_with_other_sets_is_refused_naming_the_row(tmp_path, capsys):
    """Finished rows are skipped by (dataset, model, seed, steps): a re-run into the same --out with another --set
    for one of its models would keep them as if made with it, and train the checkpoint on under a second config."""
    out = tmp_path / "e"
    out.mkdir()
    row = {"dataset": "mnist", "seed": 0, "steps": 2}
    pd.DataFrame([{**row, "model": "gvae", "settings": "loss.feature_recon=100"},
                  {**row, "model": "gvae@gmm8", "settings": "loss.feature_recon=100"},
                  {**row, "model": "gan", "settings": ""}]).to_csv(out / "results.csv", index=False)
    argv = ["--dataset", "mnist", "--steps", "2", "--out", str(out), "--models"]
    assert evaluate.main([*argv, "gvae,vae", "--set", "gvae:loss.feature_recon=10"]) != 0
    err = capsys.readouterr().err
    assert "gvae seed 0 at 2 steps was made with --set 'loss.feature_recon=100'" in err and "new --out" in err
    assert "Traceback" not in err
    assert evaluate.main([*argv, "gan", "--set", "train.lr_g=0.001"]) != 0  # an empty cell is read back as NaN
    assert "--set '(none)'" in capsys.readouterr().err
    # the same sets (in any order) and rows of models outside the command pass; a prior's row counts as its model's
    rows = pd.read_csv(out / "results.csv").to_dict("records")
    check_resumed_sets(rows, ["gvae:loss.feature_recon=100"], ["gvae", "gan"], out)
    check_resumed_sets(rows, ["loss.beta_kl=2"], ["vae"], out)
    check_resumed_sets([{"model": "gvae", "seed": 0, "steps": 2}], ["loss.beta_kl=2"], ["gvae"], out)  # older table
    two = [{"model": "vae", "seed": 1, "steps": 4, "settings": "loss.beta_kl=2 train.lr_g=0.001"}]
    check_resumed_sets(two, ["vae:train.lr_g=0.001", "loss.beta_kl=2"], ["vae"], out)
    with pytest.raises(PipelineError, match="gvae@gmm8 seed 0 at 2 steps"):
        check_resumed_sets(rows[1:], [], ["gvae"], out)


def test_a_stopped_evaluation_ends_its_mlflow_parent_killed_not_failed(tmp_path, mnist_dir, monkeypatch):
    """Ctrl-C (or SIGTERM, a KeyboardInterrupt here) during training: exit 130, the parent run KILLED."""
    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "train_run", interrupted)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert evaluate.main(["--dataset", "mnist", "--data-dir", str(mnist_dir), "--models", "gvae", "--seeds", "0",
                          "--out", str(tmp_path / "eval"), "--tracking-uri", uri, *TINY]) == 130
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["KILLED"]
