"""The one slice loader (``read_slices``) never holds a whole volume: peak memory is a few slices, not a cohort.

Issue 14 §7 asks that an 80-case cohort at 512² fit in 8 GB anywhere in the pipeline. ``read_slices`` reads
each slice from the memory-mapped cache and fits it to the slice size before stacking, so its working set is
one 512² slice plus the fitted output. numpy reports its allocations to ``tracemalloc``, so a loader that
materialised a volume (``np.asarray(memmap)``, ``mmap=False``) would show a peak of at least one volume here;
the control case below shows the measure sees exactly that.
"""

from __future__ import annotations

import tracemalloc

import numpy as np

from pancreas_gvae.data.ct.manifest import to_frame, write_manifest
from pancreas_gvae.transforms.cache import load_cached_case, save_cached_case
from pancreas_gvae.transforms.slice_dataset import CTSliceDataset, read_slices

SIZE, SLICES, CASES = 512, 24, 3
VOLUME_BYTES = SIZE * SIZE * SLICES * 2  # float16 cache


def _cohort(root):
    rng = np.random.default_rng(0)
    rows = []
    for c in range(CASES):
        image = rng.random((SIZE, SIZE, SLICES), dtype=np.float32)
        label = np.zeros(image.shape, np.uint8)
        label[200:260, 220:300, 4:20] = 1
        save_cached_case(root / "cache", f"C{c}", image, label, np.diag([0.8, 0.8, 2.0, 1.0]), {})
        rows.append({"case_id": f"C{c}", "status": "ok", "layout": "folder"})
    write_manifest(to_frame(rows), root)
    return root


def _peak(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_read_slices_peaks_far_below_one_volume(tmp_path):
    root = _cohort(tmp_path)
    ds = CTSliceDataset(root / "cache", root / "manifest.csv", size=64, pos_fraction=None, fov_mm=200.0)
    out, peak = _peak(lambda: read_slices(ds))
    assert out["image"].shape == (CASES * SLICES, 1, 64, 64)
    assert int(out["label"].sum()) > 0
    # One 512² float32 slice is 1 MiB; the cohort on disk is 3 volumes of 12 MiB.
    assert peak < VOLUME_BYTES / 4, f"read_slices peaked at {peak / 2**20:.1f} MiB"

    # Control: the same measure sees a whole volume being read into memory.
    _, whole = _peak(lambda: np.asarray(load_cached_case(root / "cache" / "C0", mmap=True).image, dtype=np.float32))
    assert whole >= VOLUME_BYTES


def test_max_slices_caps_what_is_read(tmp_path):
    root = _cohort(tmp_path)
    ds = CTSliceDataset(root / "cache", root / "manifest.csv", size=64, pos_fraction=None, fov_mm=200.0)
    out = read_slices(ds, max_slices=10, seed=1)
    assert out["image"].shape[0] == 10 and len(set(out["case_id"])) >= 2
