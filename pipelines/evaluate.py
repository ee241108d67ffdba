"""Issue 5: train GVAE, VAE and GAN with the same budget and compare them on held-out data.

    python pipelines/evaluate.py --dataset mnist --data-dir ../shared/data/mnist \\
        --models gvae,vae,gan --seeds 0,1,2 --steps 300 --out outputs/eval/mnist
    python pipelines/evaluate.py --dataset ct --models gvae,vae,gan --seeds 0 --steps 200 --out outputs/eval/ct
    python pipelines/evaluate.py --dataset ct --data-root ../shared/data/ct --layout folder --pancreas-label 7 ...
    python pipelines/evaluate.py --dataset ct --data-root /data/cohort-a --test-data-root /data/hospital-b ...
    python pipelines/evaluate.py ... --priors 0,1,8,8:diag     # also each GVAE/VAE checkpoint under other priors

Every model is trained by ``train_run`` (same steps, batch size and config, but for its own ``--set MODEL:``
overrides, which its rows name in ``settings``; one MLflow run each),
nested under one parent MLflow run ("evaluation") that holds the results table. Writes
OUT/results.csv (one row per model, seed and budget), OUT/results.md (mean ± sd per model and budget, best
marked, then every run), OUT/grid-<budget>-s<seed>.png (held-out | each model's prior samples) and, for several
budgets, OUT/curve-<metric>.png (against steps) and OUT/curve-<metric>-seconds.png (against cumulative training
seconds: equal compute; blank for a training continued from a checkpoint no row records, e.g. after a kill, whose
earlier seconds are unknown). ``--report`` re-writes results.md and the curves from results.csv alone.
Metric definitions and what each is computed on: ``pancreas_gvae/evaluation/compare.py``.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import time
from pathlib import Path

import torch

from pancreas_gvae.atomic import write_csv
from pancreas_gvae.config import MODEL_KINDS, load_config
from pancreas_gvae.data.ct.discovery import LAYOUTS
from pancreas_gvae.errors import PipelineError, run_cli
from pancreas_gvae.evaluation.compare import evaluate_model
from pancreas_gvae.evaluation.heldout import ct_eval_data, mnist_eval_data
from pancreas_gvae.evaluation.model_sets import check_model_sets, check_resumed_sets, model_sets
from pancreas_gvae.evaluation.tables import metric_specs, render_markdown, results_frame
from pancreas_gvae.models.latent_prior import encode_codes, prior_label, with_prior
from pancreas_gvae.tracking.mlflow_tracker import ends_by_outcome
from pancreas_gvae.training.run import PRIOR_FIT_IMAGES, checkpoint_path, train_run

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "pancreas-gvae-evaluation"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist", "ct"], help="required unless --report")
    p.add_argument("--models", default="gvae,vae,gan", help="comma-separated subset of " + ",".join(MODEL_KINDS))
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--steps", help="training steps, the same for every model (required unless --report); several "
                   "budgets (1000,2000,4000) give a learning curve: each model trains on to the next budget from its "
                   "checkpoint and is scored at every one (a table per budget, OUT/curve-*.png)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", type=Path, help="default: configs/mnist.yaml or configs/ct_64.yaml")
    p.add_argument("--data-dir", type=Path, help="MNIST / Fashion-MNIST IDX folder")
    p.add_argument("--data-root", type=Path, help="CT data; default: a phantom cohort under OUT/phantom")
    p.add_argument("--layout", choices=LAYOUTS, default="auto")
    p.add_argument("--labels", type=Path)
    p.add_argument("--pancreas-label", type=int)
    p.add_argument("--test-fraction", type=float, default=1 / 3, help="CT: share of cases held out (>= 1 case)")
    p.add_argument("--test-data-root", type=Path, help="CT: an external cohort scored instead of a held-out split "
                                                        "(train on --data-root, test on these patients)")
    p.add_argument("--test-layout", choices=LAYOUTS, default="auto")
    p.add_argument("--test-labels", type=Path)
    p.add_argument("--test-pancreas-label", type=int)
    p.add_argument("--n-samples", type=int, default=2000, help="prior samples per model for FD/KID, precision/"
                                                               "recall and the mask scores (>= --n-eval)")
    p.add_argument("--seg-steps", type=int, default=300, help="CT: UNet steps of the label-fidelity segmenter and "
                                                              "of TSTR (0: skip both)")
    p.add_argument("--seg-augment", action="store_true", help="CT: classic augmentation (MONAI RandAffined, "
                   "intensity, noise) in the segmenter's and TSTR's training (pipelines/segmenter_curve.py)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's, sqlite:///mlflow.db)")
    p.add_argument("--experiment", default=EXPERIMENT)
    p.add_argument("--n-eval", type=int, default=1000, help="held-out images evaluated (and samples drawn)")
    p.add_argument("--n-val", type=int, help="held-out images for the Parzen bandwidth (default n-eval/2)")
    p.add_argument("--n-memo", type=int, default=20000, help="training images searched for near-copies")
    p.add_argument("--iwae-k", type=int, default=100, help="importance samples of the IWAE bound")
    p.add_argument("--feature-steps", type=int, default=300, help="training steps of the feature network")
    p.add_argument("--log-model", action="store_true", help="also log each generator as an MLflow model")
    p.add_argument("--priors", default="", help="GVAE/VAE: also score every checkpoint's EMA generator, same "
                   "weights, with codes from other latent priors, comma-separated: K (0: N(0, I); K >= 1: a "
                   "K-component Gaussian mixture fitted to the codes of training images) or K:COV (COV one of "
                   "full, tied, diag, spherical); extra rows '<model>@<prior>' (encoder columns blank there: "
                   "they do not depend on the prior)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[MODEL:]KEY=VALUE",
                   help="a config override for every model, or with a MODEL: prefix (gvae:loss.feature_recon=100) "
                        "for that model only (pancreas_gvae/evaluation/model_sets.py)")
    p.add_argument("--report", action="store_true", help="train and score nothing: write OUT/results.md (mean ± sd "
                   "per budget, then every run) and the learning curves from the rows of OUT/results.csv, e.g. "
                   "after appending the rows of seeds run elsewhere")
    p.add_argument("--columns", help="with --report: only these metric columns, comma-separated (fid_feature,"
                   "kid_feature,...), in results.md and printed")
    args = p.parse_args(argv)
    if not args.report and (args.dataset is None or args.steps is None):
        p.error("--dataset and --steps are required (or --report)")
    return args


def _ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def _models(text: str) -> list[str]:
    models = [s.strip() for s in text.split(",") if s.strip()]
    bad = [m for m in models if m not in MODEL_KINDS]
    if bad or not models:
        raise PipelineError(f"--models: unknown {bad or '(empty)'}; choose from {', '.join(MODEL_KINDS)}")
    return models


def _priors(text: str) -> list[tuple[int, str]]:
    """``--priors`` as (components, covariance) pairs."""
    from pancreas_gvae.models.latent_prior import COVARIANCES

    out = []
    for spec in (s.strip() for s in text.split(",") if s.strip()):
        k, _, cov = spec.partition(":")
        if not k.isdigit() or (cov or "full") not in COVARIANCES:
            raise PipelineError(f"--priors: {spec!r} is not K or K:COV (K >= 0, COV one of {', '.join(COVARIANCES)})")
        out.append((int(k), cov or "full"))
    return out


def _overrides(args: argparse.Namespace, model: str, seed: int, *, shared_only: bool = False) -> list[str]:
    """One training run's config overrides; ``shared_only``: no ``MODEL:`` ``--set`` (for the shared data)."""
    pairs = {"model.kind": model, "train.steps": args.steps, "train.seed": seed, "train.batch_size": args.batch_size,
             "train.device": "cpu" if not torch.cuda.is_available() else None,
             "tracking.tracking_uri": args.tracking_uri, "tracking.experiment": args.experiment,
             "tracking.log_model": args.log_model, "tracking.system_metrics": False}
    extra = [f"data.dataset={args.dataset}"] if args.dataset != "ct" else []
    sets = model_sets(args.overrides, None if shared_only else model)
    return [f"{k}={v}" for k, v in pairs.items() if v is not None] + extra + sets


