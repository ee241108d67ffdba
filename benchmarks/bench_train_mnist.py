"""Training throughput (images/s) of GVAE, VAE and GAN at 28x28 with the smoke config.

    python benchmarks/bench_train_mnist.py [--steps 30] [--device cpu|cuda]

All three models run in the same process on the same inputs; the VAE is the
reference, so the ratios hold across machines even where absolute numbers do not.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _common import header, markdown_table
from pancreas_gvae.config import load_config
from pancreas_gvae.models import build_model
from pancreas_gvae.models.networks import count_parameters
from pancreas_gvae.training.trainer import Trainer, seed_everything

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist.yaml"


def images_per_second(kind: str, *, steps: int, warmup: int, batch_size: int, device: str) -> tuple[float, int]:
    cfg = load_config(CONFIG, [f"model.kind={kind}", f"train.batch_size={batch_size}", f"train.device={device}"])
    seed_everything(0)
    trainer = Trainer(cfg, build_model(cfg.model), torch.device(device))
    x = torch.rand(batch_size, 1, 28, 28, device=device)
    for _ in range(warmup):
        trainer.train_step(x)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start), count_parameters(trainer.model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    print(header())
    rows = []
    for kind in ("vae", "gan", "gvae"):
        ips, params = images_per_second(kind, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size,
                                        device=args.device)
        rows.append({"model": kind, "params": f"{params:,}", "images/s": f"{ips:.0f}", "_ips": ips})
    ref = rows[0]["_ips"]
    for r in rows:
        r["ratio to VAE"] = f"{r['_ips'] / ref:.2f}"
    print(f"\ntraining throughput at 28x28, batch {args.batch_size}, device {args.device}:\n")
    print(markdown_table(rows, ["model", "params", "images/s", "ratio to VAE"]))


if __name__ == "__main__":
    main()
