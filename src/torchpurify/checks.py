"""The one checker for hyper-parameters: defenses, attacks and spec entries all use it.

A value must be of the kind its field is declared with (its type hint, or its default's type):
an integer passes where a number goes, a boolean never does, ``None`` only where the hint
allows it. :func:`check_fields` runs it over a dataclass in ``__post_init__``, so a defense or
trigger built directly from Python is checked exactly as one built from the CLI or a spec.
"""

from __future__ import annotations

import dataclasses
import reprlib
import types
import typing
from typing import Any

from torchpurify.errors import UserError

KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
              dict: "a mapping", list: "a list", tuple: "a list"}  # fmt: skip


_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxother = 3, 60, 60
_short.maxlist = _short.maxdict = _short.maxtuple = 6


def shown(value: Any) -> str:
    """A short ``repr`` for messages: deep or long values are elided, never printed whole."""
    return _short.repr(value)


def _options(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint) or hint
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(hint) or (Any,)
        return isinstance(value, origin) and all(_fits(item, inner) for item in value)
    if isinstance(origin, type):
        return isinstance(value, origin)
    return True  # a hint this checker does not know: nothing to say


def describe(hint: Any) -> str:
    """'a number', 'a string or null', 'a list of strings or null', ..."""
    names = []
    for option in _options(hint):
        origin = typing.get_origin(option) or option
        if option is type(None):
            continue
        name = KIND_NAMES.get(origin, getattr(origin, "__name__", str(origin)))
        inner = typing.get_args(option)
        if origin in (list, tuple) and inner and inner[0] in KIND_NAMES:
            name = f"a list of {KIND_NAMES[inner[0]].removeprefix('a ').removeprefix('an ')}s"
        names.append(name)
    if type(None) in _options(hint):
        names.append("null")
    return " or ".join(names)


def kind_problem(value: Any, hint: Any) -> str | None:
    """None when ``value`` fits ``hint`` (a type or a type hint), else what is wrong with it."""
    if any(_fits(value, option) for option in _options(hint)):
        return None
    return f"must be {describe(hint)}, got {shown(value)}"


def normalise(value: Any, hint: Any) -> Any:
    """An integer given for a number-only field becomes a float (1 and 1.0 are one setting)."""
    options = _options(hint)
    numeric = isinstance(value, int) and not isinstance(value, bool)
    if numeric and float in options and int not in options:
        return float(value)
    return value


def check_fields(instance: Any, owner: str, skip: tuple[str, ...] = ()) -> None:
    """Check every field of a dataclass instance against its type hint (one-line UserError
    naming ``owner`` and the field), and store integers given for floats as floats."""
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        if field.name in skip or field.name not in hints:
            continue
        value = getattr(instance, field.name)
        problem = kind_problem(value, hints[field.name])
        if problem is not None:
            default = (
                "" if field.default is dataclasses.MISSING else f" (default {field.default!r})"
            )
            raise UserError(f"{owner}: {field.name} {problem}{default}")
        object.__setattr__(instance, field.name, normalise(value, hints[field.name]))


def default(value: Any, source: str) -> Any:
    """A dataclass field's default together with where it comes from, stored as the field's
    ``metadata["source"]``: ``alpha: float = default(0.2, "paper: ...")``. The kinds of source
    and the test that checks every one are in methods.md, "Where each default comes from"."""
    return dataclasses.field(default=value, metadata={"source": source})


def source_of(field: dataclasses.Field) -> str | None:
    """The source a field's default names (see :func:`default`), or None."""
    return field.metadata.get("source")


def require(owner: str, field: str, value: Any, ok: bool, allowed: str) -> None:
    """The range check: a one-line UserError ``owner: field must be allowed, got value``."""
    if not ok:
        raise UserError(f"{owner}: {field} must be {allowed}, got {shown(value)}")
