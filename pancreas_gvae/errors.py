"""Errors a user can act on.

Every user-facing command wraps its ``main`` in :func:`run_cli`, so a
:class:`PipelineError` becomes one clear line on stderr and an exit code,
never a stack trace.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable


class PipelineError(Exception):
    """An error caused by input or settings the user can fix. ``exit_code`` 2 by default."""

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class DataError(PipelineError):
    """A data file is missing, truncated or malformed; the message names the file and the problem."""


class TrainingDiverged(PipelineError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 3


def run_cli(main: Callable[..., int | None]) -> Callable[..., int]:
    """Decorate a command's ``main`` so a :class:`PipelineError` prints ``error: ...`` and exits with its code."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except PipelineError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper
