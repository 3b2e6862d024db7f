"""Command-line plumbing shared by every entry point: one-line errors, exit codes, what reaches the terminal."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable

from reir.errors import ReirError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def one_line(exc: ReirError) -> str:
    """The message; for an error re-raised from a DataLoader worker, the original one without its traceback."""
    lines = str(exc).strip().splitlines()
    if len(lines) > 1 and "Traceback" in str(exc):
        return lines[-1].split(": ", 1)[-1]
    return lines[0] if lines else type(exc).__name__


class _TerminalHandler(logging.StreamHandler):
    """Writes to ``sys.stdout``/``sys.stderr`` as they are at each message (DDP ranks silence stdout)."""

    def __init__(self, name: str):
        super().__init__()
        self.stream_name = name

    @property
    def stream(self):
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, value):
        pass  # always the current sys stream


class _WarningFormatter(logging.Formatter):
    """``warning: ...``; a warning logged with ``extra={"loud": True}`` stands out between blank lines."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return f"\n*** WARNING: {text}\n" if getattr(record, "loud", False) else f"warning: {text}"


def configure_logging(level: int = logging.INFO) -> None:
    """Library messages on the terminal: progress on stdout, warnings on stderr as ``warning: ...``."""
    logger = logging.getLogger("reir")
    logger.setLevel(level)
    if any(isinstance(h, _TerminalHandler) for h in logger.handlers):
        return
    progress = _TerminalHandler("stdout")
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    problems = _TerminalHandler("stderr")
    problems.setLevel(logging.WARNING)
    problems.setFormatter(_WarningFormatter())
    logger.addHandler(progress)
    logger.addHandler(problems)


def reports_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a ``main``: library messages reach the terminal, a :class:`ReirError` becomes one stderr line
    and its exit code."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        configure_logging()
        try:
            return main(*args, **kwargs) or 0
        except ReirError as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130

    return wrapper
