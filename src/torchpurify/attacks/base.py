"""The trigger contract shared by image and audio attacks.

A :class:`Trigger` is a deterministic callable ``x -> x'`` on one sample or a batch. Its
parameters live in a frozen dataclass that includes the input shape and a seed, so every random
pattern is regenerated from the seed and :meth:`Trigger.to_dict` stays a few lines of JSON that
rebuild the identical trigger at evaluation time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch

from torchpurify.checks import check_fields, kind_problem, shown
from torchpurify.errors import UserError, check
from torchpurify.registry import Registry

ATTACKS: Registry[Callable[..., Trigger]] = Registry("attack")


@dataclasses.dataclass(frozen=True)
class TriggerParams:
    """Fields every trigger records; subclasses add their own, all with defaults."""

    input_shape: tuple[int, ...]
    seed: int = 0


class Trigger:
    """Base class: subclasses set the class attributes below and implement :meth:`apply`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    params_class: ClassVar[type[TriggerParams]]
    sample_dims: ClassVar[tuple[str, ...]]  # names of one sample's axes, e.g. ("C", "H", "W")
    value_range: ClassVar[tuple[float, float]]
    clean_label: ClassVar[bool] = False
    # Noise samples drawn per poisoned one (WaNet's cross samples); they keep their labels.
    cross_ratio: float = 0.0

    def __init__(self, params: TriggerParams) -> None:
        self.params = params
        shape = params.input_shape
        check(
            isinstance(shape, tuple)
            and len(shape) == len(self.sample_dims)
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape),
            f"{self.name}: input_shape must be positive integers ({', '.join(self.sample_dims)}), "
            f"got {shape!r}",
        )
        self.validate()  # the attack's own checks first: their messages say more
        check_fields(params, self.name, skip=("input_shape",))  # then every field's kind

    @classmethod
    def build(cls, input_shape: tuple[int, ...], seed: int = 0, **params: Any) -> Trigger:
        """Factory stored in :data:`ATTACKS`; rejects parameters the attack does not have."""
        common = {f.name for f in dataclasses.fields(TriggerParams)}
        allowed = [f.name for f in dataclasses.fields(cls.params_class) if f.name not in common]
        for key in params:
            check(
                key in allowed,
                f"unknown parameter {key!r} for attack {cls.name!r}; allowed: {', '.join(allowed)}",
            )
        if isinstance(input_shape, (list, tuple)):
            input_shape = tuple(input_shape)  # a list when read back from JSON; torch.Size
        return cls(cls.params_class(input_shape=input_shape, seed=seed, **params))

    def validate(self) -> None:
        """Check the attack's own parameters with :meth:`require`."""

    def require(self, field: str, kind: type, ok: Callable[[Any], bool], allowed: str) -> None:
        """Raise a one-line UserError unless ``params.<field>`` is a ``kind`` passing ``ok``.

        ``kind=float`` also accepts integers; booleans never pass as numbers.
        """
        value = getattr(self.params, field)
        if kind_problem(value, kind) is not None or not ok(value):
            default = next(f.default for f in dataclasses.fields(self.params) if f.name == field)
            hint = "" if default is dataclasses.MISSING else f" (default {default!r})"
            raise UserError(f"{self.name}: {field} must be {allowed}, got {shown(value)}{hint}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Trigger a batch (N × input_shape) without modifying it; the caller clips."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.on_batch(x, self.apply)

    def on_batch(
        self, x: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Run ``transform`` on ``x`` as a batch, clip, and return a result shaped like ``x``."""
        batch = self.as_batch(x)
        out = transform(batch).clamp(*self.value_range)
        return out if batch is x else out[0]

    def as_batch(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` itself when it is a batch, else a batch of one; checks dtype and shape."""
        check(
            isinstance(x, torch.Tensor) and x.is_floating_point(),
            f"{self.name}: expected a float tensor, got "
            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}; convert the input "
            f"to float in [{self.value_range[0]:g}, {self.value_range[1]:g}] first",
        )
        shape = self.params.input_shape
        if tuple(x.shape) == shape:
            return x.unsqueeze(0)
        check(
            x.dim() == len(shape) + 1 and tuple(x.shape[1:]) == shape,
            f"{self.name}: trigger was built for inputs of shape {shape} (or batches of them), "
            f"got {tuple(x.shape)}; build the attack with the data's input shape",
        )
        return x

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable record; :func:`trigger_from_dict` rebuilds the same trigger."""
        params = dataclasses.asdict(self.params)
        params["input_shape"] = list(params["input_shape"])
        return {"attack": self.name, "params": params}


TriggerClass = TypeVar("TriggerClass", bound=type[Trigger])


def register_attack(cls: TriggerClass) -> TriggerClass:
    """Class decorator: put ``cls.build`` into :data:`ATTACKS` under ``cls.name``."""
    ATTACKS.register(cls.name, cls.summary)(cls.build)
    return cls


def build_attack(name: str, input_shape: tuple[int, ...], seed: int = 0, **params: Any) -> Trigger:
    """Build the trigger registered as ``name`` for inputs of ``input_shape``."""
    return ATTACKS.get(name)(input_shape, seed=seed, **params)


def trigger_from_dict(record: dict[str, Any]) -> Trigger:
    """Rebuild a trigger from :meth:`Trigger.to_dict` output (e.g. read back from model.json)."""
    params = record.get("params") if isinstance(record, dict) else None
    check(
        isinstance(params, dict) and "attack" in record and "input_shape" in params,
        "a trigger record must look like {'attack': name, 'params': {'input_shape': [...], ...}}; "
        "write it with Trigger.to_dict()",
    )
    return build_attack(record["attack"], **params)
