"""Errors that reach the user as one line, never as a traceback.

A message names a setting as its Python name in backticks (`` `gpu_ids` ``), the keyword a caller of the
library passes; the command line shows the same marker as its flag. Which exit code an error gives is
the command line's decision too (:mod:`reir.cli.common`), made from the error's type.
"""


class ReirError(Exception):
    """A problem the user can fix; the message names it and the fix."""


class UsageError(ReirError):
    """A setting or input that cannot work as given (a usage problem, not one met while running)."""


class StoppedBySignal(ReirError):
    """A run that a signal (``signum``) stopped cleanly, its work saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
