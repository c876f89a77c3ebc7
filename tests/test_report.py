"""The results report: tables and numbers from a hand-built store, a self-contained HTML page
that a real browser renders, and one-line errors for files that are not a results store."""

import copy
import dataclasses
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from typer.testing import CliRunner

from torchpurify.cli import app
from torchpurify.diagnostics import RULES, neuron_identification, neuron_table, pruning_curve
from torchpurify.errors import UserError
from torchpurify.report import mean_std, write_report
from torchpurify.store import CELL_COLUMNS, MODEL_COLUMNS, Store

VERSIONS = {"torchpurify": "0.1.0", "torch": "2.4.0", "python": "3.11.2"}
SETTING = ("dataset", "model", "attack", "attack_params", "poison_rate", "target_mode")
METRICS = ("acc", "asr", "ra")


def named(names, values, suffix=""):
    return {name + suffix: value for name, value in zip(names, values, strict=True)}


BADNETS = named(SETTING, ("gratings", "small-cnn", "badnets", {"size": 3}, 0.1, "all-to-one"))
CLEAN = named(SETTING, ("gratings", "small-cnn", "none", {}, None, None))
CLEAN_LABEL = "ft <lr 0.01> & more"  # must come out escaped


def make_store(path, models=(), cells=()):
    """A results store written through :class:`Store`; columns a row leaves out are NULL."""
    with Store(path) as store:
        for row in models:
            store.add_model({**dict.fromkeys(MODEL_COLUMNS), **row})
        for row in cells:
            store.add_cell({**dict.fromkeys(CELL_COLUMNS), **row})
    return path


def model_row(key, setting, seed, metrics, **diagnostics):
    """A models row; ``metrics`` is (ACC, ASR, RA) on the test split."""
    return {
        "key": key, **setting, "seed": seed, "target": None if setting is CLEAN else 0,
        **named(METRICS, metrics), "train_recipe": {"epochs": 4},
        "path": f"runs/{key}", "created_at": f"2025-01-0{seed + 1}T10:00:00", **diagnostics,
    }  # fmt: skip


def cell_row(key, model, label, before, after, der, seconds, log=None, finished="12:00:00"):
    """A cells row of a defense run on ``model``; ``before``/``after`` are (ACC, ASR, RA)."""
    day = f"2025-02-0{model['seed'] + 1}"
    return {
        "key": key, "spec_hash": "h", "model_key": model["key"],
        **{k: model[k] for k in (*SETTING, "seed")},
        "defense": label.split()[0], "label": label, "defense_params": {},
        "defender_fraction": 0.05, "der": der, "seconds": seconds, "log": log,
        **named(METRICS, before, "_before"), **named(METRICS, after, "_after"),
        "versions": VERSIONS, "started_at": f"{day}T11:00:00", "finished_at": f"{day}T{finished}",
    }  # fmt: skip


@pytest.fixture(scope="module")
def diagnostics(tiny_backdoor):
    """Real JSON for the three diagnostics columns, from the tiny backdoored model."""
    tiny = tiny_backdoor
    columns = {
        "identification": neuron_identification(tiny.model, tiny.holdout, tiny.trigger),
        "neuron_table": neuron_table(tiny.model, tiny.holdout, tiny.trigger),
        "pruning_curve": pruning_curve(tiny.model, tiny.holdout, tiny.trigger, 0, steps=8),
    }
    return json.loads(json.dumps(columns))


def with_auc(identification, auc):
    changed = copy.deepcopy(identification)
    changed["rules"]["mean-activation"]["auc"] = auc
    return changed


