"""The toolkit's acceptance targets read off a results store — the confirmation grid's
(methods.md §12.1) — each with its number and whether it is met:

- images, per attack: the best default (the lowest mean ASR among those costing at most 2 test
  points) reaches ASR ≤ 0.05; one default reaches ASR ≤ 0.10 on each single-target attack
  (BadNets, Blended, SIG, WaNet at 10 %, all-to-one) at a mean cost ≤ 2 points;
- audio, per model, the mean over its attacks: the best default reaches ASR ≤ 0.20 at ≤ 2
  points; GN-FT's mean DER is above Fine-Pruning's and FT's; the blend is removed (ASR ≤ 0.10)
  by at least one default;
- each modality: no default rolled back by its guard on more than a quarter of its cells; on
  the clean models every default costs ≤ 1 test point; the estimate's false all-clears ≤ 5 % of
  the backdoored cells, false alarms on clean models ≤ 1, Spearman ρ ≥ 0.7 (methods.md §12.2);
- the estimate before purification at most the median defense's seconds on the same model
  (methods.md §12.2), and the check after against its defense;
- ``auto``: per attack its mean DER at least the best single default's; on clean models it
  costs nothing; its mean seconds; each run that left ASR > 0.10, with its choice and why.

Every number is a mean over the store's seeds (the latest run of each seed), as in the report;
the report (``torchpurify report``) shows the tables these come from. Nothing here chooses
anything: it reads a finished grid.

    PYTHONPATH=src python benchmarks/targets.py docs/results/confirm-image/results.db \\
        docs/results/confirm-audio/results.db [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from torchpurify.errors import UserError
from torchpurify.logs import AutoLog, parse_log
from torchpurify.report import (
    _latest_runs,
    _mean,
    _paired,
    estimate_points,
    false_alarms,
    false_all_clears,
    group_settings,
    guard_rows,
    modality,
    read_store,
    spearman,
)

COST = 2.0  # test points a default may spend on a backdoored model
CLEAN_COST = 1.0  # … and on a clean one
SINGLE_TARGET = ("badnets", "blended", "sig", "wanet")
AUTO = "auto"


@dataclass
class Target:
    modality: str
    name: str
    value: str
    met: bool | None  # None: not measurable on this store

    def line(self) -> str:
        mark = {True: "met", False: "MISSED", None: "n/a"}[self.met]
        return f"[{mark:>6}] {self.modality}: {self.name}: {self.value}"


def seed_means(setting, label: str) -> dict | None:
    """Mean over seeds of one label on one setting: test ΔACC (points), ASR and DER after."""
    runs = _paired(setting, label)
    if not runs:
        return None
    return {k: _mean([r[k] for r in runs]) for k in ("dacc", "asr", "der")} | {"n": len(runs)}


def _labels(settings) -> list[str]:
    return sorted({c["label"] for s in settings for c in s.cells})


def _name(setting) -> str:
    return f"{setting.model} / {setting.attack}" + (f" ({setting.details})" if setting.details
                                                    else "")  # fmt: skip


def _best(means: dict[str, dict], cost: float = COST) -> tuple[str, dict] | None:
    """The lowest mean ASR among the labels within ``cost`` points (auto left out)."""
    within = {k: m for k, m in means.items() if k != AUTO and m["dacc"] is not None
              and m["asr"] is not None and m["dacc"] >= -cost}  # fmt: skip
    if not within:
        return None
    label = min(within, key=lambda k: within[k]["asr"])
    return label, within[label]


def _lowest(means: dict[str, dict]) -> str:
    """The lowest mean ASR at any cost, for a missed target's line."""
    rest = {k: m for k, m in means.items() if k != AUTO and m["asr"] is not None}
    if not rest:
        return "no default ran"
    label = min(rest, key=lambda k: rest[k]["asr"])
    return f"lowest ASR at any cost: {label} {rest[label]['asr']:.3f} at {rest[label]['dacc']:+.1f}"


def _single_target(setting) -> bool:
    """BadNets, Blended, SIG or WaNet, all-to-one at the grid's 10 % poison rate."""
    row = (setting.models or setting.cells)[0]
    rate, mode = row["poison_rate"], row["target_mode"]
    return (setting.attack in SINGLE_TARGET and mode in (None, "all-to-one")
            and rate is not None and abs(rate - 0.1) < 1e-9)  # fmt: skip


