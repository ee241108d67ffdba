"""How many steps does the downstream UNet need? Its validation-Dice learning curve, on training patients only.

    python pipelines/segmenter_curve.py --data-root ../shared/data/nih-pancreas-2d --layout slices \\
        --config configs/ct_nih2d.yaml --steps 3000 --every 250 --augment none,classic --seeds 0 \\
        --out ~/pgvae-runs/seg-curve

Protocol
  * the cohort is split by patient exactly as ``pipelines/evaluate.py`` splits it (--test-fraction, seed 0);
    the held-out patients are never loaded here;
  * the training patients are split again by patient (--val-fraction, seed 1): the UNet trains on the
    rest and is scored on these validation patients every --every steps (slices fitted like the generator's
    training data: ``data.ct.sampling`` of --config);
  * arms: ``none`` (real slices as they are) and ``classic`` (MONAI RandAffined + intensity + noise,
    ``segmentation.ClassicAugmentation``); same recipe as the evaluation's segmenter (batch 16, lr 1e-3,
    pancreas oversampling 0.6, UNet channels 16-128);
  * the budget printed per arm is the first step within 0.01 Dice of the best (3-point mean) validation Dice.

Writes OUT/curve.csv (one row per (arm, seed, step); an (arm, seed) already there is skipped on a re-run),
OUT/curve.png, and one MLflow run with the curves as step-indexed metrics.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from pancreas_gvae.segmentation import scoring, splits

from pancreas_gvae.segmentation import unet as S
from pancreas_gvae.config import load_config
from pancreas_gvae.data.ct.config import data_config, fit_options
from pancreas_gvae.data.ct.discovery import LAYOUTS
from pancreas_gvae.errors import PipelineError, run_cli
from pancreas_gvae.evaluation.heldout import prepare_main_cohort

ARMS = ("none", "classic")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, help="CT data; default: a phantom cohort under OUT/phantom")
    p.add_argument("--layout", choices=LAYOUTS, default="auto")
    p.add_argument("--labels", type=Path)
    p.add_argument("--pancreas-label", type=int)
    p.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "configs" / "ct_64.yaml",
                   help="a generator config: its data.ct section decides how slices are fitted")
    p.add_argument("--test-fraction", type=float, default=1 / 3, help="patients held out (as evaluate.py)")
    p.add_argument("--val-fraction", type=float, default=0.25, help="training patients used for validation")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--augment", default="none,classic", help="comma-separated arms: " + ",".join(ARMS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p.parse_args(argv)


@run_cli
def main(argv: list[str] | None = None) -> int:
    import mlflow

    from pancreas_gvae.training import ct
    from pancreas_gvae.evaluation.tables import plot_curves

    args = parse_args(argv)
    arms = [a for a in args.augment.split(",") if a]
    if not arms or set(arms) - set(ARMS):
        raise PipelineError(f"--augment: comma-separated arms from {ARMS}, got {args.augment!r}")
    seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    if args.steps < args.every or args.every < 1:
        raise PipelineError("--every must be >= 1 and <= --steps")
    cfg = load_config(args.config, args.overrides)
    data_cfg = data_config(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    prepared, manifest, cases = prepare_main_cohort(ct, args, cfg, data_cfg)
    train_cases = splits.split_cases(cases, test_fraction=args.test_fraction, seed=0).train
    fit_val = splits.split_cases(train_cases, test_fraction=args.val_fraction, seed=1)
    size, fit = data_cfg.sampling.slice_size, fit_options(data_cfg)
    train = S.load_slices(prepared, splits.restrict_manifest(manifest, fit_val.train), fit_val.train, size=size, **fit)
    val = S.load_slices(prepared, splits.restrict_manifest(manifest, fit_val.test), fit_val.test, size=size, **fit)
    pixel_mm = scoring.slice_pixel_mm(data_cfg)
    print(f"{len(fit_val.train)} training patients ({len(train)} slices), {len(fit_val.test)} validation patients "
          f"({len(val)} slices); {len(cases) - len(train_cases)} test patients not loaded; {pixel_mm:.2f} mm/pixel")

    path = args.out / "curve.csv"
    frame = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["arm", "seed", "step"])
    mlflow.set_tracking_uri(args.tracking_uri or cfg.tracking.tracking_uri)
    mlflow.set_experiment(cfg.tracking.experiment)
    with mlflow.start_run(run_name="segmenter-curve"):
        mlflow.log_params({"config": str(args.config), "steps": args.steps, "every": args.every,
                           "batch_size": args.batch_size, "n_train_patients": len(fit_val.train),
                           "n_val_patients": len(fit_val.test), "n_train_slices": len(train),
                           "n_val_slices": len(val), "pixel_mm": pixel_mm, **{f"fit_{k}": v for k, v in fit.items()}})
        for arm in arms:
            for seed in seeds:
                done = frame[(frame["arm"] == arm) & (frame["seed"] == seed)]
                if len(done) and int(done["step"].max()) >= args.steps:
                    print(f"{arm} seed {seed}: in {path}, skipped")
                else:
                    rows = scoring.learning_curve(train, val, steps=args.steps, every=args.every,
                                            batch_size=args.batch_size, seed=seed, pixel_mm=pixel_mm,
                                            augment=arm == "classic")
                    new = pd.DataFrame([{"arm": arm, "seed": seed, **r} for r in rows])
                    frame = pd.concat([frame[~((frame["arm"] == arm) & (frame["seed"] == seed))], new])
                    frame.to_csv(path, index=False)
                for r in frame[(frame["arm"] == arm) & (frame["seed"] == seed)].itertuples():
                    mlflow.log_metrics({f"{arm}/s{seed}/val_dice": r.dice, f"{arm}/s{seed}/val_hd95": r.hd95},
                                       step=int(r.step))
        curves = {}
        for arm in arms:
            mean = frame[frame["arm"] == arm].groupby("step")["dice"].agg(["mean", "std", "count"]).reset_index()
            budget = scoring.budget_from_curve(mean["step"], mean["mean"])
            best = mean.loc[mean["step"] == budget].iloc[0]
            print(f"{arm}: budget {budget} steps (validation Dice {best['mean']:.3f}, best {mean['mean'].max():.3f} "
                  f"at step {int(mean.loc[mean['mean'].idxmax(), 'step'])}, {int(best['count'])} seed(s))")
            mlflow.log_metric(f"{arm}/budget_steps", budget)
            curves[f"{arm} (val Dice)"] = (mean["step"].tolist(), mean["mean"].tolist())
        plot_curves(curves, args.out / "curve.png", xlabel="UNet step", ylabel="validation Dice",
                    title=f"UNet on {len(fit_val.train)} patients, scored on {len(fit_val.test)} others")
        mlflow.log_artifact(str(path))
        mlflow.log_artifact(str(args.out / "curve.png"))
    print(f"wrote {path} and {args.out / 'curve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