@pytest.fixture(scope="module")
def store(tmp_path_factory, diagnostics):
    """Two BadNets seeds (fine-pruning on both; gnft on seed 0, run twice; linf-pruning, which
    logs its search by rounds, on seed 1) and one clean model fine-tuned once."""
    ident = diagnostics["identification"]
    bad0 = model_row("bad-0", BADNETS, 0, (0.95, 0.99, 0.01),
                     **{**diagnostics, "identification": with_auc(ident, 0.90)})  # fmt: skip
    bad1 = model_row("bad-1", BADNETS, 1, (0.93, 0.97, 0.03), identification=with_auc(ident, 0.8))
    clean = model_row("clean-0", CLEAN, 0, (0.96, None, None))
    search = {"layer": "block4.2", "num_pruned": 20,
              "curve": [[0, 0.95], [64, 0.5], [32, 0.8], [16, 0.93], [20, 0.92]]}  # fmt: skip
    rounds = {"layer": "block4.2", "num_pruned": 10,
              "rounds": [{"curve": [[0, 0.93], [12, 0.85]]}, {"curve": [[10, 0.9]]}]}  # fmt: skip
    before0, before1 = (0.95, 0.99, 0.01), (0.93, 0.97, 0.03)
    cells = [
        cell_row("fp-0", bad0, "fine-pruning", before0, (0.90, 0.20, 0.70), 0.87, 12.0, search),
        cell_row("fp-1", bad1, "fine-pruning", before1, (0.86, 0.12, 0.80), 0.89, 14.0, search),
        cell_row("gn-0-old", bad0, "gnft", before0, (0.1, 0.1, 0.1), 0.1, 1.0, None, "11:30:00"),
        cell_row("gn-0", bad0, "gnft", before0, (0.91, 0.5, 0.45), 0.725, None),
        cell_row("linf-1", bad1, "linf-pruning", before1, (0.92, 0.3, 0.6), 0.83, 30.0, rounds),
        cell_row("ft-c", clean, CLEAN_LABEL, (0.96, None, None), (0.955, None, None), None, 5.0),
    ]
    return make_store(tmp_path_factory.mktemp("store") / "results.db", [bad0, bad1, clean], cells)


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    markdown, page = write_report(store, out)
    return out, markdown.read_text(), page.read_text()


def cells(line):
    """The cells of a Markdown table row."""
    return [cell.strip() for cell in line.strip().strip("|").split(" | ")]


def table_row(markdown, heading, first_cell):
    """The row starting with ``first_cell`` in the table under ``heading``, as "a | b | …"."""
    section = markdown.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
    for line in section.splitlines():
        if line.startswith("|") and cells(line)[0] == first_cell:
            return " | ".join(cells(line))
    raise AssertionError(f"no row {first_cell!r} under {heading!r}")


BADNETS_TITLE = "gratings / small-cnn / badnets (10 % poisoned, all-to-one, size=3)"
CLEAN_TITLE = "gratings / small-cnn / none"


def test_mean_std_formats_seeds():
    assert mean_std([0.90, 0.86]) == "0.880 ± 0.028"
    assert mean_std([0.5]) == "0.500" and mean_std([None, None]) == "–"
    assert mean_std([0.2, None]) == "0.200 (1 of 2)"


def test_header_counts_the_store(report):
    _, markdown, _ = report
    assert markdown.startswith("# torchpurify results report\n")
    assert "- 3 models, 6 defense runs (cells)" in markdown
    assert "- datasets: gratings" in markdown
    assert "- versions: python 3.11.2, torch 2.4.0, torchpurify 0.1.0" in markdown
    assert "- time span: 2025-01-01T10:00:00 to 2025-02-02T12:00:00" in markdown


def test_defense_table_shows_mean_and_std_over_seeds(report):
    _, markdown, _ = report
    # By hand, sample std over the two seeds: ACC 0.95, 0.93 → 0.940 ± 0.014; after
    # fine-pruning ACC 0.90, 0.86 → 0.880 ± 0.028, ASR 0.20, 0.12 → 0.160 ± 0.057,
    # RA 0.70, 0.80 → 0.750 ± 0.071, DER 0.87, 0.89 → 0.880 ± 0.014, seconds 12, 14 → 13.0 ± 1.4.
    assert table_row(markdown, BADNETS_TITLE, "no defense") == (
        "no defense | 2 | 0.940 ± 0.014 | 0.980 ± 0.014 | 0.020 ± 0.014 | – | –"
    )
    assert table_row(markdown, BADNETS_TITLE, "fine-pruning") == (
        "fine-pruning | 2 | 0.880 ± 0.028 | 0.160 ± 0.057 | 0.750 ± 0.071 | 0.880 ± 0.014 | "
        "13.0 ± 1.4"
    )
    # One seed shows no ±; gnft's later run replaced the earlier one; no seconds recorded.
    assert (
        table_row(markdown, BADNETS_TITLE, "gnft") == "gnft | 1 | 0.910 | 0.500 | 0.450 | 0.725 | –"
    )
    assert (
        table_row(markdown, CLEAN_TITLE, "no defense") == "no defense | 1 | 0.960 | – | – | – | –"
    )
    assert table_row(markdown, CLEAN_TITLE, "ft \\<lr 0.01> & more") == (
        "ft \\<lr 0.01> & more | 1 | 0.955 | – | – | – | 5.0"
    )


