"""The model card (``model.json``) as a typed, validated record.

A card comes from a model file, and model files are untrusted: :meth:`ModelCard.from_dict`
checks every field it reads (types, ranges, sizes) and turns any problem into one
:class:`UserError` line naming the field. The fields torchpurify reads are typed attributes;
everything else (training history, metrics, the defense's record, versions) is kept verbatim in
``extra`` and written back unchanged.

A card is also a read-only mapping of its JSON form (``card["attack"]``), so code that reads a
card as a dict keeps working.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from torchpurify.errors import UserError, check
from torchpurify.models import check_json

FORMAT = "torchpurify-model"
FORMAT_VERSION = 1
TARGET_MODES = ("all-to-one", "all-to-all")
MAX_INPUT_VALUES = 1 << 24  # values in one input sample (a 3×2048×2048 image, 17 min of 16 kHz)
MAX_CLASSES = 100_000
_DATA_KEYS = {"dataset": str, "train_size": (int, type(None)), "val_fraction": (int, float),
              "seed": int}  # fmt: skip


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Targeting:
    """How an attack maps labels: ``target``, ``mode`` and ``num_classes``, the keyword arguments
    of :func:`torchpurify.metrics.evaluate` and :func:`torchpurify.attacks.poison_split`."""

    target: int = 0
    mode: str = "all-to-one"
    num_classes: int = 2

    def as_kwargs(self) -> dict[str, Any]:
        return {"target": self.target, "mode": self.mode, "num_classes": self.num_classes}


def targeting(attack: Any, num_classes: int) -> Targeting:
    """The one place (target, mode, num_classes) is built: from an attack record (a card's
    ``attack`` dict), an :class:`~torchpurify.experiment.AttackSpec`, or None (a clean model)."""
    if attack is None:
        return Targeting(0, "all-to-one", num_classes)
    if isinstance(attack, Mapping):
        return Targeting(attack["target"], attack["target_mode"], num_classes)
    return Targeting(attack.target, attack.target_mode, num_classes)


@dataclass(frozen=True)
class Architecture:
    """A registered model name or a ``module:function`` reference, and its keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def is_code(self) -> bool:
        """True when building it means importing and calling a Python function."""
        return ":" in self.name

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, raw: Any, where: str = "architecture") -> Architecture:
        check(
            isinstance(raw, Mapping),
            f'{where} must be an object {{"name": ..., "kwargs": {{...}}}}, got {raw!r:.80}',
        )
        name, kwargs = raw.get("name"), raw.get("kwargs", {})
        check(
            isinstance(name, str) and 0 < len(name) <= 200,
            f"{where}.name must be a model name or module:function, got {name!r:.80}",
        )
        check(
            isinstance(kwargs, Mapping),
            f"{where}.kwargs must be an object of keyword arguments, got {type(kwargs).__name__}",
        )
        check_json(dict(kwargs), f"{where}.kwargs")
        return cls(name, dict(kwargs))


def _check_shape(raw: Any, where: str) -> tuple[int, ...]:
    check(
        isinstance(raw, (list, tuple))
        and 1 <= len(raw) <= 4
        and all(_is_int(d) and d >= 1 for d in raw),
        f"{where} must be a list of 1 to 4 positive integers, got {raw!r:.80}",
    )
    check(
        math.prod(raw) <= MAX_INPUT_VALUES,
        f"{where} {list(raw)} has more than {MAX_INPUT_VALUES:,} values per sample",
    )
    return tuple(raw)


def _check_attack(raw: Any, num_classes: int) -> dict[str, Any] | None:
    if raw is None:
        return None
    check(isinstance(raw, Mapping), f"attack must be an object or null, got {raw!r:.80}")
    check_json(dict(raw), "attack")
    trigger = raw.get("trigger")
    check(
        isinstance(trigger, Mapping)
        and isinstance(trigger.get("attack"), str)
        and isinstance(trigger.get("params"), Mapping),
        'attack.trigger must be {"attack": name, "params": {...}} as Trigger.to_dict writes',
    )
    target = raw.get("target")
    check(
        _is_int(target) and 0 <= target < num_classes,
        f"attack.target must be a label in 0..{num_classes - 1}, got {target!r:.40}",
    )
    check(
        raw.get("target_mode") in TARGET_MODES,
        f"attack.target_mode must be all-to-one or all-to-all, got {raw.get('target_mode')!r:.40}",
    )
    rate = raw.get("poison_rate")
    check(
        _is_number(rate) and 0 < rate <= 1,
        f"attack.poison_rate must be in (0, 1], got {rate!r:.40}",
    )
    check(
        isinstance(raw.get("clean_label"), bool),
        f"attack.clean_label must be true or false, got {raw.get('clean_label')!r:.40}",
    )
    check(
        isinstance(raw.get("poisoned_sha256"), str),
        "attack.poisoned_sha256 must be the hash string train wrote",
    )
    return dict(raw)


