"""Peak memory of CT preparation with parallel workers, per case and in total, on a synthetic full-size cohort.

    python benchmarks/bench_prepare_memory.py --cases 20 --size 512 --slices 250 --workers 2

1. Writes ``--cases`` phantom cases (pancreas_gvae.data.ct.phantom, TCIA layout, ``--size``² x ``--slices``) into a
   temporary folder (``--workdir`` to keep and reuse them instead); nothing is committed.
2. Runs the real ``prepare_dataset(..., workers=--workers)`` in this process. Each spawned worker measures
   every case it prepares: its peak RSS reset before the case (``/proc/self/clear_refs``) and read after it
   (``VmHWM``), so the per-case peak is exact, not sampled. A thread samples the RSS of this process and all
   its workers every 50 ms for the total.
3. Prints a table per case and the summary: per-worker peak (goal <= 3 GB), total peak of all processes.

Linux only (``/proc``). On another kernel the per-case figure falls back to the worker's lifetime peak so far.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pancreas_gvae.data.ct import prepare as prepare_mod  # noqa: E402

GOAL_WORKER_PEAK_GB = 3.0
_LOG_ENV = "BENCH_PREPARE_MEMORY_LOG"
_real_prepare_case = prepare_mod.prepare_case  # bound before the parent patches the module attribute
GB = 1024**3


def _status_kb(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := current RSS
        return True
    except OSError:
        return False


def measured_prepare_case(case, *args, **kwargs):
    """``prepare_case`` with this worker's peak RSS over the case appended to the log file (JSON lines)."""
    reset = _reset_peak()
    start = time.perf_counter()
    row = _real_prepare_case(case, *args, **kwargs)
    peak_kb = _status_kb("VmHWM")
    if peak_kb is None:
        import resource

        peak_kb, reset = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False
    record = {"case_id": case.case_id, "pid": os.getpid(), "status": row.get("status"),
              "seconds": round(time.perf_counter() - start, 2), "peak_gb": peak_kb * 1024 / GB, "per_case": reset}
    with open(os.environ[_LOG_ENV], "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return row


class TreeSampler(threading.Thread):
    """RSS of this process and all its children, every ``interval`` seconds: per-pid and total peaks."""

    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True)
        import psutil

        self.me, self.interval, self.stop = psutil.Process(), interval, threading.Event()
        self.total_peak, self.per_pid = 0, {}

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            total = 0
            for proc in [self.me, *self.me.children(recursive=True)]:
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                self.per_pid[proc.pid] = max(self.per_pid.get(proc.pid, 0), rss)
            self.total_peak = max(self.total_peak, total)
            self.stop.wait(self.interval)


def make_cohort(root: Path, cases: int, size: int, slices: int) -> float:
    from pancreas_gvae.data.ct.phantom import make_phantom_cohort

    stamp = root / f".phantom-{cases}-{size}-{slices}"
    if stamp.is_file():
        return 0.0
    start = time.perf_counter()
    make_phantom_cohort(root, cases=cases, size=size, slices=slices, seed=0, overwrite=True)
    stamp.write_text("ok")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--slices", type=int, default=250)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the phantom cohort here and reuse it (default: a temporary folder, removed)")
    args = p.parse_args(argv)

    from benchmarks._common import header
    from pancreas_gvae.data.ct.config import DataConfig

    print(header())
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="bench_prepare_memory_") as tmp:
        work = args.workdir or Path(tmp)
        data, out = work / "data", Path(tmp) / "prepared"
        made = make_cohort(data, args.cases, args.size, args.slices)
        print(f"phantom: {args.cases} case(s) {args.size}x{args.size}x{args.slices}"
              + (f", written in {made:.0f} s" if made else " (reused)"))
        log_path = Path(tmp) / "rss.jsonl"
        os.environ[_LOG_ENV] = str(log_path)  # inherited by the spawned workers
        prepare_mod.prepare_case = measured_prepare_case  # looked up at call time by prepare_dataset
        cfg = DataConfig()
        cfg.exclude_cases = {}  # the phantom's 0025 / 0070 are not duplicates: measure every case
        sampler = TreeSampler()
        sampler.start()
        start = time.perf_counter()
        try:
            df = prepare_mod.prepare_dataset(data, out, config=cfg, workers=args.workers, progress=False)
        finally:
            sampler.stop.set()
            sampler.join()
            prepare_mod.prepare_case = _real_prepare_case
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.is_file() else []

    import pandas as pd

    per_case = pd.DataFrame(records).sort_values("case_id")
    workers = sorted(per_case["pid"].unique()) if len(per_case) else []
    per_case["worker"] = per_case["pid"].map({pid: i + 1 for i, pid in enumerate(workers)})
    per_case["peak RSS (GB)"] = per_case["peak_gb"].map(lambda v: f"{v:.2f}")
    print()
    print(per_case[["case_id", "worker", "status", "seconds", "peak RSS (GB)"]].to_string(index=False))
    if len(per_case) and not per_case["per_case"].all():
        print("(no /proc/self/clear_refs: peaks are each worker's lifetime peak so far)")
    worker_peaks = per_case.groupby("worker")["peak_gb"].max() if len(per_case) else pd.Series(dtype=float)
    parent_peak = sampler.per_pid.get(os.getpid(), 0) / GB
    ok = int((df["status"] == "ok").sum())
    worst = float(worker_peaks.max()) if len(worker_peaks) else float("nan")
    rows = [
        ("cases prepared (ok / all)", f"{ok} / {len(df)}", ""),
        ("wall for all cases incl. worker start-up (s)", f"{wall:.1f}", ""),
        ("seconds per case (mean / max)",
         f"{per_case['seconds'].mean():.1f} / {per_case['seconds'].max():.1f}" if len(per_case) else "-", ""),
        ("peak RSS per case (GB, mean / max)",
         f"{per_case['peak_gb'].mean():.2f} / {per_case['peak_gb'].max():.2f}" if len(per_case) else "-", ""),
        *[(f"peak RSS of worker {w} (GB, {int((per_case['worker'] == w).sum())} cases)", f"{v:.2f}",
           f"<= {GOAL_WORKER_PEAK_GB:g}") for w, v in worker_peaks.items()],
        ("peak RSS of the parent process (GB, sampled)", f"{parent_peak:.2f}", ""),
        ("peak RSS of all processes together (GB, sampled every 50 ms)", f"{sampler.total_peak / GB:.2f}", ""),
    ]
    print()
    print(pd.DataFrame(rows, columns=["metric", "value", "goal"]).to_string(index=False))
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    verdict = "PASS" if worst <= GOAL_WORKER_PEAK_GB else "FAIL"
    print(f"{verdict}: worst worker peak {worst:.2f} GB (goal <= {GOAL_WORKER_PEAK_GB:g} GB per worker)")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