def test_overview_pairs_each_run_with_the_model_it_was_given(report):
    _, markdown, _ = report
    # By hand: fine-pruning ΔACC 0.90 − 0.95 and 0.86 − 0.93 → −5.0, −7.0 points: −6.0 ± 1.4;
    # ASR 0.20, 0.12 → 0.160. gnft: only the later run of seed 0 counts (0.91 − 0.95 = −4.0).
    # The clean model's fine-tuning: 0.955 − 0.96 = −0.5 points. One attack: its DER, no mean.
    heading = "gratings / small-cnn"
    header = "defense | badnets | DER | clean model ΔACC"
    section = markdown.split(f"### {heading}\n", 1)[1]
    assert " | ".join(cells(section.split("\n", 2)[1])) == header
    assert table_row(markdown, heading, "no defense") == "no defense | 0.940 / 0.980 |  | 0.960"
    assert table_row(markdown, heading, "fine-pruning") == (
        "fine-pruning | −6.0 ± 1.4 / 0.160 | 0.880 | –"
    )
    assert table_row(markdown, heading, "gnft") == "gnft | −4.0 / 0.500 | 0.725 | –"
    assert table_row(markdown, heading, "ft \\<lr 0.01> & more") == (
        "ft \\<lr 0.01> & more | – | – | −0.5"
    )


def test_overview_names_settings_of_one_attack_apart_and_averages_attacks(tmp_path):
    low = {**BADNETS, "poison_rate": 0.01}
    blended = {**BADNETS, "attack": "blended", "attack_params": {}}
    models = [
        model_row("b10", BADNETS, 0, (0.90, 1.0, 0.0)),
        model_row("b01", low, 0, (0.92, 0.9, 0.1)),
        model_row("bl", blended, 0, (0.88, 1.0, 0.0)),
    ]
    cells_ = [
        cell_row("c1", models[0], "ft", (0.90, 1.0, 0.0), (0.88, 0.2, 0.7), 0.89, 1.0),
        cell_row("c2", models[1], "ft", (0.92, 0.9, 0.1), (0.93, 0.6, 0.3), 0.65, 1.0),
        cell_row("c3", models[2], "ft", (0.88, 1.0, 0.0), (0.84, 0.4, 0.5), 0.78, 1.0),
        cell_row("c4", models[2], "gnft", (0.88, 1.0, 0.0), (0.86, 0.1, 0.8), 0.94, 1.0),
    ]
    markdown = write_report(make_store(tmp_path / "r.db", models, cells_), tmp_path / "out")[
        0
    ].read_text()
    heading = "gratings / small-cnn"
    section = markdown.split(f"### {heading}\n", 1)[1]
    assert " | ".join(cells(section.split("\n", 2)[1])) == (
        "defense | badnets (1 % poisoned) | badnets (10 % poisoned) | blended | "
        "mean of 3: ΔACC / ASR / DER"
    )
    # ft: ΔACC +1, −2, −4 → mean −1.7; ASR 0.6, 0.2, 0.4 → 0.400; DER 0.65, 0.89, 0.78 → 0.773.
    assert table_row(markdown, heading, "ft") == (
        "ft | +1.0 / 0.600 | −2.0 / 0.200 | −4.0 / 0.400 | −1.7 / 0.400 / 0.773"
    )
    # gnft ran on one attack of three: its mean says so.
    assert table_row(markdown, heading, "gnft") == (
        "gnft | – | – | −2.0 / 0.100 | −2.0 / 0.100 / 0.940 (1 of 3)"
    )


def test_identification_and_figures(report):
    out, markdown, _ = report
    auc = markdown.split("### ROC-AUC\n", 1)[1].split("\n### ", 1)[0]
    assert f"| rule | {BADNETS_TITLE} |" in auc  # the clean model has no column
    assert "| mean-activation | 0.850 ± 0.071 |" in auc  # AUC 0.90 and 0.80
    assert all(f"| {rule} |" in auc for rule in RULES)
    assert "### precision@k" in markdown and "n = 2" in markdown
    figures = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", markdown)
    badnets = "gratings-small-cnn-badnets-10-poisoned-all-to-one-size-3"
    assert sorted(name.split("-", 1)[1] for name in figures) == sorted(
        [
            f"{badnets}-defenses.png",
            f"{badnets}-tradeoff.png",
            "gratings-small-cnn-none-defenses.png",
            f"{badnets}-pruning-mean-activation.png",
            f"{badnets}-search.png",
            f"{badnets}-gradient-groups.png",
        ]
    )
    for name in figures:
        assert (out / name).read_bytes().startswith(b"\x89PNG")