def image_targets(settings) -> list[Target]:
    out = []
    backdoored = [s for s in settings if not s.clean]
    for s in backdoored:
        means = {label: m for label in _labels([s]) if (m := seed_means(s, label))}
        best = _best(means)
        if best is None:
            out.append(Target("images", f"{_name(s)}: best default ASR ≤ 0.05 at ≤ 2 points",
                              f"no default within 2 points; {_lowest(means)}", False))  # fmt: skip
            continue
        label, m = best
        value = f"{label} {m['asr']:.3f} at {m['dacc']:+.1f} (n={m['n']})"
        if m["asr"] > 0.05:
            value += f"; {_lowest(means)}"
        out.append(Target("images", f"{_name(s)}: best default ASR ≤ 0.05 at ≤ 2 points", value,
                          m["asr"] <= 0.05))  # fmt: skip
    four = [s for s in backdoored if _single_target(s)]
    if four:
        rows = []
        for label in _labels(four):
            if label == AUTO:
                continue
            means = [seed_means(s, label) for s in four]
            if any(m is None for m in means):
                continue
            worst = max(m["asr"] for m in means)
            cost = statistics.fmean(m["dacc"] for m in means)
            rows.append((worst > 0.10 or cost < -COST, worst, label, cost))
        rows.sort()
        attacks = "/".join(sorted({s.attack for s in four}))
        name = f"one default ASR ≤ 0.10 on every single-target attack ({attacks}) at ≤ 2 points"
        if rows:
            missed, worst, label, cost = rows[0]
            out.append(Target("images", name, f"{label}: worst ASR {worst:.3f}, mean "
                              f"{cost:+.1f}", not missed))  # fmt: skip
        else:
            out.append(Target("images", name, "no default ran on all of them", None))
    return out


def audio_targets(settings) -> list[Target]:
    out = []
    by_model: dict[str, list] = {}
    for s in settings:
        by_model.setdefault(s.model, []).append(s)
    for model, members in sorted(by_model.items()):
        backdoored = [s for s in members if not s.clean]
        if not backdoored:
            continue
        means: dict[str, dict] = {}
        for label in _labels(backdoored):
            per = [seed_means(s, label) for s in backdoored]
            if any(m is None for m in per):
                continue  # a mean over fewer attacks is not comparable
            means[label] = {k: statistics.fmean(m[k] for m in per if m[k] is not None)
                            for k in ("dacc", "asr", "der")} | {"n": len(per)}  # fmt: skip
        name = f"{model}, mean of {len(backdoored)} attacks: best default ASR ≤ 0.20 at ≤ 2 points"
        best = _best(means)
        if best is None:
            out.append(Target("audio", name, f"none within 2 points; {_lowest(means)}", False))
        else:
            label, m = best
            value = f"{label} {m['asr']:.3f} at {m['dacc']:+.1f}"
            if m["asr"] > 0.20:
                value += f"; {_lowest(means)}"
            out.append(Target("audio", name, value, m["asr"] <= 0.20))
        ders = {k: means[k]["der"] for k in ("gnft", "fine-pruning", "ft") if k in means}
        if len(ders) == 3:
            out.append(Target(
                "audio", f"{model}: GN-FT's mean DER above Fine-Pruning's and FT's",
                ", ".join(f"{k} {v:.3f}" for k, v in ders.items()),
                ders["gnft"] > max(ders["fine-pruning"], ders["ft"]),
            ))  # fmt: skip
        for s in backdoored:
            if s.attack != "blend":
                continue
            blend = {label: m for label in _labels([s]) if label != AUTO
                     and (m := seed_means(s, label))}  # fmt: skip
            if blend:
                label = min(blend, key=lambda k: blend[k]["asr"])
                m = blend[label]
                out.append(Target("audio", f"{model}: the blend removed (ASR ≤ 0.10) by a default",
                                  f"{label} {m['asr']:.3f} at {m['dacc']:+.1f}",
                                  m["asr"] <= 0.10))  # fmt: skip
    return out


def modality_targets(of: str, settings, cells: list[dict]) -> list[Target]:
    out = []
    rows = guard_rows(cells).get(of, [])
    guarded = [r for r in rows if r["guarded"]]
    if guarded:
        worst = max(guarded, key=lambda r: r["rolled_back"] / r["guarded"])
        out.append(Target(
            of, "no default rolled back on more than a quarter of its cells",
            ", ".join(f"{r['label']} {r['rolled_back']}/{r['guarded']}" for r in guarded),
            worst["rolled_back"] <= 0.25 * worst["guarded"],
        ))  # fmt: skip
    for s in (s for s in settings if s.clean):
        costs = {label: m["dacc"] for label in _labels([s])
                 if (m := seed_means(s, label)) and m["dacc"] is not None}  # fmt: skip
        if costs:
            out.append(Target(
                of, f"{s.model} clean model: every default costs ≤ 1 test point",
                ", ".join(f"{k} {v:+.1f}" for k, v in sorted(costs.items())),
                min(costs.values()) >= -CLEAN_COST,
            ))  # fmt: skip
    points = [p for p in estimate_points(cells) if p["modality"] == of]
    if points:
        k, n = false_all_clears(points)
        out.append(Target(of, "false all-clears ≤ 5 % of backdoored cells", f"{k} of {n}",
                          k <= 0.05 * n))  # fmt: skip
        rho = spearman(points)
        out.append(Target(of, "Spearman ρ of estimated and true ASR after ≥ 0.7",
                          "–" if rho is None else f"{rho:.3f} over {n} cells",
                          None if rho is None else rho >= 0.7))  # fmt: skip
    flagged, clean = false_alarms(cells, of)
    if clean:
        out.append(Target(of, "false alarms on clean models (before) ≤ 1", f"{flagged} of {clean}",
                          flagged <= 1))  # fmt: skip
    return out