# --------------------------------------------------------------------------- main


def _finished_rows(path: Path) -> list[dict]:
    """Every row of an earlier invocation into the same ``--out`` (a re-run skips the ones it would compute, and
    keeps the others, e.g. other budgets or priors, in the tables: none is lost)."""
    if not path.is_file():
        return []
    import pandas as pd

    return pd.read_csv(path).to_dict("records")


def _cumulative_seconds(rows: list[dict], dataset: str, model: str, seed: int, done: int, seconds: float) -> float:
    """Training seconds from step 0 to this row's budget: this call's ``seconds`` on top of the cumulative seconds of
    the model's row at ``done``, the step its training resumed from. NaN when no row records that step (a killed
    run continued from a checkpoint between budgets: the seconds before the kill are unknown, and counting from the
    restart would put the row too early on the equal-compute curves)."""
    if done == 0:
        return seconds
    at = [r for r in rows if r["dataset"] == dataset and r["model"] == model and int(r["seed"]) == seed
          and int(r["steps"]) == done]
    return float(at[0].get("train_seconds_cum", math.nan)) + seconds if at else math.nan


def _checkpoint_step(run_dir: Path) -> int:
    """Steps already trained in ``run_dir`` (0 without a checkpoint)."""
    from pancreas_gvae.training.checkpoint import load_checkpoint

    path = checkpoint_path(run_dir)
    return int(load_checkpoint(path)["step"]) if path.is_file() else 0