def test_html_is_self_contained_and_escaped(report):
    out, markdown, page = report
    assert page.count("<table>") == markdown.count("\n| ---") == 5
    assert page.count("<img ") == markdown.count("![")
    attributes = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, re.I)
    assert attributes and all(value.startswith("data:image/png;base64,") for value in attributes)
    assert not re.search(r"<(?:link|script|iframe)\b|url\(|@import", page, re.I)
    assert "ft &lt;lr 0.01&gt; &amp; more" in page and CLEAN_LABEL not in page
    assert "0.880 ± 0.028" in page


def test_sections_without_data_are_left_out_with_a_note(tmp_path):
    plain = model_row("plain", BADNETS, 0, (0.9, 0.95, 0.05))
    markdown, page = write_report(make_store(tmp_path / "r.db", [plain]), tmp_path / "out")
    text = markdown.read_text()
    assert "_No defense was run on these models._" in text
    assert "_No model pruning curve or pruning-defense search in the store._" in text
    assert "_No model in the store has identification results._" in text
    assert "_No model in the store has a neuron table._" in text
    assert "versions: not recorded" in text and "![" not in text
    assert page.read_text().count("<table>") == 1


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_writes_both_files_and_prints_their_paths(store, tmp_path):
    before = store.read_bytes()
    result = run("report", store, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    assert store.read_bytes() == before  # read-only
    assert result.output.split() == [
        str(tmp_path / "report" / n) for n in ("report.md", "report.html")
    ]


def test_cli_replaces_an_earlier_report_only_with_force(store, tmp_path):
    out = tmp_path / "report"
    assert run("report", store, "--out", out).exit_code == 0
    (out / "report.md").write_text("edited")
    again = run("report", store, "--out", out)
    assert again.exit_code == 2 and "already holds a torchpurify report" in again.output
    assert (out / "report.md").read_text() == "edited"
    assert run("report", store, "--out", out, "--force").exit_code == 0
    assert (out / "report.md").read_text().startswith("# torchpurify results report")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no staging left behind


def make_not_a_store(tmp_path, kind):
    path = tmp_path / "results.db"
    if kind == "text":
        path.write_text("ACC,ASR\n0.9,0.1\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "no-rows":
        make_store(path)
    return path


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("missing", "does not exist"),
        ("text", "not a torchpurify results store (not an SQLite file)"),
        ("empty", "empty SQLite file, not a torchpurify results store"),
        ("no-rows", "holds no models"),
    ],
)
def test_a_file_that_is_not_a_results_store_is_a_one_line_error(tmp_path, kind, fragment):
    result = run("report", make_not_a_store(tmp_path, kind), "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], lines
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError):
        write_report(tmp_path / "results.db", tmp_path / "out")


class Probe(HTMLParser):
    """Tables (their header cells) and the image widths the page's probe script recorded."""

    def __init__(self):
        super().__init__()
        self.tables, self.widths, self._in_th = [], None, False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        self._in_th = tag == "th"
        if tag == "body" and "data-widths" in dict(attrs):
            self.widths = [int(w) for w in dict(attrs)["data-widths"].split(",") if w]

    def handle_data(self, data):
        if self._in_th:
            self.tables[-1].append(data)

    def handle_endtag(self, tag):
        self._in_th = False


PROBE = """<script>addEventListener("load", () => {
  document.body.dataset.widths = [...document.images].map(i => i.complete ? i.naturalWidth : 0);
});</script>"""


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="no chromium binary (CI installs it with apt-get)")
def test_report_renders_in_a_headless_browser(report, tmp_path):
    """Chromium loads report.html from disk (no network needed): every table is in the DOM and
    every embedded image decodes to a real width; a probe script in a copy records the widths."""
    out, markdown, page = report
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    command = [
        chromium(),
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom",
        probed.as_uri(),
    ]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    probe = Probe()
    probe.feed(dom)
    lines = markdown.splitlines()
    expected = [cells(lines[i - 1]) for i, line in enumerate(lines) if line.startswith("| ---")]
    assert len(expected) == 5
    assert [[cell.strip() for cell in table] for table in probe.tables] == expected
    assert probe.widths is not None, "the probe script did not run"
    assert len(probe.widths) == markdown.count("![") == page.count("<img ")
    assert all(width > 0 for width in probe.widths), probe.widths


