"""Atomic checkpoints: write to a temporary file in the same folder, then rename.

A crash mid-write leaves the previous checkpoint intact, never a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pancreas_gvae.errors import PipelineError


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid in the name: a leftover of a killed run is told apart from a live writer's file.
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_orphan_temporaries(path: str | Path) -> list[str]:
    """Delete ``<path>.<pid>.*.tmp`` files left by killed writers (pid no longer alive, or no pid: older runs)."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f"{path.name}.*.tmp") if path.parent.is_dir() else []:
        pid = tmp.name[len(path.name) + 1:].split(".", 1)[0]
        if not (pid.isdigit() and _alive(int(pid))):
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint not found: {path}")
    try:
        # weights_only=False: our checkpoints hold RNG states and the config dict, written by us.
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise PipelineError(f"checkpoint {path} could not be read ({type(err).__name__}: {err})") from None