def cost_targets(of: str, cells: list[dict]) -> list[Target]:
    """The estimate's cost against the defenses': per model, the estimate before purification
    ÷ the median seconds of the defenses run on it (``auto`` left out, as it runs the estimate
    itself), and per cell the check after ÷ that defense's seconds; medians over models and
    cells."""
    by_model: dict[str, list[dict]] = {}
    for c in cells:
        if c["label"] != AUTO and c.get("estimate") and c["seconds"]:
            by_model.setdefault(c["model_key"], []).append(c)
    before, after = [], []
    for rows in by_model.values():
        spent = [(r["estimate"].get("before") or {}).get("seconds") for r in rows]
        spent = [v for v in spent if v is not None]
        defense = statistics.median(r["seconds"] for r in rows)
        if spent and defense > 0:
            before.append(statistics.median(spent) / defense)
        for r in rows:
            seconds = (r["estimate"].get("after") or {}).get("seconds")
            if seconds is not None:
                after.append(seconds / r["seconds"])
    if not before:
        return []
    return [
        Target(of, "the estimate before ÷ the median defense on the same model ≤ 1",
               f"median {statistics.median(before):.2f} (range {min(before):.2f}–"
               f"{max(before):.2f}) over {len(before)} models",
               statistics.median(before) <= 1.0),
        Target(of, "the check after ÷ its defense", f"median {statistics.median(after):.2f} "
               f"over {len(after)} cells", None),
    ]  # fmt: skip


def auto_targets(of: str, settings) -> list[Target]:
    out, seconds = [], []
    for s in settings:
        if AUTO not in _labels([s]):
            continue
        seconds += [c["seconds"] for c in _latest_runs(s.cells)
                    if c["label"] == AUTO and c["seconds"] is not None]  # fmt: skip
        mine = seed_means(s, AUTO)
        if s.clean:
            out.append(Target(of, f"auto on the clean {s.model}: costs nothing",
                              f"{mine['dacc']:+.1f} points", mine["dacc"] == 0.0))  # fmt: skip
            continue
        others = {label: m for label in _labels([s]) if label != AUTO
                  and (m := seed_means(s, label)) and m["der"] is not None}  # fmt: skip
        if others and mine["der"] is not None:
            best = max(others, key=lambda k: others[k]["der"])
            out.append(Target(
                of, f"{_name(s)}: auto's mean DER ≥ the best single default's",
                f"auto {mine['der']:.3f}, {best} {others[best]['der']:.3f}",
                mine["der"] >= others[best]["der"] - 1e-9,
            ))  # fmt: skip
        for c in _latest_runs(s.cells):
            if c["label"] != AUTO or c["asr_after"] is None or c["asr_after"] <= 0.10:
                continue
            log = parse_log(c["log"])
            chosen = getattr(log, "chosen", None) if isinstance(log, AutoLog) else None
            stopped = (log.auto or {}).get("stopped", "") if isinstance(log, AutoLog) else ""
            out.append(Target(of, f"{_name(s)} seed {c['seed']}: auto left ASR "
                              f"{c['asr_after']:.3f}", f"chose {chosen or 'nothing'}; {stopped}",
                              None))  # fmt: skip
    if seconds:
        out.append(Target(of, "auto's mean seconds", f"{statistics.fmean(seconds):.0f} s over "
                          f"{len(seconds)} runs", None))  # fmt: skip
    return out


def targets(models: list[dict], cells: list[dict]) -> list[Target]:
    """Every target measurable on one store's rows."""
    settings = group_settings(models, cells)
    out = []
    for of in sorted({modality(c) for c in cells}):
        mine = [s for s in settings if s.cells and modality(s.cells[0]) == of]
        out += image_targets(mine) if of == "images" else audio_targets(mine)
        out += modality_targets(of, mine, [c for c in cells if modality(c) == of])
        out += cost_targets(of, [c for c in cells if modality(c) == of])
        out += auto_targets(of, mine)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stores", nargs="+", type=Path, help="results stores (results.db)")
    parser.add_argument("--json", type=Path, help="also write the targets as JSON here")
    args = parser.parse_args()
    found = []
    try:
        for db in args.stores:
            models, cells = read_store(db)
            print(f"# {db}: {len(cells)} cells, seeds "
                  f"{', '.join(map(str, sorted({c['seed'] for c in cells})))}")  # fmt: skip
            for target in targets(models, cells):
                print(target.line())
                found.append({"store": str(db), **asdict(target)})
    except UserError as error:
        parser.exit(2, f"targets.py: error: {error}\n")
    if args.json:
        args.json.write_text(json.dumps(found, indent=1), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