def test_search_points_leave_out_the_unpruned_point_of_mask_pruning():
    """ANP and RNP log the unpruned model as threshold None; the curve must still sort."""
    from torchpurify.report import search_points

    log = {"curve": [[None, 0.90], [0.5, 0.87], [0.45, 0.89]]}
    assert search_points(log) == [[0.45, 0.89], [0.5, 0.87]]
    rounds = {"rounds": [{"curve": [[2, 0.8], [1, 0.9]]}, {"curve": [[None, 0.95]]}]}
    assert search_points(rounds) == [[1, 0.9], [2, 0.8]]
    assert search_points(None) == []


# ------------------------------------------------------------ the estimate, validated (issue 28)

KWS = named(SETTING, ("speech-synth", "kws-cnn", "badnets", {"size": 3}, 0.1, "all-to-one"))
AUTO_LOG = {
    "auto": {
        "chosen": "linf-pruning",
        "tried": [{"defense": "linf-pruning", "guard": "kept", "est_asr_after": 0.0}],
        "stopped": "linf-pruning: the guard kept it and the estimate no longer suspects a backdoor",
    }
}


def moment(est_asr, family="mask"):
    """One moment's estimate as the store keeps it: the verdict's family and its record."""
    record = {"family": family, "label": 0, "est_asr": est_asr, "flagged": est_asr >= 0.5}
    return {**record, "families": {family: record}}


def estimated(row, before, after, family="mask"):
    return {**row, "estimate": {"before": moment(before), "after": moment(after, family)}}


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    """Five backdoored image cells (two false all-clears: true ASR ≥ 0.5, verdict clean), one of
    them `auto`; two clean image models (one flagged before; after ft one of two, after auto
    none); one audio cell stored before the families (est_asr/flagged only: the mask family)."""
    bad = [model_row(f"bad-{s}", BADNETS, s, (0.95, 0.99, 0.01)) for s in (0, 1)]
    clean = [model_row(f"clean-{s}", CLEAN, s, (0.96, None, None)) for s in (0, 1)]
    kws = model_row("kws-0", KWS, 0, (0.9, 1.0, 0.0))
    before = (0.95, 0.99, 0.01)

    def backdoored(key, model, label, asr, est, family, log=None):
        row = cell_row(key, model, label, before, (0.9, asr, 0.1), 0.5, 1.0, log)
        return estimated(row, 1.0, est, family)

    def on_clean(key, model, label, flagged_before, est_after):
        row = cell_row(key, model, label, (0.96, None, None), (0.95, None, None), None, 1.0)
        return estimated(row, 0.9 if flagged_before else 0.1, est_after)

    old = cell_row("kws-ft", kws, "ft", (0.9, 1.0, 0.0), (0.88, 0.8, 0.1), 0.2, 1.0)
    old["estimate"] = {"before": {"est_asr": 1.0, "flagged": True},
                       "after": {"est_asr": 0.2, "flagged": False}}  # fmt: skip
    cells_ = [
        backdoored("ft-0", bad[0], "ft", 0.90, 0.8, "mask"),
        backdoored("ft-1", bad[1], "ft", 0.95, 0.1, "perturbation"),  # a false all-clear
        backdoored("gn-0", bad[0], "gnft", 0.60, 0.3, "generator"),  # a false all-clear
        backdoored("gn-1", bad[1], "gnft", 0.10, 0.2, "mask"),
        backdoored("auto-0", bad[0], "auto", 0.05, 0.0, "mask", AUTO_LOG),
        on_clean("ft-c0", clean[0], "ft", True, 0.7),
        on_clean("ft-c1", clean[1], "ft", False, 0.1),
        on_clean("auto-c0", clean[0], "auto", True, 0.2),
        old,
    ]
    store = make_store(tmp_path_factory.mktemp("v") / "r.db", [*bad, *clean, kws], cells_)
    out = tmp_path_factory.mktemp("validated")
    return out, write_report(store, out)[0].read_text(), cells_


