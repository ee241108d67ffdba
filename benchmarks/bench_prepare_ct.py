"""Benchmark CT preparation and cached slice epochs on full-size phantom cases.

    python benchmarks/bench_prepare_ct.py --cases 2 [--size 512] [--slices 250] [--workdir /tmp/bench_ct]

1. Writes ``--cases`` phantom cases (pancreas_gvae.data.ct.phantom, TCIA layout) unless they already exist.
2. Prepares them in a child process (workers=1): seconds per case and the child's peak RSS.
3. One epoch of 2D slice samples (every slice once, ``--slice-size`` square) three ways:
   from the cache (CTSliceDataset), through the naive MONAI chain run every epoch (LoadImaged with
   ITKReader on the series folder -> Orientationd -> Spacingd -> ScaleIntensityRanged -> CropForegroundd),
   and through this project's deterministic chain without the cache. Same slices, same per-slice fit.

Goals (docs/data.md): <= 15 s per case, peak RSS <= 3 GB, cached epoch >= 10x faster than the naive chain.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOAL_SECONDS_PER_CASE = 15.0
GOAL_PEAK_RSS_GB = 3.0
GOAL_SPEEDUP = 10.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_cohort(root: Path, cases: int, size: int, slices: int) -> float:
    from pancreas_gvae.data.ct.phantom import label_path, make_phantom_cohort

    done = all(label_path(root, i).is_file() and (root / "Pancreas-CT" / f"PANCREAS_{i:04d}").is_dir()
               for i in range(1, cases + 1))
    stamp = root / f".phantom-{cases}-{size}-{slices}"
    if done and stamp.is_file():
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    make_phantom_cohort(root, cases=cases, size=size, slices=slices, seed=0)
    stamp.write_text("ok")
    return time.perf_counter() - start


def _prepare_child(data: str, out: str) -> None:
    from pancreas_gvae.data.ct.prepare import prepare_dataset

    prepare_dataset(data, out, force=True, progress=False)


def run_prepare(data: Path, out: Path) -> tuple[float, float]:
    """Prepare in a fresh child process; returns (wall seconds, the child's peak RSS in GB)."""
    shutil.rmtree(out, ignore_errors=True)
    ctx = multiprocessing.get_context("spawn")
    start = time.perf_counter()
    proc = ctx.Process(target=_prepare_child, args=(str(data), str(out)))
    proc.start()
    proc.join()
    wall = time.perf_counter() - start
    if proc.exitcode != 0:
        raise SystemExit(f"prepare failed with exit code {proc.exitcode}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: kilobytes
    return wall, peak_kb / 1024**2


def epoch_cached(out: Path, size: int) -> tuple[float, int]:
    """One pass over every cached slice, single-threaded as in a DataLoader worker (torch sets 1 thread there;
    on a busy machine two OpenMP threads per tiny slice op mostly wait for each other)."""
    import torch

    from pancreas_gvae.transforms.slice_dataset import CTSliceDataset

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        ds = CTSliceDataset(out, out / "manifest.csv", size=size, pos_fraction=None, seed=0, fit="resize")
        n = 0
        for i in range(len(ds)):
            item = ds[i]
            n += int(item["image"].shape[0] > 0)
        return time.perf_counter() - start, n
    finally:
        torch.set_num_threads(threads)


def _slices_of(image, label, size: int) -> int:
    """Every axial slice of a (1, x, y, z) RAS volume through the same per-slice fit as the dataset."""
    import numpy as np

    from pancreas_gvae.transforms.slice_dataset import fit_slice

    img = image.as_tensor()[0]
    lab = label.as_tensor()[0].float()
    spacing = np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0)
    for k in range(img.shape[2]):
        fit_slice(img[None, :, :, k].contiguous(), lab[None, :, :, k].contiguous(),
                  (float(spacing[0]), float(spacing[1])), size, 400.0)
    return int(img.shape[2])


def epoch_naive_monai(data: Path, size: int) -> tuple[float, int]:
    from monai.data import ITKReader
    from monai.transforms import (Compose, CropForegroundd, EnsureChannelFirstd, LoadImaged, Orientationd,
                                  ScaleIntensityRanged, Spacingd)

    from pancreas_gvae.data.ct.discovery import discover

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chain = Compose([
            LoadImaged(["image", "label"], reader=ITKReader(), image_only=True),
            EnsureChannelFirstd(["image", "label"]),
            Orientationd(["image", "label"], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(["image", "label"], pixdim=(1.0, 1.0, -1.0), mode=("bilinear", "nearest")),
            CropForegroundd(["image", "label"], source_key="image", select_fn=lambda x: x > -500, margin=4,
                            allow_smaller=True),
            ScaleIntensityRanged("image", a_min=-125, a_max=275, b_min=0.0, b_max=1.0, clip=True),
        ])
    cases = [c for c in discover(data).cases if c.excluded is None and c.label is not None]
    start = time.perf_counter()
    n = 0
    for case in cases:
        series = next(p.parent for p in sorted(case.image.rglob("*.dcm")))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = chain({"image": str(series), "label": str(case.label)})
        n += _slices_of(d["image"], d["label"], size)
        del d
    return time.perf_counter() - start, n


def epoch_own_chain(data: Path, size: int) -> tuple[float, int]:
    from pancreas_gvae.data.ct.config import DataConfig
    from pancreas_gvae.data.ct.dicom_series import candidate_files, scan_dicom_files
    from pancreas_gvae.data.ct.discovery import discover
    from pancreas_gvae.transforms.ct import build_preprocess_chain

    cfg = DataConfig()
    chain = build_preprocess_chain(cfg, cfg.pancreas_values("tcia"))
    cases = [c for c in discover(data).cases if c.excluded is None and c.label is not None]
    start = time.perf_counter()
    n = 0
    for case in cases:
        series = scan_dicom_files(candidate_files(case.image), cfg.checks)
        d = chain({"image": series.files, "label": str(case.label)})
        n += _slices_of(d["image"], d["label"], size)
        del d
    return time.perf_counter() - start, n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=2)
    p.add_argument("--size", type=int, default=512, help="phantom rows = columns")
    p.add_argument("--slices", type=int, default=250)
    p.add_argument("--slice-size", type=int, default=128, help="output slice size of the epoch")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_ct"))
    p.add_argument("--skip-naive", action="store_true", help="skip the (slow) naive MONAI epoch")
    args = p.parse_args(argv)

    import pandas as pd

    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: nproc={os.cpu_count()}, cpu={cpu_model()}, python {platform.python_version()}")
    print(f"command: python benchmarks/bench_prepare_ct.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    data, out = args.workdir / "data", args.workdir / "out"
    made = make_cohort(data, args.cases, args.size, args.slices)
    print(f"phantom: {args.cases} case(s) {args.size}x{args.size}x{args.slices}"
          + (f" written in {made:.1f} s" if made else " (reused)"))

    wall, peak_gb = run_prepare(data, out)
    df = pd.read_csv(out / "manifest.csv")
    ok = df[df["status"] == "ok"]
    if len(ok) != args.cases:
        print(df[["case_id", "status", "reason"]].to_string(index=False))
        return 1
    per_case = ok["seconds"].astype(float)

    t_cache, n_cache = epoch_cached(out, args.slice_size)
    t_own, n_own = epoch_own_chain(data, args.slice_size)
    t_naive, n_naive = (float("nan"), 0) if args.skip_naive else epoch_naive_monai(data, args.slice_size)

    rows = [
        ("prepare: seconds per case (mean / max)", f"{per_case.mean():.1f} / {per_case.max():.1f}",
         f"<= {GOAL_SECONDS_PER_CASE:g}"),
        ("prepare: wall for all cases incl. start-up (s)", f"{wall:.1f}", ""),
        ("prepare: peak RSS of the process (GB)", f"{peak_gb:.2f}", f"<= {GOAL_PEAK_RSS_GB:g}"),
        (f"epoch from the cache ({n_cache} slices, 1 thread, s)", f"{t_cache:.2f}", ""),
        (f"epoch, naive MONAI chain ({n_naive} slices, s)", f"{t_naive:.2f}", ""),
        (f"epoch, own chain without cache ({n_own} slices, s)", f"{t_own:.2f}", ""),
        ("speed-up: cache vs naive MONAI chain", f"{t_naive / t_cache:.1f}x", f">= {GOAL_SPEEDUP:g}x"),
        ("speed-up: cache vs own chain uncached", f"{t_own / t_cache:.1f}x", ""),
    ]
    table = pd.DataFrame(rows, columns=["metric", "value", "goal"])
    print(table.to_string(index=False))
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
