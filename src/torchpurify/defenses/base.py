"""The defense contract: ``purify(model, clean) -> Purified``.

A defense is configured by its hyper-parameters (a dataclass with defaults, checked when it is
built, however it is built), and holds apart from them how it is run (:class:`RunContext`:
device, seed, batch size, progress bar) and the guard's settings (:class:`GuardSettings`);
``params()`` is the hyper-parameters alone, ``keyed_settings()`` what a cell's key covers. It
receives only the defender's clean data: ``tune`` for training
and ``holdout`` for every stopping or selection rule. It never sees the test split, and never
mutates the model it was given.

:meth:`Defense.purify` does, once for every defense, what no defense should repeat: it copies
the model onto the defense's device, counts every pass (:class:`~torchpurify.train.count_passes`),
and guards the result (methods.md §0): if the result's accuracy on the guard's own samples falls
more than the defense's budget below the input's, or training diverges, it backs off
(:meth:`Defense.back_off`: the method's own gentler version — a smaller step, a smaller cut, a
smaller α or radius, methods.md §0) and finally rolls back to the input, and records what
happened in ``log["guard"]``. The guard's samples are
a share of the holdout that the defense never sees (:func:`~torchpurify.data.splits.split_guard`),
so no selection rule has read the data that checks it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from torchpurify.checks import check_fields, default, require
from torchpurify.data.base import Split
from torchpurify.data.splits import split_guard
from torchpurify.errors import Divergence, check
from torchpurify.logs import DefenseLog
from torchpurify.metrics import accuracy
from torchpurify.registry import Registry
from torchpurify.train import Cost, count_passes, resolve_device

DEFENSES: Registry[type[Defense]] = Registry("defense")

# The budget rule (methods.md §0): a drop of more than GUARD_Z standard errors of holdout
# accuracy is not holdout noise. About 4 points at 540 holdout images and 87 % accuracy.
GUARD_Z = 3.0


def holdout_budget(acc: float, n: int, z: float = GUARD_Z) -> float:
    """``z`` standard errors of an accuracy measured on ``n`` samples, ``sqrt(p(1 − p)/n)``,
    with p smoothed to ``(correct + 1)/(n + 2)`` so a perfect holdout still has some noise."""
    p = (acc * n + 1) / (n + 2)
    return z * math.sqrt(p * (1 - p) / n)


@dataclass
class Clean:
    """The defender's data (methods.md §0): clean ``tune`` and ``holdout`` splits.

    ``known_trigger`` is set only when a method is run with oracle knowledge of the trigger
    (``linf-pruning`` with ``trigger="known"``); reports say so.

    ``guard``: the samples only the guard reads. None (the usual case): :meth:`Defense.purify`
    takes them from the holdout (:func:`~torchpurify.data.splits.split_guard`) and the defense's
    ``run`` sees the rest as its holdout.
    """

    tune: Split
    holdout: Split
    known_trigger: Callable[[torch.Tensor], torch.Tensor] | None = None
    guard: Split | None = None

    def for_selection(self, seed: int) -> Clean:
        """The data a defense's ``run`` gets, with the guard's samples set apart in ``guard``."""
        if self.guard is not None:
            return self
        selection, guard = split_guard(len(self.holdout), seed)
        return dataclasses.replace(
            self, holdout=self.holdout.subset(selection), guard=self.holdout.subset(guard)
        )

    def __post_init__(self) -> None:
        check(len(self.tune) > 0, "the defender's tune split is empty; raise --defender-fraction")
        check(
            len(self.holdout) > 0,
            "the defender's holdout split is empty; raise --defender-fraction",
        )


@dataclass
class Purified:
    """A defense's result: the new model, what it did and what it cost. ``log`` is the JSON of
    the defense's typed record (:mod:`torchpurify.logs`: ``record.to_dict()``; readers get the
    record back with :func:`~torchpurify.logs.parse_log`), the guard's record under ``guard``.

    ``cost`` is filled in by :meth:`Defense.purify` (a defense's ``run`` need not count)."""

    model: nn.Module
    log: dict[str, Any] = field(default_factory=dict)
    cost: Cost = field(default_factory=Cost)


RUN_SETTING = "run setting"


@dataclass(frozen=True)
class RunContext:
    """How a defense is run, not what it computes: where (``device``), with which random draws
    (``seed``), in batches of what size (``batch_size``), and whether it shows a progress bar.
    Held by every defense beside its hyper-parameters (:attr:`Defense.context`). The seed and
    the batch size change the numbers a run gives, so a cell's key covers them
    (:data:`KEYED`); the device and the progress bar do not."""

    KEYED: ClassVar[tuple[str, ...]] = ("seed", "batch_size")

    device: str = default("auto", RUN_SETTING)
    seed: int = default(0, RUN_SETTING)
    batch_size: int = default(128, RUN_SETTING)
    progress: bool = default(False, RUN_SETTING)

    def to_dict(self) -> dict[str, Any]:
        """The context as a card records it (the progress bar left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "progress"}  # fmt: skip

    def keyed(self) -> dict[str, Any]:
        """The settings of the context that change results (:data:`KEYED`)."""
        return {name: getattr(self, name) for name in self.KEYED}


@dataclass(frozen=True)
class GuardSettings:
    """The guard's settings (methods.md §0), the same for every defense: how much holdout
    accuracy the result may lose against the input (``max_acc_drop``; None: GUARD_Z standard
    errors of holdout accuracy), and how often to back off before rolling back to the input
    model (``guard_retries``). Held by every defense (:attr:`Defense.guard`)."""

    max_acc_drop: float | None = default(None, "protocol: "
        "3 standard errors of holdout accuracy, a statistical rule not tuned on any cell, "
        "methods.md §0")  # fmt: skip
    guard_retries: int = default(1, "protocol: one back-off, "
        "methods.md §0; three back-offs on configs/dev-audio-candidates.yaml kept more "
        "backdoor for 2-4 points (§12.7)")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The settings every defense takes beside its hyper-parameters, by name, and where each lives:
# ``build_defense("gnft", seed=1, max_acc_drop=0.02)`` routes them to the context and the guard.
SHARED_SETTINGS: dict[str, type] = {
    **{f.name: RunContext for f in dataclasses.fields(RunContext)},
    **{f.name: GuardSettings for f in dataclasses.fields(GuardSettings)},
}
HELD = ("context", "guard")  # the fields of a defense that hold the shared settings


@dataclass
class Defense:
    """Base class. Subclasses are dataclasses of hyper-parameters with a ``run`` method; every
    defense also holds a :class:`RunContext` (``context``) and :class:`GuardSettings`
    (``guard``), keyword-only and apart from its hyper-parameters (:meth:`params`)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # Settings that make a run take seconds on a tiny model (the contract test uses them, with
    # epochs=1 where the defense trains); a defense with a costly step of its own adds to them.
    quick: ClassVar[dict[str, Any]] = {}

    context: RunContext = field(default_factory=RunContext, kw_only=True, repr=False)
    guard: GuardSettings = field(default_factory=GuardSettings, kw_only=True, repr=False)

    # The shared settings by their names, read-only (build_defense and spec entries set them).
    device = property(lambda self: self.context.device)
    seed = property(lambda self: self.context.seed)
    batch_size = property(lambda self: self.context.batch_size)
    progress = property(lambda self: self.context.progress)
    max_acc_drop = property(lambda self: self.guard.max_acc_drop)
    guard_retries = property(lambda self: self.guard.guard_retries)

    def __post_init__(self) -> None:
        check_fields(self, self.name)  # the context and guard are of their classes, too
        check_fields(self.context, self.name)
        check_fields(self.guard, self.name)
        self.require("batch_size", self.batch_size >= 2, "at least 2")
        self.require(
            "max_acc_drop",
            self.max_acc_drop is None or 0 <= self.max_acc_drop < 1,
            "in [0, 1), or null for the holdout-noise budget",
        )
        self.require("guard_retries", self.guard_retries >= 0, "≥ 0")
        self.validate()

    @property
    def uses_known_trigger(self) -> bool:
        """True only for oracle variants that are handed the attack's real trigger."""
        return False

    def validate(self) -> None:
        """Check the method's own hyper-parameters' ranges (types are checked already)."""

    def require(self, param: str, ok: bool, allowed: str) -> None:
        require(self.name, param, getattr(self, param), ok, allowed)

    def params(self) -> dict[str, Any]:
        """The method's hyper-parameters (the run context and the guard's settings apart)."""
        return {f.name: getattr(self, f.name) for f in hyper_fields(self)}

    def with_context(self, **changes: Any) -> Defense:
        """This defense with its run context changed (``seed=3``); hyper-parameters kept."""
        return dataclasses.replace(self, context=dataclasses.replace(self.context, **changes))

    def keyed_settings(self) -> dict[str, Any]:
        """Everything of this defense that changes its result, as one flat mapping: the
        hyper-parameters, the guard's settings and the run context's seed and batch size (not
        its device or progress bar). A cell's key hashes it (:func:`torchpurify.spec.cell_jobs`);
        its names are those the settings had when they were all fields of the defense, so the
        keys of stored cells stay what they were."""
        return {**self.context.keyed(), **self.guard.to_dict(), **self.params()}

    def budget(self, holdout_acc: float, holdout_size: int) -> float:
        """The holdout accuracy this defense may lose: ``max_acc_drop``, or the noise rule."""
        if self.max_acc_drop is not None:
            return self.max_acc_drop
        return holdout_budget(holdout_acc, holdout_size)

    def back_off(self) -> Defense | None:
        """A gentler version of this defense for the guard to try next, or None to roll back to
        the input model (the default). Each method says what gentler means, by what costs it
        accuracy (methods.md §0's table): the fine-tuning defenses halve their step and their own
        strength knob, FST its α (with twice the epochs), I-BAU its radius, the pruning defenses
        their cut (``cut_scale``). Its params must differ, so the guard's log shows the change."""
        return None

    def purify(self, model: nn.Module, clean: Clean) -> Purified:
        """Return a purified copy of ``model`` on the defense's device; ``model`` is untouched."""
        start = time.perf_counter()
        device = resolve_device(self.context.device)
        given = copy.deepcopy(model).to(device)
        counter = count_passes(given)
        # The defense seeds torch's generators; the caller's random state is given back after.
        cuda = [device.index or 0] if device.type == "cuda" else []
        clean = clean.for_selection(self.seed)
        checked = clean.guard
        assert checked is not None
        with counter as cost, torch.random.fork_rng(devices=cuda):
            before = accuracy(given, checked, batch_size=self.batch_size)
            floor = before - self.budget(before, len(checked))
            guard: dict[str, Any] = {
                "holdout_acc_input": before,  # on the guard's own samples
                "floor": floor,
                "samples": len(checked),
                "selection_samples": len(clean.holdout),
                "attempts": [],
            }
            present, outputs = len(checked.y.unique()), _outputs(given, checked)
            if present < outputs:  # accuracy on these samples says nothing of the other classes
                guard["note"] = (
                    f"the guard's samples hold {present} of the model's {outputs} classes: it "
                    "cannot vouch for the others"
                )
            defense: Defense | None = self
            last_log = None  # the log of the last attempt that missed the budget
            while defense is not None:
                torch.manual_seed(self.seed)
                attempt = {"changed": self._changed(defense), "holdout_acc": None}
                guard["attempts"].append(attempt)
                try:
                    result = defense.run(
                        copy.deepcopy(given), dataclasses.replace(clean, guard=None)
                    )
                except Divergence as error:
                    attempt["diverged"] = str(error)
                else:
                    result.model.eval()
                    if not all_finite(result.model):
                        attempt["diverged"] = "the result has non-finite weights"
                    else:
                        attempt["holdout_acc"] = accuracy(
                            result.model, checked, batch_size=self.batch_size
                        )
                        if attempt["holdout_acc"] >= floor:
                            break
                    last_log = result.log
                retry = len(guard["attempts"]) <= self.guard_retries
                defense = defense.back_off() if retry else None
            else:  # nothing within the budget: the input model comes back
                log = DefenseLog(rolled_back=last_log).to_dict()
                result = Purified(copy.deepcopy(given), log)
            if defense is None:
                guard["action"] = "rolled back to the input model"
            elif len(guard["attempts"]) > 1:
                guard["action"] = "backed off: " + _describe(attempt["changed"])
            else:
                guard["action"] = "kept"
        counter.strip(result.model)
        result.model.eval()
        result.log["guard"] = guard
        result.cost = cost
        result.cost.seconds = time.perf_counter() - start
        return result

    def _changed(self, other: Defense) -> dict[str, Any]:
        mine = self.params()
        return {k: v for k, v in other.params().items() if mine[k] != v}

    def run(self, model: nn.Module, clean: Clean) -> Purified:
        raise NotImplementedError


def _outputs(model: nn.Module, data: Split) -> int:
    """How many classes ``model`` scores (one sample through it, in evaluation mode)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            return int(model(data.x[:1].to(device)).shape[-1])
    finally:
        model.train(was_training)


def all_finite(model: nn.Module) -> bool:
    """No NaN or infinity among the model's weights and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def _describe(changed: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changed.items()
    )


