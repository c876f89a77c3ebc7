"""What a defense did, as typed records: one dataclass per kind of defense, on a common base
that holds the guard's record (:meth:`~torchpurify.defenses.base.Defense.purify`). No torch
here: the report reads the records.

A defense builds its record and returns ``record.to_dict()`` as :attr:`Purified.log`: the JSON
a card and a results store hold, with the same keys, in the same order, as before there were
records (a record's ``LAYOUT``; a key the run did not produce is left :data:`ABSENT`). Readers (the
report, the CLI) turn a stored log back into its record with :func:`parse_log` and read it by
attribute. Parsing keeps what it does not know: a key no field names goes to ``extra``, and
``to_dict`` writes back exactly the keys it was given, in their order, so a log parsed from an
old cell and written again is the same JSON.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


class _Absent:
    """The value of a record's field that a run did not produce: left out of its JSON."""

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False


ABSENT: Any = _Absent()


def absent() -> Any:
    """A record field's default: not written unless set (None is written as null)."""
    return field(default=ABSENT)


class Record:
    """What the records share: a field per known JSON key (a field whose key is not its name
    says so in its metadata, ``key``: GN-FT's ``lambda``), ``extra`` for the keys of a stored
    record that no field names, and ``order``, the keys a parsed record had, in order.

    ``to_dict`` writes back exactly the keys a parsed record had, in their order (a key it did
    not have reads as None); a record built in code writes its fields that are not
    :data:`ABSENT`, in the order of ``LAYOUT`` (the keys of the log before records), then the
    others, then ``extra``."""

    HELD: ClassVar[tuple[str, ...]] = ("extra", "order")
    LAYOUT: ClassVar[tuple[str, ...]] = ()
    extra: dict[str, Any]
    order: list[str] | None

    @classmethod
    def keys(cls) -> dict[str, str]:
        """JSON key → field name, for every field a record of this kind may hold."""
        return {
            f.metadata.get("key", f.name): f.name
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.name not in cls.HELD
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = cls.keys()
        values = {name: None for name in names.values()}
        values.update({names[k]: cls.parse_value(k, v) for k, v in data.items() if k in names})
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**values, extra=extra, order=list(data))

    @classmethod
    def parse_value(cls, key: str, value: Any) -> Any:
        return value

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a JSON key, whether a field of this record or kept in ``extra`` (an
        ``auto`` log holds the chosen defense's keys beside its own)."""
        name = self.keys().get(key)
        value = getattr(self, name) if name is not None else self.extra.get(key)
        return default if value is None or value is ABSENT else value

    def __getitem__(self, key: str) -> Any:
        """The value of a JSON key the record holds, as its JSON's ``[key]`` reads it."""
        name = self.keys().get(key)
        value = getattr(self, name) if name is not None else self.extra.get(key, ABSENT)
        if value is ABSENT or (self.order is not None and key not in self.order):
            raise KeyError(key)
        return value.to_dict() if isinstance(value, Record) else value

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-able data, with the keys it was given (see the class docstring)."""
        names = self.keys()
        values = {key: getattr(self, name) for key, name in names.items()}
        values = {k: v.to_dict() if isinstance(v, Record) else v for k, v in values.items()}
        if self.order is None:
            keys = [*self.LAYOUT, *(key for key in names if key not in self.LAYOUT)]
            return {**{k: values[k] for k in keys if values[k] is not ABSENT}, **self.extra}
        return {
            key: self.extra[key] if key in self.extra else values[key]
            for key in self.order
            if key in self.extra or key in names
        }


@dataclass
class GuardRecord(Record):
    """What the guard did (methods.md §0): the input's accuracy on the guard's own samples, the
    floor, each attempt (``changed`` settings, ``holdout_acc`` or ``diverged``) and the action
    (``kept``, ``backed off: …``, ``rolled back to the input model``)."""

    holdout_acc_input: float | None = None
    floor: float | None = None
    samples: int | None = None
    selection_samples: int | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    action: str | None = absent()
    note: str | None = absent()
    extra: dict[str, Any] = field(default_factory=dict)
    order: list[str] | None = field(default=None, repr=False, compare=False)

    @property
    def rolled_back(self) -> bool:
        return str(self.action or "").startswith("rolled back")

    @property
    def kept(self) -> bool:
        return self.action in (None, ABSENT, "kept")

    def cost(self) -> tuple[float | None, bool]:
        """(holdout accuracy lost on the guard's samples, rolled back); None without attempts."""
        if not self.attempts:
            return None, False
        if self.rolled_back:
            return 0.0, True
        return self.holdout_acc_input - self.attempts[-1]["holdout_acc"], False


@dataclass
class DefenseLog(Record):
    """The base of every defense's log: the guard's record (added by ``Defense.purify``), and,
    when the guard rolled back, the log of the last attempt (``rolled_back``; None when that
    attempt diverged). ``extra`` and ``order`` as in :class:`Record`."""

    guard: GuardRecord | None = absent()
    rolled_back: dict[str, Any] | None = absent()
    extra: dict[str, Any] = field(default_factory=dict)
    order: list[str] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def parse_value(cls, key: str, value: Any) -> Any:
        return GuardRecord.from_dict(value) if key == "guard" and value is not None else value

    def search_points(self) -> list[list[float]]:
        """The [cut, holdout accuracy] points a pruning defense's search evaluated: its
        ``curve``, or every round's curve when it logs rounds (ℓ∞ pruning). A point without a
        cut (ANP and RNP log the unpruned model as threshold None) is left out."""
        points = self.get("curve") or [
            point for round_ in self.get("rounds", []) for point in round_.get("curve", [])
        ]
        return [point for point in points if point[0] is not None]


# ----------------------------------------------------------------------------- fine-tuning


@dataclass
class FineTuneLog(DefenseLog):
    """A defense that fine-tunes: its training history (one record an epoch). FT, FT-SAM."""

    history: list[dict[str, Any]] = absent()


@dataclass
class GradientNormLog(FineTuneLog):
    """GN-FT: the radius in weight units and λ = α·r."""

    LAYOUT = ("radius", "lambda", "history")
    radius: float = absent()
    lambda_: float = field(default=ABSENT, metadata={"key": "lambda"})


@dataclass
class FeatureShiftLog(FineTuneLog):
    """FST: the head it re-initialised, the old head's norm and the new head's cosine to it."""

    LAYOUT = ("head", "head_norm", "head_cosine_to_original", "history")
    head: str = absent()
    head_norm: float = absent()
    head_cosine_to_original: float = absent()


@dataclass
class AttentionDistillationLog(FineTuneLog):
    """NAD: the attention layers, their β, the attention loss an epoch, the teacher's history."""

    LAYOUT = ("layers", "betas", "attention_loss", "teacher_history", "history")
    layers: list[str] = absent()
    betas: list[float] = absent()
    attention_loss: list[float] = absent()
    teacher_history: list[dict[str, Any]] = absent()


@dataclass
class SalienceLog(FineTuneLog):
    """Salience-AR: the regularised layers (each by its owner and unit), the ratio an epoch and
    the neurons' salience."""

    LAYOUT = ("layers", "regularised", "unit", "ratios", "neuron_salience", "history")
    layers: list[str] = absent()
    regularised: dict[str, str] = absent()
    unit: dict[str, str] = absent()
    ratios: list[float] = absent()
    neuron_salience: dict[str, list[float]] = absent()


# ----------------------------------------------------------------------------- pruning


@dataclass
class PruningLog(DefenseLog):
    """A defense that prunes units within the holdout budget: the layer, what it pruned
    (``pruned``, ``num_pruned``; ``num_within_budget`` before the guard's ``cut_scale``), the
    holdout accuracy before and after, the floor it cut within (``threshold``) and the curve of
    its search ([cut, accuracy] points); and, when it fine-tunes after (methods.md §0), the
    history, the fine-tuned accuracy and whether the fine-tuned model was kept."""

    layer: str = absent()
    pruned: Any = absent()
    num_pruned: int = absent()
    num_within_budget: int = absent()
    cut_scale: float = absent()
    holdout_acc_before: float = absent()
    holdout_acc_pruned: float = absent()
    threshold: float | None = absent()
    curve: list[list[Any]] = absent()
    history: list[dict[str, Any]] = absent()
    holdout_acc_fine_tuned: float = absent()
    fine_tune_kept: bool = absent()
    fine_tune_diverged: str = absent()


FINE_TUNED = (
    "history", "holdout_acc_fine_tuned", "fine_tune_kept", "fine_tune_diverged",
)  # fmt: skip


@dataclass
class FinePruningLog(PruningLog):
    """Fine-Pruning: the channels of the layer, the search it ran and how many cuts it tried."""

    LAYOUT = (
        "layer", "channels", "pruned", "num_pruned", "num_within_budget", "cut_scale",
        "holdout_acc_before", "holdout_acc_pruned", "threshold", "search",
        "holdout_evaluations", "curve", *FINE_TUNED,
    )  # fmt: skip
    channels: int = absent()
    search: str = absent()
    holdout_evaluations: int = absent()


@dataclass
class MaskPruningLog(PruningLog):
    """ANP and RNP: the mask threshold chosen (None: nothing pruned), the floor, the neurons and
    their mask values; ANP's mask history, RNP's unlearning, recovering and the layers it left
    out or zeroed whole."""

    LAYOUT = (
        "threshold", "holdout_acc_before", "holdout_acc_pruned", "floor", "pruned",
        "num_pruned", "num_within_budget", "cut_scale", "neurons", "curve", "mask_values",
        "history", "unlearning", "recovering", "left_out", "zeroed_layers",
    )  # fmt: skip
    floor: float = absent()
    neurons: int = absent()
    mask_values: dict[str, list[float]] = absent()
    unlearning: list[dict[str, Any]] = absent()
    recovering: list[dict[str, Any]] = absent()
    left_out: list[str] = absent()
    zeroed_layers: list[str] = absent()


@dataclass
class ChannelLipschitzLog(PruningLog):
    """CLP: u, the channels over the threshold, the units scored and their UCLC scores."""

    LAYOUT = (
        "u", "cut_scale", "num_within_threshold", "units", "pruned", "num_pruned", "uclc",
    )  # fmt: skip
    u: float = absent()
    num_within_threshold: int = absent()
    units: list[dict[str, Any]] = absent()
    uclc: dict[str, list[float]] = absent()


@dataclass
class TwoStageLog(PruningLog):
    """TSBD: the scored layers, the unlearning, the neuron fraction n chosen on the curve, the
    neurons zeroed and their NWC, how many weights were zeroed, the fine-tuning's history."""

    LAYOUT = (
        "layers", "unlearning", "holdout_acc_before", "threshold", "curve", "fraction",
        "cut_scale", "neurons", "zeroed_neurons", "nwc_top", "zeroed_weights", "history",
    )  # fmt: skip
    layers: list[str] = absent()
    unlearning: list[dict[str, Any]] = absent()
    fraction: float = absent()
    neurons: int = absent()
    zeroed_neurons: list[list[Any]] = absent()
    nwc_top: list[list[Any]] = absent()
    zeroed_weights: int = absent()


@dataclass
class RoundsLog(PruningLog):
    """ℓ∞ pruning: the trigger found (or why it abstained), one pruning record per round, each
    with its own ``curve``, the unlearning share, and the space it worked in."""

    LAYOUT = (
        "trigger", "abstained", "rounds", "layer", "holdout_acc_before", "threshold", "pruned",
        "num_pruned", "num_within_budget", "cut_scale", "unlearn", *FINE_TUNED, "space",
    )  # fmt: skip
    trigger: dict[str, Any] = absent()
    abstained: str = absent()
    rounds: list[dict[str, Any]] = absent()
    unlearn: dict[str, int] = absent()
    space: str = absent()


# ----------------------------------------------------------------------------- unlearning


@dataclass
class UnlearningLog(DefenseLog):
    """A defense that unlearns a perturbation or a generated trigger: its rounds and history."""

    rounds: list[dict[str, Any]] = absent()
    history: list[dict[str, Any]] = absent()


@dataclass
class ImplicitUnlearningLog(UnlearningLog):
    """I-BAU: the inputs' norm, the radius, the perturbation's norms, whether any step
    diverged."""

    LAYOUT = ("input_norm", "radius", "perturbation_norms", "rounds", "diverging", "history")
    input_norm: float = absent()
    radius: float = absent()
    perturbation_norms: list[float] = absent()
    diverging: bool = absent()


@dataclass
class SharedUnlearningLog(UnlearningLog):
    """SAU: the tune inputs' per-value spread and the ℓ∞ radius made from it."""

    LAYOUT = ("value_spread", "radius", "history")
    value_spread: float = absent()
    radius: float = absent()


@dataclass
class GeneratorUnlearningLog(UnlearningLog):
    """BTI-DBF: the layer, the generator's scale and bound, the target search, the target."""

    LAYOUT = ("layer", "scale", "bound", "search", "target", "rounds")
    layer: str = absent()
    scale: float = absent()
    bound: float = absent()
    search: dict[str, Any] = absent()
    target: int | None = absent()


@dataclass
class AutoLog(DefenseLog):
    """``auto`` (:mod:`torchpurify.auto`): the chosen defense's log (its keys in ``extra``) and
    the ``auto`` record (the estimate before, the defenses tried, the one chosen, why it
    stopped)."""

    auto: dict[str, Any] = absent()

    @property
    def chosen(self) -> str | None:
        return (self.auto or {}).get("chosen")

    @property
    def tried(self) -> list[dict[str, Any]]:
        return (self.auto or {}).get("tried", [])


# The record of each registered defense's log, by name; a name not here parses as DefenseLog
# (its keys kept in ``extra``).
LOGS: dict[str, type[DefenseLog]] = {
    "ft": FineTuneLog,
    "ft-sam": FineTuneLog,
    "gnft": GradientNormLog,
    "fst": FeatureShiftLog,
    "nad": AttentionDistillationLog,
    "salience-ar": SalienceLog,
    "fine-pruning": FinePruningLog,
    "anp": MaskPruningLog,
    "rnp": MaskPruningLog,
    "clp": ChannelLipschitzLog,
    "tsbd": TwoStageLog,
    "linf-pruning": RoundsLog,
    "i-bau": ImplicitUnlearningLog,
    "sau": SharedUnlearningLog,
    "bti-dbf": GeneratorUnlearningLog,
    "auto": AutoLog,
}


def parse_log(data: dict[str, Any] | DefenseLog | None, defense: str | None = None) -> DefenseLog:
    """A stored log as its record: by the defense's name, or, without one, by what the log
    holds (an ``auto`` record, rounds, a curve). None or an empty log parses as an empty
    :class:`DefenseLog`; a record is returned as it is."""
    if isinstance(data, DefenseLog):
        return data
    data = data or {}
    kind = LOGS.get(defense or "")
    if kind is None:
        if "auto" in data:
            kind = AutoLog
        elif "rounds" in data and any("curve" in r for r in data["rounds"] or []):
            kind = RoundsLog
        elif "curve" in data or "num_pruned" in data:
            kind = PruningLog
        else:
            kind = DefenseLog
    return kind.from_dict(data)
