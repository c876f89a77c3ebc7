"""Purify a model you were given: the Python one-liner and the bring-your-own pipeline.

``torchpurify.purify(model, clean, defense="gnft", **params)`` runs a defense on any
``nn.Module`` with clean data given as tensors ``(x, y)``, a ``Dataset`` or a ``DataLoader``, and
returns the purified model and the defense's :class:`Record`.

:func:`purify_own` is what ``torchpurify purify --model FILE --arch NAME --clean PATH`` runs: load
the user's weights (never running code the user did not name), read the user's clean data, split
it into ``tune`` / ``holdout`` by seed, purify, measure on the user's test data when given, write
a model directory and optionally a plain state dict for the user's own class.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchpurify.attacks.poison import target_labels
from torchpurify.card import MAX_CLASSES, ModelCard, Targeting, targeting
from torchpurify.data.base import Split
from torchpurify.data.byo import OwnData, parse_classes, read_own
from torchpurify.data.splits import TUNE_FRACTION, defender_split
from torchpurify.defenses import Clean, Defense
from torchpurify.errors import UserError, check
from torchpurify.metrics import Metrics, accuracy, attack_rates, evaluate, predict
from torchpurify.models import MODELS, is_reference
from torchpurify.models.io import check_export, export_weights, load_model, save_model
from torchpurify.registry import MAX_SEED

MAX_IN_MEMORY = 1 << 31  # values of clean data gathered from a Dataset or DataLoader
# The chance check (check_above_chance): at most this many clean samples, drawn by seed, and
# how many standard errors above chance the input model's accuracy must lie.
CHANCE_SAMPLES = 2000
CHANCE_Z = 2.0


@dataclass
class Record:
    """What a defense did and cost: its hyper-parameters, its run context and guard settings
    (:class:`~torchpurify.defenses.base.RunContext`,
    :class:`~torchpurify.defenses.base.GuardSettings`), its log, seconds and passes, the
    defender data's sizes, and ``estimate`` — the defender-side backdoor estimate (suspected
    target, anomaly index, estimated ASR before and after) when one was computed, else None."""

    defense: str
    params: dict[str, Any]
    log: dict[str, Any]
    seconds: float
    forward_passes: int
    backward_passes: int
    tune_size: int
    holdout_size: int
    estimate: dict[str, Any] | None = None
    chosen: str | None = None  # defense "auto": the defense it kept (None: the input model)
    context: dict[str, Any] | None = None  # device, seed, batch size
    guard_settings: dict[str, Any] | None = None  # max_acc_drop, guard_retries

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def as_split(clean: Any) -> Split:
    """Clean data as a :class:`Split`: from ``(x, y)`` tensors, a ``Split``, a
    ``torch.utils.data.Dataset`` of ``(x, y)`` items or a ``DataLoader`` of ``(x, y)`` batches."""
    from torch.utils.data import DataLoader
    from torch.utils.data import Dataset as TorchDataset

    if isinstance(clean, Split):
        return clean
    if isinstance(clean, (tuple, list)) and len(clean) == 2:
        x, y = (torch.as_tensor(v) for v in clean)
    elif isinstance(clean, DataLoader):
        xs, ys, total = [], [], 0
        for batch in clean:
            check(
                isinstance(batch, (tuple, list)) and len(batch) >= 2,
                "the DataLoader must yield (inputs, labels) batches",
            )
            xs.append(torch.as_tensor(batch[0]))
            ys.append(torch.as_tensor(batch[1]))
            total += xs[-1].numel()
            check(total <= MAX_IN_MEMORY, "the clean data is too large to hold in memory")
        check(len(xs) > 0, "the DataLoader yielded no batches")
        x, y = torch.cat(xs), torch.cat(ys)
    elif isinstance(clean, TorchDataset):
        check(hasattr(clean, "__len__") and len(clean) > 0, "the clean Dataset is empty")
        items = [clean[i] for i in range(len(clean))]
        check(
            all(isinstance(item, (tuple, list)) and len(item) >= 2 for item in items),
            "the Dataset must return (input, label) items",
        )
        x = torch.stack([torch.as_tensor(item[0]) for item in items])
        y = torch.as_tensor([int(item[1]) for item in items])
    else:
        raise UserError(
            f"clean data must be (x, y) tensors, a Dataset or a DataLoader, "
            f"got {type(clean).__name__}"
        )
    check(x.is_floating_point(), f"clean inputs must be floating point, got {x.dtype}")
    check(
        y.dim() == 1 and len(y) == len(x) and not y.is_floating_point(),
        f"clean labels must be {len(x)} integers, got {tuple(y.shape)} {y.dtype}",
    )
    check(x.dim() >= 2, f"clean inputs must be N samples (N×...), got shape {tuple(x.shape)}")
    check(not x.is_sparse and not x.is_meta, "clean inputs must be a dense tensor with values")
    check(bool(torch.isfinite(x).all()), "the clean inputs contain NaN or infinity")
    return Split(x.float(), y.long())


def check_model(model: Any, example: torch.Tensor) -> int:
    """The number of classes ``model`` outputs for a batch of ``example`` inputs, or one line
    saying why torchpurify cannot purify it: not a module, no parameters (nothing a defense
    could change), weights on the meta device (no values), inputs it cannot run on, an output
    that is not an N×classes tensor of logits. The model is left as it was."""
    check(
        isinstance(model, nn.Module),
        f"model must be a torch.nn.Module, got {type(model).__name__}",
    )
    parameters = list(model.parameters())
    check(
        len(parameters) > 0,
        f"the model ({type(model).__name__}) has no parameters: there is nothing a defense can "
        "change",
    )
    check(
        not any(t.is_meta for t in (*parameters, *model.buffers())),
        "the model's weights are on the meta device (shapes without values); load its weights "
        "first (load_state_dict(..., assign=True) or to_empty(device=...))",
    )
    was_training = model.training
    try:
        with torch.no_grad():
            logits = model.eval()(example.to(parameters[0].device))
    except (RuntimeError, IndexError, TypeError) as error:
        first = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise UserError(
            f"the model cannot run on inputs of shape {tuple(example.shape[1:])} ({first}); "
            "check the architecture and the data"
        ) from None
    finally:
        model.train(was_training)
    got = (
        f"a tensor of shape {tuple(logits.shape)}"
        if isinstance(logits, torch.Tensor)
        else f"a {type(logits).__name__}"
    )
    check(
        isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[1] >= 1,
        f"the model must return logits of shape N×classes, got {got}; wrap it in a module "
        "whose forward returns the logits tensor",
    )
    return int(logits.shape[1])


def check_labels(labels: torch.Tensor, outputs: int, where: str) -> None:
    """Every label must be one of the model's ``outputs`` indices."""
    low, high = int(labels.min()), int(labels.max())
    check(
        low >= 0 and high < outputs,
        f"{where} has labels {low}..{high} but the model outputs {outputs} classes "
        f"(indices 0..{outputs - 1}); give labels in that range",
    )


