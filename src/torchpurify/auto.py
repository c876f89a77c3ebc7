"""``purify --defense auto`` (issue 28 item 3, methods.md §12.2): the defender-side estimate
chooses whether to purify and, by the trigger family it suspects, which defenses to try.

1. The estimate (:func:`torchpurify.estimate.estimate_before`, every family of its
   ``families``) runs on the defender's *selection* holdout — the half every selection rule
   reads; the guard's half stays the guard's (methods.md §0).
2. Nothing suspected: the model comes back unchanged, and the log says so (a clean model costs
   nothing but the estimate).
3. Suspected: the defenses of :data:`ORDER` for the suspected family are tried in turn, each at
   its defaults, each under its own guard. After each, the estimate's after-check re-checks
   the suspected label of every family that suspected a backdoor. The first result that the
   guard kept and whose after-estimate no longer suspects a backdoor (estimated ASR < 0.5) is
   returned; if none, the kept result with the lowest estimated ASR after (ties: the highest
   guard holdout accuracy); if the guard rolled every one back, the input model.

``log["auto"]`` records the estimate before, every defense tried (its guard's action and holdout
accuracy, its estimate after, its seconds), the chosen defense and why the search stopped.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from torchpurify.checks import default
from torchpurify.defenses import DEFENSES, Clean, Defense, Purified
from torchpurify.defenses import build_defense as build_registered
from torchpurify.defenses.base import build_checked, takes_shared_settings
from torchpurify.errors import check
from torchpurify.estimate import (
    Estimate,
    EstimateConfig,
    compare,
    describe_change,
    estimate_after,
    estimate_before,
)
from torchpurify.train import Cost, console, resolve_device

AUTO = "auto"
SUMMARY = (
    "run the backdoor estimate; if it suspects a backdoor, try the defenses its trigger family "
    "suggests until it no longer does (clean: the model unchanged)"
)
# Which defenses to try, in order, for each family the estimate can suspect (methods.md §12.14):
# chosen on the development cells of configs/dev-image-sweep*.yaml (small-cnn seed 100) and
# configs/dev-audio-sweep.yaml (kws-cnn seed 100) by what a defender sees — the guard kept the
# result and the estimate's after-check (size test included) no longer suspects a backdoor —
# cheapest first, with BTI-DBF(U), the one defense that cleared all three image triggers
# (BadNets, Blended, WaNet: guard -0.8, -0.8, +0.3 points), as each family's fallback:
# mask (BadNets) — ℓ∞ pruning cleared it at 0.0 points; perturbation (Blended on images, the
# pitch-style kws-cnn) — GN-FT cleared the pitch-style one at -1.0 (on the Blended image model
# the generator family still suspects it after GN-FT, so BTI-DBF follows); generator (WaNet, and
# the Blended models of seeds 101-102) — FT-SAM cleared WaNet at -0.3 (not Blended: BTI-DBF).
ORDER: dict[str, tuple[str, ...]] = {
    "mask": ("linf-pruning", "bti-dbf"),
    "perturbation": ("gnft", "bti-dbf"),
    "generator": ("ft-sam", "bti-dbf"),
}
ORDER_SOURCE = (
    "dev: configs/dev-image-sweep.yaml, -2.yaml and -3.yaml (four small-cnn, seed 100) and "
    "configs/dev-audio-sweep.yaml (kws-cnn, seed 100): per family the defenses the guard kept "
    "and the after-check cleared, cheapest first, BTI-DBF(U) last; empty, the family's ORDER "
    "(methods.md §12.14); re-read at the defaults re-chosen in §12.15 (images parts 4-5, "
    "audio part 2): the same order"
)
ROLLED_BACK = "rolled back to the input model"


@takes_shared_settings  # Auto(seed=1) as a registered defense takes it
@dataclass
class Auto(Defense):
    """Estimate, then purify only if a backdoor is suspected (module docstring). ``order``:
    defenses to try instead of the suspected family's :data:`ORDER` (comma-separated names;
    empty: by family); ``settings``: hyper-parameters per defense name
    (``{"ft": {"epochs": 5}}``). Device, seed, guard budget and retries pass to every defense
    tried. The estimate's settings are ``estimate_config`` (default ``EstimateConfig()``)."""

    name: ClassVar[str] = AUTO
    summary: ClassVar[str] = SUMMARY
    estimate_config: ClassVar[EstimateConfig | None] = None  # set per instance by the caller

    order: str = default("", ORDER_SOURCE)
    settings: dict = field(
        default_factory=dict, metadata={"source": "run setting: each defense at its defaults"}
    )

    def validate(self) -> None:
        for name in self.tried_names("mask"):
            check(name in DEFENSES.names(), f"auto: order names an unknown defense {name!r}")
        for name, values in self.settings.items():
            check(
                name in DEFENSES.names() and isinstance(values, dict),
                f"auto: settings must map defense names to settings, got {name!r}",
            )

    def tried_names(self, family: str) -> list[str]:
        if self.order.strip():
            return [name.strip() for name in self.order.split(",") if name.strip()]
        return list(ORDER[family])

    def build(self, name: str) -> Defense:
        return build_registered(
            name, device=self.device, seed=self.seed, progress=self.progress,
            max_acc_drop=self.max_acc_drop, guard_retries=self.guard_retries,
            **self.settings.get(name, {}),
        )  # fmt: skip

    def purify(self, model: nn.Module, clean: Clean) -> Purified:
        started = time.perf_counter()
        config = self.estimate_config or EstimateConfig()
        device = resolve_device(self.device)
        holdout = clean.for_selection(self.seed).holdout  # the guard's half stays unread
        say = console.print if self.progress else (lambda *_: None)
        before = estimate_before(model, holdout, config, device=device, progress=self.progress)
        model.to("cpu")
        record: dict[str, Any] = {
            "estimate_before": before.to_dict(),
            "suspected": before.flagged,
            "family": before.family,
            "label": before.label,
            "estimate_holdout": len(holdout),
            "order": [],
            "tried": [],
            "chosen": None,
        }
        cost = Cost()
        if not before.flagged:
            record["stopped"] = (
                f"nothing suspected (highest estimated ASR {before.est_asr:.3f}, "
                f"{before.family} family): the model is returned unchanged"
            )
            say(f"auto: {record['stopped']}")
            cost.seconds = time.perf_counter() - started
            return Purified(copy.deepcopy(model).eval(), {"auto": record}, cost)
        order = self.tried_names(before.family)
        record["order"] = order
        say(
            f"auto: {before.family} family suspects label {before.label} (estimated ASR "
            f"{before.est_asr:.3f}); trying {', '.join(order)}"
        )
        results: list[tuple[Purified, Estimate, dict[str, Any]]] = []
        chosen = None
        for name in order:
            result = self.build(name).purify(model, clean)
            cost.forward += result.cost.forward
            cost.backward += result.cost.backward
            guard = result.log.get("guard", {})
            kept = guard.get("action", "kept") != ROLLED_BACK
            accuracies = [a["holdout_acc"] for a in guard.get("attempts", [])]
            acc = accuracies[-1] if kept and accuracies else guard.get("holdout_acc_input")
            after = estimate_after(
                result.model, holdout, before, config, device=device, progress=self.progress
            )
            result.model.to("cpu")
            trial = {
                "defense": name,
                "guard": guard.get("action"),
                "holdout_acc": acc,
                "est_asr_after": after.est_asr,
                "reading_after": after.reading,
                "estimate_after": after.to_dict(),
                "seconds": round(result.cost.seconds + after.seconds, 2),
            }
            record["tried"].append(trial)
            say(
                f"auto: {name}: guard {trial['guard']}, holdout ACC "
                f"{'–' if acc is None else f'{acc:.3f}'}, estimated ASR after {after.est_asr:.3f}"
            )
            results.append((result, after, trial))
            if kept and not after.flagged:
                chosen = (result, after, trial)
                record["stopped"] = (
                    f"{name}: the guard kept it and the estimate no longer suspects a backdoor "
                    f"(estimated ASR {before.est_asr:.3f} → {after.est_asr:.3f})"
                )
                break
        if chosen is None:
            candidates = [r for r in results if r[2]["guard"] != ROLLED_BACK]
            if candidates:
                chosen = min(candidates, key=lambda r: (r[1].est_asr, -(r[2]["holdout_acc"] or 0)))
                record["stopped"] = (
                    f"no defense tried took the estimated ASR below 0.5: kept the best one, "
                    f"{chosen[2]['defense']} (estimated ASR {chosen[1].est_asr:.3f})"
                )
        cost.seconds = time.perf_counter() - started
        if chosen is None:
            record["stopped"] = "the guard rolled back every defense tried: the input model"
            say(f"auto: {record['stopped']}")
            return Purified(copy.deepcopy(model).eval(), {"auto": record}, cost)
        result, after, trial = chosen
        record["chosen"] = trial["defense"]
        record["estimate_after"] = after.to_dict()
        say(f"auto: chose {trial['defense']}: {record['stopped']}")
        return Purified(result.model, {**result.log, "auto": record}, cost)


