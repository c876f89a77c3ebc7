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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchpurify.attacks.poison import target_labels
from torchpurify.card import ModelCard, targeting
from torchpurify.data.base import Split
from torchpurify.data.byo import OwnData, read_own
from torchpurify.data.splits import defender_split
from torchpurify.defenses import Clean, Defense, build_defense
from torchpurify.errors import UserError, check
from torchpurify.metrics import Metrics, attack_rates, evaluate, predict
from torchpurify.models import MODELS, is_reference
from torchpurify.models.io import check_export, export_weights, load_model, save_model

MAX_IN_MEMORY = 1 << 31  # values of clean data gathered from a Dataset or DataLoader


@dataclass
class Record:
    """What a defense did and cost: its hyper-parameters, its log, seconds and passes, the
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
    return Split(x.float(), y.long())


def split_clean(data: Split, tune_fraction: float = 0.8, seed: int = 0) -> Clean:
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
        from torchpurify.estimate import compare, describe_change, estimate_backdoor
    except ImportError:  # pragma: no cover - the module ships with torchpurify
        return None
    from torchpurify.train import resolve_device

    where = resolve_device(device)
    common = {"device": where, "progress": progress}
    before = estimate_backdoor(model, clean.holdout, config, **common)
    after = estimate_backdoor(purified, clean.holdout, config, before=before, **common)
    model.to("cpu")
    purified.to("cpu")
    return {**compare(before, after), "summary": describe_change(before, after)}


def run_defense(
    model: nn.Module, clean: Clean, defense: Defense, estimate: Any = False
) -> tuple[nn.Module, Record]:
    """Run ``defense`` on ``model`` (left unchanged); the purified model and its record.
    ``estimate``: False, True, or a :class:`torchpurify.estimate.EstimateConfig`."""
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
    )
    if estimate is not False and estimate is not None:
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
    tune_fraction: float = 0.8,
    seed: int = 0,
    device: str = "auto",
    progress: bool = False,
    estimate: Any = True,
    **params: Any,
) -> tuple[nn.Module, Record]:
    """Purify ``model`` with ``defense`` (see ``torchpurify list defenses``) and its
    hyper-parameters ``params``, using ``clean`` data only: ``(x, y)`` tensors, a ``Dataset`` or a
    ``DataLoader``. ``tune_fraction`` of it trains, the rest (the holdout) drives every stopping
    and selection rule; ``seed`` draws that split and seeds the defense. ``model`` is not changed.

    Returns the purified ``nn.Module`` and its :class:`Record`: log, cost and the defender-side
    backdoor estimate before and after (trigger inversion on the holdout; ``estimate=False``
    skips it and leaves ``record.estimate`` None; an ``EstimateConfig`` sets its effort).
    """
    check(isinstance(model, nn.Module), f"model must be a torch.nn.Module, got {type(model)}")
    chosen = build_defense(defense, device=device, seed=seed, progress=progress, **params)
    return run_defense(model, split_clean(as_split(clean), tune_fraction, seed), chosen, estimate)


# ----------------------------------------------------------------------------- bring your own


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
    check(all(s > 0 for s in std), f"--normalize: every std must be positive, got {std}")
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
) -> Own:
    """Load a model (directory or bare weights) and the user's clean data for it.

    A directory's card gives the input shape and classes; for a bare weights file they come from
    the data (``num_classes`` overrides the count, e.g. when the clean data lacks a class).
    """
    model_path = Path(model_path)
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
        )
    else:
        check(
            arch is not None,
            f"{model_path.name} is a bare weights file: name its architecture with --arch "
            "(a registered name or your own module:function)",
        )
        rate = _sample_rate(arch, {}, sample_rate)
        data = read_own(clean_path, num_outputs=num_classes, sample_rate=rate)
        count = num_classes if num_classes is not None else max(data.mapping.values()) + 1
        kwargs = {"sample_rate": rate} if data.kind == "audio" and _takes_rate(arch) else {}
        net, card = load_model(
            model_path,
            arch,
            input_shape=data.input_shape,
            num_classes=count,
            kwargs=kwargs,
            normalize=normalize,
        )
        names = {index: name for name, index in data.mapping.items()}
        card = card.replace(classes=[names.get(i, str(i)) for i in range(count)])
    outputs = _output_count(net, data.split.x[:2])
    check(
        outputs == card.num_classes,
        f"the model outputs {outputs} classes but {clean_path} maps to {card.num_classes}; give "
        "one folder per output class, name the folders 0..K-1, or pass --num-classes",
    )
    return Own(net, card, data, list(data.notes))


def _takes_rate(arch: str) -> bool:
    if is_reference(arch):
        return False  # the user's own function gets only the arguments the user gives
    return "sample_rate" in inspect.signature(MODELS.get(arch)).parameters


def _output_count(model: nn.Module, example: torch.Tensor) -> int:
    try:
        with torch.no_grad():
            logits = model.eval()(example)
    except RuntimeError as error:
        raise UserError(
            f"the model cannot run on inputs of shape {tuple(example.shape[1:])} "
            f"({str(error).splitlines()[0][:200]}); check --arch and the data"
        ) from None
    check(
        isinstance(logits, torch.Tensor) and logits.dim() == 2,
        "the model must return logits of shape N×classes",
    )
    return int(logits.shape[1])


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
    how = {"target": target or 0, "mode": mode, "num_classes": num_classes}
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
    num_classes: int, triggered: bool,
):  # fmt: skip
    """The user-named trigger (``--attack NAME --set k=v --target T``), or None."""
    from torchpurify.attacks import build_attack

    if attack is None:
        check(not params, "--attack-set needs --attack")
        check(
            target is None or triggered,
            "--target needs --attack NAME or --triggered PATH (what to measure the ASR of)",
        )
        return None
    check(not triggered, "give either --attack or --triggered, not both")
    check(target is not None, "--attack needs --target T: the label the trigger leads to")
    check(
        0 <= target < num_classes,
        f"--target must be a label in 0..{num_classes - 1}, got {target}",
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
    tune_fraction: float = 0.8,
    export: str | Path | None = None,
    estimate: bool | None = None,
    force: bool = True,
) -> OwnResult:
    """The bring-your-own purification (``torchpurify purify --clean PATH``), end to end.

    ``estimate`` None: the defender-side backdoor estimate runs when no trigger is named (no
    ``attack``, no ``triggered_path``), so some measure of the backdoor is always reported.

    ``out`` and ``export`` replace an earlier torchpurify artifact only with ``force`` (the
    library default; the CLI passes its ``--force``); ``export`` never replaces the input model
    or a file torchpurify did not write, and is checked before any work."""
    from torchpurify.train import resolve_device

    if export is not None:  # before any work: never the input, never a file not ours
        inputs = [p for p in (model_path, clean_path, test_path, triggered_path) if p is not None]
        check_export(export, force=force, inputs=inputs, out=out)
    own = load_own(
        model_path,
        clean_path,
        arch,
        trust_code=trust_code,
        normalize=normalize,
        num_classes=num_classes,
        sample_rate=sample_rate,
    )
    card, rate = own.card, own.data.source.get("sample_rate")
    read = {
        "input_shape": card.input_shape,
        "mapping": own.data.mapping,
        "sample_rate": rate or 16000,
    }
    test = read_own(test_path, **read) if test_path is not None else None
    triggered = read_own(triggered_path, **read) if triggered_path is not None else None
    trigger = trigger_for(
        attack, attack_params or {}, card.input_shape, target, card.num_classes,
        triggered is not None,
    )  # fmt: skip
    how = targeting({"target": target or 0, "target_mode": target_mode}, card.num_classes)
    device = resolve_device(defense.device)
    measuring = {"trigger": trigger, "triggered": triggered, "device": device, **how.as_kwargs()}
    before = measure(own.model, test, **measuring)
    clean = split_clean(own.data.split, tune_fraction, defense.seed)
    if estimate is None:
        estimate = trigger is None and triggered is None
    purified, record = run_defense(own.model, clean, defense, estimate=estimate)
    after = measure(purified, test, **measuring)
    own.model.to("cpu")
    purified.to("cpu")
    new_card = {
        key: value
        for key, value in card.to_dict().items()
        if key not in ("format", "format_version", "versions", "masks", "defense", "metrics")
    }
    new_card["clean"] = {
        **own.data.source,
        "tune_fraction": tune_fraction,
        "seed": defense.seed,
        "split_by": "sample" if own.data.split.groups is None else "speaker",
        "notes": own.notes,
    }
    if test is not None:
        new_card["test"] = {k: test.source[k] for k in ("path", "kind", "files", "sha256")}
        new_card["metrics"] = after.to_dict()
    new_card["defense"] = {
        **record.to_dict(),
        "name": record.defense,
        "before": before.to_dict() if before else None,
        "after": after.to_dict() if after else None,
        "measured_with": (
            {"attack": trigger.to_dict(), **how.as_kwargs()} if trigger is not None
            else {"triggered": triggered.source["path"], **how.as_kwargs()} if triggered
            else None
        ),
    }  # fmt: skip
    if out is not None:
        save_model(purified, out, new_card, force=force)
    if export is not None:
        export_weights(purified, export, force=force)
    return OwnResult(purified, record, new_card, before, after, own.notes)


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