def check_all_classes(labels: torch.Tensor, outputs: int, where: str, allowed: bool) -> None:
    """Clean data must hold every class the model outputs, unless ``allowed``: a defense tuned
    on some classes may give up the others, and a holdout of one class cannot show it."""
    missing = sorted(set(range(outputs)) - {int(v) for v in labels.unique()})
    if missing and not allowed:
        shown = ", ".join(map(str, missing[:8])) + (", …" if len(missing) > 8 else "")
        raise UserError(
            f"{where} holds {outputs - len(missing)} of the model's {outputs} classes (missing "
            f"{shown}): a defense tuned on part of the classes may ruin the others unseen; give "
            "clean data of every class, or pass --allow-missing-classes "
            "(allow_missing_classes=True) to go on"
        )


def check_above_chance(
    model: nn.Module, data: Split, outputs: int, where: str, seed: int = 0, how: str = ""
) -> float:
    """The input model's accuracy on (at most :data:`CHANCE_SAMPLES` of) its clean data, or a
    UserError when it is near or below chance — ``1/outputs`` plus :data:`CHANCE_Z` standard
    errors of an accuracy at chance on that many samples. A model that does its job scores far
    above; one that does not is almost always given its classes in the wrong order (``how``
    says how they were mapped), and a defense would then "purify" it into a broken model."""
    if len(data) > CHANCE_SAMPLES:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        data = data.subset(order[:CHANCE_SAMPLES])
    acc = accuracy(model, data)
    chance = 1 / outputs
    floor = chance + CHANCE_Z * (chance * (1 - chance) / len(data)) ** 0.5
    check(
        acc > floor,
        f"the input model classifies only {acc:.1%} of {where} correctly ({len(data)} "
        f"samples), near or below chance ({chance:.1%} for {outputs} classes): the class "
        f"order is likely wrong{how}; give the model's classes in output order with --classes "
        "NAME,NAME,... or a JSON map (Python: classes=[...]) — or check the inputs "
        "(--normalize, --sample-rate, --arch)",
    )
    return acc


