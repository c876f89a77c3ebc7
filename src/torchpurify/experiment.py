"""Wiring: dataset → poisoning → training → evaluation → artifact.

The CLI and the experiment runner are the only callers. Every random choice is derived from one
seed, and everything needed to rebuild the exact splits (and so the defender's clean data) is
written into the model card.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchpurify.attacks import ATTACKS, Trigger, build_attack, poison_split, trigger_from_dict
from torchpurify.attacks.poison import check_poisoning
from torchpurify.auto import Auto, estimate_record, with_estimate
from torchpurify.card import targeting
from torchpurify.data import DATASETS, load_dataset, split_groups
from torchpurify.data.base import Dataset, Split
from torchpurify.data.splits import defender_split, train_val_split
from torchpurify.defenses import Clean, Defense, Purified
from torchpurify.errors import UserError, check
from torchpurify.estimate import (
    EstimateConfig,
    compare,
    estimate_after,
    estimate_before,
    estimate_cached,
)
from torchpurify.metrics import Metrics, der, evaluate
from torchpurify.models import MODELS, build_model
from torchpurify.models.io import save_model
from torchpurify.train import TrainConfig, fit, reproducible


@dataclass
class DataSpec:
    """Which data, how much of it, and how it is split."""

    dataset: str
    root: str | None = None
    train_size: int | None = None
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        DATASETS.get(self.dataset)
        check(
            self.train_size is None or self.train_size >= 2,
            f"--train-size must be at least 2, got {self.train_size}",
        )
        check(
            0 <= self.val_fraction < 1,
            f"--val-fraction must be in [0, 1), got {self.val_fraction}",
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "root"}


@dataclass
class AttackSpec:
    """An attack and how it poisons: rate, target label, all-to-one or all-to-all."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    poison_rate: float = 0.1
    target: int = 0
    target_mode: str = "all-to-one"
    clean_label: bool | None = None

    def __post_init__(self) -> None:
        # Fail before any data is loaded or any time is spent.
        ATTACKS.get(self.name)
        check_poisoning(self.poison_rate, self.target_mode, self.target)


@dataclass
class Prepared:
    """A dataset cut into the attacker's training data, validation data and the test split."""

    dataset: Dataset
    train: Split
    val: Split
    test: Split
    train_indices: np.ndarray


def prepare_data(spec: DataSpec, progress: bool = True) -> Prepared:
    dataset = load_dataset(spec.dataset, root=spec.root, progress=progress)
    n = len(dataset.train)
    indices = np.arange(n)
    if spec.train_size is not None:
        check(
            spec.train_size <= n,
            f"--train-size {spec.train_size} is larger than {spec.dataset}'s {n} training samples",
        )
        rng = np.random.default_rng(spec.seed)
        indices = np.sort(rng.choice(n, spec.train_size, replace=False))
    check(len(dataset.test) > 0, f"the test split of {spec.dataset} is empty")
    if dataset.val is not None:
        # The dataset's own validation split (speaker-disjoint for speech) replaces a random cut.
        return Prepared(
            dataset=dataset,
            train=dataset.train.subset(indices),
            val=dataset.val,
            test=dataset.test,
            train_indices=indices,
        )
    train_pos, val_pos = train_val_split(len(indices), spec.val_fraction, seed=spec.seed)
    return Prepared(
        dataset=dataset,
        train=dataset.train.subset(indices[train_pos]),
        val=dataset.train.subset(indices[val_pos]),
        test=dataset.test,
        train_indices=indices[train_pos],
    )


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of N×C×… inputs, for the model's normalisation layer."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    std = flat.std(1).clamp_min(1e-3)
    return flat.mean(1).tolist(), std.tolist()


@dataclass
class Backdoored:
    """A trained model, the card written with it and its test metrics."""

    model: nn.Module
    card: dict[str, Any]
    metrics: Metrics


def poison_with(train: Split, trigger: Trigger, attack: Any, num_classes: int, seed: int):
    """Poison ``train`` as ``attack`` says (an :class:`AttackSpec` when training, the card's
    ``attack`` record when the defender's data is rebuilt): the one call both sides share, so
    the rebuilt poisoned indices match the trained ones."""
    how = targeting(attack, num_classes)
    record = attack if isinstance(attack, Mapping) else asdict(attack)
    return poison_split(
        train, trigger, record["poison_rate"], **how.as_kwargs(), seed=seed,
        clean_label=record["clean_label"],
    )  # fmt: skip


def train_model(
    data: DataSpec,
    model_name: str,
    attack: AttackSpec | None,
    config: TrainConfig,
    out: str | Path | None = None,
    prepared: Prepared | None = None,
    on_epoch=None,
    threads: int | None = None,
) -> Backdoored:
    """Poison (when ``attack`` is given), train, evaluate on the test split and save to ``out``.

    Training runs with deterministic algorithms and, with ``threads``, on that many intra-op
    threads (:func:`~torchpurify.train.reproducible`): the same data, recipe and seed then give
    bit-identical weights wherever they are trained (the runner fixes ``threads``)."""
    with reproducible(threads):
        return _train_model(data, model_name, attack, config, out, prepared, on_epoch, threads)