def register_defense(cls: type[Defense]) -> type[Defense]:
    """Register ``cls`` by its name; its constructor takes the run context's and the guard's
    settings by name too (:func:`takes_shared_settings`)."""
    DEFENSES.register(cls.name, cls.summary)(takes_shared_settings(cls))
    return cls


def takes_shared_settings(cls: type[Defense]) -> type[Defense]:
    """``cls`` whose constructor takes the run context's and the guard's settings by name
    (``GradientNormFineTuning(seed=1, alpha=0.5)``, :func:`route_shared`): every registered
    defense, and a chooser such as ``auto``."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **params: Any) -> None:
        init(self, *args, **route_shared(params))

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def route_shared(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the run context's settings (device, seed, …) and the guard's
    (max_acc_drop, guard_retries), given by name, moved into ``context`` and ``guard``."""
    params = dict(params)
    shared = {key: params.pop(key) for key in list(params) if key in SHARED_SETTINGS}
    context = {k: v for k, v in shared.items() if SHARED_SETTINGS[k] is RunContext}
    guard = {k: v for k, v in shared.items() if SHARED_SETTINGS[k] is GuardSettings}
    if context:
        params["context"] = dataclasses.replace(params.get("context", RunContext()), **context)
    if guard:
        params["guard"] = dataclasses.replace(params.get("guard", GuardSettings()), **guard)
    return params