def split_clean(data: Split, tune_fraction: float = TUNE_FRACTION, seed: int = 0) -> Clean:
    """The defender's ``tune`` and ``holdout`` (methods.md §0), drawn from ``data`` by ``seed``;
    when ``data.groups`` is set (a speech folder's speakers), no group is in both."""
    check(len(data) >= 2, f"the clean data has {len(data)} sample(s); give at least 2")
    groups = None if data.groups is None else data.groups.numpy()
    tune, holdout = defender_split(
        np.arange(len(data)), len(data), fraction=1.0, tune_fraction=tune_fraction, seed=seed,
        groups=groups,
    )  # fmt: skip
    return Clean(data.subset(tune), data.subset(holdout))


def backdoor_estimate(
    model: nn.Module, purified: nn.Module, clean: Clean, device: str = "auto",
    progress: bool = False, config: Any = None,
) -> dict[str, Any] | None:  # fmt: skip
    """The defender-side backdoor estimate before and after (:mod:`torchpurify.estimate`, on the
    clean holdout only), with a one-line ``summary``; None where that module is unavailable."""
    try:
        from torchpurify.estimate import compare, describe_change, estimate_after, estimate_before
    except ImportError:  # pragma: no cover - the module ships with torchpurify
        return None
    from torchpurify.train import resolve_device

    where = resolve_device(device)
    common = {"device": where, "progress": progress}
    before = estimate_before(model, clean.holdout, config, **common)
    after = estimate_after(purified, clean.holdout, before, config, **common)
    model.to("cpu")
    purified.to("cpu")
    return {**compare(before, after), "summary": describe_change(before, after)}


def run_defense(
    model: nn.Module, clean: Clean, defense: Defense, estimate: Any = False
) -> tuple[nn.Module, Record]:
    """Run ``defense`` on ``model`` (left unchanged); the purified model and its record.
    ``estimate``: False, True, or a :class:`torchpurify.estimate.EstimateConfig`; ``auto``
    (:mod:`torchpurify.auto`) runs the estimate itself, and its record is the one it read."""
    from torchpurify.auto import Auto, estimate_record, with_estimate

    auto = isinstance(defense, Auto)
    if auto:
        with_estimate(defense, None if isinstance(estimate, bool) else estimate)
    purified = defense.purify(model, clean)
    record = Record(
        defense=defense.name,
        params=defense.params(),
        log=purified.log,
        seconds=round(purified.cost.seconds, 2),
        forward_passes=purified.cost.forward,
        backward_passes=purified.cost.backward,
        tune_size=len(clean.tune),
        holdout_size=len(clean.holdout),
        context=defense.context.to_dict(),
        guard_settings=defense.guard.to_dict(),
    )
    if auto:
        record.estimate = estimate_record(purified.log)
        record.chosen = purified.log["auto"]["chosen"]
    elif estimate is not False and estimate is not None:
        config = None if estimate is True else estimate
        record.estimate = backdoor_estimate(
            model, purified.model, clean, defense.device, defense.progress, config
        )
    return purified.model.to("cpu"), record


