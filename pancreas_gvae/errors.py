"""Errors a user can act on.

Every user-facing command wraps its ``main`` in :func:`run_cli`, so a
:class:`PipelineError` becomes one clear line on stderr and an exit code,
never a stack trace.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
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


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a scheduler or torchrun stopping a job), raised like Ctrl-C."""


def _sigterm_as_interrupt(owner: int):
    # Python's default for SIGTERM ends the process at once: no ``finally``, no ``except BaseException``, so
    # every MLflow run it had open stays RUNNING in the UI forever. Raised as an exception instead, it takes
    # the path Ctrl-C takes (runs ended KILLED/FAILED, partial tables written); checkpoints and result rows
    # are written atomically, so a re-run resumes either way.
    def handler(signum, frame):
        if os.getpid() != owner:  # a forked child (a DataLoader worker) keeps the default: exit now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated(f"signal {signum}")

    return handler


def run_cli(main: Callable[..., int | None]) -> Callable[..., int]:
    """Decorate a command's ``main`` so a :class:`PipelineError` prints ``error: ...`` and exits with its code,
    Ctrl-C exits 130 and SIGTERM 143, both after the command's own clean-up ran."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        install = threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        if install:
            signal.signal(signal.SIGTERM, _sigterm_as_interrupt(os.getpid()))
        try:
            return main(*args, **kwargs) or 0
        except PipelineError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code
        except Terminated:
            print("terminated (SIGTERM); finished results are kept, a re-run resumes", file=sys.stderr)
            return 143
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            if install:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return wrapper
