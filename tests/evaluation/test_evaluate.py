"""Issue 5: the evaluation CLI on tiny settings (real MNIST, temporary MLflow sqlite store) and results.md."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pancreas_gvae.evaluation import COLUMNS, METRICS, best_per_column, render_markdown, summarise
from pipelines import evaluate

ENCODER_ONLY = [m.column for m in METRICS if m.encoder_only]
TINY = ["--steps", "3", "--batch-size", "8", "--n-eval", "16", "--n-val", "8", "--n-memo", "200",
        "--iwae-k", "2", "--feature-steps", "5", "--set", "model.channels=[8,16]", "--set", "model.latent_dim=8",
        "--set", "train.num_samples=8", "--set", "train.sample_every=100", "--set", "train.checkpoint_every=100"]


@pytest.mark.slow
def test_cli_writes_tables_and_nested_mlflow_runs(tmp_path, mnist_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "eval"
    code = evaluate.main(["--dataset", "mnist", "--data-dir", str(mnist_dir), "--models", "vae,gan", "--seeds", "0",
                          "--out", str(out), "--tracking-uri", uri, *TINY])
    assert code == 0
    frame = pd.read_csv(out / "results.csv")
    assert list(frame.columns) == COLUMNS
    assert sorted(frame["model"]) == ["gan", "vae"] and set(frame["seed"]) == {0} and len(frame) == 2
    gan, vae = frame[frame.model == "gan"].iloc[0], frame[frame.model == "vae"].iloc[0]
    for c in ENCODER_ONLY:  # blank, not zero, for the GAN; present for the VAE
        assert math.isnan(gan[c]), c
        assert math.isfinite(vae[c]), c
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
    assert len(children) == 2 and len(runs) == 3
    assert {c.info.run_id for c in children} == set(frame["run_id"])
    vae_run = next(c for c in children if c.data.tags["model"] == "vae")
    assert "eval/elbo_nats" in vae_run.data.metrics and "eval/mmd2_pixel" in vae_run.data.metrics
    gan_run = next(c for c in children if c.data.tags["model"] == "gan")
    assert "eval/elbo_nats" not in gan_run.data.metrics
    assert {a.path for a in client.list_artifacts(pid)} >= {"results.csv", "results.md"}


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
