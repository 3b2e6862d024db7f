"""Test hook: stop the process at a named point, to prove that resuming loses nothing.

Set ``REIR_TEST_KILL_AT=<event>:<n>[:<signal>]`` and the process sends itself
``signal`` (default ``KILL``) the ``n``-th time it reaches ``event``. Events:
``train_step`` (after an optimizer step), ``eval_batch`` (after an evaluation batch),
``save`` (a file is fully written but not yet renamed into place). Unset, this costs
one dictionary lookup per call. It is for the test suite only; never set it in a real run.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def reached(event: str) -> None:
    spec = os.environ.get("REIR_TEST_KILL_AT")
    if not spec:
        return
    target, _, rest = spec.partition(":")
    if target != event:
        return
    count, _, name = rest.partition(":")
    _counts[event] = _counts.get(event, 0) + 1
    if _counts[event] == int(count):
        os.kill(os.getpid(), getattr(signal, f"SIG{name or 'KILL'}"))