def test_the_estimate_is_validated_per_modality(validated):
    out, markdown, _ = validated
    images = markdown.split("### Backdoor estimate: images\n", 1)[1].split("\n### ", 1)[0]
    # By hand: true ASR 0.90, 0.95, 0.60, 0.10, 0.05 against estimated 0.8, 0.1, 0.3, 0.2, 0.0:
    # rank differences −1, 3, −1, −1, 0, Σd² = 12, ρ = 1 − 6·12 / (5·24) = 0.4.
    assert (
        "- Spearman rank correlation of estimated and true ASR after purification: 0.400 over "
        "5 backdoored cells" in images
    )
    assert "- false all-clears (true ASR ≥ 0.5 after, verdict clean): 2 of 5 (40 %)" in images
    assert "- false alarms on clean models before purification: 1 of 2 (50 %)" in images
    heading = "Backdoor estimate: images"
    assert table_row(markdown, heading, "no defense (before)") == (
        "no defense (before) | – | – | 1 of 2 (50 %)"
    )
    assert table_row(markdown, heading, "ft") == "ft | 1 of 2 (50 %) | – | 1 of 2 (50 %)"
    assert table_row(markdown, heading, "gnft") == "gnft | 1 of 2 (50 %) | – | –"
    assert table_row(markdown, heading, "auto") == "auto | 0 of 1 (0 %) | – | 0 of 1 (0 %)"
    audio = markdown.split("### Backdoor estimate: audio\n", 1)[1].split("\n## ", 1)[0]
    assert "- false all-clears (true ASR ≥ 0.5 after, verdict clean): 1 of 1 (100 %)" in audio
    assert "- false alarms on clean models before purification: –" in audio
    widths = {}
    for name in ("images", "audio"):
        figure = (out / "figures" / f"estimate-vs-true-asr-{name}.png").read_bytes()
        assert figure.startswith(b"\x89PNG")
        widths[name] = int.from_bytes(figure[16:20], "big")  # the PNG header's width
        assert f"](figures/estimate-vs-true-asr-{name}.png)" in markdown
    assert widths["images"] > 2.5 * widths["audio"]  # three family panels against one


def test_the_estimate_plot_has_a_panel_per_family(validated):
    from torchpurify.report import estimate_points, false_alarms, family_points, modality

    _, _, cells_ = validated
    points = estimate_points(cells_)
    assert sorted(p["modality"] for p in points) == ["audio"] + ["images"] * 5
    images = family_points([p for p in points if p["modality"] == "images"])
    assert list(images) == ["mask", "perturbation", "generator"]
    assert sorted(p["est"] for p in images["mask"]) == [0.0, 0.2, 0.8]
    audio = family_points([p for p in points if p["modality"] == "audio"])
    assert {family: [p["est"] for p in ps] for family, ps in audio.items()} == {"mask": [0.2]}
    assert false_alarms(cells_) == (1, 2) and false_alarms(cells_, "audio") == (0, 0)
    assert modality({"dataset": "image-folder", "model": "m5"}) == "audio"


def test_auto_is_a_row_of_every_table_with_its_choice(validated):
    _, markdown, _ = validated
    row = table_row(markdown, BADNETS_TITLE, "auto")
    assert row == "auto | 1 | 0.900 | 0.050 | 0.100 | 0.500 | 1.0"
    assert table_row(markdown, "gratings / small-cnn", "auto").startswith("auto | −5.0 / 0.050")
    assert table_row(markdown, CLEAN_TITLE, "auto").startswith("auto | 1 | 0.950")
    section = markdown.split(f"### {BADNETS_TITLE}\n", 1)[1].split("\n### ", 1)[0]
    assert (
        "- auto, seed 0: chose linf-pruning; tried linf-pruning (kept, estimated ASR after "
        "0.000); linf-pruning: the guard kept it and the estimate no longer suspects a backdoor"
        in section
    )


def _sweep_cell(label, model_key, guard, est_after, flagged, asr_before=1.0, asr_after=0.5):
    return {
        "defense": "fst", "label": label, "model_key": model_key, "finished_at": "12:00:00",
        "asr_before": asr_before, "asr_after": asr_after, "acc_after": 0.5, "seconds": 10.0,
        "log": {"guard": guard},
        "estimate": {"before": {"est_asr": 0.9, "flagged": True},
                     "after": {"est_asr": est_after, "flagged": flagged}},
    }  # fmt: skip


def _guard(before, after=None):
    if after is None:
        return {"action": "rolled back to the input model", "holdout_acc_input": before,
                "attempts": [{"holdout_acc": 0.5}]}  # fmt: skip
    return {"action": "kept", "holdout_acc_input": before, "attempts": [{"holdout_acc": after}]}


