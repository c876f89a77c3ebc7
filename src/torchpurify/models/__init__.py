"""Architectures by name, and the one way to build them.

``build_model("small-cnn", (1, 28, 28), 10)`` builds a registered model;
``build_model("mypkg.nets:make_net", ...)`` builds a user's own architecture from a
``module:function`` reference. The function receives ``input_shape`` and ``num_classes`` when its
signature asks for them, plus any keyword arguments given.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from torch import nn

from torchpurify.errors import UserError
from torchpurify.models import audio, image  # noqa: F401  (register the audio and image models)
from torchpurify.models.registry import MODELS

SPEC_ATTR = "torchpurify_architecture"


def _import_factory(reference: str):
    module_name, _, function_name = reference.partition(":")
    if not module_name or not function_name:
        raise UserError(f"architecture {reference!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(
            f"cannot import {module_name!r} for architecture {reference!r} ({error}); "
            "make sure the module is on PYTHONPATH"
        ) from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise UserError(f"{module_name!r} has no callable {function_name!r}")
    return factory


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any
) -> nn.Module:
    """Build an architecture by registry name or ``module:function`` and remember how."""
    factory = _import_factory(name) if ":" in name else MODELS.get(name)
    params = inspect.signature(factory).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = dict(kwargs)
    for key, value in (("input_shape", tuple(input_shape)), ("num_classes", num_classes)):
        if key in params or accepts_any:
            given[key] = value
    try:
        model = factory(**given)
    except (TypeError, ValueError) as error:
        raise UserError(
            f"cannot build model {name!r} for input {tuple(input_shape)}: {error}"
        ) from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{name!r} returned {type(model).__name__}, not a torch.nn.Module")
    setattr(model, SPEC_ATTR, {"name": name, "kwargs": kwargs})
    return model


def architecture_of(model: nn.Module) -> dict[str, Any] | None:
    """The ``{"name", "kwargs"}`` record :func:`build_model` left on a model, if any."""
    return getattr(model, SPEC_ATTR, None)


__all__ = ["MODELS", "build_model", "architecture_of"]
