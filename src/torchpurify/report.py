"""The results report (design.md: store → report): the tables and plots of a results store as
``report.md`` with its figures beside it, and as ``report.html``, one self-contained page.

The store is only read (a :class:`~torchpurify.store.Store` opened read-only). Numbers are the
mean ± sample standard deviation over seeds; a seed run more than once counts once, with its
latest record. The report is built once as a list of blocks (headings, tables, figures, notes)
and rendered twice, so the Markdown and the HTML say the same thing.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from torchpurify.diagnostics import (
    RULES,
    _figure,
    _save,
    plot_gradient_groups,
    plot_pruning_curve,
)
from torchpurify.errors import UserError, check
from torchpurify.logs import AutoLog, DefenseLog, parse_log
from torchpurify.outputs import check_output, staged_output
from torchpurify.store import Store

NO_DEFENSE = "no defense"
FIGURES = "figures"


# ----------------------------------------------------------------------------- reading the store


def read_store(db: Path) -> tuple[list[dict], list[dict]]:
    """The ``models`` and ``cells`` rows of a results store, JSON columns decoded."""
    with Store(db, readonly=True) as store:
        models, cells = store.models(), store.cells()
    check(len(models) > 0, f"{db} holds no models yet; run an experiment before reporting")
    return models, cells


# ----------------------------------------------------------------------------- grouping


@dataclass
class Setting:
    """One dataset × model × attack configuration: its models (one per seed, by seed) and the
    defense runs on them."""

    dataset: str
    model: str
    attack: str
    details: str
    parts: list[str] = field(default_factory=list)  # the details, one item each
    slug: str = ""
    models: list[dict] = field(default_factory=list)
    cells: list[dict] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.attack == "none"

    @property
    def title(self) -> str:
        name = f"{self.dataset} / {self.model} / {self.attack}"
        return f"{name} ({self.details})" if self.details else name


def _setting_key(row: dict) -> tuple:
    """What must match for runs to be seeds of one experiment: not just the attack's name,
    or runs at different poison rates would be averaged together."""
    params = json.dumps(row["attack_params"], sort_keys=True)
    return (
        row["dataset"],
        row["model"],
        row["attack"],
        params,
        row["poison_rate"],
        row["target_mode"],
    )


def _detail_parts(row: dict) -> list[str]:
    """What sets an attack's setting apart: poison rate, target mode, trigger parameters."""
    if row["attack"] == "none":
        return []
    parts = [] if row["poison_rate"] is None else [f"{row['poison_rate'] * 100:g} % poisoned"]
    parts += [row["target_mode"]] if row["target_mode"] else []
    parts += [f"{k}={v}" for k, v in sorted((row["attack_params"] or {}).items())]
    return parts


def _details(row: dict) -> str:
    return ", ".join(_detail_parts(row))


def _latest_per_seed(rows: list[dict], stamp: str) -> list[dict]:
    """One row per seed, the latest by ``stamp``, ordered by seed: a repeated run replaces
    its earlier record instead of being counted twice."""
    latest = {}
    for row in sorted(rows, key=lambda r: r[stamp]):
        latest[row["seed"]] = row
    return [latest[seed] for seed in sorted(latest)]


def _latest_runs(cells: list[dict]) -> list[dict]:
    """The latest run of each defense label and seed."""
    labels = sorted({c["label"] for c in cells})
    return [
        run
        for label in labels
        for run in _latest_per_seed([c for c in cells if c["label"] == label], "finished_at")
    ]


