"""Smoke job: train the GVAE (or a VAE / GAN baseline) on MNIST or Fashion-MNIST, tracked in MLflow.

    python pipelines/train_mnist.py --dataset mnist --data-dir ../shared/data/mnist --steps 300
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pancreas_gvae.config import MODEL_KINDS, load_config
from pancreas_gvae.data.mnist import load_dataset, to_tensor
from pancreas_gvae.errors import run_cli
from pancreas_gvae.training.batches import TensorBatches
from pancreas_gvae.training.run import train_run

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "mnist.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist")
    p.add_argument("--data-dir", type=Path, required=True, help="folder with the IDX .gz files")
    p.add_argument("--download", action="store_true", help="download missing files from the standard mirrors")
    p.add_argument("--model", choices=MODEL_KINDS, default="gvae")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config (default: configs/mnist.yaml)")
    p.add_argument("--steps", type=int, help="total optimisation steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", type=Path, default=Path("outputs/mnist"), help="checkpoints and PNG grids")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --set loss.beta_kl=0.5 (repeatable)")
    return p.parse_args(argv)


def _cli_overrides(args: argparse.Namespace) -> list[str]:
    pairs = {"model.kind": args.model, "train.steps": args.steps, "train.batch_size": args.batch_size,
             "train.seed": args.seed, "train.device": args.device, "tracking.tracking_uri": args.tracking_uri}
    return [f"{k}={v}" for k, v in pairs.items() if v is not None] + args.overrides


@run_cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, _cli_overrides(args) + [f"data.dataset={args.dataset}"])
    splits = load_dataset(args.data_dir, args.dataset, download=args.download)
    train = to_tensor(splits["train"].images)
    print(f"{args.dataset}: {len(train)} training images ({splits['train'].source})")
    batches = TensorBatches(train, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    result = train_run(cfg, batches, to_tensor(splits["test"].images), out_dir=args.out,
                       run_name=f"{cfg.model.kind}-{args.dataset}", resume=args.resume,
                       tags={"dataset": args.dataset, "model": cfg.model.kind})
    print(f"done: {cfg.train.steps} steps in {result.seconds:.0f} s; sample grids in {args.out}")
    print(f"MLflow run {result.run_id} in {result.tracking_uri}")
    print(f"  look at it: mlflow ui --backend-store-uri {result.tracking_uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
