"""Stopping a run on SIGINT/SIGTERM: after the current step, with a checkpoint, never halfway through a write."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from reir.errors import StoppedBySignal

log = logging.getLogger(__name__)


class TrainingStopped(Exception):
    """Raised after the step during which SIGINT/SIGTERM arrived."""


class StopRequest:
    """SIGINT/SIGTERM set ``signum``; training stops after the current step and saves.

    Before training starts (:meth:`arm`), and on a second signal, it stops at once:
    the last checkpoint on disk is still good.
    """

    def __init__(self):
        self.signum: int | None = None
        self.armed = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def arm(self) -> None:
        self.armed = True

    def check(self) -> None:
        """Called between steps: stop here if a signal asked to."""
        if self.requested:
            raise TrainingStopped()

    def _handle(self, signum, frame):
        if not self.armed or self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s: finishing the current step, then saving a checkpoint (send it again to stop at once)",
                    signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle SIGINT/SIGTERM while inside; only the main thread can, elsewhere signals keep their handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def error(self, path: Path, where: str) -> StoppedBySignal:
        if self.signum is None:
            raise ValueError("no signal arrived; error() describes a run a signal stopped")
        name = signal.Signals(self.signum).name
        return StoppedBySignal(f"stopped by {name} {where}; checkpoint saved to {path}; "
                               "resume with the same command plus `resume` auto", self.signum)