def _slug(text: str) -> str:
    """A file-name-safe form of a title."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def group_settings(models: list[dict], cells: list[dict]) -> list[Setting]:
    """Models and cells grouped by experiment setting, in a stable order."""
    settings: dict[tuple, Setting] = {}
    for row in models + cells:
        key = _setting_key(row)
        if key not in settings:
            parts = _detail_parts(row)
            settings[key] = Setting(
                row["dataset"], row["model"], row["attack"], ", ".join(parts), parts
            )
    for row in models:
        settings[_setting_key(row)].models.append(row)
    for row in cells:
        settings[_setting_key(row)].cells.append(row)
    ordered = [settings[key] for key in sorted(settings, key=lambda k: tuple(map(str, k)))]
    for index, setting in enumerate(ordered, start=1):
        setting.models = _latest_per_seed(setting.models, "created_at")
        setting.cells = sorted(setting.cells, key=lambda c: c["finished_at"])
        setting.slug = f"{index:02d}-{_slug(setting.title)}"
    return ordered


# ----------------------------------------------------------------------------- blocks


@dataclass
class Heading:
    text: str
    level: int


@dataclass
class Text:
    text: str


@dataclass
class Note:
    """A section left out, and why."""

    text: str


@dataclass
class Items:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    """A PNG under the output folder, referenced by its path relative to it."""

    relative: str
    caption: str


# ----------------------------------------------------------------------------- numbers


def _present(values: list) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def fmt(value: float | None, digits: int = 3) -> str:
    """A number to ``digits`` places; ``–`` for none."""
    return "–" if value is None else f"{value:.{digits}f}"


def mean_std(values: list, digits: int = 3) -> str:
    """``mean ± std`` of the values present (sample std; none for one value), ``–`` for none;
    ``(k of n)`` when only k of the n seeds have the value."""
    present = _present(values)
    if not present:
        return "–"
    text = fmt(statistics.fmean(present), digits)
    if len(present) > 1:
        text += f" ± {statistics.stdev(present):.{digits}f}"
    if len(present) < len(values):
        text += f" ({len(present)} of {len(values)})"
    return text


def _mean_and_std(values: list) -> tuple[float, float]:
    """For a bar and its error bar; NaN draws nothing (no value, or no spread from one seed)."""
    present = _present(values)
    mean = statistics.fmean(present) if present else math.nan
    return mean, statistics.stdev(present) if len(present) > 1 else math.nan


# ----------------------------------------------------------------------------- header


def _versions(cells: list[dict]) -> str:
    seen: dict[str, set[str]] = defaultdict(set)
    for cell in cells:
        for package, version in (cell["versions"] or {}).items():
            seen[package].add(str(version))
    if not seen:
        return "not recorded (no defense runs)"
    return ", ".join(f"{p} {' / '.join(sorted(seen[p]))}" for p in sorted(seen))


def header(db: Path, models: list[dict], cells: list[dict]) -> list:
    """Title and what the store holds: counts, datasets, package versions, time span."""
    stamps = [m["created_at"] for m in models]
    stamps += [c[key] for c in cells for key in ("started_at", "finished_at")]
    return [
        Heading("torchpurify results report", 1),
        Items(
            [
                f"store: {db.name}",
                f"{len(models)} models, {len(cells)} defense runs (cells)",
                f"datasets: {', '.join(sorted({m['dataset'] for m in models}))}",
                f"versions: {_versions(cells)}",
                f"time span: {min(stamps)} to {max(stamps)}",
            ]
        ),
        Text(
            "Numbers are mean ± standard deviation over seeds (n seeds; a single seed shows its "
            'value alone; "k of n" when only k seeds have the value). – means not measured, '
            "or not applicable: a clean model has no ASR, RA or DER. A seed run more than once "
            "counts once, with its latest record."
        ),
    ]


# ----------------------------------------------------------------------------- defenses


def _outcome(row: dict, suffix: str) -> dict:
    """ACC, ASR, RA (columns ending in ``suffix``), DER and seconds of one run; a model row or
    the before numbers of a cell have no DER or cost."""
    outcome = {name: row[name + suffix] for name in ("acc", "asr", "ra")}
    after = suffix == "_after"
    return {
        **outcome,
        "der": row["der"] if after else None,
        "seconds": row["seconds"] if after else None,
    }


def defense_rows(setting: Setting) -> list[tuple[str, list[dict]]]:
    """(label, one dict per seed with acc/asr/ra/der/seconds): ``no defense`` first, from the
    before numbers of the defense runs (the model's own test metrics for seeds without one),
    then each defense label in alphabetical order."""
    before = {m["seed"]: _outcome(m, "") for m in setting.models}
    before.update({c["seed"]: _outcome(c, "_before") for c in setting.cells})
    rows = [(NO_DEFENSE, [before[seed] for seed in sorted(before)])]
    runs = _latest_runs(setting.cells)
    for label in sorted({c["label"] for c in runs}):
        rows.append((label, [_outcome(c, "_after") for c in runs if c["label"] == label]))
    return rows


def defense_table(setting: Setting, rows: list[tuple[str, list[dict]]]) -> Table:
    table = Table(["defense", "n", "ACC", "ASR", "RA", "DER", "seconds"], [])
    for label, runs in rows:
        cells = [label, str(len(runs)), mean_std([r["acc"] for r in runs])]
        for name in ("asr", "ra", "der"):
            cells.append("–" if setting.clean else mean_std([r[name] for r in runs]))
        cells.append(mean_std([r["seconds"] for r in runs], digits=1))
        table.rows.append(cells)
    return table


def plot_defenses(setting: Setting, rows: list[tuple[str, list[dict]]], path: Path) -> Path:
    """Grouped bars: ACC (and ASR for a backdoored model) with no defense and after each
    defense, error bars one standard deviation over seeds."""
    metrics = ("acc",) if setting.clean else ("acc", "asr")
    figure, (axis,) = _figure(width=4.0 + 1.2 * len(metrics))
    width = 0.8 / len(rows)
    for i, (label, runs) in enumerate(rows):
        means, stds = zip(*(_mean_and_std([r[m] for r in runs]) for m in metrics), strict=True)
        offset = (i - (len(rows) - 1) / 2) * width
        positions = [j + offset for j in range(len(metrics))]
        axis.bar(positions, means, width, yerr=stds, capsize=3, label=f"{label} (n={len(runs)})")
    axis.set_xticks(range(len(metrics)), [m.upper() for m in metrics])
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("rate on the test split")
    axis.set_title(f"{setting.dataset} / {setting.model} / {setting.attack}")
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(figure, path)


def plot_tradeoff(setting: Setting, rows: list[tuple[str, list[dict]]], path: Path) -> Path:
    """ACC against ASR, one point per defense at its mean over seeds with one-standard-deviation
    bars both ways; the undefended model is a star. Lower right is better: the backdoor gone
    (low ASR) and the model still accurate (high ACC)."""
    figure, (axis,) = _figure(width=5.5)
    markers = "osD^vP<>Xhp"
    for i, (label, runs) in enumerate(rows):
        acc, acc_std = _mean_and_std([r["acc"] for r in runs])
        asr, asr_std = _mean_and_std([r["asr"] for r in runs])
        if math.isnan(acc) or math.isnan(asr):
            continue
        undefended = label == NO_DEFENSE
        axis.errorbar(
            asr, acc, xerr=asr_std, yerr=acc_std, fmt="*" if undefended else markers[i % 11],
            markersize=14 if undefended else 7, capsize=3, color="black" if undefended else None,
            label=f"{label} (n={len(runs)})",
        )  # fmt: skip
    axis.set_xlim(-0.03, 1.03)
    axis.set_xlabel("ASR (test split, true trigger)")
    axis.set_ylabel("ACC (test split)")
    axis.set_title(f"{setting.dataset} / {setting.model} / {setting.attack}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(figure, path)


def auto_details(setting: Setting) -> list[str]:
    """One line per ``auto`` run (its log's ``auto`` record, torchpurify.auto): the defense it
    chose, what it tried (guard action, estimated ASR after) and why it stopped."""
    lines = []
    for cell in _latest_runs(setting.cells):
        log = parse_log(cell["log"])
        if not isinstance(log, AutoLog) or log.auto is None:
            continue
        tried = ", ".join(
            f"{t['defense']} ({t.get('guard') or 'no guard'}, estimated ASR after "
            f"{fmt(t.get('est_asr_after'))})"
            for t in log.tried
        )
        chosen = log.chosen or "none (the input model)"
        stopped = f"; {log.auto['stopped']}" if log.auto.get("stopped") else ""
        lines.append(
            f"{cell['label']}, seed {cell['seed']}: chose {chosen}; tried {tried or 'nothing'}"
            + stopped
        )
    return lines


def defense_section(settings: list[Setting], out: Path) -> list:
    blocks = [Heading("Defenses", 2)]
    for setting in settings:
        rows = defense_rows(setting)
        blocks.append(Heading(setting.title, 3))
        if len(rows) > 1 and not setting.clean:
            relative = f"{FIGURES}/{setting.slug}-tradeoff.png"
            plot_tradeoff(setting, rows, out / relative)
            caption = f"{setting.title}: test ACC against ASR, mean ± std over seeds (★ no defense)"
            blocks.append(Image(relative, caption))
        blocks.append(defense_table(setting, rows))
        chosen = auto_details(setting)
        if chosen:
            blocks.append(Items(chosen))
        if len(rows) == 1:
            blocks.append(Note("No defense was run on these models."))
            continue
        relative = f"{FIGURES}/{setting.slug}-defenses.png"
        plot_defenses(setting, rows, out / relative)
        shown = "ACC" if setting.clean else "ACC and ASR"
        blocks.append(Image(relative, f"{setting.title}: test {shown}, no defense and after each"))
    return blocks


# ----------------------------------------------------------------------------- overview


def _short_names(settings: list[Setting]) -> list[str]:
    """Column names for one model's settings: the attack's name, with the details that tell
    apart settings of the same attack (``badnets (1 % poisoned)``, ``badnets (all-to-all)``)."""
    names = []
    for setting in settings:
        same = [s for s in settings if s.attack == setting.attack]
        common = set.intersection(*(set(s.parts) for s in same))
        own = [part for part in setting.parts if part not in common]
        names.append(f"{setting.attack} ({', '.join(own)})" if own else setting.attack)
    return names


def _paired(setting: Setting, label: str) -> list[dict]:
    """Each seed's run of ``label`` (latest record): its ΔACC against the model it was given
    (points), ASR and DER after."""
    runs = [c for c in _latest_runs(setting.cells) if c["label"] == label]
    return [
        {
            "dacc": None
            if c["acc_after"] is None or c["acc_before"] is None
            else 100 * (c["acc_after"] - c["acc_before"]),
            "asr": c["asr_after"],
            "der": c["der"],
        }
        for c in runs
    ]


def _signed(values: list, digits: int = 1) -> str:
    """``mean ± std`` of a change, with its sign (``+0.4``, ``−1.2 ± 0.3``)."""
    text = mean_std(values, digits)
    if text == "–":
        return text
    return "−" + text[1:] if text.startswith("-") else "+" + text


def overview_table(settings: list[Setting], asr_std: bool = False) -> Table:
    """One model's settings side by side: per defense and attack the test ΔACC (points,
    paired per seed, mean ± std) / ASR after (mean); the mean over the backdoored settings of
    ΔACC, ASR and DER (the DER alone for a single attack); the clean model's ΔACC. The first
    row is the undefended model."""
    backdoored = [s for s in settings if not s.clean]
    clean = [s for s in settings if s.clean]
    names = _short_names(backdoored)
    header = ["defense", *names]
    if len(backdoored) > 1:
        header.append(f"mean of {len(backdoored)}: ΔACC / ASR / DER")
    elif backdoored:
        header.append("DER")
    header += ["clean model ΔACC"] * len(clean)  # a model has at most one clean setting

    def mean_of(rows: list[dict], name: str) -> str:
        present = _present([r[name] for r in rows])
        return fmt(statistics.fmean(present)) if present else "–"

    first = [NO_DEFENSE]
    for setting in backdoored:
        before = defense_rows(setting)[0][1]
        first.append(f"{mean_of(before, 'acc')} / {mean_of(before, 'asr')}")
    if backdoored:
        first.append("")
    first += [mean_of(defense_rows(s)[0][1], "acc") for s in clean]
    table = Table(header, [first])
    labels = sorted({c["label"] for s in settings for c in s.cells})
    for label in labels:
        row, means = [label], []
        for setting in backdoored:
            runs = _paired(setting, label)
            if not runs:
                row.append("–")
                continue
            dacc, asr = [r["dacc"] for r in runs], [r["asr"] for r in runs]
            shown = mean_std(asr) if asr_std else mean_of(runs, "asr")
            row.append(f"{_signed(dacc)} / {shown}")
            means.append(
                [statistics.fmean(_present(v)) if _present(v) else None for v in
                 (dacc, asr, [r["der"] for r in runs])]
            )  # fmt: skip
        if len(backdoored) > 1:
            if means:
                dacc, asr, der = (_present([m[i] for m in means]) for i in range(3))
                text = f"{_signed([statistics.fmean(dacc)])} / {fmt(statistics.fmean(asr))}"
                text += f" / {fmt(statistics.fmean(der)) if der else '–'}"
                if len(means) < len(backdoored):
                    text += f" ({len(means)} of {len(backdoored)})"
                row.append(text)
            else:
                row.append("–")
        elif backdoored:
            row.append(fmt(means[0][2]) if means else "–")
        for setting in clean:
            runs = _paired(setting, label)
            row.append(_signed([r["dacc"] for r in runs]) if runs else "–")
        table.rows.append(row)
    return table


def overview_section(settings: list[Setting]) -> list:
    """Per dataset and model, every defense against every attack in one table."""
    blocks = [
        Heading("Summary: the change each defense makes", 2),
        Text(
            "Per dataset and model: test ΔACC in points against the model each run was given "
            "(paired per seed; mean ± std over seeds) / ASR after (mean over seeds), the mean "
            "over the attacks (each attack's seed mean, averaged), and the ΔACC on clean "
            "models. The first row is the undefended model's ACC / ASR. The sections above "
            "give the absolute numbers with their spread."
        ),
    ]
    groups: dict[tuple[str, str], list[Setting]] = defaultdict(list)
    for setting in settings:
        groups[(setting.dataset, setting.model)].append(setting)
    shown = 0
    for (dataset, model), members in groups.items():
        if not any(s.cells for s in members):
            continue
        blocks += [Heading(f"{dataset} / {model}", 3), overview_table(members)]
        shown += 1
    if not shown:
        blocks.append(Note("No defense was run yet."))
    return blocks


# ----------------------------------------------------------------------------- pruning curves


def search_points(log: dict | DefenseLog | None) -> list[list[float]]:
    """The (k, holdout ACC) points a pruning defense evaluated while searching for its cut,
    sorted (:meth:`~torchpurify.defenses.logs.DefenseLog.search_points`)."""
    return sorted(parse_log(log).search_points())


def plot_search(cells: list[dict], path: Path) -> Path:
    """Holdout ACC at every cut each pruning run evaluated, its chosen cut starred."""
    figure, (axis,) = _figure()
    logs = [parse_log(cell["log"]) for cell in cells]
    for i, (cell, log) in enumerate(zip(cells, logs, strict=True)):
        points = search_points(log)
        colour = f"C{i % 10}"
        label = f"{cell['label']}, seed {cell['seed']}"
        axis.plot(*zip(*points, strict=True), "o-", ms=4, lw=0.8, color=colour, label=label)
        chosen = {k: acc for k, acc in points}.get(log.get("num_pruned"))
        if chosen is not None:
            axis.plot(log.get("num_pruned"), chosen, "*", ms=12, color=colour, mec="k")
    layers = {log.get("layer") for log in logs if log.get("layer")}
    axis.set_xlabel("channels pruned" + (f" of {layers.pop()}" if len(layers) == 1 else ""))
    axis.set_ylabel("holdout ACC")
    axis.set_title("Cuts evaluated by the pruning search (★ chosen)")
    axis.legend(fontsize="small")
    return _save(figure, path)


def _by_order(curve: list[dict]) -> dict[str, list[dict]]:
    orders: dict[str, list[dict]] = defaultdict(list)
    for row in curve:
        orders[row["order"]].append(row)
    return orders


def pruning_section(settings: list[Setting], out: Path) -> list:
    blocks = [Heading("Pruning curves", 2)]
    for setting in settings:
        figures = []
        model = next((m for m in setting.models if m["pruning_curve"]), None)
        if model is not None:
            for order, curve in _by_order(model["pruning_curve"]).items():
                relative = f"{FIGURES}/{setting.slug}-pruning-{_slug(order)}.png"
                plot_pruning_curve(curve, out / relative)
                caption = f"Holdout ACC and true-trigger ASR, {order} order, seed {model['seed']}"
                figures.append(Image(relative, caption))
        searched = [c for c in _latest_runs(setting.cells) if search_points(c["log"])]
        if searched:
            relative = f"{FIGURES}/{setting.slug}-search.png"
            plot_search(searched, out / relative)
            figures.append(Image(relative, "Pruning defenses' search on the holdout"))
        if figures:
            blocks += [Heading(setting.title, 3), *figures]
    if len(blocks) == 1:
        blocks.append(Note("No model pruning curve or pruning-defense search in the store."))
    return blocks


# ----------------------------------------------------------------------------- identification


def identification_section(settings: list[Setting]) -> list:
    """ROC-AUC and precision@k of each scoring rule (methods.md §8), a column per setting."""
    blocks = [Heading("Neuron identification (methods.md §8)", 2)]
    columns = [
        (s, [m["identification"] for m in s.models if m["identification"]]) for s in settings
    ]
    columns = [(s, results) for s, results in columns if results]
    if not columns:
        return [*blocks, Note("No model in the store has identification results.")]
    found = [rule for _, results in columns for r in results for rule in r["rules"]]
    rules = [*RULES, *dict.fromkeys(r for r in found if r not in RULES)]
    for metric, name in (("auc", "ROC-AUC"), ("precision_at_k", "precision@k")):
        table = Table(["rule", *(s.title for s, _ in columns)], [])
        for rule in rules:
            values = [
                [r["rules"].get(rule, {}).get(metric) for r in results] for _, results in columns
            ]
            table.rows.append([rule, *map(mean_std, values)])
        blocks += [Heading(name, 3), table]
    blocks.append(Items([_identification_setup(s, results) for s, results in columns]))
    return blocks


def _identification_setup(setting: Setting, results: list[dict]) -> str:
    first = results[0]
    return (
        f"{setting.title}: layer {first['layer']}, {first['channels']} channels, ground truth "
        f"the top {first['k']} by true-trigger activation rise, bias rules scored with the "
        f"{first['bias_trigger']} trigger, n = {len(results)}"
    )


# ----------------------------------------------------------------------------- gradient groups


def gradient_section(settings: list[Setting], out: Path) -> list:
    """Weight-gradient norm by neuron group (methods.md §5), the first seed of each setting."""
    blocks = [Heading("Gradient norm by neuron group (methods.md §5)", 2)]
    for setting in settings:
        model = next((m for m in setting.models if m["neuron_table"]), None)
        if model is None:
            continue
        relative = f"{FIGURES}/{setting.slug}-gradient-groups.png"
        plot_gradient_groups(model["neuron_table"], out / relative)
        blocks += [Heading(setting.title, 3), Image(relative, f"seed {model['seed']}")]
    if len(blocks) == 1:
        blocks.append(Note("No model in the store has a neuron table."))
    return blocks


# ----------------------------------------------------------------------------- backdoor estimate

# Models that read audio (the rest read images); a speech-* dataset is audio whatever its model.
AUDIO_MODELS = ("ds-cnn", "kws-cnn", "lstm", "m5", "res8")
FAMILY_ORDER = ("mask", "perturbation", "generator")  # the estimate's families (§12.2)
HIGH_ASR = 0.5  # a true ASR after purification at least this is a backdoor still there


def modality(row: dict) -> str:
    """``audio`` for a speech dataset or an audio model, else ``images``."""
    audio = str(row["dataset"]).startswith("speech") or row["model"] in AUDIO_MODELS
    return "audio" if audio else "images"


def _flagged(record: dict) -> bool:
    """The verdict of one moment's estimate under today's rule (methods.md §12.2): its family
    records judged again with the default verdict thresholds, so cells written by different
    versions — before the size test, or under an earlier threshold — read alike (what a cell's
    own run acted on stays in its stored ``flagged``); a record without per-family sizes keeps
    its ``flagged``, else est. ASR ≥ 0.5 (the oldest cells)."""
    from torchpurify.estimate import EstimateConfig, FamilyEstimate, judge

    families = record.get("families") or {}
    fields = set(FamilyEstimate.__dataclass_fields__)
    if families and all(fields <= set(family) for family in families.values()):
        records = {name: FamilyEstimate.from_dict(family) for name, family in families.items()}
        return judge(records, EstimateConfig(), seconds=0.0).flagged
    flagged = record.get("flagged")
    return bool(record["est_asr"] >= HIGH_ASR if flagged is None else flagged)


def _flagged_after(estimate: dict) -> bool:
    """The verdict after purification: flagged after *and* before — a model nobody suspected is
    not flagged after (``Estimate.suspected_before``, methods.md §12.2); applied here too to
    cells stored before that rule."""
    return _flagged(estimate["after"]) and _flagged(estimate["before"])


def _family_estimates(record: dict) -> dict[str, float]:
    """Family → estimated ASR at one moment: every family record it holds (after
    purification, the suspected one), or — a cell from before the families — ``mask``."""
    families = record.get("families") or {}
    if families:
        return {name: families[name]["est_asr"] for name in _ordered(families)}
    return {record.get("family") or "mask": record["est_asr"]}


def _ordered(names) -> list[str]:
    """Families in the estimate's order (mask, perturbation, generator), others after."""
    rank = {name: i for i, name in enumerate(FAMILY_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def _estimated_cells(cells: list[dict]) -> list[dict]:
    """The latest run per setting, defense label and seed of the cells with an estimate."""
    return [
        cell
        for setting in group_settings([], cells)
        for cell in _latest_runs(setting.cells)
        if cell.get("estimate")
    ]


def estimate_points(cells: list[dict]) -> list[dict]:
    """One point per backdoored cell with an estimate (latest run per setting, label and seed):
    true and estimated ASR after purification, the verdict after (``flagged``), the family it
    names (old cells: ``mask``), every family's estimated ASR after (``families``), the
    modality and the defense label."""
    points = []
    for cell in _estimated_cells(cells):
        if cell["attack"] == "none" or cell["asr_after"] is None:
            continue
        after = cell["estimate"]["after"]
        points.append(
            {
                "attack": cell["attack"],
                "asr": cell["asr_after"],
                "est": after["est_asr"],
                "flagged": _flagged_after(cell["estimate"]),
                "family": after.get("family") or "mask",
                "families": _family_estimates(after),
                "modality": modality(cell),
                "defense": cell["label"],
            }
        )
    return points


def false_alarms(cells: list[dict], of: str | None = None) -> tuple[int, int]:
    """(flagged, total) clean models (of modality ``of``; None: all): the estimate before
    purification says "backdoor" on a model trained without one."""
    before = {}
    for cell in cells:
        if cell["attack"] == "none" and cell.get("estimate") and of in (None, modality(cell)):
            before[cell["model_key"]] = _flagged(cell["estimate"]["before"])
    return sum(before.values()), len(before)


def false_alarms_after(cells: list[dict], of: str | None = None) -> dict[str, tuple[int, int]]:
    """Defense label → (flagged, total) cells on clean models (of modality ``of``) whose
    estimate after purification says "backdoor"."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for cell in _estimated_cells(cells):
        if cell["attack"] == "none" and of in (None, modality(cell)):
            counts[cell["label"]][0] += _flagged_after(cell["estimate"])
            counts[cell["label"]][1] += 1
    return {label: (k, n) for label, (k, n) in sorted(counts.items())}


def false_all_clears(points: list[dict]) -> tuple[int, int]:
    """(missed, total) backdoored cells: true ASR after ≥ 0.5, yet the verdict after is clean."""
    return sum(p["asr"] >= HIGH_ASR and not p["flagged"] for p in points), len(points)


def rate(k: int, n: int) -> str:
    """``k of n (p %)``; ``–`` for none."""
    return "–" if n == 0 else f"{k} of {n} ({100 * k / n:.0f} %)"


def spearman(points: list[dict], key: str = "est") -> float | None:
    """Spearman's ρ of the true and estimated ASR; None for fewer than 3 points or no spread."""
    spread = all(len({p[k] for p in points}) > 1 for k in ("asr", key))
    if len(points) < 3 or not spread:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr([p["asr"] for p in points], [p[key] for p in points]).statistic)


def _rho(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def family_points(points: list[dict]) -> dict[str, list[dict]]:
    """Family → the points with that family's estimated ASR after as ``est``."""
    by_family: dict[str, list[dict]] = defaultdict(list)
    for point in points:
        for family, est in point["families"].items():
            by_family[family].append({**point, "est": est})
    return {family: by_family[family] for family in _ordered(by_family)}


def plot_estimate(by_family: dict[str, list[dict]], title: str, path: Path) -> Path:
    """Estimated against true ASR after purification, a panel per family, points by attack."""
    figure, axes = _figure(panels=len(by_family), width=4.5)
    attacks = sorted({p["attack"] for points in by_family.values() for p in points})
    for axis, (family, points) in zip(axes, by_family.items(), strict=True):
        for i, attack in enumerate(attacks):
            mine = [p for p in points if p["attack"] == attack]
            if mine:
                axis.scatter([p["asr"] for p in mine], [p["est"] for p in mine], s=18,
                             color=f"C{i % 10}", label=attack)  # fmt: skip
        axis.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
        axis.axhline(HIGH_ASR, color="grey", linewidth=0.5, linestyle=":")
        axis.axvline(HIGH_ASR, color="grey", linewidth=0.5, linestyle=":")
        axis.set_xlim(-0.03, 1.03)
        axis.set_ylim(-0.03, 1.03)
        axis.set_xlabel("true ASR after purification")
        axis.set_ylabel("estimated ASR (clean holdout only)")
        rho = spearman(points)
        name = f"{family} family, n = {len(points)}"
        axis.set_title(name if rho is None else f"{name}, ρ = {rho:.2f}", fontsize="medium")
        axis.grid(alpha=0.3)
    legend = {}  # every attack, whichever panel holds it
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    axes[-1].legend(legend.values(), legend.keys(), fontsize="small", loc="upper left",
                    bbox_to_anchor=(1.0, 1.0))  # fmt: skip
    figure.suptitle(title)
    return _save(figure, path)


def _estimate_table(points: list[dict], cells: list[dict], of: str) -> Table:
    """Per defense label: backdoored cells, their false all-clears and Spearman ρ; clean-model
    cells and their false alarms after. The first row: the clean models before purification."""
    table = Table(["defense", "false all-clears", "Spearman ρ", "false alarms on clean models"], [])
    table.rows.append([f"{NO_DEFENSE} (before)", "–", "–", rate(*false_alarms(cells, of))])
    after = false_alarms_after(cells, of)
    for label in sorted({p["defense"] for p in points} | set(after)):
        mine = [p for p in points if p["defense"] == label]
        alarms = rate(*after[label]) if label in after else "–"
        table.rows.append([label, rate(*false_all_clears(mine)), _rho(spearman(mine)), alarms])
    return table


def estimate_section(cells: list[dict], out: Path) -> list:
    """The defender-side backdoor estimate (methods.md §12.2) against the true ASR, per
    modality: Spearman ρ, false all-clears, false alarms before and after each defense, and a
    plot per trigger family."""
    blocks = [Heading("Backdoor estimate (defender side)", 2)]
    points = estimate_points(cells)
    estimated = [c for c in cells if c.get("estimate")]
    if not estimated:
        return [*blocks, Note("No defense run recorded the backdoor estimate.")]
    blocks.append(
        Text(
            "Per modality, on the latest run of each defense and seed: Spearman's ρ of the "
            "estimated and true ASR after purification (backdoored cells); false all-clears: "
            f"backdoored cells whose true ASR after purification is ≥ {HIGH_ASR} but whose "
            "verdict after says clean (not suspected); false alarms: clean models whose "
            "estimate says a backdoor is suspected, before purification (per model) and after "
            "each defense (per cell). The plots show each trigger family's estimated ASR after "
            "purification (the family the verdict named; cells stored before the families "
            "count as mask)."
        )
    )
    for of in sorted({modality(c) for c in estimated}):
        mine = [p for p in points if p["modality"] == of]
        flagged, clean = false_alarms(cells, of)
        blocks += [
            Heading(f"Backdoor estimate: {of}", 3),
            Items(
                [
                    f"Spearman rank correlation of estimated and true ASR after purification: "
                    f"{_rho(spearman(mine))} over {len(mine)} backdoored cells",
                    f"false all-clears (true ASR ≥ {HIGH_ASR} after, verdict clean): "
                    f"{rate(*false_all_clears(mine))}",
                    f"false alarms on clean models before purification: {rate(flagged, clean)}",
                ]
            ),
            _estimate_table(mine, cells, of),
        ]
        if mine:
            relative = f"{FIGURES}/estimate-vs-true-asr-{of}.png"
            by_family = family_points(mine)
            plot_estimate(by_family, f"defender-side estimate vs true ASR, {of}", out / relative)
            caption = f"{of}: estimated against true ASR after each purification, per family"
            blocks.append(Image(relative, caption))
    return blocks


# ----------------------------------------------------------------------------- rendering


def _md_text(text: str) -> str:
    """Text a Markdown renderer shows as written: no ``<`` read as a tag, no ``|`` as a cell."""
    return text.replace("<", "\\<").replace("|", "\\|")


def render_markdown(blocks: list) -> str:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines.append(f"{'#' * block.level} {_md_text(block.text)}")
        elif isinstance(block, Text):
            lines.append(_md_text(block.text))
        elif isinstance(block, Note):
            lines.append(f"_{_md_text(block.text)}_")
        elif isinstance(block, Items):
            lines.append("\n".join(f"- {_md_text(item)}" for item in block.items))
        elif isinstance(block, Table):
            align = ["---"] + ["---:"] * (len(block.header) - 1)
            rows = [block.header, align, *block.rows]
            lines.append("\n".join(f"| {' | '.join(map(_md_text, row))} |" for row in rows))
        elif isinstance(block, Image):
            alt = block.caption.replace("[", "(").replace("]", ")")
            lines.append(f"![{alt}]({block.relative})")
        lines.append("")
    return "\n".join(lines)


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.4; }
table { border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
figure { margin: 1em 0; }
img { max-width: 100%; }
figcaption, .note { color: #666; font-size: 0.9em; }
.note { font-style: italic; }
"""


def _html_block(block, root: Path) -> str:
    e = html.escape
    if isinstance(block, Heading):
        return f"<h{block.level}>{e(block.text)}</h{block.level}>"
    if isinstance(block, Text):
        return f"<p>{e(block.text)}</p>"
    if isinstance(block, Note):
        return f'<p class="note">{e(block.text)}</p>'
    if isinstance(block, Items):
        return "<ul>" + "".join(f"<li>{e(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Table):
        head = "".join(f"<th>{e(cell)}</th>" for cell in block.header)
        body = "".join(
            "<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>" for row in block.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    data = base64.b64encode((root / block.relative).read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{e(block.caption)}">'
        f"<figcaption>{e(block.caption)}</figcaption></figure>"
    )


def render_html(blocks: list, root: Path) -> str:
    """One page with no external resource: inline CSS, images as base64 data URIs."""
    title = next(b.text for b in blocks if isinstance(b, Heading))
    body = "\n".join(_html_block(block, root) for block in blocks)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def _write(path: Path, text: str) -> Path:
    """Write through a temporary file, so an interrupted report leaves no half-written page."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
    return path


def write_report(db: str | Path, out: str | Path, force: bool = False) -> tuple[Path, Path]:
    """Write ``report.md`` (figures under ``out/figures``) and the self-contained
    ``report.html`` for the results store ``db``; return their paths. ``out`` must be new, an
    empty folder, or (with ``force``) an earlier report, which is replaced whole."""
    db, out = Path(db), Path(out)
    check_output(out, "report", force)
    models, cells = read_store(db)
    with staged_output(out, "report", force) as folder:
        _write_pages(db, folder, models, cells)
    return out / "report.md", out / "report.html"


def _write_pages(db: Path, out: Path, models: list[dict], cells: list[dict]) -> None:
    settings = group_settings(models, cells)
    blocks = [
        *header(db, models, cells),
        *defense_section(settings, out),
        *overview_section(settings),
        *estimate_section(cells, out),
        *guard_section(cells),
        *sweep_section(cells),
        *pruning_section(settings, out),
        *identification_section(settings),
        *gradient_section(settings, out),
    ]
    _write(out / "report.md", render_markdown(blocks))
    _write(out / "report.html", render_html(blocks, out))


# ----------------------------------------------------------------------------- development sweeps

# The rule that picks a setting among a development sweep's labels of one defense (methods.md
# §12.12), reading defender-side numbers only — the guard's half of the holdout and the
# estimate after purification — never test data: admissible when its guard rolled back at most
# this share of the models, and its mean guard-half cost is at most SELECT_COST on the
# backdoored models and at most SELECT_CLEAN_COST on the clean ones; among those, the fewest
# backdoored models still suspected after, then the lowest mean estimated ASR after, then the
# fewest seconds. Settings are compared on the same models only: a setting that has not run on
# every model its defense ran on is "incomplete" and not ranked (a mean over two models is not
# comparable with one over four). When no complete setting is admissible, the pick is the
# complete one within the rollback share that overshoots the cost budgets least (the larger of
# its two overshoots), then the same order — marked "over budget": a default must exist, and
# the one that misses the budget by least is the defensible one.
SELECT_ROLLBACKS = 0.25
SELECT_COST = 0.02
SELECT_CLEAN_COST = 0.01


def guard_cost(row: dict) -> tuple[float | None, bool]:
    """(holdout accuracy lost on the guard's half, rolled back) for one cell; the cost is None
    for a cell stored without a guard record."""
    guard = parse_log(row.get("log")).guard
    return (None, False) if guard is None else guard.cost()


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return float(statistics.mean(present)) if present else None


def _latest_per_model(cells: list[dict]) -> list[dict]:
    """The latest run of each defense label on each model: a repeated run replaces its earlier
    record."""
    latest: dict[tuple, dict] = {}
    for row in sorted(cells, key=lambda r: r["finished_at"]):
        latest[row["label"], row["model_key"]] = row
    return list(latest.values())


def sweep_summary(cells: list[dict]) -> dict[str, list[dict]]:
    """Defense → one summary per label (in the order first seen) of the latest cells: models,
    rollbacks, mean guard-half cost on backdoored and clean models, backdoored models suspected
    after, mean estimated ASR after, mean seconds; ``complete`` says whether the label ran on
    every model of its defense (only complete labels are ranked); ``chosen`` marks the rule's
    pick."""
    by: dict[str, dict[str, list[dict]]] = {}
    for row in _latest_per_model(cells):
        by.setdefault(row["defense"], {}).setdefault(row["label"], []).append(row)
    out: dict[str, list[dict]] = {}
    for defense, labels in by.items():
        summaries = []
        models = {r["model_key"] for rows in labels.values() for r in rows}
        for label, rows in labels.items():
            costs = [guard_cost(r) for r in rows]
            bad = [(r, c) for r, c in zip(rows, costs, strict=True) if r["asr_before"] is not None]
            good = [c for r, c in zip(rows, costs, strict=True) if r["asr_before"] is None]
            estimates = [r.get("estimate") for r, _ in bad]
            estimates = [e for e in estimates if e and e.get("after")]
            after = [e["after"] for e in estimates]
            summary = {
                "label": label,
                "models": len(rows),
                "rolled_back": sum(rolled for _, rolled in costs),
                "cost": _mean([c[0] for _, c in bad]),
                "clean_cost": _mean([c[0] for c in good]),
                "suspected": sum(_flagged_after(e) for e in estimates) if estimates else None,
                "est_asr": _mean([a["est_asr"] for a in after]),
                "seconds": _mean([r["seconds"] for r in rows]) or 0.0,
                "complete": {r["model_key"] for r in rows} == models,
            }
            summary["admissible"] = (
                summary["rolled_back"] <= SELECT_ROLLBACKS * len(rows)
                and (summary["cost"] is None or summary["cost"] <= SELECT_COST)
                and (summary["clean_cost"] is None or summary["clean_cost"] <= SELECT_CLEAN_COST)
            )
            summaries.append(summary)
        order = lambda s: (s["suspected"] or 0, s["est_asr"] or 0, s["seconds"])  # noqa: E731
        ranked = sorted((s for s in summaries if s["admissible"] and s["complete"]), key=order)
        over = not ranked
        if over:
            within = [s for s in summaries if s["complete"] and s["rolled_back"]
                      <= SELECT_ROLLBACKS * s["models"]]  # fmt: skip
            ranked = sorted(within, key=lambda s: (_overshoot(s), *order(s)))
        for s in summaries:
            s["chosen"] = bool(ranked) and s is ranked[0]
            s["over_budget"] = s["chosen"] and over
        out[defense] = summaries
    return out


def _overshoot(summary: dict) -> float:
    """How far a setting's mean guard-half costs exceed the rule's budgets (0: within both)."""
    cost, clean = summary["cost"] or 0.0, summary["clean_cost"] or 0.0
    return max(cost - SELECT_COST, clean - SELECT_CLEAN_COST, 0.0)


def _points(value: float | None) -> str:
    return "–" if value is None else f"{-100 * value:+.1f}"


def _sweep_mark(summary: dict) -> str:
    if summary["chosen"]:
        return "✓ (over budget: the least)" if summary["over_budget"] else "✓"
    if not summary["admissible"]:
        return "inadmissible"
    return "" if summary["complete"] else "incomplete"


def sweep_section(cells: list[dict]) -> list:
    """For each defense run with more than one setting: the defender-side numbers the
    development rule (:data:`SELECT_COST` …) reads, and its pick."""
    sweeps = {d: s for d, s in sweep_summary(cells).items() if len(s) > 1}
    if not sweeps:
        return []
    blocks = [
        Heading("Development sweep: the settings compared on defender-side numbers", 2),
        Text(
            "Per defense, each setting over the models of the store: guard rollbacks; the mean "
            "change of accuracy on the guard's half of the holdout (points) on the backdoored "
            "and on the clean models; backdoored models the estimate still suspects after "
            "purification and their mean estimated ASR. The rule (methods.md §12.12): at most "
            f"{SELECT_ROLLBACKS:.0%} rolled back, a mean cost of at most {100 * SELECT_COST:g} "
            f"points (backdoored) and {100 * SELECT_CLEAN_COST:g} (clean), then the fewest "
            "suspected, the lowest estimated ASR, the fewest seconds. Only settings run on every "
            'model of their defense are ranked (the others read "incomplete"); when none is '
            'admissible, the complete setting that overshoots the budgets least is marked "over '
            'budget". No test number is read.'
        ),
    ]
    header = ["setting", "models", "rolled back", "guard Δ backdoored", "guard Δ clean",
              "suspected after", "est. ASR after", "seconds", "chosen"]  # fmt: skip
    for defense, summaries in sweeps.items():
        table = Table(header, [])
        for s in summaries:
            table.rows.append([
                s["label"], str(s["models"]), str(s["rolled_back"]), _points(s["cost"]),
                _points(s["clean_cost"]), "–" if s["suspected"] is None else str(s["suspected"]),
                fmt(s["est_asr"]), f"{s['seconds']:.0f}",
                _sweep_mark(s),
            ])  # fmt: skip
        blocks += [Heading(defense, 3), table]
    return blocks


def guard_rows(cells: list[dict]) -> dict[str, list[dict]]:
    """Modality → one row per defense label (latest run of each model and label, labels in the
    order first seen): cells, cells with a guard record, rollbacks, and the mean accuracy lost
    on the guard's samples (points) on backdoored and on clean models."""
    by: dict[str, dict[str, list[dict]]] = {}
    for row in _latest_per_model(cells):
        by.setdefault(modality(row), {}).setdefault(row["label"], []).append(row)
    out: dict[str, list[dict]] = {}
    for of, labels in sorted(by.items()):
        out[of] = []
        for label, rows in labels.items():
            costs = [(guard_cost(r), r["asr_before"] is not None) for r in rows]
            guarded = [(c, bad) for c, bad in costs if c[0] is not None]
            out[of].append({
                "label": label, "cells": len(rows), "guarded": len(guarded),
                "rolled_back": sum(c[1] for c, _ in guarded),
                "cost": _mean([c[0] for c, bad in guarded if bad]),
                "clean_cost": _mean([c[0] for c, bad in guarded if not bad]),
            })  # fmt: skip
    return out


def guard_section(cells: list[dict]) -> list:
    """How often each defense's guard rolled it back, and what the kept results cost on the
    guard's own samples — per modality, defender-side numbers only."""
    rows = guard_rows(cells)
    if not any(r["guarded"] for table in rows.values() for r in table):
        return []
    blocks = [
        Heading("The guard: rollbacks and cost on its own samples", 2),
        Text(
            "Per modality and defense, on the latest run of each model: the cells whose guard "
            "rolled the defense back to the model it was given (of the cells with a guard "
            "record), and the mean accuracy change on the guard's half of the holdout, which no "
            "selection read (points; a rolled-back cell counts 0), on backdoored and on clean "
            "models. The test set's change is in the tables above."
        ),
    ]
    header = ["defense", "cells", "rolled back", "guard Δ backdoored", "guard Δ clean"]
    for of, table_rows in rows.items():
        table = Table(header, [])
        for r in table_rows:
            if not r["guarded"]:
                continue
            table.rows.append([
                r["label"], str(r["cells"]), rate(r["rolled_back"], r["guarded"]),
                _points(r["cost"]), _points(r["clean_cost"]),
            ])  # fmt: skip
        if table.rows:
            blocks += [Heading(f"The guard: {of}", 3), table]
    return blocks


# ----------------------------------------------------------------------------- README tables

# A README table generated from a store sits between these markers; the opening one names the
# store, the model, and the defense labels (rows) in order, e.g.
#   <!-- results: docs/results/eval-image/results.db model=small-cnn labels=ft,gnft -->
#   ...the table...
#   <!-- /results -->
_README_TABLE = re.compile(
    r"(<!-- results: (?P<db>\S+) model=(?P<model>\S+) labels=(?P<labels>\S+) -->\n)"
    r"(?P<table>.*?)(?=<!-- /results -->)",
    re.S,
)


def headline_table(db: str | Path, model: str, labels: list[str]) -> str:
    """The overview table (:func:`overview_table`, ASR with its std) of one model of a store,
    for the defense ``labels`` in that order: Markdown."""
    models, cells = read_store(Path(db))
    settings = [s for s in group_settings(models, cells) if s.model == model]
    check(bool(settings), f"{db} holds no model {model!r}")
    for setting in settings:
        setting.cells = [c for c in setting.cells if c["label"] in labels]
    table = overview_table(settings, asr_std=True)
    first, rest = table.rows[:1], table.rows[1:]
    table.rows = first + sorted(rest, key=lambda row: labels.index(row[0]))
    return render_markdown([table])


def readme_tables(readme: str | Path, root: str | Path | None = None) -> tuple[str, list[str]]:
    """``readme``'s text with every marked results table rebuilt from its store (paths relative
    to ``root``, by default the README's folder), and the stores read."""
    readme = Path(readme)
    base = readme.parent if root is None else Path(root)
    text = readme.read_text(encoding="utf-8")
    read: list[str] = []

    def rebuilt(match: re.Match) -> str:
        read.append(match["db"])
        table = headline_table(base / match["db"], match["model"], match["labels"].split(","))
        return match.group(1) + table

    return _README_TABLE.sub(rebuilt, text), read


def sync_readme(readme: str | Path, check_only: bool = False) -> list[str]:
    """Rebuild the README's results tables from their stores; with ``check_only`` change
    nothing and raise a :class:`UserError` naming the first table that differs."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    new, read = readme_tables(readme)
    check(bool(read), f"{readme} has no results table marked <!-- results: ... -->")
    if check_only:
        if new != text:
            old_lines, new_lines = text.splitlines(), new.splitlines()
            line = next(
                (i for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=False)) if a != b),
                min(len(old_lines), len(new_lines)),
            )
            raise UserError(
                f"{readme}:{line + 1} differs from its results store; run "
                f"`torchpurify report --readme {readme}` to rebuild the tables"
            )
        return read
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return read
