"""Does synthetic data help segmentation? A 2D MONAI UNet on real slices, with and without GVAE slices.

    python pipelines/augment_segmentation.py --train-generator-steps 600 \\
        --fractions 0.1,0.5,1.0 --synthetic-ratio 1 --seeds 0,1,2 --steps 300 --out outputs/seg
    python pipelines/augment_segmentation.py --data-root ../shared/data/ct --layout folder --pancreas-label 7 \\
        --checkpoint outputs/seg/generator/checkpoints/last.pt --fractions 1.0 --seeds 0,1,2 --steps 300 --out ...

Protocol
  * cases: the ok cases of the prepared store are split once, by case, from --split-seed
    (--test-fraction of them held out, at least one; at least one left for training).
  * fraction f: round(f * n_train) training cases (at least 1), drawn with the run seed; both arms of one
    (fraction, seed) use the same cases, UNet initialisation and real-slice draws.
  * real slices: every slice of those cases, drawn with pancreas oversampling (--pos-fraction).
  * synthetic arm: a pool of R x n_real_slices generator samples (CT + thresholded mask); every batch of B
    holds round(B R / (1 + R)) synthetic and the rest real slices. Same --steps and --batch-size in both arms.
  * test: every slice of the held-out cases; Dice and HD95 (mm) on their pancreas slices, Dice on all slices.
  * leakage: the generator is trained (--train-generator-steps) on the training cases only; a --checkpoint
    with a split.json naming a test case is refused, one without is run but marked "unverified".

Writes OUT/dice.csv (one row per fraction x arm x seed), OUT/summary.csv, OUT/dice.png; one MLflow parent run
with a child run per (fraction, arm, seed).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from pancreas_gvae import segmentation as seg
from pancreas_gvae.config import default_tracking_uri
from pancreas_gvae.ct.config import fit_options
from pancreas_gvae.ct.discovery import LAYOUTS
from pancreas_gvae.errors import PipelineError, run_cli
from pancreas_gvae.export.bundle import generator_from_checkpoint
from pancreas_gvae.sampling import load_from_run

REPO = Path(__file__).resolve().parents[1]
ARMS = ("real", "real+synthetic")
COLUMNS = ["fraction", "arm", "seed", "n_train_cases", "n_real_slices", "n_synthetic", "dice", "hd95",
           "dice_all", "hd95_nonempty", "n_empty_pred", "n_test_slices", "n_test_pancreas_slices", "final_loss",
           "seconds"]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data (default: a phantom cohort under OUT/phantom)")
    d.add_argument("--data-root", type=Path, help="CT data (TCIA, MSD or a plain folder)")
    d.add_argument("--labels", type=Path)
    d.add_argument("--layout", choices=LAYOUTS, default="auto")
    d.add_argument("--pancreas-label", type=int, help="pancreas value in multi-organ label maps (e.g. 7)")
    d.add_argument("--prepared", type=Path, help="an already prepared store (prepare_ct output); default OUT/prepared")
    d.add_argument("--phantom-cases", type=int, default=10)
    d.add_argument("--phantom-size", type=int, default=128)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", type=Path, help="a GVAE training checkpoint (its EMA generator is used)")
    g.add_argument("--run-id", help="an MLflow run that logged the generator (tracking.log_model)")
    g.add_argument("--train-generator-steps", type=int, metavar="N",
                   help="train a generator for N steps on the training cases of the split first")
    p.add_argument("--generator-only", action="store_true", help="with --train-generator-steps: stop after it")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "ct_64.yaml",
                   help="GVAE config for --train-generator-steps (and the slice geometry when none is given)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a GVAE config value for --train-generator-steps (repeatable)")
    p.add_argument("--fractions", type=_floats, default=[0.1, 0.25, 1.0])
    p.add_argument("--synthetic-ratio", type=float, default=1.0, help="synthetic slices per real slice (R)")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300, help="UNet steps, both arms")
    p.add_argument("--batch-size", type=int, default=16, help="UNet batch size, both arms")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pos-fraction", type=float, default=0.6, help="share of real draws from pancreas slices")
    p.add_argument("--unet-channels", type=_ints, default=[16, 32, 64, 128])
    p.add_argument("--test-fraction", type=float, default=0.4)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs/segmentation"))
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="pancreas-gvae-segmentation")
    args = p.parse_args(argv)
    if args.synthetic_ratio < 0 or args.steps < 1 or args.batch_size < 2:
        p.error("--synthetic-ratio must be >= 0, --steps >= 1, --batch-size >= 2")
    if args.generator_only and args.train_generator_steps is None:
        p.error("--generator-only needs --train-generator-steps")
    return args


def _gvae_config(args: argparse.Namespace):
    from pancreas_gvae.config import load_config

    overrides = list(args.overrides)
    if args.train_generator_steps is not None:
        overrides += [f"train.steps={args.train_generator_steps}", "tracking.log_model=false",
                      "tracking.system_metrics=false"]
    if args.tracking_uri:
        overrides.append(f"tracking.tracking_uri={args.tracking_uri}")
    return load_config(args.config, overrides)


def _prepare(args: argparse.Namespace, data) -> tuple[Path, pd.DataFrame]:
    from pancreas_gvae.ct.manifest import read_manifest
    from pancreas_gvae.training import ct

    if args.prepared is not None and (args.prepared / "manifest.csv").is_file() and args.data_root is None:
        return args.prepared, read_manifest(args.prepared)
    prepared = args.prepared or args.out / "prepared"
    root = args.data_root
    if root is None:
        root = ct.ensure_phantom(args.out / "phantom", {"cases": args.phantom_cases, "size": args.phantom_size})
    manifest = ct.prepare(root, prepared, data, labels=args.labels, layout=args.layout,
                          pancreas_label=args.pancreas_label, workers=1)
    return prepared, manifest


@run_cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import mlflow

    from pancreas_gvae.training import ct

    args.out.mkdir(parents=True, exist_ok=True)
    tracking_uri = args.tracking_uri or default_tracking_uri()

    # 1. the generator and its config (its slice geometry is the UNet's)
    gcfg, generator, leakage = _gvae_config(args), None, "unverified"
    if args.checkpoint is not None:
        generator, gcfg = generator_from_checkpoint(args.checkpoint)
    elif args.run_id is not None:
        loaded = load_from_run(args.run_id, tracking_uri)
        generator, gcfg = loaded.generator, loaded.config
    data = ct.data_config(gcfg)
    sampling = data.sampling
    prepared, manifest = _prepare(args, data)

    # 2. the case-level split
    split = seg.split_cases(seg.ok_cases(manifest), test_fraction=args.test_fraction, seed=args.split_seed)
    print(f"split (seed {args.split_seed}): {len(split.train)} training case(s), {len(split.test)} test case(s)")
    seg.write_split(split, args.out)  # local only: case ids never go to MLflow
    if args.train_generator_steps is not None:
        t0 = time.perf_counter()
        ckpt = seg.train_generator(prepared, manifest, split, gcfg, args.out / "generator")
        print(f"generator trained on the {len(split.train)} training case(s) only: {ckpt} "
              f"({time.perf_counter() - t0:.0f} s)")
        if args.generator_only:
            return 0
        generator, gcfg = generator_from_checkpoint(ckpt)
        leakage = seg.check_generator_split(ckpt, split)
    elif args.checkpoint is not None:
        leakage = seg.check_generator_split(args.checkpoint, split)
    if leakage != "ok":
        print("warning: the generator's training cases are not recorded (no split.json beside the checkpoint); "
              "cannot verify that it never saw the test cases")
    if gcfg.model.image_size != sampling.slice_size:
        raise PipelineError(f"generator makes {gcfg.model.image_size}px slices, data config says {sampling.slice_size}")
    pixel_mm = seg.slice_pixel_mm(data)

    test = seg.load_slices(prepared, manifest, split.test, size=sampling.slice_size, **fit_options(data))
    print(f"test: {len(test)} slices, {int(test.has_pancreas.sum())} with pancreas; {pixel_mm:.2f} mm/pixel")

    # 3. the arms
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(args.experiment)
    rows = []
    n_real_b, n_syn_b = seg.split_batch(args.batch_size, args.synthetic_ratio)
    params = {"fractions": ",".join(map(str, args.fractions)), "synthetic_ratio": args.synthetic_ratio,
              "seeds": ",".join(map(str, args.seeds)), "steps": args.steps, "batch_size": args.batch_size,
              "batch_real": n_real_b, "batch_synthetic": n_syn_b, "lr": args.lr, "pos_fraction": args.pos_fraction,
              "unet_channels": ",".join(map(str, args.unet_channels)), "split_seed": args.split_seed,
              "test_fraction": args.test_fraction, "n_train_cases": len(split.train),
              "n_test_cases": len(split.test), "n_test_slices": len(test), "pixel_mm": pixel_mm,
              "slice_size": sampling.slice_size, "generator_kind": gcfg.model.kind,
              "generator_source": "trained-here" if args.train_generator_steps is not None
              else ("checkpoint" if args.checkpoint is not None else "mlflow-run"),
              "generator_steps": args.train_generator_steps or "", "dataset": "phantom" if args.data_root is None
              else "ct"}
    with mlflow.start_run(run_name="augment-segmentation", tags={"leakage_check": leakage}) as parent:
        mlflow.log_params(params)
        for fraction in args.fractions:
            for seed in args.seeds:
                cases = seg.subset_cases(split.train, fraction, seed)
                real = seg.load_slices(prepared, manifest, cases, size=sampling.slice_size, **fit_options(data))
                for arm in ARMS:
                    synthetic = None
                    if arm != "real":
                        if args.synthetic_ratio <= 0:
                            continue
                        n = max(n_syn_b, int(round(args.synthetic_ratio * len(real))))
                        synthetic = seg.synthetic_pool(generator, n, latent_dim=gcfg.model.latent_dim,
                                                       seed=10_000 + seed, mask_channels=gcfg.model.mask_channels)
                    t0 = time.perf_counter()
                    with mlflow.start_run(run_name=f"{arm}-f{fraction:g}-s{seed}", nested=True):
                        def log(step, loss):
                            mlflow.log_metric("train/loss", loss, step=step)
                        model, losses = seg.train_unet(real, synthetic, steps=args.steps, batch_size=args.batch_size,
                                                       ratio=args.synthetic_ratio, seed=seed, lr=args.lr,
                                                       pos_fraction=args.pos_fraction,
                                                       channels=args.unet_channels, log=log)
                        metrics = seg.evaluate_model(model, test, pixel_mm=pixel_mm)
                        row = {"fraction": fraction, "arm": arm, "seed": seed, "n_train_cases": len(cases),
                               "n_real_slices": len(real), "n_synthetic": len(synthetic) if synthetic else 0,
                               "dice": metrics["dice"], "hd95": metrics["hd95"], "dice_all": metrics["dice_all"],
                               "hd95_nonempty": metrics["hd95_nonempty"], "n_empty_pred": int(metrics["n_empty_pred"]),
                               "n_test_slices": int(metrics["n_slices"]),
                               "n_test_pancreas_slices": int(metrics["n_pancreas_slices"]),
                               "final_loss": float(sum(losses[-10:]) / len(losses[-10:])),
                               "seconds": round(time.perf_counter() - t0, 1)}
                        mlflow.log_params({"fraction": fraction, "arm": arm, "seed": seed,
                                           "n_train_cases": len(cases), "n_real_slices": len(real),
                                           "n_synthetic": row["n_synthetic"]})
                        mlflow.log_metrics({k: float(row[k]) for k in ("dice", "hd95", "dice_all", "hd95_nonempty",
                                                                         "n_empty_pred", "final_loss")
                                            if pd.notna(row[k])})
                    rows.append(row)
                    print(f"fraction {fraction:g} seed {seed} {arm:>15}: {len(cases)} case(s), {len(real)} real + "
                          f"{row['n_synthetic']} synthetic slices -> Dice {row['dice']:.3f}, HD95 {row['hd95']:.1f} mm "
                          f"({row['seconds']:.0f} s)", flush=True)
                    pd.DataFrame(rows, columns=COLUMNS).to_csv(args.out / "dice.csv", index=False)
        df = pd.DataFrame(rows, columns=COLUMNS)
        df.to_csv(args.out / "dice.csv", index=False)
        summary = seg.summarize(df)
        summary.to_csv(args.out / "summary.csv", index=False)
        seg.plot_dice(df, args.out / "dice.png", title=f"R={args.synthetic_ratio:g}, {args.steps} steps x "
                                                         f"{args.batch_size}, {len(args.seeds)} seed(s)")
        for name in ("dice.csv", "summary.csv", "dice.png"):
            mlflow.log_artifact(str(args.out / name))
        for r in summary.itertuples():
            tag = f"f{r.fraction:g}_{r.arm.replace('+', '_')}"
            mlflow.log_metrics({f"{tag}/dice_mean": r.dice_mean, f"{tag}/dice_sd": r.dice_sd})
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"wrote {args.out / 'dice.csv'}, {args.out / 'dice.png'}; MLflow parent run {parent.info.run_id} "
              f"in {tracking_uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
