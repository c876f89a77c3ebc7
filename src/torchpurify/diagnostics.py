"""Research diagnostics: how well each neuron score finds backdoor neurons, and the plots that
reproduce the papers' observations (methods.md §3, §4, §5, §7, §8).

Unlike a defense, a diagnostic may use the attack's true trigger: it measures a method, it does
not purify a model. Every result says which trigger it used (``"true"``, ``"inverted"`` or
``"none"``). Nothing here changes the model it is given.

Ground truth (§8): the ``k`` channels of the neuron layer whose mean activation rises most when
the true trigger is applied. On a post-ReLU layer the ℓ1 norm equals the mean, so ``l1-bias``
with the true trigger *is* the ground-truth score (AUC 1 by construction); compare the bias
rules with an inverted trigger to learn something about them.
"""

from __future__ import annotations

import copy
import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.stats import mannwhitneyu
from torch import nn

from torchpurify.data.base import Split
from torchpurify.defenses.pruning import prune_first
from torchpurify.errors import UserError, check
from torchpurify.metrics import evaluate
from torchpurify.neurons import (
    ActivationStats,
    BenignSalience,
    Inversion,
    activation_stats,
    default_neuron_layer,
    invert_triggers,
    layer_info,
    neuron_groups,
    producer_of,
    weight_gradient_norms,
)
from torchpurify.neurons.inversion import value_range_of
from torchpurify.neurons.layers import model_device

Trigger = Callable[[torch.Tensor], torch.Tensor]

RULES = (
    "mean-activation",
    "linf-bias",
    "l1-bias",
    "l2-bias",
    "salience-low",
    "salience-high",
    "gradient-norm",
)
NORMS = ("mean", "l1", "l2", "linf")
TABLE_KEYS = (
    "layer", "channel", "group", "backdoor", "trigger",
    *(f"{side}_{norm}" for norm in NORMS for side in ("clean", "triggered")),
    *(f"{norm}_bias" for norm in NORMS),
    "salience", "grad_norm_clean", "grad_norm_triggered",
)  # fmt: skip
GROUP_ORDER = ("backdoored", "hybrid", "clean", "dormant")
DPI = 120


# ----------------------------------------------------------------------------- ranking metrics


