"""Sample synthetic CT slices with pancreas masks from a trained generator; export NIfTI, PNG and DICOM.

    python pipelines/sample.py --checkpoint outputs/ct/checkpoints/last.pt --n 64 --out outputs/samples
    python pipelines/sample.py --run-id RUN_ID --tracking-uri sqlite:///mlflow.db --n 64 \\
        --format nifti,png,dicom --out outputs/samples --seed 1 --filter \\
        --memorisation-check --prepared outputs/ct/prepared

The EMA generator comes from a training checkpoint or from the model an MLflow training run logged (with the
run's config.yaml: HU window, pixel size). ``--filter`` keeps plausible pairs only; ``--memorisation-check``
leaves out near-copies of training slices. Results: OUT/{nifti,png,dicom}/, OUT/grid.png, OUT/samples.csv,
OUT/summary.json, and a new MLflow run "sample" tagged with the source run id. See docs/sampling-and-privacy.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pancreas_gvae.errors import PipelineError, run_cli

FORMATS = ("nifti", "png", "dicom")


def _formats(text: str) -> tuple[str, ...]:
    values = tuple(v.strip().lower() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in FORMATS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(FORMATS)}, got {text!r}")
    return tuple(dict.fromkeys(values))


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-id", help="MLflow training run whose logged generator to sample")
    src.add_argument("--checkpoint", type=Path, help="training checkpoint (OUT/checkpoints/last.pt)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI: where --run-id lives and where the sampling run is "
                                          "logged (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; with "
                                          "--checkpoint: the checkpoint's tracking.tracking_uri)")
    p.add_argument("--n", type=int, required=True, help="pairs to generate (before filter and memorisation check)")
    p.add_argument("--format", dest="formats", type=_formats, default=FORMATS, metavar="nifti,png,dicom",
                   help="export formats (default all three)")
    p.add_argument("--out", type=Path, required=True, help="export folder (must be new or empty; see --overwrite)")
    p.add_argument("--seed", type=int, default=0, help="latent seed: same seed, same pairs (default 0)")
    p.add_argument("--filter", action="store_true", help="keep plausible pairs only (mask present, HU under the mask "
                                                         "within data.ct.checks)")
    p.add_argument("--min-mask-voxels", type=int, help="filter: smallest mask in pixels "
                                                       "(default data.ct.checks.min_label_voxels)")
    p.add_argument("--memorisation-check", action="store_true",
                   help="compare every pair with the training slices; leave near-copies out of the export")
    p.add_argument("--prepared", type=Path, help="prepare output (manifest.csv + cache/) for --memorisation-check; "
                                                 "for train_ct: OUT/prepared")
    p.add_argument("--memorisation-threshold", type=_positive_float, default=1.0 / 3.0,
                   help="near-copy: nearest-training distance / median real-to-real distance <= this (default 1/3)")
    p.add_argument("--max-train-slices", type=int, help="compare with a seeded subset of this many training slices")
    p.add_argument("--feature-steps", type=int, default=0,
                   help="also check in the feature space of a slice autoencoder trained for this many steps on the "
                        "training slices (default 0: pixel space only)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out (replaces earlier exports)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the sampling run to MLflow")
    return p


@run_cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.memorisation_check and args.prepared is None:
        raise PipelineError("--memorisation-check needs --prepared DIR (the prepare output with manifest.csv)")
    if args.prepared is not None and not args.prepared.is_dir():
        raise PipelineError(f"--prepared {args.prepared} is not a folder")
    if args.n < 1:
        raise PipelineError(f"--n must be at least 1, got {args.n}")
    from pancreas_gvae.synthesis.generator import load_from_checkpoint, load_from_run
    from pancreas_gvae.synthesis.sampling import SampleOptions, run_sampling

    loaded = (load_from_checkpoint(args.checkpoint) if args.checkpoint is not None
              else load_from_run(args.run_id, args.tracking_uri))
    opts = SampleOptions(n=args.n, out=args.out, formats=args.formats, seed=args.seed, filter=args.filter,
                         min_mask_voxels=args.min_mask_voxels, memorisation_check=args.memorisation_check,
                         prepared=args.prepared, memorisation_threshold=args.memorisation_threshold,
                         max_train_slices=args.max_train_slices, feature_steps=args.feature_steps,
                         overwrite=args.overwrite, tracking_uri=args.tracking_uri, mlflow=not args.no_mlflow)
    run_sampling(loaded, opts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
