"""Errors that reach the user as one line, never as a traceback."""


class ReirError(Exception):
    """A problem the user can fix; the message names it and the fix.

    ``exit_code`` is 1 for runtime problems and 2 for usage problems.
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(ReirError):
    def __init__(self, message: str):
        super().__init__(message, exit_code=2)
