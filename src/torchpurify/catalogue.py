"""What the registries hold — every dataset, model, attack and defense by name, with its one-line
summary and the settings a spec may give it — readable without importing torch.

The registries fill in as their modules are imported, and those modules import torch: seconds,
where ``torchpurify list``, ``--help`` or the refusal of a bad spec should answer at once.
``catalogue.json`` beside this file is their copy. tests/test_cli_startup.py checks that it
equals the live registries (names, summaries, settings and their kinds), so it cannot drift;
after adding or changing an entry, rewrite it with::

    python -m torchpurify.catalogue

Once a registry's module is imported (a program that registered an entry of its own, or any
process that already loaded torch), the lookups here read the live registry instead.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import sys
from pathlib import Path
from typing import Any

PATH = Path(__file__).with_name("catalogue.json")
# kind → (the package whose import fills the registry, the registry's name in it)
REGISTRIES = {
    "datasets": ("torchpurify.data", "DATASETS"),
    "models": ("torchpurify.models", "MODELS"),
    "attacks": ("torchpurify.attacks", "ATTACKS"),
    "defenses": ("torchpurify.defenses", "DEFENSES"),
}
KINDS = tuple(REGISTRIES)
# The settings of a spec's ``training`` and ``estimate`` mappings: the module of each one's class.
GROUPS = {"training": "torchpurify.train", "estimate": "torchpurify.estimate"}
# Fields of those classes (and of triggers and defenses) that are not a spec's to set: seeds
# come from ``seeds``, the device from ``device``; distillation is a defense's setting.
NOT_SETTINGS = {
    "training": ("seed", "device", "progress", "distill"),
    "estimate": ("seed",),
    "attacks": ("input_shape", "seed"),
    "defenses": ("progress",),
}
# A setting's kind, by its default's type; a setting of another kind (or a None default) is
# not checked by kind.
# Choosers: names a spec's ``defenses`` and ``purify --defense`` take beside the registry's
# defenses, each a class of its own module (``auto``: torchpurify.auto, methods.md §12.2).
CHOOSERS = {"auto": ("torchpurify.auto", "Auto")}
KIND_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "dict": dict, "list": list}
HAS_SETTINGS = ("attacks", "defenses")


def kind_of(default: Any) -> str | None:
    """The kind a spec's value must have, named (``'float'``), from the setting's default."""
    for name, kind in KIND_TYPES.items():
        if type(default) is kind:
            return name
    return None


def singular(kind: str) -> str:
    """``'defenses'`` → ``'defense'``: the word messages use."""
    return kind.removesuffix("s")


# ----------------------------------------------------------------------------- lookups


@functools.cache
def static() -> dict[str, Any]:
    """The catalogue as stored in catalogue.json."""
    return json.loads(PATH.read_text(encoding="utf-8"))


def _loaded(module: str) -> bool:
    return module in sys.modules


def summaries(kind: str) -> dict[str, str]:
    """Name → one-line summary of every entry of a registry, sorted by name."""
    if _loaded(REGISTRIES[kind][0]):
        live_registry = registry(kind)
        return {name: live_registry.summary(name) for name in live_registry.names()}
    return {name: entry["summary"] for name, entry in static()[kind].items()}


def names(kind: str) -> list[str]:
    return list(summaries(kind))


def listed(kind: str) -> dict[str, str]:
    """What ``torchpurify list KIND`` shows: :func:`summaries`, and for defenses also the
    choosers that are not defenses of the registry (``auto``, :mod:`torchpurify.auto`: purify
    and a grid spec take it)."""
    entries = summaries(kind)
    if kind == "defenses":
        entries = dict(sorted({**entries, **choosers()}.items()))
    return entries


def choosers() -> dict[str, str]:
    """Name → one-line summary of every chooser (:data:`CHOOSERS`): a spec's ``defenses`` and
    ``purify --defense`` take them beside the registry's defenses."""
    return {name: entry["summary"] for name, entry in static()["choosers"].items()}


def settings(kind: str, name: str | None = None) -> dict[str, str | None]:
    """Setting → kind (:func:`kind_of`) of an attack's or defense's ``params`` (``name``), or
    of a spec's ``training`` or ``estimate`` mapping (``kind`` alone); the name must exist."""
    if kind == "defenses" and name in CHOOSERS:
        if _loaded(CHOOSERS[name][0]):
            return {key: kind_of(value) for key, value in defaults(kind, name).items()}
        return dict(static()["choosers"][name]["params"])
    module = REGISTRIES[kind][0] if name is not None else GROUPS[kind]
    if _loaded(module):
        return {key: kind_of(value) for key, value in defaults(kind, name).items()}
    return dict(static()[kind][name]["params"] if name is not None else static()[kind])


# ----------------------------------------------------------------------------- the live side


def registry(kind: str):
    """The live registry (imports its package, and with it torch)."""
    module, attribute = REGISTRIES[kind]
    return getattr(importlib.import_module(module), attribute)


def defaults(kind: str, name: str | None = None) -> dict[str, Any]:
    """The settings a spec may give, with their defaults, read from the live classes: a
    trigger's or defense's ``params`` (``name``), or the ``training`` / ``estimate`` mapping."""
    skip = NOT_SETTINGS[kind]
    if kind == "training":
        from torchpurify.train import TrainConfig

        recipe = TrainConfig()
        return {f.name: getattr(recipe, f.name) for f in dataclasses.fields(TrainConfig)
                if f.name not in skip}  # fmt: skip
    if kind == "estimate":
        from torchpurify.estimate import EstimateConfig

        return {f.name: f.default for f in dataclasses.fields(EstimateConfig)
                if f.name not in skip}  # fmt: skip
    if kind == "defenses" and name in CHOOSERS:
        module, attribute = CHOOSERS[name]
        factory = getattr(importlib.import_module(module), attribute)
    else:
        factory = registry(kind).get(name)
    if kind == "attacks":
        params_class = factory.__self__.params_class  # the registry holds Class.build
        return {
            f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
            for f in dataclasses.fields(params_class)
            if f.name not in skip
        }  # fmt: skip
    if kind == "defenses":  # a default made by a factory is MISSING: not checked by kind
        from torchpurify.defenses.base import setting_fields  # the context's, guard's, method's

        return {f.name: f.default for f in setting_fields(factory) if f.name not in skip}
    raise ValueError(f"{kind} have no settings")


def live() -> dict[str, Any]:
    """The catalogue read from the live registries and classes (imports torch)."""
    catalogue: dict[str, Any] = {}
    for kind in KINDS:
        live_registry = registry(kind)
        catalogue[kind] = {}
        for name in live_registry.names():
            entry: dict[str, Any] = {"summary": live_registry.summary(name)}
            if kind in HAS_SETTINGS:
                entry["params"] = {k: kind_of(v) for k, v in defaults(kind, name).items()}
            catalogue[kind][name] = entry
    for group in GROUPS:
        catalogue[group] = {key: kind_of(value) for key, value in defaults(group).items()}
    catalogue["choosers"] = {}
    for name, (module, attribute) in CHOOSERS.items():
        chooser = getattr(importlib.import_module(module), attribute)
        params = {k: kind_of(v) for k, v in defaults("defenses", name).items()}
        catalogue["choosers"][name] = {"summary": chooser.summary, "params": params}
    return catalogue


def write(path: Path = PATH) -> None:
    """Rewrite catalogue.json from the live registries."""
    text = json.dumps(live(), indent=1, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")
    static.cache_clear()


if __name__ == "__main__":
    write()
    print(f"wrote {PATH}", file=sys.stderr)
