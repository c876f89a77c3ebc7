"""The one exception type for user mistakes.

A :class:`UserError` carries a single line that says what was wrong and what to do about it.
The CLI prints it and exits with code 2; Python callers can catch it as a ``ValueError``.
"""

from __future__ import annotations

import re

# C0 and C1 control characters (terminal escape sequences among them) and DEL: a file or folder
# name holding them is shown escaped, so a message can neither move the cursor nor recolour the
# terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` on one line, each control character shown as its escape (``\\x1b``)."""
    return _CONTROL.sub(lambda c: c[0].encode("unicode_escape").decode(), " ".join(text.split()))


class UserError(ValueError):
    """A mistake the user can fix: bad path, unknown name, wrong shape, corrupt file, ...

    A ``ValueError``, so Python callers that catch those catch it too."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(printable(message))


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
