"""The defense contract: ``purify(model, clean) -> Purified``.

A defense is configured by its hyper-parameters (a dataclass with defaults, validated when it is
built) and receives only the defender's clean data: ``tune`` for training and ``holdout`` for
every stopping or selection rule. It never sees the test split, and never mutates the model it
was given.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from torchpurify.data.base import Split
from torchpurify.errors import UserError, check
from torchpurify.registry import Registry
from torchpurify.train import Cost

DEFENSES: Registry[type[Defense]] = Registry("defense")


@dataclass
class Clean:
    """The defender's data (methods.md §0): clean ``tune`` and ``holdout`` splits.

    ``known_trigger`` is set only when a method is run with oracle knowledge of the trigger
    (``linf-pruning`` with ``trigger="known"``); reports say so.
    """

    tune: Split
    holdout: Split
    known_trigger: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        check(len(self.tune) > 0, "the defender's tune split is empty; raise --defender-fraction")
        check(
            len(self.holdout) > 0,
            "the defender's holdout split is empty; raise --defender-fraction",
        )


@dataclass
class Purified:
    """A defense's result: the new model, what it did (JSON-able) and what it cost."""

    model: nn.Module
    log: dict[str, Any] = field(default_factory=dict)
    cost: Cost = field(default_factory=Cost)


@dataclass
class Defense:
    """Base class. Subclasses are dataclasses of hyper-parameters with a ``run`` method."""

    name: ClassVar[str]
    summary: ClassVar[str]

    device: str = "auto"
    seed: int = 0
    batch_size: int = 128
    progress: bool = False

    def __post_init__(self) -> None:
        check(
            self.batch_size >= 2,
            f"{self.name}: batch_size must be at least 2, got {self.batch_size}",
        )
        self.validate()

    @property
    def uses_known_trigger(self) -> bool:
        """True only for oracle variants that are handed the attack's real trigger."""
        return False

    def validate(self) -> None:
        """Check the method's own hyper-parameters (one-line UserError naming the parameter)."""

    def require(self, param: str, ok: bool, allowed: str) -> None:
        if not ok:
            raise UserError(f"{self.name}: {param} must be {allowed}, got {getattr(self, param)!r}")

    def params(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "progress"
        }

    def purify(self, model: nn.Module, clean: Clean) -> Purified:
        """Return a purified copy of ``model``; ``model`` itself is left untouched."""
        start = time.perf_counter()
        torch.manual_seed(self.seed)
        result = self.run(copy.deepcopy(model), clean)
        result.cost.seconds = time.perf_counter() - start
        result.model.eval()
        return result

    def run(self, model: nn.Module, clean: Clean) -> Purified:
        raise NotImplementedError


def register_defense(cls: type[Defense]) -> type[Defense]:
    DEFENSES.register(cls.name, cls.summary)(cls)
    return cls


def build_defense(name: str, **params: Any) -> Defense:
    """A defense by registry name with hyper-parameters; unknown names are user errors."""
    cls = DEFENSES.get(name)
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in params:
        check(
            key in allowed,
            f"unknown parameter {key!r} for defense {name!r}; allowed: {', '.join(allowed)}",
        )
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for key, value in params.items():
        check_type(name, key, value, defaults[key])
    return cls(**params)


def check_type(defense: str, param: str, value: Any, default: Any) -> None:
    """A value from ``--set`` must have the kind of its default (ints pass where floats go)."""
    if default is None or default is dataclasses.MISSING:
        return
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(type(default))
    if kinds is None:
        return
    wrong_bool = isinstance(value, bool) and bool not in kinds
    if wrong_bool or not isinstance(value, kinds):
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        raise UserError(
            f"{defense}: {param} must be {kind[type(default)]}, got {value!r} (default {default!r})"
        )
