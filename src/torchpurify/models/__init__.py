"""Architectures by name, and the one way to build them.

``build_model("small-cnn", (1, 28, 28), 10)`` builds a registered model;
``build_model("mypkg.nets:make_net", ...)`` builds a user's own architecture from a
``module:function`` reference. The function receives ``input_shape`` and ``num_classes`` when its
signature asks for them, plus any keyword arguments given.

Whoever calls :func:`build_model` chooses the name, so a ``module:function`` reference is imported
here without question; loading a model *file* goes through :mod:`torchpurify.models.io`, which
refuses a reference recorded in a model card unless the user named it (see ``load_model``).

Keyword arguments must be plain JSON values (they are written to the model card), must be
parameters of the factory, and must have the kind of the parameter's default. The model is
first built with every large tensor on the ``meta`` device, so an argument that would need
gigabytes (``width=100000``) is refused before any memory is allocated.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from torchpurify.errors import UserError, check
from torchpurify.models import audio, image  # noqa: F401  (register the audio and image models)
from torchpurify.models.registry import MODELS

SPEC_ATTR = "torchpurify_architecture"
#: The most values (parameters and buffers) a model built here may hold: 2³⁰, 4 GiB as float32.
MAX_ELEMENTS = 1 << 30
_LARGE = 1 << 22  # tensors above this many values are sized on the meta device first
_FACTORIES = {
    torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.randint,
    torch.empty_strided,
}  # fmt: skip
_MAX_JSON_DEPTH = 8


def is_reference(name: str) -> bool:
    """True for a ``module:function`` reference (code to import), False for a registry name."""
    return isinstance(name, str) and ":" in name


@contextlib.contextmanager
def _current_folder_on_path():
    added = "" not in sys.path and os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        yield
    finally:
        if added and os.getcwd() in sys.path:
            sys.path.remove(os.getcwd())


def _import_factory(reference: str) -> Callable[..., Any]:
    module_name, _, function_name = reference.partition(":")
    if not module_name or not function_name:
        raise UserError(f"architecture {reference!r} must look like 'package.module:function'")
    try:
        # Like `python -m`, a module in the current folder is found (the user named it).
        with _current_folder_on_path():
            module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(
            f"cannot import {module_name!r} for architecture {reference!r} ({error}); "
            "run from the folder holding it or put it on PYTHONPATH"
        ) from None
    except SystemExit as error:  # a script's sys.exit() at import would end the command silently
        raise UserError(
            f"importing {module_name!r} for architecture {reference!r} called sys.exit"
            f"({error.code!r}); guard the module's script part with "
            "if __name__ == '__main__':"
        ) from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise UserError(f"{module_name!r} has no callable {function_name!r}")
    return factory


def check_json(value: Any, where: str, depth: int = 0) -> None:
    """``value`` must be a plain JSON value: null, bool, int, finite float, str, or lists and
    string-keyed dicts of those (at most 8 levels deep)."""
    check(depth <= _MAX_JSON_DEPTH, f"{where} is nested too deeply (more than 8 levels)")
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        check(math.isfinite(value), f"{where} must be a finite number, got {value}")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_json(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            check(isinstance(key, str), f"{where} has a non-string key {key!r}")
            check_json(item, f"{where}.{key}", depth + 1)
        return
    raise UserError(
        f"{where} must be a plain JSON value (number, string, list, ...), "
        f"got a {type(value).__name__}"
    )


_KINDS = {bool: ((bool,), "true or false"), int: ((int,), "an integer"),
          float: ((int, float), "a number"), str: ((str,), "a string")}  # fmt: skip


def _signature(factory: Callable[..., Any]) -> inspect.Signature:
    """The factory's signature; a module class without its own ``__init__`` takes no arguments
    (``nn.Module.__init__``'s ``*args, **kwargs`` accept none of ``input_shape``, ...)."""
    if isinstance(factory, type) and factory.__init__ is nn.Module.__init__:
        return inspect.Signature()
    return inspect.signature(factory)


def check_kwargs(name: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Keyword arguments for ``factory``: plain JSON, named parameters, of the defaults' kinds."""
    check(
        isinstance(kwargs, dict),
        f"the arguments of architecture {name!r} must be a mapping, got {type(kwargs).__name__}",
    )
    try:
        params = _signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
        params = {}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = [
        key
        for key, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and key not in ("input_shape", "num_classes")
    ]
    for key, value in kwargs.items():
        check(
            key not in ("input_shape", "num_classes"),
            f"{key} of architecture {name!r} comes from the data, not from its arguments",
        )
        check(
            key in named or accepts_any,
            f"architecture {name!r} has no argument {key!r}; "
            f"its arguments: {', '.join(named) or 'none'}",
        )
        check_json(value, f"argument {key!r} of architecture {name!r}")
        default = params[key].default if key in params else inspect.Parameter.empty
        kinds, words = _KINDS.get(type(default), (None, ""))
        if kinds is not None and (
            not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
        ):
            raise UserError(
                f"argument {key!r} of architecture {name!r} must be {words}, got {value!r}"
            )


def _size(args: tuple, kwargs: dict) -> int:
    size = kwargs.get("size")
    if size is None:
        size = args[0] if args and isinstance(args[0], (tuple, list, torch.Size)) else args
    try:
        return math.prod(int(s) for s in size if isinstance(s, int))
    except (TypeError, ValueError):
        return 0


class _LargeOnMeta(TorchFunctionMode):
    """Create every tensor of more than ``_LARGE`` values on the meta device (no memory)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and _size(args, kwargs) > _LARGE:
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


def _construct(name: str, factory, given: dict[str, Any], input_shape) -> nn.Module:
    """Call the factory. Arguments that do not fit its signature, and a ValueError it raises
    about its input, are the user's to fix (one line); any other exception is a bug in the
    architecture and keeps its traceback."""
    try:
        _signature(factory).bind(**given)
    except TypeError as error:
        raise UserError(f"cannot build model {name!r}: {error}") from None
    except ValueError:  # no signature to check against (a builtin)
        pass
    try:
        model = factory(**given)
    except UserError:
        raise
    except ValueError as error:
        raise UserError(
            f"cannot build model {name!r} for input {tuple(input_shape)}: {error}"
        ) from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def count_values(model: nn.Module) -> int:
    """Parameters and buffers of ``model``, in values (meta tensors included)."""
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    /,
    *,
    max_elements: int = MAX_ELEMENTS,
    **kwargs: Any,
) -> nn.Module:
    """Build an architecture by registry name or ``module:function`` and remember how.

    A model holding more than ``max_elements`` values is refused before it is allocated.
    """
    return build_architecture(name, input_shape, num_classes, kwargs, max_elements=max_elements)


def build_architecture(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    kwargs: dict[str, Any],
    *,
    max_elements: int = MAX_ELEMENTS,
) -> nn.Module:
    """:func:`build_model` with the keyword arguments as one mapping (e.g. from a model card)."""
    check(isinstance(name, str) and name != "", f"architecture must be a name, got {name!r}")
    factory = _import_factory(name) if is_reference(name) else MODELS.get(name)
    check_kwargs(name, factory, kwargs)
    kwargs = dict(kwargs)
    try:
        params = _signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = dict(kwargs)
    for key, value in (("input_shape", tuple(input_shape)), ("num_classes", num_classes)):
        if key in params or accepts_any:
            given[key] = value
    rng = torch.get_rng_state()
    with _LargeOnMeta():
        model = _construct(name, factory, given, input_shape)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        values = count_values(model)
        if values > max_elements:
            raise UserError(
                f"architecture {name!r} with arguments {kwargs} would hold {values:,} values "
                f"(more than {max_elements:,}); check its arguments"
            )
        torch.set_rng_state(rng)  # the real build draws the same initial weights
        model = _construct(name, factory, given, input_shape)
    elif count_values(model) > max_elements:
        raise UserError(
            f"architecture {name!r} with arguments {kwargs} holds {count_values(model):,} "
            f"values (more than {max_elements:,}); check its arguments"
        )
    setattr(model, SPEC_ATTR, {"name": name, "kwargs": kwargs})
    return model


def architecture_of(model: nn.Module) -> dict[str, Any] | None:
    """The ``{"name", "kwargs"}`` record :func:`build_model` left on a model, if any."""
    return getattr(model, SPEC_ATTR, None)


__all__ = [
    "MAX_ELEMENTS",
    "MODELS",
    "architecture_of",
    "build_architecture",
    "build_model",
    "check_json",
    "is_reference",
]
