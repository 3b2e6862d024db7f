"""train.py's command line in a process that kills itself the N-th time it reaches an event.

    python tests/train_with_kill.py EVENT:N[:SIGNAL] <train.py flags>

``step`` and ``eval_batch`` come from :func:`reir.training.train.train`'s callbacks; ``save`` is the moment
a file is completely written but not yet renamed into place (every output is renamed with
``os.replace``). The signal defaults to KILL: a real, unannounced death of the process.
"""

from __future__ import annotations

import os
import signal
import sys

from reir.cli.common import reports_errors
from reir.cli.train import get_args_parser
from reir.training.config import TrainConfig
from reir.training.train import train


def main() -> int:
    event, count, name = [*sys.argv[1].split(":"), "KILL"][:3]
    seen = 0

    def reached() -> None:
        nonlocal seen
        seen += 1
        if seen == int(count):
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))

    callbacks = []
    if event == "save":
        rename = os.replace

        def replace(source, target, *args, **kwargs):
            reached()
            return rename(source, target, *args, **kwargs)

        os.replace = replace
    else:
        callbacks.append(lambda e: reached() if e.kind == event else None)

    @reports_errors
    def run() -> int:
        train(TrainConfig.from_args(get_args_parser().parse_args(sys.argv[2:])), callbacks)
        return 0

    return run()


if __name__ == "__main__":
    sys.exit(main())