def build_defense(name: str, **params: Any) -> Defense:
    """:func:`torchpurify.defenses.build_defense`, and ``"auto"`` (:class:`Auto`)."""
    if name != AUTO:
        return build_registered(name, **params)
    return build_checked(Auto, AUTO, **params)


def with_estimate(defense: Defense, config: EstimateConfig | None) -> Defense:
    """``defense`` with the estimate's settings, when it is :class:`Auto` (else unchanged)."""
    if isinstance(defense, Auto) and config is not None:
        defense.estimate_config = config
    return defense


def estimate_record(log: dict[str, Any]) -> dict[str, Any] | None:
    """The card's ``estimate`` record (:func:`torchpurify.estimate.compare` and a ``summary``)
    from an :class:`Auto` run's log: the estimate before and that of the result returned (the
    same estimate when the model came back unchanged); None for another defense's log."""
    record = log.get("auto")
    if record is None:
        return None
    before = Estimate.from_dict(record["estimate_before"])
    after = Estimate.from_dict(record.get("estimate_after") or record["estimate_before"])
    return {
        **compare(before, after),
        "summary": describe_change(before, after),
        "holdout": "selection",
        "chosen": record["chosen"],
    }


def describe(log: dict[str, Any]) -> str | None:
    """One line: what ``auto`` tried and why it stopped; None for another defense's log."""
    record = log.get("auto")
    if record is None:
        return None
    tried = ", ".join(
        f"{t['defense']} ({t['guard']}, estimated ASR {t['est_asr_after']:.3f})"
        for t in record["tried"]
    )
    chosen = record["chosen"] or "none (the input model)"
    return f"auto: chose {chosen}; tried {tried or 'nothing'}; {record['stopped']}"