def test_the_development_rule_reads_guard_and_estimate_never_test_numbers():
    """The sweep rule (methods.md §12.12): settings over the budget or rolled back are
    inadmissible; among the rest the fewest suspected after wins, then the lowest estimate."""
    from torchpurify.report import sweep_section, sweep_summary

    cells = [
        # cheap but leaves the backdoor suspected
        _sweep_cell("a", "bad", _guard(0.90, 0.90), 0.90, True),
        _sweep_cell("a", "clean", _guard(0.90, 0.90), 0.10, False, asr_before=None),
        # removes it within budget: chosen
        _sweep_cell("b", "bad", _guard(0.90, 0.885), 0.30, False),
        _sweep_cell("b", "clean", _guard(0.90, 0.895), 0.10, False, asr_before=None),
        # removes it, lowest estimate, but costs the clean model 2 points: inadmissible
        _sweep_cell("c", "bad", _guard(0.90, 0.89), 0.05, False),
        _sweep_cell("c", "clean", _guard(0.90, 0.88), 0.10, False, asr_before=None),
        # rolled back on the backdoored model: inadmissible
        _sweep_cell("d", "bad", _guard(0.90), 0.01, False),
        _sweep_cell("d", "clean", _guard(0.90, 0.90), 0.10, False, asr_before=None),
    ]
    summary = {s["label"]: s for s in sweep_summary(cells)["fst"]}
    assert [label for label, s in summary.items() if s["chosen"]] == ["b"]
    assert not summary["c"]["admissible"] and not summary["d"]["admissible"]
    assert summary["a"]["admissible"] and summary["a"]["suspected"] == 1
    assert summary["b"]["cost"] == pytest.approx(0.015) and summary["d"]["rolled_back"] == 1
    for cell in cells:  # test numbers do not move the choice
        cell["asr_after"], cell["acc_after"] = (0.0, 1.0) if cell["label"] == "a" else (1.0, 0.0)
    assert [s["label"] for s in sweep_summary(cells)["fst"] if s["chosen"]] == ["b"]
    rows = {row[0]: row for row in sweep_section(cells)[-1].rows}
    assert rows["b"][-1] == "✓" and rows["c"][-1] == "inadmissible" and rows["c"][4] == "-2.0"


def test_the_development_rule_ranks_only_settings_run_on_every_model():
    """A setting run on fewer models than its defense's others is not compared with them: its
    mean over an easier subset would win by absence (methods.md §12.12)."""
    from torchpurify.report import sweep_section, sweep_summary

    cells = [
        _sweep_cell("a", "bad", _guard(0.90, 0.89), 0.30, False),
        _sweep_cell("a", "bad2", _guard(0.90, 0.89), 0.60, True),
        _sweep_cell("a", "clean", _guard(0.90, 0.90), 0.10, False, asr_before=None),
        # the lowest estimate, but never run on the harder model bad2
        _sweep_cell("b", "bad", _guard(0.90, 0.89), 0.05, False),
        _sweep_cell("b", "clean", _guard(0.90, 0.90), 0.10, False, asr_before=None),
    ]
    summary = {s["label"]: s for s in sweep_summary(cells)["fst"]}
    assert summary["a"]["complete"] and not summary["b"]["complete"]
    assert summary["b"]["admissible"] and summary["a"]["chosen"] and not summary["b"]["chosen"]
    rows = {row[0]: row for row in sweep_section(cells)[-1].rows}
    assert rows["b"][-1] == "incomplete" and rows["a"][-1] == "✓"
    cells.append(_sweep_cell("b", "bad2", _guard(0.90, 0.89), 0.20, False))
    assert [s["label"] for s in sweep_summary(cells)["fst"] if s["chosen"]] == ["b"]


def test_when_no_setting_is_admissible_the_least_over_budget_is_marked():
    """Every setting over the budgets (methods.md §12.12): the complete setting that overshoots
    least is the pick, marked as over budget; one rolled back too often is never picked."""
    from torchpurify.report import sweep_section, sweep_summary

    cells = [
        # 3 points on the backdoored model, 1.5 on the clean one: overshoot 1.0
        _sweep_cell("a", "bad", _guard(0.90, 0.87), 0.30, False),
        _sweep_cell("a", "clean", _guard(0.90, 0.885), 0.10, False, asr_before=None),
        # 2.5 and 1.2: overshoot 0.5, though it leaves the backdoor suspected
        _sweep_cell("b", "bad", _guard(0.90, 0.875), 0.90, True),
        _sweep_cell("b", "clean", _guard(0.90, 0.888), 0.10, False, asr_before=None),
        # rolled back on the backdoored model: half its models, never picked
        _sweep_cell("c", "bad", _guard(0.90), 0.90, True),
        _sweep_cell("c", "clean", _guard(0.90, 0.90), 0.10, False, asr_before=None),
    ]
    summary = {s["label"]: s for s in sweep_summary(cells)["fst"]}
    assert not any(s["admissible"] for s in summary.values())
    assert summary["b"]["chosen"] and summary["b"]["over_budget"]
    assert not summary["a"]["chosen"] and not summary["c"]["chosen"]
    rows = {row[0]: row for row in sweep_section(cells)[-1].rows}
    assert rows["b"][-1] == "✓ (over budget: the least)" and rows["a"][-1] == "inadmissible"