def purify(
    model: nn.Module,
    clean: Any,
    defense: str = "gnft",
    *,
    tune_fraction: float = TUNE_FRACTION,
    seed: int = 0,
    device: str = "auto",
    progress: bool = False,
    estimate: Any = True,
    allow_missing_classes: bool = False,
    **params: Any,
) -> tuple[nn.Module, Record]:
    """Purify ``model`` with ``defense`` (see ``torchpurify list defenses``) and its
    hyper-parameters ``params``, using ``clean`` data only: ``(x, y)`` tensors, a ``Dataset`` or a
    ``DataLoader``. ``tune_fraction`` of it trains, the rest is the holdout: half of it drives
    every stopping and selection rule, the other half only the guard (methods.md §0); ``seed``
    draws that split and seeds the defense. ``model`` is not changed.

    Returns the purified ``nn.Module`` and its :class:`Record`: log, cost and the defender-side
    backdoor estimate before and after (trigger inversion on the holdout; ``estimate=False``
    skips it and leaves ``record.estimate`` None; an ``EstimateConfig`` sets its effort).
    ``defense="auto"`` (:mod:`torchpurify.auto`): the estimate decides whether to purify and
    which defenses to try; ``record.chosen`` names the one kept (None: the model is returned
    unchanged) and ``record.log["auto"]`` what was tried and why it stopped.

    Before any work the data is checked against the model (one ``UserError``, a ``ValueError``,
    naming the problem): the model must run on the inputs and return N×classes logits, the
    labels must be its output indices, every class must occur (unless
    ``allow_missing_classes``), and the model must classify the data clearly above chance
    (else the labels are likely in another order than the model's outputs).
    """
    check_seed(seed)
    data = as_split(clean)
    outputs = check_model(model, data.x[:2])
    check_labels(data.y, outputs, "the clean data")
    check_all_classes(data.y, outputs, "the clean data", allow_missing_classes)
    from torchpurify.auto import build_defense as build_any  # the registry's, and "auto"

    chosen = build_any(defense, device=device, seed=seed, progress=progress, **params)
    check_above_chance(model, data, outputs, "the clean data", seed)
    return run_defense(model, split_clean(data, tune_fraction, seed), chosen, estimate)


def check_seed(seed: Any) -> None:
    check(
        isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED,
        f"seed must be an integer in 0..{MAX_SEED}, got {seed!r:.40}",
    )


# ----------------------------------------------------------------------------- bring your own


MIN_STD = 1e-6  # --normalize: a smaller std scales pixels past float32's useful range


def parse_normalize(text: str | None) -> tuple[list[float], list[float]] | None:
    """``"0.5,0.25"`` (one mean and std for every channel) or ``"m1,m2,m3,s1,s2,s3"``."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--normalize takes MEAN,STD numbers, got {text!r}") from None
    check(
        len(values) >= 2 and len(values) % 2 == 0,
        f"--normalize takes MEAN,STD, or one mean per channel then one std each, got {text!r}",
    )
    half = len(values) // 2
    mean, std = values[:half], values[half:]
    check(
        all(math.isfinite(v) for v in values),
        f"--normalize takes finite numbers, got {text!r}",
    )
    check(
        all(MIN_STD <= s <= 1 / MIN_STD for s in std),
        f"--normalize: every std must lie in {MIN_STD:g}..{1 / MIN_STD:g}, got {text!r}",
    )
    return mean, std


def _sample_rate(arch: str, kwargs: dict[str, Any], given: int | None) -> int:
    if given is not None:
        check(given > 0, f"--sample-rate must be positive, got {given}")
        return given
    if "sample_rate" in kwargs:
        return int(kwargs["sample_rate"])
    if not is_reference(arch):
        default = inspect.signature(MODELS.get(arch)).parameters.get("sample_rate")
        if default is not None and isinstance(default.default, int):
            return default.default
    return 16000


@dataclass
class Own:
    """A user's model and clean data, loaded and checked against each other."""

    model: nn.Module
    card: ModelCard
    data: OwnData
    notes: list[str] = field(default_factory=list)


