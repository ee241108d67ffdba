"""One preparation run per output folder: an exclusive lock on ``OUT/.lock``.

Two runs writing one cache used to race (both renaming ``manifest.csv.tmp``, one deleting the case folder
the other had just finished). The second run now waits for the first (up to ``wait_s`` seconds) or stops
with one line naming the holder.

Why ``fcntl.flock`` and not the ``filelock`` package (installed with torch): the lock file must hold the
holder's pid and host for that message, and flock leaves the file's content to us (filelock owns and
truncates its lock file, and its internals changed across major versions); the kernel drops the lock when
the holder exits or is killed, so there is never a stale lock to clean up; and it excludes a second run in
the same process too (locks belong to the open file). On Linux NFS, flock is emulated with POSIX byte-range
locks, so runs on two hosts exclude each other as well. The lock file is never deleted: deleting it would
let a waiting run lock an orphaned inode while a third run creates a new file.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import time
from pathlib import Path

from pancreas_gvae.errors import PipelineError

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "holder unknown"


@contextlib.contextmanager
def locked_output(out_dir: str | Path, wait_s: float = 0.0, poll_s: float = 0.5):
    """Hold the exclusive lock of ``out_dir`` for the block; wait up to ``wait_s`` seconds (< 0: no limit) for
    another run to release it, then raise :class:`PipelineError` naming the holder (pid, host, start time)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (documented); runs must not share an output folder there
        log.warning("no fcntl on this platform: %s is not locked against a second run", LOCK_NAME)
        yield
        return
    path = Path(out_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    held = False
    try:
        deadline = None if wait_s < 0 else time.monotonic() + wait_s
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                holder = _holder(path)
                if deadline is not None and time.monotonic() >= deadline:
                    waited = f" after waiting {wait_s:g} s" if wait_s > 0 else ""
                    raise PipelineError(f"the output folder is in use by another prepare run ({holder}){waited}; "
                                        f"let it finish, or pass --wait SECONDS") from None
                if not announced:
                    log.info("output folder in use by another prepare run (%s): waiting%s", holder,
                             "" if deadline is None else f" up to {wait_s:g} s")
                    announced = True
                time.sleep(poll_s)
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {since}\n".encode(), 0)
        yield
    finally:
        if held:
            os.ftruncate(fd, 0)  # no stale holder line once released
        os.close(fd)  # releases the lock
