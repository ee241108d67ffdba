"""Tables written whole or not at all.

A result table (``manifest.csv``, ``dice.csv``, ``results.csv``) is rewritten after every finished row so that
an interrupted run keeps what it finished; written in place, a kill mid-write would leave half a file that
the resumed run cannot read. Here the table goes to a temporary file beside the target, unique to this
process (``.<name>.tmp-<pid>-...``, so a leftover is told apart from a live writer's), then renamed over it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """``df.to_csv(path, index=False)``, atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            df.to_csv(handle, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
