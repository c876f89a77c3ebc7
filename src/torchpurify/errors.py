"""The one exception type for user mistakes.

A :class:`UserError` carries a single line that says what was wrong and what to do about it.
The CLI prints it and exits with code 2; Python callers can catch it like any exception.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: bad path, unknown name, wrong shape, corrupt file, ..."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def check(condition: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise UserError(message)


class Divergence(RuntimeError):
    """Training produced a non-finite loss. Not a :class:`UserError`: inside a defense it is
    handled (the guard of :meth:`torchpurify.defenses.Defense.purify` backs off with a smaller
    step or rolls back); elsewhere the CLI reports it in one line (exit code 3)."""

    exit_code = 3

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
