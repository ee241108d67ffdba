"""One prepare run per output folder (issue 13, item 2): a lock on OUT/.lock, unique temp names, orphan cleanup."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pancreas_gvae.data.ct.manifest import read_manifest
from pancreas_gvae.data.ct.outlock import LOCK_NAME, locked_output
from pancreas_gvae.data.ct.prepare import prepare_dataset
from pancreas_gvae.errors import PipelineError

REPO = Path(__file__).resolve().parents[2]


def test_a_second_run_stops_with_one_line_naming_the_holder(cohort_root, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with locked_output(out):  # another run (flock excludes a second open file, even in this process)
        with pytest.raises(PipelineError) as err:
            prepare_dataset(cohort_root, out, progress=False)
        message = str(err.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message and "\n" not in message
        assert "--wait" in message
        from pancreas_gvae.pipelines.prepare_ct import main

        assert main(["--data-root", str(cohort_root), "--out", str(out), "--no-progress"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: the output folder is in use") and "Traceback" not in lines[0]
    assert not (out / "manifest.csv").exists()  # nothing was written while the other run held the folder
    df = prepare_dataset(cohort_root, out, progress=False)  # released: the next run goes ahead
    assert (df["status"] == "ok").all()
    assert (out / LOCK_NAME).read_text() == ""  # no stale holder line after release


def test_a_second_run_waits_for_the_first(cohort_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    held = threading.Event()

    def other_run():
        with locked_output(out):
            held.set()
            time.sleep(1.5)

    thread = threading.Thread(target=other_run)
    thread.start()
    held.wait(10)
    start = time.monotonic()
    df = prepare_dataset(cohort_root, out, progress=False, wait_s=60)
    thread.join()
    assert time.monotonic() - start >= 1.0
    assert (df["status"] == "ok").all()


def test_leftovers_of_a_killed_run_are_removed_and_finished_cases_kept(cohort_root, tmp_path):
    out = tmp_path / "out"
    prepare_dataset(cohort_root, out, progress=False)
    cache = out / "cache"
    (cache / ".good.tmp-4242-abcd1234").mkdir()
    (cache / ".good.tmp-4242-abcd1234" / "image.npy").write_bytes(b"half")
    (cache / ".good.trash-4243-0000beef").mkdir()
    (cache / "good" / ".meta.json.tmp-4244-1").write_text("{")
    (out / ".manifest.csv.tmp-4245-xyz").write_text("case_id\n")
    before = (cache / "good" / "image.npy").stat().st_mtime_ns
    df = prepare_dataset(cohort_root, out, progress=False).set_index("case_id")
    assert df.loc["good", "status"] == "ok" and df.loc["good", "from_cache"]  # the finished case is reused
    assert (cache / "good" / "image.npy").stat().st_mtime_ns == before
    leftovers = [p.name for p in [*cache.glob(".*"), *(cache / "good").glob(".*"), *out.glob(".manifest*")]]
    assert leftovers == []


def test_replacing_a_cached_case_never_leaves_it_half_written(tmp_path):
    import numpy as np

    from pancreas_gvae.transforms.cache import load_cached_case, read_cache_meta, save_cached_case

    root = tmp_path / "cache"
    image, label = np.zeros((4, 5, 6), np.float32), np.zeros((4, 5, 6), np.uint8)
    save_cached_case(root, "c", image, label, np.eye(4), {"config_hash": "a"})
    save_cached_case(root, "c", image + 0.5, label, np.eye(4), {"config_hash": "b"})
    assert read_cache_meta(root, "c")["config_hash"] == "b"
    assert float(load_cached_case(root / "c").image.max()) == 0.5
    assert sorted(p.name for p in root.iterdir()) == ["c"]  # no temporary or renamed-aside folder left


@pytest.mark.slow
def test_two_concurrent_cli_runs_into_one_out_both_succeed(cohort_root, tmp_path, make_case):
    make_case(cohort_root, "second", seed=4)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "pipelines" / "prepare_ct.py"), "--data-root", str(cohort_root),
           "--out", str(out), "--no-progress", "--wait", "300"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-2000:]
        assert "Traceback" not in stderr
    printed = "".join(stdout for stdout, _ in results)
    assert "2 ok, 0 excluded (0 reused" in printed and "2 ok, 0 excluded (2 reused" in printed  # one ran, one reused
    df = read_manifest(out)
    assert (df["status"] == "ok").all()
    assert not list((out / "cache").glob(".*")) and not list(out.glob(".manifest*"))