def _slug(label: str) -> str:
    """A row label as a file name and an MLflow key part: ``gvae@N(0,I)`` -> ``gvae-N0I``."""
    return re.sub(r"[^\w.-]+", "", label.replace("@", "-"))


GRID_N = 16  # prior samples (and held-out slices) per model in the comparison grids


def _save_sample_grid(generator, latent_dim: int, mask_channels: int, seed: int, path: Path) -> Path:
    """``GRID_N`` prior samples of the EMA generator from a seeded code (the same codes for every model)."""
    from pancreas_gvae.synthesis.slices import generate
    from pancreas_gvae.tracking.images import image_grid, save_png

    device = next(generator.parameters()).device
    x = generate(generator, GRID_N, latent_dim=latent_dim, seed=seed, device=device)
    return save_png(image_grid(x, nrow=4, mask_channels=mask_channels), path)


def _compare_grids(data, models: list[str], seed: int, budget: int, out: Path) -> Path | None:
    """OUT/grid-<budget>-s<seed>.png: held-out real slices next to each model's prior samples of this seed."""
    import numpy as np
    from PIL import Image

    from pancreas_gvae.tracking.images import image_grid, save_png, side_by_side

    panels = {"real (held-out)": image_grid(data.test[:GRID_N], nrow=4, mask_channels=data.mask_channels)}
    for model in models:
        path = out / "grids" / f"{_slug(model)}-s{seed}-{budget}.png"
        if path.is_file():
            panels[f"{model.upper()} ({budget} steps)"] = np.asarray(Image.open(path).convert("RGB"))
    if len(panels) == 1:
        return None
    return save_png(side_by_side(panels), out / f"grid-{budget}-s{seed}.png")


def learning_curves(frame, metric: str, x: str = "steps") -> dict[str, tuple[list[float], list[float]]]:
    """``metric`` against ``x`` (training steps, or ``train_seconds_cum`` for equal compute), one line per model
    and seed ("gvae s0"); rows without either value are left out.

    Per seed, not a mean over seeds: a curve is often run on one seed and only its last budget on three, and a mean
    per budget would then join a one-seed point to a three-seed point as if they were one curve."""
    curves = {}
    for (model, seed), g in frame.groupby(["model", "seed"], sort=False):
        m = g[[x, metric]].dropna().sort_values(x)
        if len(m):
            curves[f"{model} s{seed}"] = ([int(v) if x == "steps" else float(v) for v in m[x]], m[metric].tolist())
    return curves


def _plot_learning_curves(frame, out: Path, columns: list[str] | None = None) -> list[Path]:
    """OUT/curve-<metric>.png: each model's seeds against training steps (a colour per model, a marker per seed),
    and OUT/curve-<metric>-seconds.png against cumulative training seconds, the axis on which models of different
    step costs are compared at equal compute; ``columns``: only the curves of these metrics."""
    from pancreas_gvae.evaluation.tables import plot_curves

    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(frame["model"]))}
    markers = {s: "osD^v<>"[i % 7] for i, s in enumerate(sorted(set(frame["seed"])))}
    styles = {f"{m} s{s}": {"color": colours[m], "marker": markers[s]} for m in colours for s in markers}
    paths = []
    for metric in ("fid_feature", "kid_feature", "recall", "precision", "fidelity_dice", "tstr_ratio",
                   "mmd2_feature"):
        if metric not in frame or frame[metric].isna().all() or (columns is not None and metric not in columns):
            continue
        for x, suffix, xlabel in (("steps", "", "training steps"),
                                  ("train_seconds_cum", "-seconds", "cumulative training seconds")):
            curves = learning_curves(frame, metric, x) if x in frame else {}
            if curves:
                paths.append(plot_curves(curves, out / f"curve-{metric}{suffix}.png", xlabel=xlabel, ylabel=metric,
                                         title=f"{metric}: one line per seed", styles=styles))
    return paths


