"""Experiment specs: a YAML file → a validated grid of models and defense cells, each with a key.

A spec names datasets, models, attacks, seeds and defenses. Every dataset × model × attack × seed
is one trained model; every trained model × defense is one *cell*. Everything is validated when
the file is loaded, before any work, and each mistake is one line that says where it is::

    configs/x.yaml: defenses[2].params: unknown parameter 'alpah' for gnft (did you mean alpha?)

Keys are SHA-256 digests of everything that determines a result, so a finished model or cell is
recognised in the results store and never computed twice: the model key covers the data (dataset,
train size, validation fraction, seed), the architecture, the attack and the training recipe; the
cell key covers the model key, the defense's name, everything of the defense that changes its
result (:meth:`~torchpurify.defenses.base.Defense.keyed_settings`: its hyper-parameters, the
guard's settings, and the run context's seed and batch size) and the defender's fraction. The
device and progress display are left out: they do not change what is computed. The keyed
settings are hashed as one flat mapping under the names they had when they were all fields of
the defense, so the keys of stored cells did not change when the run context and the guard's
settings moved apart from the hyper-parameters.

The YAML is read with the numbers of YAML 1.2 (``1e-3`` is a number, as in JSON) and with
aliases bounded: a file whose aliases would expand to more than :data:`MAX_VALUES` values (a
"billion laughs" bomb) is refused before anything walks it, and every message is cut to
:data:`MAX_MESSAGE` characters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from torchpurify import catalogue
from torchpurify.checks import kind_problem, normalise
from torchpurify.errors import UserError
from torchpurify.registry import MAX_SEED, suggestion

if TYPE_CHECKING:  # the modules that import torch are imported where they are used
    from torchpurify.defenses import Defense
    from torchpurify.estimate import EstimateConfig
    from torchpurify.experiment import AttackSpec, DataSpec
    from torchpurify.train import TrainConfig

NO_ATTACK = "none"
TOP_KEYS = (
    "datasets", "models", "attacks", "defenses", "seeds", "training", "defender_fraction",
    "diagnostics", "device", "cpus_per_task", "estimate",
)  # fmt: skip
REQUIRED = ("datasets", "defenses")
# A dataset may name its own models and attacks (audio models and triggers do not fit images).
DATASET_KEYS = (
    "name", "root", "train_size", "val_fraction", "training", "models", "attacks",
)  # fmt: skip
ATTACK_KEYS = ("name", "params", "poison_rate", "target", "target_mode", "clean_label")
DEFENSE_KEYS = ("name", "params", "label")
# The recipe a spec may set (TrainConfig's fields less those of catalogue.NOT_SETTINGS).
TRAINING_KEYS = tuple(catalogue.settings("training"))
# Defense parameters added after stores were written, at the value that reproduces the earlier
# behaviour: left out of a cell's key at that value, so the stored cells stay valid.
NEUTRAL = {"augment": False, "distill": 0.0, "cut_scale": 1.0}
MAX_BYTES = 1_000_000  # a spec is a page of YAML
MAX_VALUES = 100_000  # values after alias expansion; real specs have hundreds
MAX_MESSAGE = 400


class SpecError(UserError):
    """A mistake in a spec file, reported with its place: ``FILE: datasets[0].name: ...``."""

    def __init__(self, source: str, place: str, message: str) -> None:
        where = f"{source}: {place}: " if place else f"{source}: "
        super().__init__(capped(where + message))


def capped(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message`` cut to ``limit`` characters (a hostile file must not print megabytes)."""
    return message if len(message) <= limit else message[: limit - 1] + "…"


_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxother = 3, 60, 60
_short.maxlist = _short.maxdict = _short.maxtuple = 6


def shown(value: Any) -> str:
    """A short ``repr`` for messages: deep or long values are elided, never walked whole."""
    return _short.repr(value)


# ----------------------------------------------------------------------------- YAML


class SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 numbers, and aliases bounded (:func:`read_yaml`)."""

    def compose_document(self):
        node = super().compose_document()
        expanded_size(node, {}, set())
        return node


SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class TooLarge(Exception):
    """The document expands to more values than :data:`MAX_VALUES`."""


def expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Values ``node`` stands for once every alias is expanded, counting each shared node once
    per use but visiting it once (so a bomb is measured in microseconds, never expanded)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise TooLarge("an alias refers to the node that contains it")
    open_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    size = 1
    for child in children:
        size += expanded_size(child, sizes, open_nodes)
        if size > MAX_VALUES:
            raise TooLarge(f"its aliases expand to more than {MAX_VALUES:,} values")
    open_nodes.discard(id(node))
    sizes[id(node)] = size
    return size


def read_yaml(text: str, source: str) -> Any:
    """YAML text → Python values, with the spec loader; any problem is one line."""
    try:
        return yaml.load(text, Loader=SpecLoader)  # noqa: S506 - SpecLoader is a SafeLoader
    except TooLarge as error:
        raise UserError(f"{source}: refused: {error}") from None
    except RecursionError:
        raise UserError(f"{source}: refused: nested too deeply") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise UserError(capped(f"{source}: not valid YAML: {problem}{where}")) from None


def read_value(text: str) -> Any:
    """One ``--set`` value as YAML (``1e-3`` → 0.001, ``true`` → True, ``a,b`` → 'a,b');
    text that is not valid YAML stays text."""
    try:
        return read_yaml(text, "value")
    except UserError:
        return text


# ----------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class DatasetEntry:
    """A dataset of the grid and its own overrides of the training recipe, models and attacks
    (empty: the spec's top-level ones)."""

    name: str
    root: str | None = None
    train_size: int | None = None
    val_fraction: float = 0.1
    training: dict[str, Any] = field(default_factory=dict)
    models: tuple[str, ...] = ()
    attacks: tuple[AttackSpec | None, ...] = ()

    def data_spec(self, seed: int) -> DataSpec:
        from torchpurify.experiment import DataSpec

        return DataSpec(self.name, self.root, self.train_size, self.val_fraction, seed)


@dataclass(frozen=True)
class DefenseEntry:
    """A defense of the grid: registry name, hyper-parameters, and the label reports show."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def build(self, seed: int, device: str = "auto", progress: bool = False) -> Defense:
        """The defense for one cell: the cell's seed and device unless the params set them."""
        from torchpurify.auto import build_defense  # a registry defense, or the auto chooser

        params = {"seed": seed, "device": device, **self.params}
        return build_defense(self.name, progress=progress, **params)


@dataclass(frozen=True)
class ExperimentSpec:
    """A validated spec (see :func:`load_spec`). ``attacks`` holds None for a clean model."""

    datasets: tuple[DatasetEntry, ...]
    models: tuple[str, ...]
    attacks: tuple[AttackSpec | None, ...]
    defenses: tuple[DefenseEntry, ...]
    seeds: tuple[int, ...] = (0,)
    training: dict[str, Any] = field(default_factory=dict)
    defender_fraction: float = 0.05
    diagnostics: bool = False
    device: str = "auto"
    cpus_per_task: int = 1
    # The defender-side backdoor estimate's settings (EstimateConfig fields); None: not computed.
    estimate: dict[str, Any] | None = field(default_factory=dict)
    source: str = "spec"

    def estimate_config(self) -> EstimateConfig | None:
        from torchpurify.estimate import EstimateConfig

        return None if self.estimate is None else EstimateConfig(**self.estimate)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data (the file's meaning, not its spelling); ``source`` left out."""
        data = dataclasses.asdict(self)
        data.pop("source")
        return data

    def hash(self) -> str:
        return digest(self.to_dict())


def attack_record(attack: AttackSpec | None) -> dict[str, Any] | None:
    return None if attack is None else dataclasses.asdict(attack)


def attack_name(attack: AttackSpec | None) -> str:
    return NO_ATTACK if attack is None else attack.name


def digest(value: Any) -> str:
    """SHA-256 of canonical JSON: the same content gives the same key, whatever its order."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class ModelJob:
    """One model to train: a dataset, an architecture, an attack (or none) and a seed."""

    key: str
    dataset: DatasetEntry
    model: str
    attack: AttackSpec | None
    seed: int
    recipe: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.dataset.name}/{self.model}/{attack_name(self.attack)}/seed {self.seed}"

    def data_spec(self) -> DataSpec:
        return self.dataset.data_spec(self.seed)

    def train_config(self, device: str = "auto", progress: bool = False) -> TrainConfig:
        from torchpurify.train import TrainConfig

        return TrainConfig(**self.recipe, seed=self.seed, device=device, progress=progress)


@dataclass(frozen=True)
class CellJob:
    """One defense run on one trained model."""

    key: str
    model: ModelJob
    defense: DefenseEntry
    params: dict[str, Any]  # the defense's resolved settings that enter the key (keyed_settings)
    defender_fraction: float

    @property
    def label(self) -> str:
        return self.defense.label or self.defense.name

    @property
    def name(self) -> str:
        return f"{self.model.name} {self.label}"


def model_jobs(spec: ExperimentSpec) -> list[ModelJob]:
    """Datasets × models × attacks × seeds, in that nesting order (a dataset's own models and
    attacks replace the top-level ones)."""
    from torchpurify.train import TrainConfig

    jobs = []
    for dataset in spec.datasets:
        recipe = {**TrainConfig().to_dict(), **spec.training, **dataset.training}
        recipe = {key: recipe[key] for key in TRAINING_KEYS}
        for model in dataset.models or spec.models:
            for attack in dataset.attacks or spec.attacks:
                for seed in spec.seeds:
                    content = {
                        "data": dataset.data_spec(seed).to_dict(),
                        "model": model,
                        "attack": attack_record(attack),
                        "training": recipe,
                    }
                    jobs.append(ModelJob(digest(content), dataset, model, attack, seed, recipe))
    return jobs


def cell_jobs(spec: ExperimentSpec, models: list[ModelJob] | None = None) -> list[CellJob]:
    """Every trained model × every defense, grouped by model."""
    from torchpurify.data.splits import GROUP_RULE, GUARD_RULE

    cells = []
    settings = spec.estimate_config()  # defaults filled in: spelling one out changes no key
    estimate = None if settings is None else settings.keyed()
    for job in model_jobs(spec) if models is None else models:
        for defense in spec.defenses:
            params = defense.build(job.seed, spec.device).keyed_settings()
            content = {
                "model": job.key,
                "defense": defense.name,
                "params": {
                    k: v for k, v in params.items() if not (k in NEUTRAL and v == NEUTRAL[k])
                },
                "defender_fraction": spec.defender_fraction,
                "estimate": estimate,
            }
            content["defender_split"] = GUARD_RULE
            by = split_groups(job.dataset.name)
            if by:  # the rule changed for grouped data; cells of earlier rules stay apart
                content["defender_split"] = f"by {by}: {GROUP_RULE}; {GUARD_RULE}"
            cells.append(CellJob(digest(content), job, defense, params, spec.defender_fraction))
    return cells


def split_groups(dataset: str) -> str:
    """What the dataset's defender split keeps together ('' for none; data.split_groups)."""
    from torchpurify.data import split_groups as groups

    return groups(dataset)


# ----------------------------------------------------------------------------- loading


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and validate a YAML spec; any mistake is a one-line :class:`SpecError`."""
    return parse_spec(read_spec_file(path), source=str(Path(path)))


def check_spec_file(path: str | Path) -> None:
    """The first pass of :func:`load_spec` alone, from the catalogue (no torch imported): a
    mistake of shape, name or kind is the same one-line :class:`SpecError`."""
    Reader(str(Path(path)), light=True).spec(read_spec_file(path))


def read_spec_file(path: str | Path) -> Any:
    """A spec file's YAML, read within the bounds of :func:`read_yaml` (a file of at most
    :data:`MAX_BYTES`, UTF-8)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserError(f"spec file {path} {what}; give a YAML file")
    if path.stat().st_size > MAX_BYTES:
        raise UserError(f"{path}: refused: over {MAX_BYTES:,} bytes; a spec is a page of YAML")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file; a spec is YAML") from None
    return read_yaml(text, str(path))


def parse_spec(data: Any, source: str = "spec") -> ExperimentSpec:
    """Validate spec data already read from YAML (a mapping); ``source`` names it in errors.

    Two passes of one reader: the first checks the shape, the names, every value's kind and the
    ranges this module knows, from the catalogue alone, so most mistakes are refused before
    torch is imported (a one-line answer in a blink); the second imports the live classes, checks
    the ranges they own (a defense's, the training recipe's, the estimate's, the poisoning) and
    builds the spec."""
    Reader(source, light=True).spec(data)
    spec = Reader(source).spec(data)
    assert spec is not None
    return spec


class Reader:
    """Validates the parts of a spec, naming the place of each mistake. ``light``: check only
    what needs no module that imports torch (:func:`parse_spec`'s first pass)."""

    def __init__(self, source: str, light: bool = False) -> None:
        self.source = source
        self.light = light
        if not light:  # the live registries, extensions registered from Python included
            for kind in catalogue.KINDS:
                catalogue.registry(kind)

    def spec(self, data: Any) -> ExperimentSpec | None:
        """The whole spec; None in the light pass, which only refuses."""
        top = self.mapping(data, "", TOP_KEYS)
        for key in REQUIRED:
            if key not in top:
                raise self.fail("", f"missing {key!r} (a spec needs {', '.join(REQUIRED)})")
        training = self.training(top.get("training", {}), "training")
        datasets = self.entries(top["datasets"], "datasets", self.dataset)
        for key in ("models", "attacks"):
            for i, dataset in enumerate(datasets):
                if key not in top and not getattr(dataset, key):
                    raise self.fail(
                        f"datasets[{i}]", f"no {key}: give {key!r} at the top or in the entry"
                    )
        models = self.entries(top["models"], "models", self.model) if "models" in top else ()
        attacks = self.entries(top["attacks"], "attacks", self.attack) if "attacks" in top else ()
        spec = ExperimentSpec(
            datasets=datasets,
            models=models,
            attacks=attacks,
            defenses=self.entries(top["defenses"], "defenses", self.defense),
            seeds=self.seeds(top.get("seeds", [0])),
            training=training,
            defender_fraction=self.fraction(
                top.get("defender_fraction", 0.05), "defender_fraction"
            ),
            diagnostics=self.kind(top.get("diagnostics", False), bool, "diagnostics"),
            device=self.device(top.get("device", "auto")),
            cpus_per_task=self.positive(top.get("cpus_per_task", 1), "cpus_per_task"),
            estimate=self.estimate(top.get("estimate", {})),
            source=self.source,
        )
        if self.light:  # its attacks are placeholders: repeats are the second pass's to find
            return None
        self.no_repeats(spec)
        return spec

    def fail(self, place: str, message: str) -> SpecError:
        return SpecError(self.source, place, message)

    def kind(self, value: Any, kind: type, place: str) -> Any:
        """``value`` if it is a ``kind`` (an int passes as a float, a bool never as a number)."""
        problem = kind_problem(value, kind)  # the one checker (torchpurify.checks)
        if problem is not None:
            raise self.fail(place, problem)
        return normalise(value, kind)

    def mapping(self, value: Any, place: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            what = "must be a mapping" if place else "a spec must be a mapping of its keys"
            raise self.fail(place, f"{what}, got {shown(value)}")
        for key in value:
            if key not in allowed:
                raise self.fail(
                    place, f"unknown key {shown(key)}" + suggestion(key, allowed, "allowed")
                )
        return value

    def registered(self, name: Any, kind: str, place: str) -> str:
        """A name of a registry (``kind``: catalogue.KINDS)."""
        name = self.kind(name, str, place)
        known = catalogue.names(kind)
        if name not in known:
            what = catalogue.singular(kind)
            raise self.fail(place, f"unknown {what} {name!r}" + suggestion(name, known))
        return name

    def entries(self, value: Any, place: str, read_one) -> tuple:
        if not isinstance(value, list) or not value:
            raise self.fail(place, f"must be a non-empty list, got {shown(value)}")
        return tuple(read_one(item, f"{place}[{i}]") for i, item in enumerate(value))

    def named(self, value: Any, place: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        """An entry given as a bare name or as a mapping with ``name``."""
        if isinstance(value, str):
            return {"name": value}
        entry = self.mapping(value, place, allowed)
        if "name" not in entry:
            raise self.fail(place, "missing 'name'")
        return entry

    def dataset(self, value: Any, place: str) -> DatasetEntry:
        entry = self.named(value, place, DATASET_KEYS)
        train_size = entry.get("train_size")
        if train_size is not None:
            train_size = self.kind(train_size, int, f"{place}.train_size")
            if train_size < 2:
                raise self.fail(f"{place}.train_size", f"must be at least 2, got {train_size}")
        val_fraction = self.kind(entry.get("val_fraction", 0.1), float, f"{place}.val_fraction")
        if not 0 <= val_fraction < 1:
            raise self.fail(f"{place}.val_fraction", f"must be in [0, 1), got {val_fraction}")
        root = entry.get("root")
        return DatasetEntry(
            name=self.registered(entry["name"], "datasets", f"{place}.name"),
            root=None if root is None else str(self.kind(root, str, f"{place}.root")),
            train_size=train_size,
            val_fraction=val_fraction,
            training=self.training(entry.get("training", {}), f"{place}.training"),
            models=self.entries(entry["models"], f"{place}.models", self.model)
            if "models" in entry
            else (),
            attacks=self.entries(entry["attacks"], f"{place}.attacks", self.attack)
            if "attacks" in entry
            else (),
        )

    def model(self, value: Any, place: str) -> str:
        name = self.kind(value, str, place)
        if ":" in name:
            if not re.fullmatch(r"[\w.]+:\w+", name):
                raise self.fail(place, f"{name!r} must look like 'package.module:function'")
            return name
        return self.registered(name, "models", place)

    def attack(self, value: Any, place: str) -> AttackSpec | None:
        entry = self.named(value, place, ATTACK_KEYS)
        name = self.kind(entry["name"], str, f"{place}.name")
        if name == NO_ATTACK:
            extra = sorted(set(entry) - {"name"})
            if extra:
                raise self.fail(place, f"attack 'none' (a clean model) takes no {extra[0]!r}")
            return None
        known = catalogue.names("attacks")
        if name not in known:
            choices = [NO_ATTACK, *known]
            raise self.fail(f"{place}.name", f"unknown attack {name!r}" + suggestion(name, choices))
        given = {
            key: self.kind(entry[key], kind, f"{place}.{key}")
            for key, kind in (("target_mode", str), ("poison_rate", float), ("target", int))
            if key in entry
        }
        clean_label = entry.get("clean_label")
        if clean_label is not None:
            clean_label = self.kind(clean_label, bool, f"{place}.clean_label")
        params = self.attack_params(name, entry.get("params", {}), f"{place}.params")
        if self.light:  # the poisoning's ranges are checked in the second pass
            return None
        from torchpurify.attacks.poison import poisoning_problem
        from torchpurify.experiment import AttackSpec

        defaults = AttackSpec(name)
        mode = given.get("target_mode", defaults.target_mode)
        rate = given.get("poison_rate", defaults.poison_rate)
        target = given.get("target", defaults.target)
        problem = poisoning_problem(rate, mode, target)
        if problem is not None:
            raise self.fail(f"{place}.{problem[0]}", problem[1])
        return AttackSpec(
            name=name,
            params=params,
            poison_rate=rate,
            target=target,
            target_mode=mode,
            clean_label=clean_label,
        )

    def attack_params(self, attack: str, value: Any, place: str) -> dict[str, Any]:
        """All of the trigger's parameters (defaults filled in, so leaving one out or giving its
        default is the same model). Ranges that depend on the input shape are checked by
        :func:`torchpurify.runner.check_grid` once the data is loaded."""
        kinds = catalogue.settings("attacks", attack)
        given = self.params(value, place, kinds, f"parameter {{!r}} for {attack}")
        return given if self.light else {**catalogue.defaults("attacks", attack), **given}

    def params(self, value: Any, place: str, kinds: dict[str, str | None], unknown: str) -> dict:
        """Settings with known names (``unknown`` formats the complaint about another name),
        each of its kind (catalogue.settings: its default's kind; None: not checked); ints given
        for floats become floats."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(place, f"must be a mapping of settings, got {shown(value)}")
        checked = {}
        for key, given in value.items():
            if key not in kinds:
                hint = suggestion(key, list(kinds), "allowed")
                raise self.fail(place, "unknown " + unknown.format(key) + hint)
            kind = kinds[key]
            if kind is None:
                checked[key] = given
            else:
                checked[key] = self.kind(given, catalogue.KIND_TYPES[kind], f"{place}.{key}")
        return checked

    def defense(self, value: Any, place: str) -> DefenseEntry:
        entry = self.named(value, place, DEFENSE_KEYS)
        name = entry["name"]
        if not (isinstance(name, str) and name in catalogue.CHOOSERS):  # auto: a chooser
            name = self.registered(name, "defenses", f"{place}.name")
        kinds = catalogue.settings("defenses", name)
        unknown = f"parameter {{!r}} for {name}"
        params = self.params(entry.get("params", {}), f"{place}.params", kinds, unknown)
        if not self.light:  # the defense checks its own ranges when it is built
            from torchpurify.auto import build_defense

            try:
                build_defense(name, **params)
            except UserError as error:
                raise self.fail(f"{place}.params", str(error)) from None
        label = self.kind(entry.get("label", name), str, f"{place}.label").strip()
        if not label:
            raise self.fail(f"{place}.label", "must not be empty")
        return DefenseEntry(name, params, label)

    def training(self, value: Any, place: str) -> dict[str, Any]:
        kinds = catalogue.settings("training")
        recipe = self.params(value, place, kinds, "training setting {!r}")
        if not self.light:
            from torchpurify.train import TrainConfig

            try:
                TrainConfig(**recipe, progress=False)
            except UserError as error:
                raise self.fail(place, str(error)) from None
        return recipe

    def seeds(self, value: Any) -> tuple[int, ...]:
        seeds = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(seeds, list) or not seeds:
            raise self.fail(
                "seeds", f"must be an integer or a non-empty list of them, got {shown(value)}"
            )
        for i, seed in enumerate(seeds):
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
                raise self.fail(
                    f"seeds[{i}]", f"must be an integer in 0..{MAX_SEED}, got {shown(seed)}"
                )
        return tuple(seeds)

    def fraction(self, value: Any, place: str) -> float:
        value = self.kind(value, float, place)
        if not 0 < value < 1:
            raise self.fail(place, f"must be in (0, 1), got {value}")
        return value

    def positive(self, value: Any, place: str) -> int:
        value = self.kind(value, int, place)
        if value < 1:
            raise self.fail(place, f"must be at least 1, got {value}")
        return value

    def estimate(self, value: Any) -> dict[str, Any] | None:
        """``false`` (no estimate) or a mapping of the estimate's settings (methods.md §12.2)."""
        if value is False:
            return None
        kinds = catalogue.settings("estimate")
        given = self.params(value, "estimate", kinds, "estimate setting {!r}")
        if not self.light:
            from torchpurify.estimate import EstimateConfig

            try:
                EstimateConfig(**given)
            except UserError as error:
                raise self.fail("estimate", str(error)) from None
        return given

    def device(self, value: Any) -> str:
        value = self.kind(value, str, "device")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise self.fail("device", f"must be auto, cpu or cuda[:N], got {value!r}")
        return value

    def no_repeats(self, spec: ExperimentSpec) -> None:
        """A repeated entry would name the same models or cells twice; a repeated label would
        make two defenses one line of a report."""
        lists = (
            ("datasets", "entry", [(d.name, d.train_size, d.val_fraction) for d in spec.datasets]),
            ("models", "entry", list(spec.models)),
            ("attacks", "entry", [digest(attack_record(a)) for a in spec.attacks]),
            ("seeds", "entry", list(spec.seeds)),
            ("defenses", "entry", [digest([d.name, d.params]) for d in spec.defenses]),
            ("defenses", "label", [d.label for d in spec.defenses]),
        )
        for place, what, items in lists:
            for i, item in enumerate(items):
                if item in items[:i]:
                    first = f"{place}[{items.index(item)}]"
                    raise self.fail(f"{place}[{i}]", f"repeats the {what} of {first}; drop one")