def _train_model(data, model_name, attack, config, out, prepared, on_epoch, threads) -> Backdoored:
    if ":" not in model_name:
        MODELS.get(model_name)
    prepared = prepared or prepare_data(data, progress=config.progress)
    dataset = prepared.dataset
    input_shape = dataset.input_shape
    train, trigger, attack_card = prepared.train, None, None
    if attack is not None:
        check(
            0 <= attack.target < dataset.num_classes,
            f"--target must be a label in [0, {dataset.num_classes - 1}], got {attack.target}",
        )
        labels = torch.unique(prepared.train.y).tolist()
        check(
            len(labels) >= 2,
            f"the training data of {data.dataset} holds only the labels {labels}; a backdoor "
            "needs samples of at least two classes — add classes to the data, or train without "
            "--attack",
        )
        trigger = build_attack(attack.name, input_shape, seed=data.seed, **attack.params)
        poisoned = poison_with(prepared.train, trigger, attack, dataset.num_classes, data.seed)
        train = poisoned.split
        attack_card = {
            "trigger": trigger.to_dict(),
            "poison_rate": attack.poison_rate,
            "target": attack.target,
            "target_mode": attack.target_mode,
            "clean_label": bool(
                trigger.clean_label if attack.clean_label is None else attack.clean_label
            ),
            "num_poisoned": len(poisoned.poisoned),
            "num_noise": len(poisoned.noise),
            "poisoned_sha256": poisoned.indices_sha256(),
        }
    kwargs = {}
    if ":" not in model_name and "mean" in inspect.signature(MODELS.get(model_name)).parameters:
        # Image models normalise their input inside; audio models normalise their features.
        mean, std = channel_stats(prepared.train.x)
        kwargs = {"mean": mean, "std": std}
    torch.manual_seed(config.seed)
    model = build_model(model_name, input_shape, dataset.num_classes, **kwargs)
    how = targeting(attack, dataset.num_classes).as_kwargs()

    def record_epoch(record: dict) -> None:
        # The attacker's validation split (clean, held out from training) tracks progress.
        if len(prepared.val):
            measured = evaluate(model, prepared.val, trigger, **how)
            record["val_acc"] = measured.acc
            if measured.asr is not None:
                record["val_asr"] = measured.asr
        if on_epoch is not None:
            on_epoch(record)

    if hasattr(trigger, "train_backdoored"):
        # An attack that is a training procedure (pruning-aware) trains the model itself.
        result, attack_card["procedure"] = trigger.train_backdoored(
            model,
            clean=prepared.train,
            poisoned=train,
            val=prepared.val,
            config=config,
            on_epoch=record_epoch,
        )
    else:
        result = fit(model, train, config, on_epoch=record_epoch)
    metrics = evaluate(model, prepared.test, trigger, **how)
    card = {
        "input_shape": list(input_shape),
        "classes": dataset.classes,
        "data": data.to_dict(),
        "attack": attack_card,
        "training": {
            **config.to_dict(),
            "seconds": round(result.cost.seconds, 2),
            "history": result.history,
            **({"threads": threads} if threads is not None else {}),
        },
        "metrics": metrics.to_dict(),
    }
    model.to("cpu")
    if out is not None:
        save_model(model, out, card)
    return Backdoored(model, card, metrics)


def trigger_of(card: dict[str, Any]):
    """The attack's trigger recorded in a model card (None for a clean model)."""
    attack = card.get("attack")
    return trigger_from_dict(attack["trigger"]) if attack else None


def defender_pool(prepared: Prepared, fraction: float) -> str:
    """Where the defender's clean data come from (methods.md §0): ``"heldout"`` — the
    validation split the model never trained on — when it holds ``fraction`` of the training
    set, else ``"train"`` — unpoisoned training samples, which the model has memorised, so its
    holdout accuracy overstates test accuracy and a purification's cost on it."""
    return "heldout" if len(prepared.val) >= round(fraction * len(prepared.train)) else "train"


def defender_data(
    card: dict[str, Any],
    root: str | None = None,
    fraction: float = 0.05,
    seed: int | None = None,
    progress: bool = True,
) -> tuple[Split, Split, Prepared]:
    """The defender's clean ``tune`` and ``holdout`` sets (methods.md §0) for a trained model:
    ``round(fraction × training set)`` samples from :func:`defender_pool`.

    The splits and the poisoned indices are rebuilt from the card; the rebuilt poisoning is
    checked against the card's hash so the defender never receives a poisoned sample. Speech
    is split by speaker (:func:`~torchpurify.data.split_groups`): no holdout speaker is in tune.
    """
    data_card = card.get("data")
    if not data_card:
        raise UserError(
            "the model card does not record its training data, so the defender's clean data "
            "cannot be rebuilt from it; give your clean data with --clean PATH"
        )
    spec = DataSpec(**{**data_card, "root": root})
    prepared = prepare_data(spec, progress=progress)
    poisoned = np.array([], dtype=np.int64)
    attack = card.get("attack")
    if attack:
        result = poison_with(
            prepared.train,
            trigger_from_dict(attack["trigger"]),
            attack,
            prepared.dataset.num_classes,
            spec.seed,
        )
        if result.indices_sha256() != attack["poisoned_sha256"]:
            raise UserError(
                "the poisoned samples rebuilt from the model card differ from the ones it was "
                "trained with (different data files?); pass the same dataset as at training"
            )
        poisoned = np.union1d(result.poisoned.numpy(), result.noise.numpy())
    if defender_pool(prepared, fraction) == "heldout":
        source, candidates = prepared.val, np.arange(len(prepared.val))
    else:
        source = prepared.train
        candidates = np.setdiff1d(np.arange(len(prepared.train)), poisoned)
    by = split_groups(spec.dataset)
    tune_idx, holdout_idx = defender_split(
        candidates,
        len(prepared.train),
        fraction=fraction,
        seed=spec.seed if seed is None else seed,
        pool_size=len(source),
        groups=source.groups.numpy() if by and source.groups is not None else None,
    )
    return source.subset(tune_idx), source.subset(holdout_idx), prepared