def _log_child(client, run_id: str, row: dict, prefix: str = "eval") -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(f"{prefix}/{k}", float(v), now, int(row["steps"])) for k, v in row.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
               and k not in ("seed", "steps", "batch_size")]
    client.log_batch(run_id, metrics=metrics)


def _write_report(frame, out: Path, title: str, notes: list[str],
                  columns: list[str] | None = None) -> tuple[str, list[Path]]:
    """OUT/results.md (mean ± sd per model and budget, then every run) and, for several budgets, the curves."""
    md = render_markdown(frame, title=title, notes=notes, columns=columns, runs=True)
    (out / "results.md").write_text(md)
    return md, _plot_learning_curves(frame, out, columns) if frame["steps"].nunique() > 1 else []


def _report(args: argparse.Namespace) -> int:
    import pandas as pd

    path = args.out / "results.csv"
    if not path.is_file():
        raise PipelineError(f"--report: no {path}: run the evaluation first")
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    try:
        metric_specs(columns)  # an unknown name is refused before anything is written
    except ValueError as e:
        raise PipelineError(f"--columns: {e}") from None
    frame = results_frame(pd.read_csv(path).to_dict("records"))
    md, _ = _write_report(frame, args.out, f"Evaluation: {args.out.name}",
                          [f"rows of {path}: {len(frame)}"], columns)
    print(md)
    return 0


