"""Fault injection at the write points of REIR's file helpers: every rename, and every fsync that finishes a file.

In process, the chosen point raises ``OSError(ENOSPC)`` (a full disk) or :class:`Killed` (the process
stopping there: nothing after it runs). :func:`kill_child` runs a script in a fresh interpreter that
SIGKILLs itself at one point, for the real thing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POINTS = ("replace", "rename", "fsync")


class Killed(BaseException):
    """The process stops at this point (a BaseException, so no ``except Exception`` carries on)."""


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@contextlib.contextmanager
def fault_at(point: int | None, error: Callable[[], BaseException] = Killed) -> Iterator[list[str]]:
    """Count the write points reached inside the block; the ``point``-th (1-based) raises ``error()`` instead."""
    seen: list[str] = []
    originals = {name: getattr(os, name) for name in POINTS}

    def hooked(name):
        def call(*args, **kwargs):
            seen.append(name)
            if len(seen) == point:
                raise error()
            return originals[name](*args, **kwargs)
        return call

    for name in POINTS:
        setattr(os, name, hooked(name))
    try:
        yield seen
    finally:
        for name, original in originals.items():
            setattr(os, name, original)


def kill_child(script: str, point: int, into: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script`` in a new interpreter that SIGKILLs itself at its ``point``-th rename (os.replace or
    os.rename) of something into the folder ``into``."""
    prelude = f"""
import os, signal
_calls = []
def _killing(original):
    def call(*args, **kwargs):
        if os.path.dirname(os.path.abspath(args[1])) == {str(Path(into).resolve())!r}:
            _calls.append(args)
        if len(_calls) == {point}:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    return call
os.replace, os.rename = _killing(os.replace), _killing(os.rename)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", prelude + script], env=env, capture_output=True, text=True,
                          timeout=timeout)
