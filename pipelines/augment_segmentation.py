"""Do synthetic slices help a segmenter on real patients? The downstream experiment (issue 14).

    # NIH slices (the main table): 3 patient folds, 4 labelled fractions, supervised and semi-supervised
    # generators, UNet budget from pipelines/segmenter_curve.py
    python pipelines/augment_segmentation.py --data-root ../shared/data/nih-pancreas-2d --layout slices \\
        --config configs/ct_nih2d.yaml --generator-steps 2000 --fractions 0.1,0.25,0.5,1.0 --folds 3 \\
        --seeds 0 --ratios 0.5,1,2 --semi --unet-steps 2000 --out ~/pgvae-runs/downstream-nih
    # the same generators with a fitted latent prior (issue 12): its own OUT, the run above's generator cache;
    # no generator trains again, each only gets the prior fitted to its encoder's codes
    python pipelines/augment_segmentation.py ...(as above)... --set model.latent_prior_components=8 \\
        --out ~/pgvae-runs/downstream-nih-k8 --generator-cache ~/pgvae-runs/downstream-nih/generators
    # the phantom (the quick one): no --data-root; 12 cases at 256 px seen as the NIH slices are (1 mm cache,
    # a 102.4 mm window on the pancreas: 1.6 mm per pixel); at ct_64's 5 mm per pixel a UNet never finds it
    python pipelines/augment_segmentation.py --set data.phantom.size=256 --set data.phantom.cases=12 \\
        --set 'data.ct.preprocess.spacing=[1.0,1.0,null]' --set data.ct.sampling.fov_mm=102.4 \\
        --set data.ct.sampling.centre=pancreas --set data.ct.sampling.centre_jitter_mm=10 \\
        --generator-steps 1500 --fractions 0.1,0.25 --seeds 0 --ratios 1 --filter-threshold 0 --semi \\
        --semi-encoder image --semi-d blind --arms real,real+classic+semi1 --unet-steps 1000 \\
        --out ~/pgvae-runs/downstream-phantom
    # a GPU server: one process per (fraction, seed, fold), side by side, each with its own --out and
    # --tracking-uri: add --fractions F --seeds S --only-folds K; merge their dice.csv files, then --report

Protocol (details: pancreas_gvae/segmentation/experiment.py)
  * patients are cut into --folds seeded folds; each fold is the test set once (or: --test-data-root, an
    external cohort's patients, with every --data-root patient for training);
  * fraction f: round(f * n_train) labelled training patients (>= 1), drawn with the seed, nested;
  * generators: supervised (those patients' slices only) and, with --semi, semi-supervised (every training
    patient's images, only those patients' masks; --semi-encoder image: its encoder reads the image channel
    only, so an unlabelled slice's empty "unknown" mask never reads as "no pancreas"; --semi-d blind: its D
    judges (image, mask) pairs against labelled slices only, images alone on the rest); cached under
    OUT/generators/<key>, reused by arms and re-runs (--generator-cache shares them between OUTs; a generator
    that differs from a cached one only by its latent prior takes its weights and fits the prior); each one's
    split.json lists the patients it saw;
  * arms: real | real+classic | real+classic+{sup,semi}<R> for R in --ratios | real+classic+sup1-filtered
    (pairs the real+classic UNet agrees with, Dice >= --filter-threshold) | tstr-{sup,semi}; every arm
    of a (fraction, fold, seed) has the same UNet recipe, seed and real slices;
  * test: every slice of the fold's test patients: Dice and HD95 (mm) on pancreas slices;
  * summary: per (fraction, arm) Dice mean and sd, and the paired difference to real+classic over
    (fold, seed) with a 95 % t interval over pairs and one over fold means (the test patients as the
    unit), a sign count with its exact test, and each pair's difference (summary.md).

Writes OUT/dice.csv (one row per fraction x arm x fold x seed; a re-run computes only missing rows),
OUT/summary.csv, OUT/summary.md, OUT/dice.png, OUT/paired.png (each pair's difference to real+classic)
(``--report``: only these four, from the rows so far, nothing
trained); one MLflow parent run with a child per row (counts only: no patient id
reaches MLflow; case lists stay in local split.json files).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from pancreas_gvae.atomic import write_csv
from pancreas_gvae.segmentation import experiment as D
from pancreas_gvae.segmentation import report, scoring, splits
from pancreas_gvae.segmentation import unet as seg
from pancreas_gvae.config import load_config
from pancreas_gvae.data.ct.config import check_model_matches_data, data_config, fit_options
from pancreas_gvae.data.ct.discovery import LAYOUTS
from pancreas_gvae.errors import PipelineError, run_cli
from pancreas_gvae.evaluation.heldout import prepare_cohort, prepare_main_cohort
from pancreas_gvae.tracking.mlflow_tracker import ends_by_outcome

REPO = Path(__file__).resolve().parents[1]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data (default: a phantom cohort under OUT/phantom)")
    d.add_argument("--data-root", type=Path, help="CT data (TCIA, MSD, a plain folder or a 2D slice set)")
    d.add_argument("--labels", type=Path)
    d.add_argument("--layout", choices=LAYOUTS, default="auto")
    d.add_argument("--pancreas-label", type=int, help="pancreas value in multi-organ label maps (e.g. 7)")
    d.add_argument("--test-data-root", type=Path, help="an external cohort to test on (no folds then)")
    d.add_argument("--test-layout", choices=LAYOUTS, default="auto")
    d.add_argument("--test-labels", type=Path)
    d.add_argument("--test-pancreas-label", type=int)
    g = p.add_argument_group("generators")
    g.add_argument("--config", type=Path, default=REPO / "configs" / "ct_64.yaml",
                   help="generator config; its data.ct section fits the slices for every arm")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--generator-steps", type=int, help="training steps of every generator (required)")
    g.add_argument("--semi", action="store_true", help="also semi-supervised generators (all images, few masks)")
    g.add_argument("--semi-encoder", choices=("image+mask", "image"), default="image+mask",
                   help="what the semi-supervised generator's encoder reads; 'image' (model.encoder_reads_masks="
                        "false) spares it the all-zero mask of unlabelled slices. Its rows keep the arm names "
                        "semi<R>, tstr-semi: give it its own --out")
    g.add_argument("--semi-d", choices=("own", "blind"), default="own",
                   help="how the semi-supervised generator's D sees an unlabelled slice (loss.unlabelled_masks): "
                        "'own' with the generator's reconstructed mask as real; 'blind' with an 'unknown' mask, "
                        "its fakes alike, so D judges masks against labelled slices only. Rows keep the arm "
                        "names semi<R>, tstr-semi: give it its own --out (--generator-cache shares the rest)")
    g.add_argument("--generator-cache", type=Path, help="where generators are cached (default OUT/generators); "
                   "share one between runs, e.g. a --set model.latent_prior_components=8 run in its own OUT takes "
                   "the weights of the N(0, I) run's generators and only fits the prior")
    e = p.add_argument_group("experiment")
    e.add_argument("--fractions", type=_floats, default=[0.1, 0.25, 0.5, 1.0])
    e.add_argument("--folds", type=int, default=3)
    e.add_argument("--only-folds", type=_ints, help="run only these folds (0-based) of the --folds split, e.g. one "
                                                    "fold per process on a GPU server, each into its own --out")
    e.add_argument("--seeds", type=_ints, default=[0])
    e.add_argument("--ratios", type=_floats, default=[0.5, 1.0, 2.0], help="synthetic slices per real one (R)")
    e.add_argument("--arms", type=lambda t: [a.strip() for a in t.split(",") if a.strip()],
                   help="only these arms, e.g. real+classic+semi1,tstr-semi (default: every arm that --ratios, --semi "
                        "and --filter-threshold give); real+classic, the reference of every paired difference, "
                        "always runs")
    e.add_argument("--filter-threshold", type=float, default=0.5, help="0: no filtered arm")
    e.add_argument("--pool-size", type=int, default=2000, help="synthetic pairs drawn per generator")
    e.add_argument("--unet-steps", type=int, help="UNet steps of every arm (a learning curve's; required)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--lr", type=float, default=1e-3)
    e.add_argument("--pos-fraction", type=float, default=0.6, help="share of real draws from pancreas slices")
    e.add_argument("--unet-channels", type=_ints, default=[16, 32, 64, 128])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's)")
    p.add_argument("--experiment", default="pancreas-gvae-segmentation")
    p.add_argument("--report", action="store_true", help="only write OUT/summary.csv, summary.md, dice.png and paired.png "
                                                         "from the rows of OUT/dice.csv so far; train nothing")
    args = p.parse_args(argv)
    if args.report:
        return args
    if args.generator_steps is None or args.unet_steps is None:
        p.error("--generator-steps and --unet-steps are required (a learning curve's budgets)")
    known = {a for f in args.fractions
             for a in D.arms_for(args.ratios, semi=args.semi, fraction=f, filter_threshold=args.filter_threshold)}
    if args.arms and set(args.arms) - known:
        p.error(f"--arms: {', '.join(sorted(set(args.arms) - known))} is not an arm of this run; its arms: "
                f"{', '.join(sorted(known))}")
    if min(args.ratios, default=1) <= 0 or args.unet_steps < 1 or args.batch_size < 2 or args.generator_steps < 1:
        p.error("--ratios must be > 0, --unet-steps and --generator-steps >= 1, --batch-size >= 2")
    n_folds = 1 if args.test_data_root is not None else args.folds
    if args.only_folds and not set(args.only_folds) <= set(range(n_folds)):
        p.error(f"--only-folds: {args.only_folds} must be among 0..{n_folds - 1} (the run has {n_folds} fold(s))")
    return args


@run_cli
def main(argv: list[str] | None = None) -> int:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from pancreas_gvae.training import ct

    args = parse_args(argv)
    if args.report:  # the tables and plot of a partly filled dice.csv, e.g. while the runner is still going
        if not (args.out / "dice.csv").is_file():
            raise PipelineError(f"--report: no {args.out / 'dice.csv'} yet: run the experiment first")
        report.write_report(pd.read_csv(args.out / "dice.csv"), args.out, title=f"{args.out.name}: rows so far")
        print((args.out / "summary.md").read_text())
        return 0
    overrides = [f"train.steps={args.generator_steps}", "tracking.log_model=false", "tracking.system_metrics=false",
                 f"tracking.experiment={args.experiment}", *args.overrides] + ([f"tracking.tracking_uri={args.tracking_uri}"] if args.tracking_uri else [])
    gcfg = load_config(args.config, overrides)
    data = data_config(gcfg)
    check_model_matches_data(gcfg, data)
    args.out.mkdir(parents=True, exist_ok=True)
    prepared, manifest, cases = prepare_main_cohort(ct, args, gcfg, data)
    size, fit, pixel_mm = data.sampling.slice_size, fit_options(data), scoring.slice_pixel_mm(data)
    if args.test_data_root is not None:
        test_prepared = args.out / "prepared-test"
        test_manifest, test_cases = prepare_cohort(ct, args.test_data_root, test_prepared, data,
                                                   labels=args.test_labels, layout=args.test_layout,
                                                   pancreas_label=args.test_pancreas_label)
        folds = [splits.CaseSplit(train=cases, test=test_cases)]  # an id in both cohorts is refused here
    else:
        folds = D.patient_folds(cases, args.folds, seed=0)

    def load(which: list[str]) -> seg.SliceSet:
        return seg.load_slices(prepared, splits.restrict_manifest(manifest, which), which, size=size, **fit)

    def load_test(split: splits.CaseSplit) -> seg.SliceSet:
        if args.test_data_root is None:
            return load(split.test)
        return seg.load_slices(test_prepared, splits.restrict_manifest(test_manifest, split.test), split.test,
                               size=size, **fit)

    recipe = D.Recipe(steps=args.unet_steps, batch_size=args.batch_size, lr=args.lr, pos_fraction=args.pos_fraction,
                      channels=tuple(args.unet_channels), pool_size=args.pool_size,
                      filter_threshold=args.filter_threshold)
    path, cache = args.out / "dice.csv", args.generator_cache or args.out / "generators"
    rows = pd.read_csv(path).to_dict("records") if path.is_file() else []
    done = {(float(r["fraction"]), r["arm"], int(r["fold"]), int(r["seed"])) for r in rows}
    if rows:
        print(f"resuming: {len(rows)} finished row(s) in {path} are kept, not recomputed")
    print(f"{len(cases)} patients, {len(folds)} fold(s); {pixel_mm:.2f} mm/pixel at {size} px; UNet "
          f"{args.unet_steps} steps x {args.batch_size}; generators {args.generator_steps} steps")
    tracking_uri = gcfg.tracking.tracking_uri
    # The client API, not mlflow.start_run: each generator's training opens its own (fluent) run meanwhile.
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(args.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(args.experiment)
    parent_id = client.create_run(exp_id, run_name="downstream", tags={"kind": "downstream"}).info.run_id
    with ends_by_outcome(client, parent_id):
        _log_params(client, parent_id, {
                           "fractions": ",".join(f"{f:g}" for f in args.fractions), "folds": len(folds),
                           "only_folds": ",".join(map(str, args.only_folds or [])) or "all",
                           "seeds": ",".join(map(str, args.seeds)), "ratios": ",".join(f"{r:g}" for r in args.ratios),
                           "semi": args.semi, "semi_encoder": args.semi_encoder,
                           "semi_d": args.semi_d, "arms": ",".join(args.arms or ["all"]),
                           "filter_threshold": args.filter_threshold, "pool_size": args.pool_size,
                           "unet_steps": args.unet_steps, "batch_size": args.batch_size, "lr": args.lr,
                           "pos_fraction": args.pos_fraction, "generator_steps": args.generator_steps,
                           "generator_config": str(args.config), "n_patients": len(cases), "pixel_mm": pixel_mm,
                           "slice_size": size, "external_test": args.test_data_root is not None})

        def on_row(row: dict) -> None:
            rows.append(row)
            write_csv(pd.DataFrame(rows, columns=D.COLUMNS), path)  # survives an interruption
            name = f"{row['arm']}-f{row['fraction']:g}-k{row['fold']}-s{row['seed']}"
            child = client.create_run(exp_id, run_name=name, tags={"mlflow.parentRunId": parent_id}).info.run_id
            _log_params(client, child, {k: row[k] for k in ("fraction", "arm", "fold", "seed", "n_labelled_cases",
                                                            "n_unlabelled_cases", "n_real_slices", "n_synthetic")})
            client.log_batch(child, metrics=[Metric(k, float(row[k]), int(time.time() * 1000), 0)
                                             for k in ("dice", "hd95", "dice_all", "final_loss") if pd.notna(row[k])])
            client.set_terminated(child)
            print(f"fraction {row['fraction']:g} fold {row['fold']} seed {row['seed']} {row['arm']:>28}: "
                  f"{row['n_labelled_cases']} labelled patient(s), {row['n_real_slices']} real + "
                  f"{row['n_synthetic']} synthetic -> Dice {row['dice']:.3f} ({row['seconds']:.0f} s)", flush=True)

        for k, split in enumerate(folds):
            if args.only_folds and k not in args.only_folds:
                continue
            test = load_test(split)
            for fraction in args.fractions:
                for seed in args.seeds:
                    labelled = splits.subset_cases(split.train, fraction, seed)
                    unlabelled = sorted(set(split.train) - set(labelled))

                    def generator(mode: str, labelled=labelled, unlabelled=unlabelled, seed=seed) -> Path:
                        semi = (["model.encoder_reads_masks=false"] if args.semi_encoder == "image" else []) + (
                            [f"loss.unlabelled_masks={args.semi_d}"] if args.semi_d != "own" else [])
                        cfg = load_config(args.config, overrides + [f"train.seed={seed}"]
                                          + (semi if mode == "semi" else []))
                        spec = D.GeneratorSpec(labelled=labelled, unlabelled=unlabelled if mode == "semi" else [],
                                               test=split.test, seed=seed, config=cfg.to_dict())
                        return D.train_or_reuse_generator(spec, prepared, manifest, cfg, cache,
                                                          tags={"mlflow.parentRunId": parent_id})

                    arms = [a for a in D.arms_for(args.ratios, semi=args.semi, fraction=fraction,
                                                  filter_threshold=args.filter_threshold)
                            if not args.arms or a in args.arms or a == D.BASELINE]
                    D.run_group(fraction=fraction, fold=k, seed=seed, split=split, arms=arms, done=done, load=load,
                                test=test, generator=generator, recipe=recipe, pixel_mm=pixel_mm, on_row=on_row)
        if not rows:
            raise PipelineError("no row was produced")
        df = pd.DataFrame(rows, columns=D.COLUMNS)
        seeds = ",".join(str(v) for v in sorted(df["seed"].unique()))  # of every row, resumed ones included
        for f in report.write_report(df, args.out, title=f"{df['fold'].nunique()} fold(s), seed(s) {seeds} "
                                                    f"(not every arm has each), UNet {args.unet_steps} steps"):
            client.log_artifact(parent_id, str(f))
    print((args.out / "summary.md").read_text())
    print(f"wrote {path}, summary.csv, summary.md, dice.png and paired.png in {args.out}; MLflow parent run {parent_id} "
          f"in {tracking_uri}")
    return 0


def _log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])


if __name__ == "__main__":
    raise SystemExit(main())
