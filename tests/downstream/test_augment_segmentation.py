"""Issue 6, downstream half: case-level split, no test case in the generator's data, metric sanity, CLI plumbing."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from pancreas_gvae.segmentation import scoring, splits

from pancreas_gvae.segmentation import unet as seg
from pancreas_gvae.errors import PipelineError

TINY_GVAE = ["--set", "model.channels=[8,16,32]", "--set", "model.latent_dim=8", "--set", "train.batch_size=4",
             "--set", "train.sample_every=1000", "--set", "train.checkpoint_every=1000", "--set", "train.num_samples=4",
             "--set", "data.ct.sampling.slice_size=32", "--set", "model.image_size=32"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """4 phantom cases at 64 px, prepared with the CT-64 data config (slices fitted to 32 px for speed)."""
    from pancreas_gvae.config import load_config
    from pancreas_gvae.data.ct.phantom import make_phantom_cohort
    from pancreas_gvae.data.ct.prepare import prepare_dataset
    from pancreas_gvae.data.ct.config import data_config

    root = tmp_path_factory.mktemp("seg")
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "ct_64.yaml",
                      ["model.channels=[8,16,32]", "model.latent_dim=8", "model.image_size=32",
                       "data.ct.sampling.slice_size=32", "train.batch_size=4", "tracking.log_model=false",
                       "tracking.system_metrics=false"])
    make_phantom_cohort(root / "phantom", cases=4, size=64, seed=0)
    data = data_config(cfg)
    manifest = prepare_dataset(root / "phantom", root / "prepared", config=data, progress=False)
    return root, cfg, manifest


def test_split_is_by_case_without_overlap_and_fractions_stay_in_train():
    ids = [f"PANCREAS_{i:04d}" for i in range(1, 11)]
    split = splits.split_cases(ids, test_fraction=0.4, seed=3)
    assert not set(split.train) & set(split.test)
    assert sorted(split.train + split.test) == ids and len(split.test) == 4
    assert splits.split_cases(ids, test_fraction=0.4, seed=3) == split  # fixed by the seed
    for f in (0.01, 0.1, 0.5, 1.0):
        sub = splits.subset_cases(split.train, f, seed=1)
        assert 1 <= len(sub) <= len(split.train) and set(sub) <= set(split.train)
    assert set(splits.subset_cases(split.train, 0.5, 2)) <= set(splits.subset_cases(split.train, 1.0, 2))
    with pytest.raises(PipelineError):
        splits.CaseSplit(train=["a", "b"], test=["b"])
    two = splits.split_cases(["a", "b"], test_fraction=0.5, seed=0)
    assert len(two.train) == len(two.test) == 1


@pytest.mark.slow  # the first MONAI metrics import alone takes ~20 s on the loaded 2-core box
def test_perfect_prediction_scores_dice_1_and_hd95_0():
    label = torch.zeros(3, 1, 32, 32)
    label[0, 0, 8:16, 8:16] = 1
    label[1, 0, 10:20, 5:9] = 1  # slice 2: no pancreas
    res = scoring.evaluate_predictions(label.clone(), label, pixel_mm=2.0)
    assert res["dice"] == pytest.approx(1.0) and res["hd95"] == pytest.approx(0.0)
    assert res["dice_all"] == pytest.approx(1.0) and res["n_pancreas_slices"] == 2
    empty = scoring.evaluate_predictions(torch.zeros_like(label), label, pixel_mm=2.0)
    assert empty["dice"] == pytest.approx(0.0)
    assert empty["hd95"] == pytest.approx(2.0 * (32**2 + 32**2) ** 0.5)  # missed organ: the image diagonal
    shifted = torch.roll(label, 2, dims=-1)
    assert scoring.evaluate_predictions(shifted, label, pixel_mm=2.0)["hd95"] == pytest.approx(4.0)


def test_batches_mix_synthetic_at_the_ratio_with_the_same_size():
    assert seg.split_batch(16, 0.0) == (16, 0)
    assert seg.split_batch(16, 1.0) == (8, 8)
    assert seg.split_batch(16, 0.5) == (11, 5)
    assert seg.split_batch(4, 100.0) == (1, 3)


def test_generators_see_only_their_patients_and_withheld_masks_stay_withheld(cohort, tmp_path, monkeypatch):
    """Supervised: the labelled patients only. Semi-supervised: every training patient's images, masks of
    the labelled ones only (unlabelled items carry has_label 0 and an all-zero mask). Never a test patient;
    split.json records what each saw; a finished generator is reused, not retrained."""
    from pancreas_gvae.segmentation import experiment as D

    root, cfg, manifest = cohort
    cases = splits.ok_cases(manifest)
    split = splits.CaseSplit(train=cases[:3], test=cases[3:])
    seen = []

    def fake_train_run(cfg, batches, preview, **kw):
        ds = batches.dataset
        seen.append({"cases": set(ds.case_ids), "withheld": set(ds.withheld),
                     "items": [ds[i] for i in range(len(ds))]})
        ckpt = Path(kw["out_dir"]) / "checkpoints" / "last.pt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_text("stand-in")

    import pancreas_gvae.training.run as run_mod
    monkeypatch.setattr(run_mod, "train_run", fake_train_run)
    labelled, unlabelled = split.train[:1], split.train[1:]
    sup = D.GeneratorSpec(labelled=labelled, unlabelled=[], test=split.test, seed=0, config=cfg.to_dict())
    semi = D.GeneratorSpec(labelled=labelled, unlabelled=unlabelled, test=split.test, seed=0, config=cfg.to_dict())
    assert sup.key != semi.key
    for spec in (sup, semi):
        D.train_or_reuse_generator(spec, root / "prepared", manifest, cfg, tmp_path / "gen", tags={})
    assert seen[0]["cases"] == set(labelled) and not seen[0]["withheld"]
    assert seen[1]["cases"] == set(split.train) and seen[1]["withheld"] == set(unlabelled)
    for item in seen[1]["items"]:
        hidden = item["case_id"] in unlabelled
        assert float(item["has_label"]) == (0.0 if hidden else 1.0)
        if hidden:
            assert item["label"].sum() == 0
    assert any(it["label"].sum() > 0 for it in seen[1]["items"])  # labelled patients keep their masks
    recorded = json.loads((tmp_path / "gen" / semi.key / "split.json").read_text())
    assert set(recorded["train"]) == set(split.train) and set(recorded["test"]) == set(split.test)
    D.train_or_reuse_generator(semi, root / "prepared", manifest, cfg, tmp_path / "gen", tags={})
    assert len(seen) == 2, "a finished generator is reused"
    ckpt = tmp_path / "gen" / semi.key / "checkpoints" / "last.pt"
    with pytest.raises(PipelineError, match="leak"):
        splits.check_generator_split(ckpt, splits.CaseSplit(train=split.test, test=split.train))


def test_a_latent_prior_reuses_the_weights_of_its_n01_twin_bit_for_bit(cohort, tmp_path, monkeypatch):
    """A generator that differs from a finished one only by a fitted latent prior takes its weights and fits the
    prior, as training from scratch would have: the same tensors, prior included, and no training."""
    import torch

    from pancreas_gvae.config import Config, deep_update
    from pancreas_gvae.segmentation import experiment as D

    root, cfg, manifest = cohort
    cases = splits.ok_cases(manifest)
    split = splits.CaseSplit(train=cases[:3], test=cases[3:])

    def make(k: int, gen: str):
        c = Config.from_dict(deep_update(cfg.to_dict(), {
            "model": {"latent_prior_components": k},
            "train": {"steps": 3, "sample_every": 1000, "checkpoint_every": 1000, "num_samples": 4},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}))
        spec = D.GeneratorSpec(labelled=split.train, unlabelled=[], test=split.test, seed=0, config=c.to_dict())
        return D.train_or_reuse_generator(spec, root / "prepared", manifest, c, tmp_path / gen, tags={})

    scratch = torch.load(make(2, "scratch"), map_location="cpu", weights_only=False)  # trained with the prior
    make(0, "shared")  # the N(0, I) twin, trained

    import pancreas_gvae.training.run as run_mod

    def no_training(*_, **__):
        raise AssertionError("trained again")

    monkeypatch.setattr(run_mod, "train_run", no_training)
    reused = torch.load(make(2, "shared"), map_location="cpu", weights_only=False)
    for part in ("model", "ema"):
        assert any(".prior." in k for k in reused[part])
        assert reused[part].keys() == scratch[part].keys()
        assert all(torch.equal(reused[part][k], scratch[part][k]) for k in scratch[part]), part
    assert reused["config"]["model"]["latent_prior_components"] == 2


def test_generator_cache_key_ignores_settings_the_code_added_later_at_their_default():
    """A generator trained before a setting existed is the one the same config gives now if the setting is at
    its default (every new setting keeps the old behaviour there): same key, reused. Any value that differs
    from the default, or another patient, seed or tracking-independent setting, is another generator."""
    import copy

    from pancreas_gvae.config import load_config
    from pancreas_gvae.segmentation import experiment as D

    now = load_config(None, ["train.steps=2000", "model.latent_dim=64"]).to_dict()
    before = copy.deepcopy(now)
    del before["model"]["latent_prior_components"]  # the config as saved before the latent prior existed

    def key(config, labelled=("P1", "P2"), seed=0):
        return D.GeneratorSpec(labelled=list(labelled), unlabelled=[], test=["P9"], seed=seed, config=config).key

    assert key(before) == key(now)
    tracked = copy.deepcopy(now)
    tracked["tracking"]["experiment"] = "elsewhere"
    assert key(tracked) == key(now)
    for change in (["train.steps=3000"], ["model.latent_prior_components=8"], []):
        other = load_config(None, ["train.steps=2000", "model.latent_dim=64", *change]).to_dict()
        assert (key(other) == key(now)) == (change == [])
    assert key(now, labelled=("P1", "P3")) != key(now) and key(now, seed=1) != key(now)


def test_patient_folds_test_every_patient_once():
    from pancreas_gvae.segmentation import experiment as D

    ids = [f"P{i:02d}" for i in range(10)]
    folds = D.patient_folds(ids, 3, seed=0)
    tests = [set(f.test) for f in folds]
    assert sorted(sum((sorted(t) for t in tests), [])) == ids and all(len(t) in (3, 4) for t in tests)
    for f in folds:
        assert not set(f.train) & set(f.test) and set(f.train) | set(f.test) == set(ids)
    with pytest.raises(PipelineError, match="folds"):
        D.patient_folds(ids, 1)


def test_arms_and_their_names():
    from pancreas_gvae.segmentation import experiment as D

    arms = D.arms_for([0.5, 1.0], semi=True, fraction=0.25, filter_threshold=0.5)
    assert arms == ["real", "real+classic", "real+classic+sup0.5", "real+classic+sup1", "real+classic+semi0.5",
                    "real+classic+semi1", "real+classic+sup1-filtered", "tstr-sup", "tstr-semi"]
    assert "real+classic+semi1" not in D.arms_for([1.0], semi=True, fraction=1.0, filter_threshold=0.5)
    assert D.parse_arm("real+classic+semi0.5") == ("semi", 0.5, False)
    assert D.parse_arm("real+classic+sup1-filtered") == ("sup", 1.0, True)
    assert D.parse_arm("tstr-sup")[1] == float("inf") and D.parse_arm("real+classic") == (None, 0.0, False)


def test_paired_differences_and_their_interval():
    from scipy import stats

    from pancreas_gvae.segmentation import report as R

    rows = []
    for fold, (base, aug) in enumerate([(0.50, 0.55), (0.60, 0.62), (0.40, 0.47)]):
        rows += [{"fraction": 0.1, "arm": "real+classic", "fold": fold, "seed": 0, "dice": base},
                 {"fraction": 0.1, "arm": "real+classic+sup1", "fold": fold, "seed": 0, "dice": aug}]
    s = R.paired_summary(pd.DataFrame(rows)).set_index("arm")
    diffs = [0.05, 0.02, 0.07]
    half = stats.t.ppf(0.975, 2) * pd.Series(diffs).std(ddof=1) / 3 ** 0.5
    got = s.loc["real+classic+sup1"]
    assert got["diff_vs_real+classic"] == pytest.approx(sum(diffs) / 3)
    assert got["ci95_low"] == pytest.approx(sum(diffs) / 3 - half) and got["n_pairs"] == 3
    assert s.loc["real+classic", "diff_vs_real+classic"] == 0
    assert got["n_positive"] == 3 and got["sign_p"] == pytest.approx(0.25)  # 3 of 3: 2 * 0.5 ** 3


def test_fold_interval_averages_the_seeds_of_a_fold_first():
    """Seeds of one fold share its test patients: the fold-level interval is a t interval over fold means
    (n = folds), wider than the one over pairs; the sign test drops ties."""
    from scipy import stats

    from pancreas_gvae.segmentation import report as R

    diffs = {(0, 0): 0.04, (0, 1): 0.02, (1, 0): 0.06, (1, 1): 0.0, (2, 0): -0.01, (2, 1): 0.05}
    rows = []
    for (fold, seed), d in diffs.items():
        rows += [{"fraction": 0.25, "arm": "real+classic", "fold": fold, "seed": seed, "dice": 0.5},
                 {"fraction": 0.25, "arm": "real+classic+sup1", "fold": fold, "seed": seed, "dice": 0.5 + d}]
    got = R.paired_summary(pd.DataFrame(rows)).set_index("arm").loc["real+classic+sup1"]
    fold_means = pd.Series([0.03, 0.03, 0.02])
    half = stats.t.ppf(0.975, 2) * fold_means.std(ddof=1) / 3 ** 0.5
    assert got["n_folds"] == 3 and got["n_pairs"] == 6
    assert got["fold_ci95_low"] == pytest.approx(fold_means.mean() - half, abs=1e-9)
    assert got["fold_ci95_high"] == pytest.approx(fold_means.mean() + half, abs=1e-9)
    assert got["fold_ci95_high"] - got["fold_ci95_low"] != pytest.approx(got["ci95_high"] - got["ci95_low"])
    assert got["n_positive"] == 4 and got["sign_p"] == pytest.approx(stats.binomtest(4, 5).pvalue)


def test_report_writes_the_tables_of_a_partial_run_and_trains_nothing(tmp_path, capsys):
    """--report: summary.csv/.md and dice.png from the rows so far (a missing pair is a blank, not a zero);
    without rows it is one line and exit 2; without --report the budgets are required."""
    from pancreas_gvae.pipelines import augment_segmentation

    rows = [{"fraction": 0.25, "arm": arm, "fold": fold, "seed": 0, "dice": dice}
            for fold, (base, aug) in enumerate([(0.50, 0.55), (0.60, 0.58)])
            for arm, dice in (("real+classic", base), ("real+classic+sup1", aug))]
    rows.append({"fraction": 0.25, "arm": "real+classic", "fold": 2, "seed": 0, "dice": 0.4})  # its pair is missing
    pd.DataFrame(rows).to_csv(tmp_path / "dice.csv", index=False)
    assert augment_segmentation.main(["--out", str(tmp_path), "--report"]) == 0
    md = (tmp_path / "summary.md").read_text()
    assert ("| real+classic+sup1 | 2 | 0.565 ± 0.021 | +0.015 | [-0.430, +0.460] | [-0.430, +0.460], 2 folds "
            "| 1 of 2 (p = 1) |") in md, md
    assert "| real+classic | 3 | 0.500 ± 0.100 | +0.000 | – | – | – |" in md, md
    assert "| 0, 0 | +0.050 |" in md and "| 1, 0 | -0.020 |" in md and "| 2, 0 |  |" in md
    assert (tmp_path / "dice.png").is_file() and (tmp_path / "summary.csv").is_file()
    assert (tmp_path / "paired.png").stat().st_size > 0
    assert not (tmp_path / "generators").exists()
    assert augment_segmentation.main(["--out", str(tmp_path / "empty"), "--report"]) == 2
    with pytest.raises(SystemExit):
        augment_segmentation.main(["--out", str(tmp_path)])
    assert "--generator-steps and --unet-steps are required" in capsys.readouterr().err


def test_arms_and_only_folds_options_run_what_they_name(cohort, tmp_path, capsys):
    """--arms trains only the named arms (real+classic always: every paired difference needs it); --only-folds only
    the named folds, and a later run adds the others; a name or fold that is not one of the run is a clear argument
    error, before anything is prepared or trained."""
    from pancreas_gvae.pipelines import augment_segmentation

    root, _, _ = cohort
    out = tmp_path / "out"
    argv = ["--data-root", str(root / "phantom"), "--generator-steps", "2", "--semi", "--fractions", "0.5",
            "--folds", "2", "--seeds", "0", "--ratios", "1", "--unet-steps", "2", "--batch-size", "4",
            "--unet-channels", "4,8,16", "--pool-size", "8", "--filter-threshold", "0", "--out", str(out),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *TINY_GVAE,
            "--set", "model.latent_prior_components=0"]
    with pytest.raises(SystemExit) as err:
        augment_segmentation.main(argv + ["--arms", "real+classic+semi2"])
    assert err.value.code == 2 and "real+classic+semi2 is not an arm of this run" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit) as err:
        augment_segmentation.main(argv + ["--only-folds", "2"])
    assert err.value.code == 2 and "--only-folds: [2] must be among 0..1" in capsys.readouterr().err
    assert not out.exists()
    # one fold per process (as on a GPU server), then the rest: the second run keeps fold 1's rows
    assert augment_segmentation.main(argv + ["--arms", "real+classic+semi1", "--only-folds", "1"]) == 0
    assert set(pd.read_csv(out / "dice.csv")["fold"]) == {1} and len(list((out / "generators").iterdir())) == 1
    assert augment_segmentation.main(argv + ["--arms", "real+classic+semi1"]) == 0
    assert "resuming: 2 finished row(s)" in capsys.readouterr().out
    df = pd.read_csv(out / "dice.csv")
    assert sorted(df["arm"].unique()) == ["real+classic", "real+classic+semi1"] and len(df) == 4
    gens = list((out / "generators").iterdir())
    assert len(gens) == 2  # the semi generators of the two folds; no supervised one was trained


def test_filter_keeps_the_pairs_the_judge_agrees_with():
    from pancreas_gvae.segmentation import experiment as D

    label = torch.zeros(3, 1, 8, 8)
    label[0, 0, 2:6, 2:6] = 1
    label[1, 0, 0:2, 0:2] = 1
    pool = seg.SliceSet(label.clone(), label.clone(), ["synthetic"] * 3)

    class Judge(torch.nn.Module):  # predicts the first pair's mask everywhere
        def forward(self, x):
            fg = label[:1].expand(len(x), -1, -1, -1)
            return torch.cat([1 - fg, fg], dim=1)

    kept = D.filter_by_agreement(pool, Judge(), 0.5)
    assert len(kept) == 1 and torch.equal(kept.label[0], label[0])  # pair 2 disagrees, pair 3 (empty) too


@pytest.mark.slow
def test_cli_runs_every_arm_resumably_with_nested_mlflow_runs(cohort, tmp_path):
    from mlflow.tracking import MlflowClient

    from pancreas_gvae.pipelines import augment_segmentation
    from pancreas_gvae.training.run import checkpoint_path

    root, _, _ = cohort
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    argv = ["--data-root", str(root / "phantom"), "--generator-steps", "2", "--semi", "--fractions", "0.5,1.0",
            "--folds", "2", "--seeds", "0", "--ratios", "1", "--unet-steps", "2", "--batch-size", "4",
            "--unet-channels", "4,8,16", "--pool-size", "16", "--filter-threshold", "0.01", "--out", str(out),
            "--tracking-uri", uri, *TINY_GVAE, "--set", "model.latent_prior_components=0",  # ct_64's is 8
            "--semi-encoder", "image", "--semi-d", "blind"]
    assert augment_segmentation.main(argv) == 0
    df = pd.read_csv(out / "dice.csv")
    half = {"real", "real+classic", "real+classic+sup1", "real+classic+semi1", "tstr-sup", "tstr-semi"}
    assert half <= set(df.loc[df["fraction"] == 0.5, "arm"])
    assert "real+classic+semi1" not in set(df.loc[df["fraction"] == 1.0, "arm"])
    assert set(df["fold"]) == {0, 1} and df["dice"].between(0, 1).all()
    assert (df.loc[df["arm"].isin(["real", "real+classic"]), "n_synthetic"] == 0).all()
    assert (df.loc[df["arm"].str.startswith("tstr"), "n_synthetic"] > 0).all()
    semi = df[df["arm"] == "real+classic+semi1"]
    assert (semi["n_unlabelled_cases"] > 0).all() and (semi["n_labelled_cases"] == 1).all()
    generators = list((out / "generators").iterdir())
    assert len(generators) == 6  # per fold: f0.5 supervised + semi-supervised, f1.0 supervised
    for g in generators:
        rec = json.loads((g / "split.json").read_text())
        assert not set(rec["train"]) & set(rec["test"])
    configs = [torch.load(checkpoint_path(g), weights_only=False)["config"] for g in generators]
    reads = [c["model"]["encoder_reads_masks"] for c in configs]
    assert sorted(reads) == [False, False, True, True, True, True]  # the two semi generators' read images only
    d_modes = {c["model"]["encoder_reads_masks"]: c["loss"]["unlabelled_masks"] for c in configs}
    assert d_modes == {False: "blind", True: "own"}  # --semi-d reaches the semi generators only
    summary = pd.read_csv(out / "summary.csv")
    assert {"diff_vs_real+classic", "ci95_low", "ci95_high", "n_pairs"} <= set(summary.columns)
    assert (out / "dice.png").stat().st_size > 0
    n = len(df)
    assert augment_segmentation.main(argv) == 0  # resumed: nothing recomputed
    assert len(pd.read_csv(out / "dice.csv")) == n
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("pancreas-gvae-segmentation")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "downstream"]
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    ids = {p.info.run_id for p in parents}
    rows = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in ids and r.info.run_name.startswith(("real",
                                                                                                          "tstr"))]
    assert len(rows) == n, "one child run per row, none added by the resumed run"
    generator_runs = [r for r in runs if r.data.tags.get("purpose") == "downstream-generator"]
    assert len(generator_runs) == 6 and all(r.data.tags["mlflow.parentRunId"] in ids for r in generator_runs)
    text = str([r.data.params for r in runs]) + str([r.data.tags for r in runs])
    assert "PANCREAS_" not in text and "case_0" not in text  # case ids never reach MLflow

    # a latent-prior run in its own OUT, sharing the generator cache: the supervised generators' weights are
    # reused (no generator trains), each gets a fitted prior in a new cache entry
    import pancreas_gvae.training.run as run_mod

    def no_training(*_, **__):
        raise AssertionError("a generator was trained again")

    prior_argv = [a if a != str(out) else str(tmp_path / "k2") for a in argv if a != "--semi"]
    prior_argv += ["--generator-cache", str(out / "generators"), "--set", "model.latent_prior_components=2"]  # last wins
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod, "train_run", no_training)
        assert augment_segmentation.main(prior_argv) == 0
    assert len(pd.read_csv(tmp_path / "k2" / "dice.csv")) == len(df[~df["arm"].str.contains("semi")])
    assert len(list((out / "generators").iterdir())) == 6 + 4  # per fold: f0.5 and f1.0 with a prior


def test_a_stopped_run_ends_its_mlflow_parent_killed_not_failed(cohort, tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM, a KeyboardInterrupt here) is a stop, not a failure: exit 130, parent run KILLED."""
    from mlflow.tracking import MlflowClient

    from pancreas_gvae.pipelines import augment_segmentation
    from pancreas_gvae.segmentation import experiment as D

    def interrupted(**_):
        raise KeyboardInterrupt

    monkeypatch.setattr(D, "run_group", interrupted)
    root, _, _ = cohort
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--data-root", str(root / "phantom"), "--generator-steps", "2", "--fractions", "1.0", "--folds", "2",
            "--unet-steps", "2", "--out", str(tmp_path / "out"), "--tracking-uri", uri, *TINY_GVAE]
    assert augment_segmentation.main(argv) == 130
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("pancreas-gvae-segmentation").experiment_id])
    assert [r.info.status for r in runs if r.data.tags.get("kind") == "downstream"] == ["KILLED"]