def test_a_clean_model_not_suspected_before_counts_no_false_alarm_after():
    """Cells stored before the rule of methods.md §12.2 (a model not suspected before is not
    flagged after) read by it: the clean model's after-flag counts only when it was suspected
    before."""
    from torchpurify.report import false_alarms_after

    def clean(label, seed, before, after):
        model = {"key": f"m{seed}", "seed": seed, **CLEAN}
        row = cell_row(
            f"{label}{seed}", model, label, (0.9, None, None), (0.9, None, None), None, 1
        )
        flags = {"before": before, "after": after}
        row["estimate"] = {k: {"est_asr": v, "flagged": v >= 0.5} for k, v in flags.items()}
        return row

    cells = [clean("fine-pruning", 0, 0.32, 0.62), clean("ft", 0, 0.32, 0.40),
             clean("gnft", 0, 0.81, 0.82)]  # fmt: skip
    counts = false_alarms_after(cells)
    assert counts == {"fine-pruning": (0, 1), "ft": (0, 1), "gnft": (1, 1)}


def test_stored_family_records_are_judged_by_the_current_rule():
    """A cell stored before the size test (methods.md §12.2) flagged a working capped trigger
    whatever its size; the report judges its family records again by today's thresholds: a mask
    at 0.6 of the other labels' median, no outlier, no longer suspects, one at 0.1 does, and an
    outlier suspects whatever its size. A record without per-family sizes keeps its
    ``flagged``."""
    from torchpurify.estimate import FamilyEstimate
    from torchpurify.report import _flagged

    def record(ratio, anomaly, est_asr=0.9, flagged=True):
        family = FamilyEstimate(
            family="mask", label=0, flagged=flagged, target=None, anomaly_index=anomaly,
            size=ratio * 10, reference_size=10.0, success=1.0, est_asr=est_asr, budget=0.8,
            seconds=1.0, sizes=[ratio * 10, 10.0, 10.0],
        )  # fmt: skip
        raw = dataclasses.asdict(family)
        return {"family": "mask", "est_asr": est_asr, "flagged": flagged,
                "families": {"mask": raw}}  # fmt: skip

    assert not _flagged(record(0.6, 1.0))
    assert _flagged(record(0.1, 1.0, flagged=False))  # judged again, not read
    assert _flagged(record(0.6, 3.5))
    assert _flagged(record(0.1, 0.0))
    assert not _flagged(record(0.1, 5.0, est_asr=0.3))
    assert not _flagged({"est_asr": 0.9, "flagged": False})
    assert _flagged({"est_asr": 0.9})


def test_the_guard_section_counts_rollbacks_and_guard_cost_per_modality():
    """Per modality and defense: rollbacks of the cells with a guard record, and the mean
    guard-half cost on backdoored and on clean models; cells without a guard are not counted."""
    from torchpurify.report import guard_section

    def cell(label, key, guard, dataset, asr_before=1.0):
        row = _sweep_cell(label, key, guard, 0.1, False, asr_before=asr_before)
        row.update(dataset=dataset, model="kws-cnn" if dataset == "speech-synth" else "small-cnn")
        if guard is None:
            row["log"] = {}
        return row

    cells = [
        cell("gnft", "img-bad", _guard(0.90, 0.88), "fashion-mnist"),
        cell("gnft", "img-bad2", _guard(0.90), "fashion-mnist"),
        cell("gnft", "img-clean", _guard(0.90, 0.895), "fashion-mnist", asr_before=None),
        cell("ft", "img-bad", None, "fashion-mnist"),
        cell("gnft", "kws-bad", _guard(0.80, 0.79), "speech-synth"),
    ]
    blocks = guard_section(cells)
    tables = [b for b in blocks if hasattr(b, "rows")]
    audio, images = tables  # modalities in name order
    assert images.rows == [["gnft", "3", "1 of 3 (33 %)", "-1.0", "-0.5"]]  # ft: no guard
    assert audio.rows == [["gnft", "1", "0 of 1 (0 %)", "-1.0", "–"]]
    assert guard_section([cell("ft", "img-bad", None, "fashion-mnist")]) == []
