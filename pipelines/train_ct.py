"""Train the GVAE (or a VAE / GAN baseline) on CT slices with their pancreas masks, tracked in MLflow.

With no arguments it makes a small phantom cohort, prepares it and trains a short CPU
schedule (configs/ct_64.yaml). On real data:

    python pipelines/train_ct.py --data-root /data/pancreas --config configs/ct_128.yaml
    torchrun --nproc_per_node=4 pipelines/train_ct.py --data-root /data/pancreas --config configs/ct_256.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pancreas_gvae.config import MODEL_KINDS, load_config
from pancreas_gvae.data.ct.config import check_model_matches_data, data_config
from pancreas_gvae.data.ct.discovery import LAYOUTS
from pancreas_gvae.errors import run_cli
from pancreas_gvae.training import ct, distributed
from pancreas_gvae.training.run import train_run

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, help="CT data (TCIA Pancreas-CT, MSD Task07 or a plain folder); "
                                                  "default: a phantom cohort made under OUT/phantom")
    p.add_argument("--labels", type=Path, help="label folder, when not beside the data")
    p.add_argument("--layout", choices=LAYOUTS, default="auto")
    p.add_argument("--pancreas-label", type=int, help="pancreas value in multi-organ label maps (e.g. 7)")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "ct_64.yaml")
    p.add_argument("--model", choices=MODEL_KINDS)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", type=Path, default=Path("outputs/ct"), help="phantom, prepared cache, checkpoints")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)")
    p.add_argument("--register", metavar="NAME", help="register the EMA generator under this model name")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, default=1, help="processes for data preparation")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --set train.lr_g=1e-4 (repeatable)")
    return p.parse_args(argv)


def _cli_overrides(args: argparse.Namespace) -> list[str]:
    pairs = {"model.kind": args.model, "train.steps": args.steps, "train.batch_size": args.batch_size,
             "train.seed": args.seed, "train.device": args.device, "tracking.tracking_uri": args.tracking_uri,
             "tracking.register_name": args.register}
    return [f"{k}={v}" for k, v in pairs.items() if v is not None] + args.overrides


@run_cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, _cli_overrides(args))
    data = data_config(cfg)
    check_model_matches_data(cfg, data)
    device = distributed.init_distributed(cfg.train.device)
    try:
        cfg.train.device = str(device)  # under torchrun: this rank's GPU
        data_root = args.data_root or args.out / "phantom"
        prepared = args.out / "prepared"
        if distributed.is_main_process():  # rank 0 makes and prepares the data; the others wait
            if args.data_root is None:
                ct.ensure_phantom(data_root, cfg.data.get("phantom", {}))
            manifest = ct.prepare(data_root, prepared, data, labels=args.labels, layout=args.layout,
                                  pancreas_label=args.pancreas_label, workers=args.workers)
        distributed.barrier()
        if not distributed.is_main_process():
            from pancreas_gvae.data.ct.manifest import read_manifest

            manifest = read_manifest(prepared)
        batches = ct.slice_batches(prepared, manifest, data, cfg, num_workers=int(cfg.data.get("loader_workers", 0)))
        preview = ct.preview_slices(prepared, manifest, data, cfg.train.num_samples // 2, cfg.train.seed)
        monitor = ct.mask_monitor(prepared, manifest, data, cfg) if distributed.is_main_process() else None
        result = train_run(
            cfg, batches, preview, out_dir=args.out, run_name=f"{cfg.model.kind}-ct", resume=args.resume,
            tags={"dataset": "phantom" if args.data_root is None else "ct", "model": cfg.model.kind}, monitor=monitor,
            on_finish=lambda trainer, tracker, out: ct.log_ct_artifacts(
                trainer, tracker, out, data=data, manifest=manifest, n_nifti=int(cfg.data.get("nifti_samples", 16))),
        )
        if distributed.is_main_process():
            print(f"done: {cfg.train.steps} steps in {result.seconds:.0f} s; grids and NIfTI slices in {args.out}")
            print(f"MLflow run {result.run_id} in {result.tracking_uri}")
            print(f"  look at it: mlflow ui --backend-store-uri {result.tracking_uri}")
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
