"""Typed defense logs (torchpurify.logs): the committed stores' logs parse into their records
and write back as the same JSON; the report reads them by attribute."""

import json
import sqlite3
from pathlib import Path

import pytest

from torchpurify.logs import (
    LOGS,
    AutoLog,
    DefenseLog,
    GradientNormLog,
    GuardRecord,
    PruningLog,
    parse_log,
)

ROOT = Path(__file__).resolve().parents[1]
# The committed stores (those a sweep is still writing are left out).
STORES = sorted(
    p for p in (ROOT / "docs" / "results").glob("*/results.db")
    if p.parent.name not in ("dev-sweep", "dev-audio-sweep")
)  # fmt: skip


def old_search_points(log):
    """report.search_points as it read the dicts before the records."""
    if not log:
        return []
    points = log.get("curve") or [
        point for round_ in log.get("rounds", []) for point in round_.get("curve", [])
    ]
    return sorted(point for point in points if point[0] is not None)


@pytest.mark.parametrize("store", STORES, ids=lambda p: p.parent.name)
def test_every_stored_log_parses_into_its_record_and_back_unchanged(store):
    connection = sqlite3.connect(f"{store.as_uri()}?mode=ro", uri=True)
    rows = connection.execute("SELECT defense, log FROM cells WHERE log IS NOT NULL").fetchall()
    assert rows
    for defense, text in rows:
        log = json.loads(text)
        for record in (parse_log(log, defense), parse_log(log)):
            assert json.dumps(record.to_dict()) == json.dumps(log), defense
            assert sorted(record.search_points()) == old_search_points(log)
        record = parse_log(log, defense)
        assert isinstance(record, LOGS.get(defense, DefenseLog))
        if "guard" in log:
            assert isinstance(record.guard, GuardRecord)
            assert record.guard.action == log["guard"].get("action")


def test_a_record_built_in_code_writes_the_keys_of_the_log_before_records():
    log = GradientNormLog(radius=0.5, lambda_=0.45, history=[{"epoch": 1}]).to_dict()
    assert log == {"radius": 0.5, "lambda": 0.45, "history": [{"epoch": 1}]}
    assert list(log) == ["radius", "lambda", "history"]
    parsed = parse_log(log, "gnft")
    assert parsed.lambda_ == 0.45 and parsed.to_dict() == log


def test_unknown_keys_are_kept_and_kinds_found_by_content():
    log = {"layer": "conv", "num_pruned": 3, "curve": [[0, 0.9], [3, 0.88]], "new_key": [1]}
    record = parse_log(log)
    assert isinstance(record, PruningLog) and record.num_pruned == 3 and record.layer == "conv"
    assert record.extra == {"new_key": [1]} and record.to_dict() == log
    auto = parse_log({"auto": {"chosen": "gnft", "tried": [{"defense": "gnft"}]}})
    assert isinstance(auto, AutoLog) and auto.chosen == "gnft" and len(auto.tried) == 1
    guard = {"holdout_acc_input": 0.9, "floor": 0.86, "attempts": [{"holdout_acc": 0.8},
             {"holdout_acc": 0.88}], "action": "backed off: lr=0.005"}  # fmt: skip
    assert parse_log({"guard": guard}).guard.cost() == pytest.approx((0.02, False))
    assert parse_log(None).to_dict() == {} and parse_log({}).guard is None