def _check_data(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    check(isinstance(raw, Mapping), f"data must be an object or null, got {raw!r:.80}")
    unknown = sorted(set(raw) - set(_DATA_KEYS))
    check(not unknown, f"data has unknown fields {unknown}; allowed: {', '.join(_DATA_KEYS)}")
    check("dataset" in raw, "data.dataset is missing")
    for key, kinds in _DATA_KEYS.items():
        if key in raw:
            value = raw[key]
            ok = isinstance(value, kinds) and not isinstance(value, bool)
            check(ok, f"data.{key} has the wrong type: {value!r:.40}")
    seed = raw.get("seed", 0)
    check(0 <= seed < 2**63, f"data.seed must be a non-negative integer, got {seed}")
    return dict(raw)


def _check_masks(raw: Any) -> dict[str, int]:
    if raw is None:
        return {}
    check(isinstance(raw, Mapping), f"masks must be an object {{layer: channels}}, got {raw!r:.80}")
    for layer, count in raw.items():
        check(
            isinstance(layer, str) and _is_int(count) and 1 <= count <= 1 << 20,
            f"masks.{layer} must be a channel count in 1..{1 << 20}, got {count!r:.40}",
        )
    return dict(raw)


def _check_normalize(raw: Any, channels: int) -> dict[str, list[float]] | None:
    if raw is None:
        return None
    check(isinstance(raw, Mapping), 'normalize must be {"mean": [...], "std": [...]}')
    mean, std = raw.get("mean"), raw.get("std")
    for key, values in (("mean", mean), ("std", std)):
        check(
            isinstance(values, list)
            and len(values) in (1, channels)
            and all(_is_number(v) for v in values),
            f"normalize.{key} must be "
            f"{'1 number' if channels == 1 else f'1 or {channels} numbers'}, got {values!r:.80}",
        )
    check(all(s > 0 for s in std), f"normalize.std must be positive, got {std}")
    return {"mean": list(mean), "std": list(std)}


@dataclass(frozen=True)
class ModelCard(Mapping):
    """What ``model.json`` says about a model, checked.

    ``data`` is the training-data spec written by ``torchpurify train`` (it lets ``purify``
    rebuild the defender's split); ``clean`` describes a user's own clean data (bring-your-own);
    ``normalize`` is the input normalisation wrapped around a user's model (``--normalize``).
    """

    architecture: Architecture
    input_shape: tuple[int, ...]
    classes: list[str]
    attack: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    clean: dict[str, Any] | None = None
    normalize: dict[str, list[float]] | None = None
    masks: dict[str, int] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def how(self) -> Targeting:
        """(target, mode, num_classes) of the recorded attack (label 0, all-to-one when clean)."""
        return targeting(self.attack, self.num_classes)

    def trigger(self):
        """The recorded attack's trigger, or None for a clean model."""
        from torchpurify.attacks import trigger_from_dict

        return trigger_from_dict(self.attack["trigger"]) if self.attack else None

    def replace(self, **changes: Any) -> ModelCard:
        """A copy with typed fields or ``extra`` keys changed."""
        typed = {f.name for f in fields(self)}
        extra = {**self.extra, **{k: v for k, v in changes.items() if k not in typed}}
        kept = {f.name: getattr(self, f.name) for f in fields(self)}
        kept.update({k: v for k, v in changes.items() if k in typed})
        kept["extra"] = extra
        return ModelCard(**kept)

    def to_dict(self) -> dict[str, Any]:
        record = {
            "format": FORMAT,
            "format_version": self.format_version,
            **self.extra,
            "architecture": self.architecture.to_dict(),
            "input_shape": list(self.input_shape),
            "classes": list(self.classes),
            "attack": self.attack,
            "masks": dict(self.masks),
        }
        for key in ("data", "clean", "normalize"):
            if getattr(self, key) is not None:
                record[key] = getattr(self, key)
        return record

    # the read-only mapping of the JSON form
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    @classmethod
    def from_dict(cls, raw: Any, source: str = "the model card") -> ModelCard:
        """Check a card read from JSON; every problem is one line naming ``source`` and field."""
        try:
            return cls._from_dict(raw)
        except UserError as error:
            raise UserError(f"{source}: {error}") from None

    @classmethod
    def _from_dict(cls, raw: Any) -> ModelCard:
        check(isinstance(raw, Mapping), "a model card must be a JSON object")
        check(raw.get("format") == FORMAT, f"format must be {FORMAT!r}: not a torchpurify card")
        version = raw.get("format_version", FORMAT_VERSION)
        check(_is_int(version) and version >= 1, f"format_version must be 1, got {version!r:.40}")
        check(
            version <= FORMAT_VERSION,
            f"format_version {version} was written by a newer torchpurify; upgrade torchpurify",
        )
        check("architecture" in raw, "architecture is missing")
        architecture = Architecture.from_dict(raw["architecture"])
        check("input_shape" in raw, "input_shape is missing")
        input_shape = _check_shape(raw["input_shape"], "input_shape")
        classes = raw.get("classes")
        check(
            isinstance(classes, list)
            and 1 <= len(classes) <= MAX_CLASSES
            and all(isinstance(c, str) for c in classes),
            f"classes must be a list of 1 to {MAX_CLASSES:,} class names, got {classes!r:.80}",
        )
        typed = {f.name for f in fields(cls)} | {"format"}
        extra = {k: v for k, v in raw.items() if k not in typed}
        return cls(
            architecture=architecture,
            input_shape=input_shape,
            classes=list(classes),
            attack=_check_attack(raw.get("attack"), len(classes)),
            data=_check_data(raw.get("data")),
            clean=dict(raw["clean"]) if isinstance(raw.get("clean"), Mapping) else None,
            normalize=_check_normalize(raw.get("normalize"), input_shape[0]),
            masks=_check_masks(raw.get("masks")),
            format_version=version,
            extra=extra,
        )


__all__ = ["Architecture", "ModelCard", "Targeting", "targeting", "FORMAT", "FORMAT_VERSION"]
