"""Time every metric of pancreas_gvae.evaluation.metrics on 10,000 samples against 10,000 real 28×28 images, on the CPU.

Real images: the MNIST test split from ../shared/data/mnist when present, else uniform noise. "Samples":
the real images shifted by one pixel plus Gaussian noise (timing does not depend on their quality).
Encoder-based metrics use a small randomly initialised MLP encoder/decoder (784 → 256 → 2×16, 16 → 256 → 784):
only the cost of the metric is measured, not a trained model's. The feature network is the project's
small classifier, trained once here (its time is reported separately, as it is shared by all models).

    python benchmarks/bench_metrics.py [--n 10000] [--k 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pancreas_gvae.evaluation import metrics as M  # noqa: E402

MNIST = REPO.parent / "shared" / "data" / "mnist"


def load_real(n: int) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    img, lab = MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz"
    if img.exists() and lab.exists():
        from pancreas_gvae.data.idx import read_idx

        x = torch.from_numpy(read_idx(img).astype(np.float32) / 255.0).unsqueeze(1)
        y = torch.from_numpy(read_idx(lab).astype(np.int64))
        reps = -(-n // x.shape[0])
        return x.repeat(reps, 1, 1, 1)[:n], y.repeat(reps)[:n], f"MNIST test split ({img})"
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=g), None, "uniform noise (MNIST not found)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="samples and real images (each)")
    ap.add_argument("--k", type=int, default=100, help="IWAE importance samples per image")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    real, labels, source = load_real(args.n)
    g = torch.Generator().manual_seed(1)
    samples = (torch.roll(real, shifts=1, dims=-1) + 0.05 * torch.randn(real.shape, generator=g)).clamp(0, 1)
    n = args.n
    n_val = n // 5  # Parzen: bandwidth chosen on the first 20 % of the real images, evaluated on the rest

    latent = 16
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 2 * latent)).eval()
    decoder = nn.Sequential(nn.Linear(latent, 256), nn.ReLU(), nn.Linear(256, 784), nn.Unflatten(1, (1, 28, 28))).eval()

    def encode(x):
        h = encoder(x)
        return h[:, :latent], h[:, latent:].clamp(-6, 2)

    def decode_logits(z):
        return decoder(z)

    rows: list[tuple[str, float, float, str]] = []

    def timed(name: str, fn, note: str = ""):
        """Run ``fn`` once, record its wall time and the CPU time of this process (all threads)."""
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        rows.append((name, time.perf_counter() - t0, time.process_time() - c0, note))
        return out

    load0 = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    t0, c0 = time.perf_counter(), time.process_time()
    if labels is not None:
        clf = M.train_classifier(real, labels, steps=300, batch_size=128, seed=0)
    else:
        clf = M.SmallClassifier().eval()
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0

    with torch.no_grad():
        timed("MMD² pixel (Gaussian, 5 bandwidths)", lambda: M.mmd2_gaussian(real, samples), f"{n}×784 vs {n}×784")
        f_real, f_fake = timed(
            "feature extraction (classifier, both sets)",
            lambda: (M.extract_features(clf.features, real), M.extract_features(clf.features, samples)),
            f"2×{n} images → 128-d",
        )
        timed("MMD² feature (Gaussian, 5 bandwidths)", lambda: M.mmd2_gaussian(f_real, f_fake), "on the features")
        timed("Fréchet distance (features)", lambda: M.frechet_distance_features(f_real, f_fake), "128-d, eigh")
        timed("kernel distance KID (100 × 1000)", lambda: M.kernel_distance(f_real, f_fake), "cubic kernel")
        timed("precision / recall (k = 3, features)", lambda: M.precision_recall(f_real, f_fake, k=3), "float64")
        timed(
            "mode coverage (classifier head)",
            lambda: M.mode_coverage(
                clf.head(f_fake), num_classes=10, reference=M.class_histogram(clf.head(f_real), 10)
            ),
            "logits from the features",
        )
        recon = timed("reconstructions decode(mu) (for next 2)", lambda: torch.sigmoid(decode_logits(encode(real)[0])))
        timed("SSIM reconstruction (MONAI)", lambda: M.reconstruction_ssim(real, recon), f"{n} pairs, 11-px window")
        timed("reconstruction error MSE / L1", lambda: M.reconstruction_error(real, recon, window=(-125.0, 275.0)))
        timed("MS-SSIM diversity (MONAI, 3 scales)", lambda: M.ms_ssim_diversity(samples, n_pairs=2000), "2,000 pairs")
        timed("KL (closed form)", lambda: M.encoder_kl(real, encode))
        xb = M.binarize(real, seed=0)
        timed("ELBO (Bernoulli, 1 sample)", lambda: M.elbo(xb, encode, decode_logits))
        timed(
            f"IWAE bound (Bernoulli, k = {args.k})", lambda: M.iwae_bound(xb, encode, decode_logits, k=args.k), "∝ k"
        )
        timed(
            "Parzen window (10-σ grid)",
            lambda: M.parzen_estimate(real[n_val:], real[:n_val], samples),
            f"σ on {n_val} val, eval {n - n_val}, {n} centres, float64",
        )
        timed(
            "memorisation, pixel space",
            lambda: M.memorisation_check(samples, real, max_reference=2000),
            f"{n} vs {n} train, 2,000 leave-one-out refs",
        )
        timed(
            "memorisation, feature space",
            lambda: M.memorisation_check(f_fake, f_real, max_reference=2000),
            "on the features",
        )

    width = max(len(r[0]) for r in rows)
    print(f"pancreas_gvae.evaluation.metrics benchmark: {n} samples vs {n} real 28×28 images; real = {source}")
    cpu = platform.processor() or platform.machine()
    py = platform.python_version()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {cpu}, python {py}")
    print(f"load average at start (1, 5, 15 min): {load0}  (other processes on the machine inflate the times)")
    print(
        f"feature classifier training (one-off, 300 steps, not in total): {train_s:.1f} s wall, {train_cpu:.1f} s CPU"
    )
    print("wall s: elapsed; CPU s: this process's CPU time over all threads (less sensitive to other load)")
    print(f"{'metric'.ljust(width)}  {'wall s':>8}  {'CPU s':>8}  notes")
    print(f"{'-' * width}  {'-' * 8}  {'-' * 8}  -----")
    for name, sec, cpu_s, note in rows:
        print(f"{name.ljust(width)}  {sec:8.2f}  {cpu_s:8.2f}  {note}")
    print(f"{'-' * width}  {'-' * 8}  {'-' * 8}")
    print(f"{'total'.ljust(width)}  {sum(r[1] for r in rows):8.2f}  {sum(r[2] for r in rows):8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