def build_defense(name: str, **params: Any) -> Defense:
    """A defense by registry name with hyper-parameters; unknown names are user errors (the
    values are checked by the defense itself, when it is built)."""
    return build_checked(DEFENSES.get(name), name, **params)


def hyper_fields(cls: type | Defense) -> list[dataclasses.Field]:
    """A defense's hyper-parameter fields: its dataclass fields less the context and guard."""
    return [f for f in dataclasses.fields(cls) if f.name not in HELD]


def setting_fields(cls: type | Defense) -> list[dataclasses.Field]:
    """Every setting a defense takes by name, in the order ``list defenses`` shows them: the run
    context's, the guard's, then the method's hyper-parameters."""
    if not any(f.name in HELD for f in dataclasses.fields(cls)):
        return list(dataclasses.fields(cls))  # not a defense (build_checked's other classes)
    shared = [*dataclasses.fields(RunContext), *dataclasses.fields(GuardSettings)]
    return [*shared, *hyper_fields(cls)]


def build_checked(cls: type, name: str, **params: Any) -> Any:
    """``cls(**params)`` after refusing, in one line, a parameter ``cls`` has no setting for; a
    defense's run-context and guard settings, given by name, go to its ``context`` and
    ``guard``."""
    allowed = [f.name for f in setting_fields(cls)]
    held = [f.name for f in dataclasses.fields(cls) if f.name in HELD]
    for key in params:
        check(
            key in allowed or key in held,
            f"unknown parameter {key!r} for defense {name!r}; allowed: {', '.join(allowed)}",
        )
    return cls(**route_shared(params)) if held else cls(**params)