def load_own(
    model_path: str | Path,
    clean_path: str | Path,
    arch: str | None = None,
    *,
    trust_code: bool = False,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    num_classes: int | None = None,
    sample_rate: int | None = None,
    classes: Any = None,
    allow_missing_classes: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> Own:
    """Load a model (directory or bare weights) and the user's clean data for it.

    A directory's card gives the input shape and classes; for a bare weights file they come from
    the data (``num_classes`` overrides the count, e.g. when the clean data lacks a class).
    ``classes`` is the user's class mapping (:func:`~torchpurify.data.byo.parse_classes`: names
    in output order, a JSON file, or a name → index dict); it sets the count when
    ``num_classes`` is not given.

    Checked before any defense runs: the model runs on the data and returns N×classes logits;
    the clean data holds every class (unless ``allow_missing_classes``); the model classifies
    it clearly above chance (:func:`check_above_chance`, on samples drawn by ``seed``), so a
    wrong class order stops here instead of being "purified".
    """
    model_path = Path(model_path)
    mapping = parse_classes(classes)
    check(
        num_classes is None or 2 <= num_classes <= MAX_CLASSES,
        f"--num-classes must be 2 to {MAX_CLASSES:,} (the model's output count), got {num_classes}",
    )
    if mapping is not None and num_classes is not None:
        top = max(mapping.values())
        check(
            top < num_classes,
            f"--classes maps a class to output {top} but --num-classes is {num_classes}",
        )
    if model_path.is_dir():
        check(normalize is None, "--normalize is for a bare weights file; a model directory "
              "records its own normalisation")  # fmt: skip
        net, card = load_model(model_path, arch, trust_code=trust_code)
        rate = _sample_rate(card.architecture.name, card.architecture.kwargs, sample_rate)
        data = read_own(
            clean_path,
            input_shape=card.input_shape,
            model_classes=card.classes,
            num_outputs=card.num_classes,
            sample_rate=rate,
            classes=mapping,
            progress=progress,
        )
    else:
        check(
            arch is not None,
            f"{model_path.name} is a bare weights file: name its architecture with --arch "
            "(a registered name or your own module:function)",
        )
        rate = _sample_rate(arch, {}, sample_rate)
        if mapping is not None and num_classes is None:
            num_classes = max(mapping.values()) + 1
        data = read_own(
            clean_path, num_outputs=num_classes, sample_rate=rate, classes=mapping,
            progress=progress,
        )  # fmt: skip
        count = num_classes if num_classes is not None else max(data.mapping.values()) + 1
        if normalize is not None and data.kind != "audio":
            channels = data.input_shape[0]
            check(
                all(len(values) in (1, channels) for values in normalize),
                f"--normalize gives {len(normalize[0])} means and stds but the inputs have "
                f"{channels} channel{'s' if channels > 1 else ''}: give MEAN,STD"
                + (f" or {channels} means then {channels} stds" if channels > 1 else ""),
            )
        kwargs = {"sample_rate": rate} if data.kind == "audio" and _takes_rate(arch) else {}
        net, card = load_model(
            model_path,
            arch,
            input_shape=data.input_shape,
            num_classes=count,
            kwargs=kwargs,
            normalize=normalize,
        )
        names = {index: name for name, index in (mapping or data.mapping).items()}
        card = card.replace(classes=[names.get(i, str(i)) for i in range(count)])
    outputs = check_model(net, data.split.x[:2])
    net.eval()
    check(
        outputs == card.num_classes,
        f"the model outputs {outputs} classes but {clean_path} maps to {card.num_classes}; give "
        "one folder per output class, name the folders 0..K-1, or pass --num-classes",
    )
    check_all_classes(data.split.y, outputs, str(clean_path), allow_missing_classes)
    how = (
        " (--classes)"
        if mapping is not None
        else f" (mapped {_shown(data.mapping)})"
        if data.kind != "npz"
        else " (the .npz labels)"
    )
    check_above_chance(net, data.split, outputs, str(clean_path), seed, how)
    return Own(net, card, data, list(data.notes))


def _shown(mapping: dict[str, int]) -> str:
    pairs = sorted(mapping.items(), key=lambda pair: pair[1])
    return ", ".join(f"{name}→{index}" for name, index in pairs[:5]) + (
        ", …" if len(pairs) > 5 else ""
    )


def _takes_rate(arch: str) -> bool:
    if is_reference(arch):
        return False  # the user's own function gets only the arguments the user gives
    return "sample_rate" in inspect.signature(MODELS.get(arch)).parameters


def measure(
    model: nn.Module,
    test: OwnData | None,
    *,
    trigger=None,
    triggered: OwnData | None = None,
    target: int | None = None,
    mode: str = "all-to-one",
    num_classes: int,
    device: torch.device | str = "cpu",
) -> Metrics | None:
    """ACC on ``test``; ASR and RA with a ``trigger`` (applied to ``test``) or on a folder of
    ``triggered`` inputs (labelled with their true classes); None without test data."""
    if test is None and triggered is None:
        return None
    model = model.to(device)
    check(
        (trigger is None and triggered is None) or target is not None or mode == "all-to-all",
        "measuring ASR needs the target label (--target T)",
    )
    how = {"target": 0 if target is None else target, "mode": mode, "num_classes": num_classes}
    if test is not None:
        result = evaluate(model, test.split, trigger, device=device, **how)
    else:
        result = Metrics(acc=None, asr=None, ra=None)
    if triggered is not None:
        data = triggered.split
        eligible = target_labels(data.y, how["target"], mode, num_classes) != data.y
        check(
            bool(eligible.any()), "every triggered input is of the target class; ASR is undefined"
        )
        predicted = predict(model, data.x[eligible], device=device)
        asr, ra = attack_rates(predicted, data.y[eligible], how["target"], mode, num_classes)
        result = Metrics(acc=result.acc, asr=asr, ra=ra)
    return result


def trigger_for(
    attack: str | None, params: dict[str, Any], input_shape: tuple[int, ...], target: int | None,
    num_classes: int, triggered: bool, *, tested: bool = True, mode: str = "all-to-one",
):  # fmt: skip
    """The user-named trigger (``--attack NAME --set k=v --target T``), or None. ``--target``
    is checked on every path: required with ``--attack`` or ``--triggered`` (all-to-one), a
    label of the model, and refused without either. ``tested``: False when there is no test
    data to apply ``--attack`` to, which is then refused rather than silently dropped."""
    from torchpurify.attacks import build_attack

    needs_target = mode != "all-to-all"
    if target is not None:
        check(
            0 <= target < num_classes,
            f"--target must be one of the model's labels, 0..{num_classes - 1}, got {target}",
        )
    if attack is None:
        check(not params, "--attack-set needs --attack")
        check(
            target is None or triggered,
            "--target needs --attack NAME or --triggered PATH (what to measure the ASR of)",
        )
        check(
            not triggered or target is not None or not needs_target,
            "--triggered needs --target T: the label the trigger leads to",
        )
        return None
    check(not triggered, "give either --attack or --triggered, not both")
    check(
        tested,
        "--attack is measured on --test data: give --test PATH, or leave --attack out (the "
        "defender-side backdoor estimate then runs on the clean holdout)",
    )
    check(
        target is not None or not needs_target,
        "--attack needs --target T: the label the trigger leads to",
    )
    params = dict(params)
    seed = params.pop("seed", 0)
    return build_attack(attack, input_shape, seed=seed, **params)


@dataclass
class OwnResult:
    """What :func:`purify_own` did: metrics before and after (None without test data)."""

    model: nn.Module
    record: Record
    card: dict[str, Any]
    before: Metrics | None
    after: Metrics | None
    notes: list[str]


def purify_own(
    model_path: str | Path,
    clean_path: str | Path,
    defense: Defense,
    out: str | Path | None,
    *,
    arch: str | None = None,
    trust_code: bool = False,
    test_path: str | Path | None = None,
    triggered_path: str | Path | None = None,
    attack: str | None = None,
    attack_params: dict[str, Any] | None = None,
    target: int | None = None,
    target_mode: str = "all-to-one",
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    num_classes: int | None = None,
    sample_rate: int | None = None,
    tune_fraction: float = TUNE_FRACTION,
    export: str | Path | None = None,
    estimate: bool | None = None,
    force: bool = True,
    classes: Any = None,
    allow_missing_classes: bool = False,
) -> OwnResult:
    """The bring-your-own purification (``torchpurify purify --clean PATH``), end to end.

    ``estimate`` None: the defender-side backdoor estimate runs when no trigger is named (no
    ``attack``, no ``triggered_path``), so some measure of the backdoor is always reported.

    ``out`` and ``export`` replace an earlier torchpurify artifact only with ``force`` (the
    library default; the CLI passes its ``--force``); ``export`` never replaces the input model
    or a file torchpurify did not write, and is checked before any work."""
    if export is not None:  # before any work: never the input, never a file not ours
        inputs = [p for p in (model_path, clean_path, test_path, triggered_path) if p is not None]
        check_export(export, force=force, inputs=inputs, out=out)
    own = load_own(
        model_path, clean_path, arch, trust_code=trust_code, normalize=normalize,
        num_classes=num_classes, sample_rate=sample_rate, classes=classes,
        allow_missing_classes=allow_missing_classes, seed=defense.seed, progress=defense.progress,
    )  # fmt: skip
    test, triggered = read_test_files(own, test_path, triggered_path, classes, defense.progress)
    measuring = Measuring.of(
        own.card, attack, attack_params, target, target_mode, test, triggered, defense.device
    )
    before = measuring.measure(own.model, test)
    clean = split_clean(own.data.split, tune_fraction, defense.seed)
    if estimate is None:
        estimate = measuring.trigger is None and triggered is None
    purified, record = run_defense(own.model, clean, defense, estimate=estimate)
    after = measuring.measure(purified, test)
    own.model.to("cpu")
    purified.to("cpu")
    card = own_card(own, defense.seed, tune_fraction, test, record, before, after, measuring)
    if out is not None:
        save_model(purified, out, card, force=force)
    if export is not None:
        export_weights(purified, export, force=force)
    return OwnResult(purified, record, card, before, after, own.notes)


def read_test_files(
    own: Own, test_path: Any, triggered_path: Any, classes: Any, progress: bool
) -> tuple[OwnData | None, OwnData | None]:
    """``--test`` and ``--triggered``, read in the model's input shape, classes and sample rate
    (None where not given)."""
    read = {
        "input_shape": own.card.input_shape,
        "mapping": parse_classes(classes) or own.data.mapping,
        "sample_rate": own.data.source.get("sample_rate") or 16000,
        "progress": progress,
    }
    test = read_own(test_path, **read) if test_path is not None else None
    triggered = read_own(triggered_path, **read) if triggered_path is not None else None
    return test, triggered


@dataclass(frozen=True)
class Measuring:
    """How :func:`purify_own` measures before and after: the trigger ``--attack`` names (or
    None), the ``--triggered`` inputs (or None), the device and the targeting."""

    trigger: Any
    triggered: OwnData | None
    device: torch.device | str
    how: Targeting

    @classmethod
    def of(
        cls, card: ModelCard, attack: str | None, attack_params: dict[str, Any] | None,
        target: int | None, target_mode: str, test: OwnData | None, triggered: OwnData | None,
        device: str,
    ) -> Measuring:  # fmt: skip
        from torchpurify.train import resolve_device

        trigger = trigger_for(
            attack, attack_params or {}, card.input_shape, target, card.num_classes,
            triggered is not None, tested=test is not None, mode=target_mode,
        )  # fmt: skip
        how = targeting(
            {"target": 0 if target is None else target, "target_mode": target_mode},
            card.num_classes,
        )
        return cls(trigger, triggered, resolve_device(device), how)

    def measure(self, model: nn.Module, test: OwnData | None) -> Metrics | None:
        return measure(model, test, trigger=self.trigger, triggered=self.triggered,
                       device=self.device, **self.how.as_kwargs())  # fmt: skip

    def record(self) -> dict[str, Any] | None:
        """The card's ``measured_with``: the trigger or the triggered folder, and the targeting."""
        if self.trigger is not None:
            return {"attack": self.trigger.to_dict(), **self.how.as_kwargs()}
        if self.triggered:
            return {"triggered": self.triggered.source["path"], **self.how.as_kwargs()}
        return None


def own_card(
    own: Own, seed: int, tune_fraction: float, test: OwnData | None, record: Record,
    before: Metrics | None, after: Metrics | None, measuring: Measuring,
) -> dict[str, Any]:  # fmt: skip
    """The purified model's card: the input's, with where its clean and test data came from,
    and the defense's record with the metrics before and after and what measured them."""
    card = {
        key: value
        for key, value in own.card.to_dict().items()
        if key not in ("format", "format_version", "versions", "masks", "defense", "metrics")
    }
    card["clean"] = {
        **own.data.source,
        "tune_fraction": tune_fraction,
        "seed": seed,
        "split_by": "sample" if own.data.split.groups is None else "speaker",
        "notes": own.notes,
    }
    if test is not None:
        card["test"] = {k: test.source[k] for k in ("path", "kind", "files", "sha256")}
        card["metrics"] = after.to_dict()
    card["defense"] = {
        **record.to_dict(),
        "name": record.defense,
        "before": before.to_dict() if before else None,
        "after": after.to_dict() if after else None,
        "measured_with": measuring.record(),
    }
    return card


__all__ = [
    "Own",
    "OwnResult",
    "Record",
    "as_split",
    "load_own",
    "measure",
    "parse_normalize",
    "purify",
    "purify_own",
    "split_clean",
]