@run_cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        return _report(args)
    models, seeds, budgets = _models(args.models), _ints(args.seeds), sorted(set(_ints(args.steps)))
    priors = _priors(args.priors)
    check_model_sets(args.overrides, models)
    rows = _finished_rows(args.out / "results.csv")
    check_resumed_sets(rows, args.overrides, models, args.out / "results.csv")
    if not seeds:
        raise PipelineError("--seeds: give at least one seed")
    if not budgets or budgets[0] < 1:
        raise PipelineError(f"--steps: one or more positive step counts, got {args.steps!r}")
    args.steps = budgets[0]  # the config the data is prepared with; each run gets its own budget below
    config = args.config or REPO / "configs" / ("ct_64.yaml" if args.dataset == "ct" else "mnist.yaml")
    base_cfg = load_config(config, _overrides(args, models[0], seeds[0], shared_only=True))
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    data, make_batches, preview = (ct_eval_data(args, base_cfg) if args.dataset == "ct"
                                       else mnist_eval_data(args))

    import mlflow
    from mlflow.tracking import MlflowClient

    uri = base_cfg.tracking.tracking_uri
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(args.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(args.experiment)
    parent = client.create_run(exp_id, run_name=f"evaluation-{data.dataset}",
                               tags={"dataset": data.dataset, "kind": "evaluation"})
    parent_id = parent.info.run_id
    params = {"dataset": data.dataset, "models": ",".join(models), "seeds": ",".join(map(str, seeds)),
              "steps": ",".join(map(str, budgets)), "batch_size": base_cfg.train.batch_size, "config": str(config),
              "n_eval": len(data.test), "n_val": len(data.val), "n_samples": data.sample_count,
              "iwae_k": args.iwae_k, "priors": args.priors or "(the config's)",
              "feature_net": data.feature_net, "likelihood": data.likelihood, **data.notes}
    for k, v in params.items():
        client.log_param(parent_id, k, str(v)[:500])
    print(f"MLflow parent run {parent_id} in {uri} (experiment {args.experiment})")

    if rows:
        print(f"resuming: {len(rows)} finished row(s) in {args.out / 'results.csv'} are kept, not recomputed")
    with ends_by_outcome(client, parent_id):
        for model, seed, budget in ((m, s, b) for m in models for s in seeds for b in budgets):
            labels = {model: None, **({f"{model}@{prior_label(k, c)}": (k, c) for k, c in priors}
                                      if model != "gan" else {})}  # a GAN has no codes of training images
            todo = [label for label in labels if not any(
                r["dataset"] == data.dataset and r["model"] == label and int(r["seed"]) == seed
                and int(r["steps"]) == budget for r in rows)]
            if not todo:
                continue
            args.steps = budget
            cfg = load_config(config, _overrides(args, model, seed))
            name = f"{model}-{data.dataset}-s{seed}"
            run_dir = args.out / "runs" / name
            done = _checkpoint_step(run_dir)
            if done > budget:
                raise PipelineError(f"{run_dir} has trained {done} steps, past the {budget}-step budget whose "
                                    f"row is missing: give budgets >= {done}, or a new --out")
            print(f"== training {name}: {cfg.train.steps} steps ({done} already), batch "
                  f"{cfg.train.batch_size}", flush=True)
            batches = make_batches(cfg)
            res = train_run(cfg, batches, preview[: cfg.train.num_samples], out_dir=run_dir,
                            resume=checkpoint_path(run_dir).is_file(),  # a killed training continues
                            run_name=name, tags={"dataset": data.dataset, "model": model, "seed": str(seed),
                                                 "mlflow.parentRunId": parent_id}, progress=False)
            if (run_dir / "samples.png").is_file():  # the grid of this budget (the next budget overwrites it)
                shutil.copyfile(run_dir / "samples.png", run_dir / f"samples-{budget}.png")
            codes = None
            for label in todo:
                generator, prior = res.trainer.ema_generator, labels[label]
                if prior is not None:  # same weights, codes from another prior
                    if codes is None:
                        codes = encode_codes(res.trainer.model.encoder, batches.fit_sample(PRIOR_FIT_IMAGES, seed),
                                             device=res.trainer.device)
                    generator = with_prior(generator, codes, prior[0], covariance=prior[1], seed=seed)
                _save_sample_grid(generator, cfg.model.latent_dim, data.mask_channels, seed,
                                  args.out / "grids" / f"{_slug(label)}-s{seed}-{budget}.png")
                t0 = time.perf_counter()
                metrics = evaluate_model(res.trainer.model if prior is None else None, generator, data,
                                         latent_dim=cfg.model.latent_dim, seed=seed, iwae_k=args.iwae_k,
                                         device=res.trainer.device)
                row = {"dataset": data.dataset, "model": label, "seed": seed, **metrics,
                       "steps": cfg.train.steps, "batch_size": cfg.train.batch_size,
                       "settings": " ".join(model_sets(args.overrides, model)), "n_eval": len(data.test),
                       "n_samples": data.sample_count,
                       "iwae_k": args.iwae_k if model != "gan" else math.nan,
                       "likelihood": (f"{data.likelihood} (binarised)" if data.likelihood == "bernoulli"
                                      else f"gaussian sigma={data.sigma}"),
                       "recon_units": "HU" if data.window else "[0,1] pixel", "feature_net": data.feature_net,
                       "run_id": res.run_id, "train_seconds": round(res.seconds, 1),
                       "train_seconds_cum": round(_cumulative_seconds(rows, data.dataset, model, seed, done,
                                                                      res.seconds), 1),
                       "eval_seconds": round(time.perf_counter() - t0, 1)}
                mlflow.set_tracking_uri(uri)
                _log_child(MlflowClient(tracking_uri=res.tracking_uri or uri), res.run_id, row,
                           prefix="eval" if prior is None else "eval-" + _slug(prior_label(*prior)))
                rows.append(row)
                print(f"   {label}: trained {res.seconds:.0f} s, evaluated {row['eval_seconds']:.0f} s: "
                      + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if math.isfinite(v)), flush=True)
                frame = results_frame(rows)
                write_csv(frame, args.out / "results.csv")  # the partial table survives an interruption
        frame = results_frame(rows)
        for seed, budget in ((s, b) for s in seeds for b in budgets):
            grid = _compare_grids(data, list(dict.fromkeys(r["model"] for r in rows)), seed, budget, args.out)
            if grid is not None:
                client.log_artifact(parent_id, str(grid))
        notes = [f"{k}: {v}" for k, v in params.items()]
        md, curves = _write_report(frame, args.out, f"Evaluation: {data.dataset}", notes)
        for path in curves:
            client.log_artifact(parent_id, str(path))
        for f in ("results.csv", "results.md"):
            client.log_artifact(parent_id, str(args.out / f))
    print(md)
    print(f"wrote {args.out / 'results.csv'} and {args.out / 'results.md'}; MLflow parent run {parent_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
