"""Command-line plumbing shared by every entry point: the parser, what reaches the terminal, one-line errors
(rendered by :mod:`reir.cli.messages`)."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable

from reir.cli.messages import as_flags, exit_code, forget_flags, one_line, remember_flags
from reir.errors import ReirError, UsageError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2; the options it parses are the
    flags :func:`as_flags` shows settings as."""

    def error(self, message: str):
        self.exit(exit_code(UsageError(message)), f"{self.prog}: error: {message} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        remember_flags(self)
        return super().parse_known_args(args, namespace)


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


class _ProgressFormatter(logging.Formatter):
    """The message, settings shown as flags."""

    def format(self, record: logging.LogRecord) -> str:
        return as_flags(super().format(record))


class _WarningFormatter(logging.Formatter):
    """``warning: ...``; a warning logged with ``extra={"loud": True}`` stands out between blank lines."""

    def format(self, record: logging.LogRecord) -> str:
        text = as_flags(record.getMessage())
        return f"\n*** WARNING: {text}\n" if getattr(record, "loud", False) else f"warning: {text}"


def configure_logging(level: int = logging.INFO) -> None:
    """Library messages on the terminal: progress on stdout, warnings on stderr as ``warning: ...``."""
    logger = logging.getLogger("reir")
    logger.setLevel(level)
    if any(isinstance(h, _TerminalHandler) for h in logger.handlers):
        return
    progress = _TerminalHandler("stdout")
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    progress.setFormatter(_ProgressFormatter())
    problems = _TerminalHandler("stderr")
    problems.setLevel(logging.WARNING)
    problems.setFormatter(_WarningFormatter())
    logger.addHandler(progress)
    logger.addHandler(problems)


def reports_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a ``main``: library messages reach the terminal, a :class:`ReirError` becomes one stderr line
    (settings shown as flags) and the exit code :data:`EXIT_CODES` gives it."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        configure_logging()
        forget_flags()
        try:
            return main(*args, **kwargs) or 0
        except (ReirError, KeyboardInterrupt) as exc:
            text = as_flags(one_line(exc)) if isinstance(exc, ReirError) else "interrupted"
            print(f"error: {text}", file=sys.stderr)
            return exit_code(exc)
        finally:
            forget_flags()  # a library call after the command names settings again

    return wrapper
