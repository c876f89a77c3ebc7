"""Name → factory registries shared by the CLI, YAML specs and Python.

Names are kebab-case; every lookup of an unknown name says which names exist.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from torchpurify.errors import UserError

T = TypeVar("T")
# Seeds seed numpy, torch and Python alike: 0..2**32-1 is the range all of them take as given.
MAX_SEED = 2**32 - 1


def suggestion(name: str, choices: list[str] | tuple[str, ...], what: str = "choose one of") -> str:
    """' (did you mean X?)' for a near miss, else ' (choose one of: a, b, c)' (nothing when
    ``what`` is empty)."""
    close = difflib.get_close_matches(str(name)[:200], list(choices), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]}?)"
    return f" ({what}: {', '.join(choices)})" if what else ""


class Registry(Generic[T]):
    """A mapping from kebab-case names to factories, with a one-line summary each."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, tuple[T, str]] = {}

    def register(self, name: str, summary: str = "") -> Callable[[T], T]:
        """Decorator: ``@MODELS.register("small-cnn", "4 conv + BN")``."""

        def add(factory: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = (factory, summary)
            return factory

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name][0]
        except KeyError:
            hint = suggestion(name, self.names(), what="")
            raise UserError(
                f"unknown {self.kind} {name!r}{hint}; choose one of: {', '.join(self.names())}"
            ) from None

    def summary(self, name: str) -> str:
        self.get(name)
        return self._entries[name][1]

    def names(self) -> list[str]:
        return sorted(self._entries)