@dataclass
class Defended:
    """A defense's outcome on the test split: metrics before and after, DER, the result."""

    before: Metrics
    after: Metrics
    der: float | None
    purified: Purified
    card: dict[str, Any]
    estimate: dict[str, Any] | None = None  # estimate.compare(before, after), when asked for


def purify_model(
    model: nn.Module,
    card: dict[str, Any],
    defense: Defense,
    *,
    root: str | None = None,
    defender_fraction: float = 0.05,
    seed: int | None = None,
    out: str | Path | None = None,
    estimate: EstimateConfig | None = None,
    estimate_cache: str | Path | None = None,
    force: bool = True,
) -> Defended:
    """Run ``defense`` with the defender's clean data and measure it on the test split.

    With ``estimate``, the defender-side backdoor estimate (methods.md §12) is computed on the
    holdout before and after purification (the one before is kept in ``estimate_cache`` when
    given) and recorded in the card's ``estimate``.

    ``seed`` draws the defender's split (default: the training seed the card records).

    The defense itself receives only ``tune`` and ``holdout`` (and the true trigger only when
    it declares that it runs as an oracle); the test split is used here, after it returns.
    """
    tune, holdout, prepared = defender_data(
        card, root=root, fraction=defender_fraction, seed=seed, progress=defense.progress
    )
    trigger = trigger_of(card)
    how = targeting(card.get("attack"), prepared.dataset.num_classes).as_kwargs()
    check(
        not defense.uses_known_trigger or trigger is not None,
        f"{defense.name} with the known trigger needs a backdoored model with a recorded attack",
    )
    clean = Clean(tune, holdout, known_trigger=trigger if defense.uses_known_trigger else None)
    before = evaluate(model, prepared.test, trigger, **how)
    guess_before = None
    auto = isinstance(defense, Auto)  # it runs the estimate itself (torchpurify.auto)
    if auto:
        estimate = estimate or EstimateConfig()
        with_estimate(defense, estimate)
    elif estimate is not None:
        show = defense.progress
        guess_before = (
            estimate_cached(estimate_cache, model, holdout, estimate, progress=show)
            if estimate_cache is not None
            else estimate_before(model, holdout, estimate, progress=show)
        )
    purified = defense.purify(model, clean)
    after = evaluate(purified.model, prepared.test, trigger, **how)
    der_value = der(before.acc, before.asr, after.acc, after.asr) if trigger is not None else None
    new_card = {
        key: value for key, value in card.items() if key not in ("format", "format_version")
    }
    new_card["metrics"] = after.to_dict()
    new_card["defense"] = {
        "name": defense.name,
        "params": defense.params(),
        "context": defense.context.to_dict(),
        "guard_settings": defense.guard.to_dict(),
        "oracle_trigger": defense.uses_known_trigger,
        "defender_fraction": defender_fraction,
        "defender_pool": defender_pool(prepared, defender_fraction),
        "split_seed": card["data"]["seed"] if seed is None else seed,
        "split_by": split_groups(card["data"]["dataset"]) or "sample",
        "tune_size": len(tune),
        "holdout_size": len(holdout),
        "before": before.to_dict(),
        "after": after.to_dict(),
        "der": der_value,
        "seconds": round(purified.cost.seconds, 2),
        "forward_passes": purified.cost.forward,
        "backward_passes": purified.cost.backward,
        "log": purified.log,
    }
    guess = None
    if auto:
        new_card["defense"]["chosen"] = purified.log["auto"]["chosen"]
        guess = {**estimate_record(purified.log), "config": estimate.to_dict()}
        new_card["estimate"] = guess
    elif guess_before is not None:
        guess_after = estimate_after(
            purified.model, holdout, guess_before, estimate, progress=defense.progress
        )
        guess = {**compare(guess_before, guess_after), "config": estimate.to_dict()}
        new_card["estimate"] = guess
    purified.model.to("cpu")
    if out is not None:
        save_model(purified.model, out, new_card, force=force)
    return Defended(before, after, der_value, purified, new_card, guess)