def _as_arrays(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(torch.as_tensor(scores, dtype=torch.float64).cpu(), dtype=np.float64)
    labels = np.asarray(torch.as_tensor(labels).cpu()).astype(bool)
    check(
        scores.ndim == 1 and scores.shape == labels.shape,
        f"scores and labels must be 1-D and of equal length, got {scores.shape} and {labels.shape}",
    )
    check(bool(np.isfinite(scores).all()), "scores contain NaN or infinity; check the model")
    return scores, labels


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counting one half (scipy's Mann–Whitney U over positives × negatives)."""
    scores, labels = _as_arrays(scores, labels)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    check(
        positives > 0 and negatives > 0,
        f"ROC-AUC needs positives and negatives, got {positives} and {negatives}",
    )
    u = mannwhitneyu(scores[labels], scores[~labels], method="asymptotic").statistic
    return float(u / (positives * negatives))


def precision_at_k(scores, labels, k: int) -> float:
    """Fraction of positives among the ``k`` highest scores. Ties at the cut are shared: the
    expected precision when tied channels are ordered at random, so ties favour no one."""
    scores, labels = _as_arrays(scores, labels)
    check(
        isinstance(k, int) and 1 <= k <= len(scores),
        f"k must be an integer in 1..{len(scores)}, got {k!r}",
    )
    cut = np.sort(scores)[::-1][k - 1]
    above, tied = scores > cut, scores == cut
    slots = k - int(above.sum())
    hits = labels[above].sum() + labels[tied].sum() * slots / tied.sum()
    return float(hits / k)


# ----------------------------------------------------------------------------- measurements


def _resolve_layer(model: nn.Module, holdout: Split, layer: str | None) -> str:
    check(
        isinstance(holdout, Split) and len(holdout) > 0,
        "holdout must be a non-empty Split of clean samples",
    )
    layer = layer or default_neuron_layer(model, holdout.x[:2])
    layer_info(model, layer, holdout.x[:2])  # a UserError for an unknown or channel-less layer
    return layer


def _stats(model, layer, holdout, trigger, batch_size) -> tuple[ActivationStats, ActivationStats]:
    """Clean and triggered activation statistics of ``layer`` on the holdout."""
    clean = activation_stats(model, layer, holdout, batch_size=batch_size)
    triggered = activation_stats(model, layer, holdout, transform=trigger, batch_size=batch_size)
    return clean, triggered


def _default_k(channels: int, k: int | None) -> int:
    k = max(1, channels // 10) if k is None else k
    check(
        isinstance(k, int) and 1 <= k < channels,
        f"k must be an integer in 1..{channels - 1} (the layer has {channels} channels), got {k!r}",
    )
    return k


def _ground_truth(clean: ActivationStats, triggered: ActivationStats, k: int) -> torch.Tensor:
    """Boolean flag per channel: among the top k by triggered − clean mean activation (§8)."""
    rise = triggered.mean - clean.mean
    flags = torch.zeros(len(rise), dtype=torch.bool)
    flags[rise.argsort(descending=True, stable=True)[:k]] = True
    return flags


def _salience(model, holdout, producer, batch_size) -> torch.Tensor:
    """Benign salience of the producer's output channels after a warm-up pass on the holdout."""
    tracker = BenignSalience([producer]).warm_up(model, holdout, batch_size)
    return tracker.neuron_salience(producer).float().cpu()


def neuron_identification(
    model: nn.Module,
    holdout: Split,
    trigger: Trigger,
    *,
    layer: str | None = None,
    k: int | None = None,
    inverted_trigger: Trigger | None = None,
    batch_size: int = 128,
) -> dict:
    """ROC-AUC and precision@k of every scoring rule against the true-trigger ground truth (§8).

    Each rule ranks the neuron layer's channels, higher = more suspicious: ``mean-activation``
    (Fine-Pruning: low clean activation), ``linf-``/``l1-``/``l2-bias`` (Cheng et al.: norm on
    triggered minus clean inputs, with ``inverted_trigger`` when given, else the true one),
    ``salience-low``/``-high`` (Fan et al.: benign salience of the producing conv, either end),
    ``gradient-norm`` (Zhou et al.: per-channel weight-gradient norm on the clean holdout).
    ``k`` defaults to a tenth of the channels. The result is JSON-able.
    """
    layer = _resolve_layer(model, holdout, layer)
    producer = producer_of(model, layer, holdout.x[:2])
    clean, triggered = _stats(model, layer, holdout, trigger, batch_size)
    k = _default_k(len(clean.mean), k)
    truth = _ground_truth(clean, triggered, k)
    if inverted_trigger is None:
        inspected, bias_trigger = triggered, "true"
    else:
        inspected = activation_stats(
            model, layer, holdout, transform=inverted_trigger, batch_size=batch_size
        )
        bias_trigger = "inverted"
    salience = _salience(model, holdout, producer, batch_size)
    scores = {
        "mean-activation": (-clean.mean, "none"),
        **{
            f"{n}-bias": (getattr(inspected, n) - getattr(clean, n), bias_trigger)
            for n in NORMS[1:]
        },
        "salience-low": (-salience, "none"),
        "salience-high": (salience, "none"),
        "gradient-norm": (
            weight_gradient_norms(model, holdout, [producer], batch_size=batch_size)[producer],
            "none",
        ),
    }
    rules = {
        name: {
            "auc": roc_auc(scores[name][0], truth),
            "precision_at_k": precision_at_k(scores[name][0], truth, k),
            "trigger": scores[name][1],
        }
        for name in RULES
    }
    return {
        "layer": layer,
        "producer": producer,
        "channels": len(truth),
        "k": k,
        "samples": len(holdout),
        "ground_truth_trigger": "true",
        "ground_truth": truth.nonzero().flatten().tolist(),
        "bias_trigger": bias_trigger,
        "rules": rules,
    }


def neuron_table(
    model: nn.Module,
    holdout: Split,
    trigger: Trigger,
    *,
    layer: str | None = None,
    z: float = 1.0,
    k: int | None = None,
    batch_size: int = 128,
) -> list[dict]:
    """One row per channel of the neuron layer (keys: :data:`TABLE_KEYS`), all with the true
    trigger: clean and triggered mean/ℓ1/ℓ2/ℓ∞ and their biases, benign salience, the producing
    conv's weight-gradient norm on clean and on triggered batches, the GN-FT group
    (:func:`~torchpurify.neurons.neuron_groups` with threshold ``z``) and the ground-truth flag.

    Triggered batches keep their true labels: the loss a defender fine-tuning on them would
    descend, large exactly where the backdoor overrides the true class.
    """
    layer = _resolve_layer(model, holdout, layer)
    producer = producer_of(model, layer, holdout.x[:2])
    clean, triggered = _stats(model, layer, holdout, trigger, batch_size)
    truth = _ground_truth(clean, triggered, _default_k(len(clean.mean), k))
    salience = _salience(model, holdout, producer, batch_size)
    gradients = {
        side: weight_gradient_norms(
            model, holdout, [producer], transform=transform, batch_size=batch_size
        )[producer]
        for side, transform in (("clean", None), ("triggered", trigger))
    }
    groups = neuron_groups(clean, triggered, z=z)
    rows = []
    for c in range(len(truth)):
        row = {"layer": layer, "channel": c, "group": groups[c], "backdoor": bool(truth[c])}
        row["trigger"] = "true"  # the attack's own, for every triggered column
        for norm in NORMS:
            row[f"clean_{norm}"] = float(getattr(clean, norm)[c])
            row[f"triggered_{norm}"] = float(getattr(triggered, norm)[c])
        for norm in NORMS:
            row[f"{norm}_bias"] = row[f"triggered_{norm}"] - row[f"clean_{norm}"]
        row["salience"] = float(salience[c])
        row["grad_norm_clean"] = float(gradients["clean"][c])
        row["grad_norm_triggered"] = float(gradients["triggered"][c])
        rows.append({key: row[key] for key in TABLE_KEYS})
    return rows


def pruning_curve(
    model: nn.Module,
    holdout: Split,
    trigger: Trigger,
    target: int,
    *,
    layer: str | None = None,
    order: str | Sequence[int] | torch.Tensor = "mean-activation",
    steps: int | None = None,
    mode: str = "all-to-one",
    batch_size: int = 256,
) -> list[dict]:
    """Holdout ACC and true-trigger ASR after pruning the first k channels of ``order``, at
    ``steps`` (default 20) evenly spaced k from 0 to all channels: the research curve of
    Fine-Pruning (§2, step 4). ``order`` is ``"mean-activation"`` (increasing clean mean, the
    paper's), ``"linf-bias"`` (decreasing ℓ∞ bias with the true trigger: an oracle) or explicit
    channel indices. Works on a copy: ``model`` and its masks are left as they were.
    """
    layer = _resolve_layer(model, holdout, layer)
    steps = 20 if steps is None else steps
    check(isinstance(steps, int) and steps >= 2, f"steps must be an integer ≥ 2, got {steps!r}")
    clean = activation_stats(model, layer, holdout, batch_size=batch_size)
    channels = len(clean.mean)
    if isinstance(order, str):
        if order == "mean-activation":
            ranking = clean.mean.argsort(stable=True)
        elif order == "linf-bias":
            triggered = activation_stats(
                model, layer, holdout, transform=trigger, batch_size=batch_size
            )
            ranking = (triggered.linf - clean.linf).argsort(descending=True, stable=True)
        else:
            raise UserError(f"order must be mean-activation, linf-bias or indices, got {order!r}")
        name = order
    else:
        ranking = torch.as_tensor(order, dtype=torch.long).flatten()
        check(
            sorted(ranking.tolist()) == list(range(channels)),
            f"an explicit order must list each of the {channels} channels once",
        )
        name = "custom"
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        num_classes = int(pruned.eval()(holdout.x[:1].to(model_device(pruned))).shape[1])
    curve = []
    for k in sorted({round(i * channels / (steps - 1)) for i in range(steps)}):
        prune_first(pruned, layer, ranking, k)
        metrics = evaluate(
            pruned, holdout, trigger, target=target, mode=mode,
            num_classes=num_classes, batch_size=batch_size,
        )  # fmt: skip
        curve.append(
            {"layer": layer, "order": name, "trigger": "true", "k": k,
             "fraction": k / channels, "acc": metrics.acc, "asr": metrics.asr}
        )  # fmt: skip
    return curve


# ----------------------------------------------------------------------------- trigger inversion


def inversion_summary(inversion: Inversion) -> dict:
    """A JSON-able account of a Neural-Cleanse inversion (§7): the suspected target (None when
    no label is a low outlier that works), the most anomalous label, and per label the anomaly
    index, mask ℓ1 norm and success rate of its inverted trigger."""
    most = inversion.labels[int(inversion.anomaly_index.argmax())]
    return {
        "trigger": "inverted",
        "target": inversion.target,
        "most_anomalous": most,
        "labels": [
            {"label": label, "anomaly_index": float(index), "mask_norm": float(norm),
             "success": float(rate)}
            for label, index, norm, rate in zip(
                inversion.labels, inversion.anomaly_index, inversion.mask_norms,
                inversion.success, strict=True,
            )
        ],
    }  # fmt: skip


def detect(
    model: nn.Module,
    holdout: Split,
    *,
    steps: int = 300,
    batch_size: int = 64,
    seed: int = 0,
    value_range: tuple[float, float] | None = None,
    progress: bool = False,
) -> dict:
    """Is the model backdoored, and towards which label? Neural-Cleanse trigger inversion on the
    clean holdout (§7; no trigger knowledge). ``value_range`` defaults to (0, 1) for images and
    (-1, 1) for data with negative values. Returns :func:`inversion_summary` plus the settings."""
    check(
        isinstance(holdout, Split) and len(holdout) > 0,
        "holdout must be a non-empty Split of clean samples",
    )
    value_range = value_range_of(holdout.x) if value_range is None else tuple(value_range)
    inversion = invert_triggers(
        model, holdout, steps=steps, batch_size=batch_size, seed=seed, value_range=value_range,
        progress=progress,
    )  # fmt: skip
    settings = {"steps": steps, "batch_size": batch_size, "seed": seed}
    return {**inversion_summary(inversion), **settings, "value_range": list(value_range)}


# ----------------------------------------------------------------------------- output


def write_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """Write dict rows as CSV (columns in first-seen order; lists as JSON); return the path."""
    check(len(rows) > 0, "no rows to write; the table is empty")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()}
            )
    return path


def _figure(panels: int = 1, width: float = 5.0):
    """A new figure outside pyplot: no global state, no display needed, the user's open
    figures untouched (pyplot's backend switch would close them)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * panels, 4.0), layout="constrained")
    return figure, figure.subplots(1, panels, squeeze=False)[0]


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


def _require(rows: Sequence[dict], keys: Sequence[str], what: str) -> None:
    check(len(rows) > 0, f"the {what} is empty; nothing to plot")
    missing = [key for key in keys if key not in rows[0]]
    check(not missing, f"the {what} lacks {', '.join(missing)}; pass the output of {what}()")


def plot_bias(table: Sequence[dict], path: str | Path) -> Path:
    """ℓ∞ bias against ℓ1 bias per neuron, ground-truth backdoor neurons highlighted: Cheng et
    al.'s observation is that a trigger moves the activation peak far more than the mean."""
    _require(table, ("l1_bias", "linf_bias", "backdoor", "layer", "trigger"), "neuron_table")
    figure, (axis,) = _figure()
    for flag, colour, label in ((False, "0.6", "other neurons"), (True, "C3", "backdoor neurons")):
        rows = [row for row in table if row["backdoor"] == flag]
        axis.scatter(
            [row["l1_bias"] for row in rows], [row["linf_bias"] for row in rows],
            s=28 if flag else 14, c=colour, label=f"{label} ({len(rows)})",
            edgecolors="k" if flag else "none", linewidths=0.5, zorder=3 if flag else 2,
        )  # fmt: skip
    values = [row[key] for row in table for key in ("l1_bias", "linf_bias")]
    low, high = min(values), max(values)
    axis.plot([low, high], [low, high], "k--", lw=0.8, label="ℓ∞ bias = ℓ1 bias")
    axis.set_xlabel("ℓ1 bias (mean |A|, triggered − clean)")
    axis.set_ylabel("ℓ∞ bias (mean peak A, triggered − clean)")
    axis.set_title(
        f"Activation bias per neuron, {table[0]['layer']} ({table[0]['trigger']} trigger)"
    )
    axis.legend(fontsize="small")
    return _save(figure, path)


def plot_gradient_groups(table: Sequence[dict], path: str | Path) -> Path:
    """Weight-gradient norm per neuron group, on triggered and on clean batches (two panels):
    Zhou et al.'s observation is backdoored > hybrid > clean on triggered inputs."""
    keys = ("group", "grad_norm_triggered", "grad_norm_clean", "layer", "trigger")
    _require(table, keys, "neuron_table")
    groups = [g for g in GROUP_ORDER if any(row["group"] == g for row in table)]
    figure, axes = _figure(panels=2, width=4.5)
    jitter = np.random.default_rng(0)
    for axis, key, batches in zip(
        axes, ("grad_norm_triggered", "grad_norm_clean"), ("triggered", "clean"), strict=True
    ):
        values = [[row[key] for row in table if row["group"] == g] for g in groups]
        axis.boxplot(values, showfliers=False, widths=0.5, medianprops={"color": "k"})
        for i, group_values in enumerate(values, start=1):
            spread = jitter.uniform(-0.15, 0.15, len(group_values))
            axis.scatter(i + spread, group_values, s=10, alpha=0.6, zorder=3)
        axis.set_xticks(
            range(1, len(groups) + 1),
            [f"{g}\n({len(v)})" for g, v in zip(groups, values, strict=True)],
        )
        axis.set_title(f"{batches} batches")
        axis.set_ylabel("weight-gradient norm per neuron")
    figure.suptitle(
        f"Gradient norm by neuron group, {table[0]['layer']} ({table[0]['trigger']} trigger)"
    )
    return _save(figure, path)


def plot_pruning_curve(curve: Sequence[dict], path: str | Path) -> Path:
    """Holdout ACC and ASR against the number of channels pruned (:func:`pruning_curve`)."""
    _require(curve, ("k", "acc", "asr", "order", "layer", "trigger"), "pruning_curve")
    figure, (axis,) = _figure()
    ks = [row["k"] for row in curve]
    axis.plot(ks, [row["acc"] for row in curve], "o-", ms=3, label="holdout ACC")
    axis.plot(
        ks, [row["asr"] for row in curve], "s-", ms=3, label=f"ASR ({curve[0]['trigger']} trigger)"
    )
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel(f"channels of {curve[0]['layer']} pruned")
    axis.set_ylabel("rate on holdout")
    axis.set_title(f"Pruning curve on the holdout ({curve[0]['order']} order)")
    axis.legend(fontsize="small")
    return _save(figure, path)
