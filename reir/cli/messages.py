"""What the command line shows of a library error: settings as flags, and the exit code of its type.

The library names a setting in its messages as `` `name` ``; this is the one place that shows such a name as
the flag of the command running, and the one place that turns an error's type into an exit code.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import re
import signal
from collections.abc import Callable
from typing import Any

from reir.errors import ReirError, StoppedBySignal, UsageError

# A setting named in a library message: its Python name in backticks (reir/errors.py).
SETTING_MARK = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")

# The exit code of each kind of failure, a subclass before its base: the first type the error is an instance of
# decides. A signal's stop exits as a shell reports a process the signal killed, 128 + its number.
EXIT_CODES: dict[type[BaseException], Callable[[Any], int]] = {
    StoppedBySignal: lambda exc: 128 + exc.signum,
    KeyboardInterrupt: lambda exc: 128 + signal.SIGINT,
    UsageError: lambda exc: 2,
    ReirError: lambda exc: 1,
}

# setting (an option's ``dest``) -> its flag, for the options of the command running (filled as it parses)
_command_flags: dict[str, str] = {}


def remember_flags(parser: argparse.ArgumentParser) -> None:
    """The options ``parser`` parses become the flags settings are shown as."""
    _command_flags.update(flags_of(parser))


def forget_flags() -> None:
    """After a command: a setting a library message names shows as any command's flag of that name, or as itself."""
    _command_flags.clear()


def flag_name(setting_name: str) -> str:
    """The command-line flag of a declared setting (:mod:`reir.settings`): the one place the two names are tied."""
    return f"--{setting_name}"


def flags_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's setting (its ``dest``) and its long flag, which may be named otherwise (``--format``
    sets ``export_format``)."""
    return {action.dest: long[0] for action in parser._actions
            if (long := [option for option in action.option_strings if option.startswith("--")])}


@functools.cache
def every_command_flag() -> dict[str, str]:
    """The options of every ``reir`` command (those in :data:`reir.cli.COMMANDS` with a ``get_args_parser``):
    a message may point to another command's flag, as ``prepare with `skip_bad` ``."""
    from reir.cli import COMMANDS

    flags: dict[str, str] = {}
    for module_name in sorted({target.partition(":")[0] for target, _ in COMMANDS.values()}):
        build = getattr(importlib.import_module(module_name), "get_args_parser", None)
        if build is not None:
            flags |= {name: flag for name, flag in flags_of(build()).items() if name not in flags}
    return flags


def as_flags(message: str) -> str:
    """A library message as the command line shows it: each `` `setting` `` becomes its flag, the running
    command's own if it has one, else the flag of that name another command has; other backticked text
    (a name no command has a flag for) stays as it is."""

    def flag(mark: re.Match) -> str:
        name = mark.group(1)
        if name in _command_flags:
            return _command_flags[name]
        return every_command_flag().get(name, mark.group(0))

    return SETTING_MARK.sub(flag, message)


def exit_code(exc: BaseException) -> int:
    """The exit code :data:`EXIT_CODES` gives ``exc``."""
    return next(code(exc) for kind, code in EXIT_CODES.items() if isinstance(exc, kind))


def one_line(exc: ReirError) -> str:
    """The message; for an error re-raised from a DataLoader worker, the original one without its traceback."""
    lines = str(exc).strip().splitlines()
    if len(lines) > 1 and "Traceback" in str(exc):
        return lines[-1].split(": ", 1)[-1]
    return lines[0] if lines else type(exc).__name__
