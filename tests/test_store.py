"""The SQLite results store: its exact layout, round trips and no duplicates."""

import sqlite3

import pytest

from torchpurify.errors import UserError
from torchpurify.store import CELL_COLUMNS, MODEL_COLUMNS, Store, utc_now


def model_row(key="m1", **extra):
    return {
        "key": key, "dataset": "digits", "model": "small-cnn", "attack": "badnets",
        "attack_params": {"size": 2, "position": "bottom-right"}, "poison_rate": 0.1,
        "target": 0, "target_mode": "all-to-one", "seed": 0,
        "train_recipe": {"epochs": 1, "lr": 0.05}, "path": "/cache/m1", "acc": 0.9,
        "asr": 1.0, "ra": 0.0, "train_seconds": 1.5, "identification": {"rules": {}},
        "neuron_table": [{"channel": 0}], "pruning_curve": None, "created_at": utc_now(),
        **extra,
    }  # fmt: skip


def cell_row(key="c1", model_key="m1", **extra):
    return {
        "key": key, "spec_hash": "s", "model_key": model_key, "dataset": "digits",
        "model": "small-cnn", "attack": "badnets", "attack_params": {"size": 2},
        "poison_rate": 0.1, "target_mode": "all-to-one", "seed": 0, "defense": "ft",
        "label": "ft", "defense_params": {"epochs": 1, "lr": 0.01}, "defender_fraction": 0.05,
        "acc_before": 0.9, "asr_before": 1.0, "ra_before": 0.0, "acc_after": 0.88,
        "asr_after": 0.1, "ra_after": 0.8, "der": 0.94, "seconds": 2.0, "forward_passes": 10,
        "backward_passes": 10, "log": {"history": [{"epoch": 1, "loss": 0.3}]},
        "versions": {"torch": "x"}, "started_at": utc_now(), "finished_at": utc_now(),
        **extra,
    }  # fmt: skip


def test_the_schema_is_the_agreed_one(tmp_path):
    with Store(tmp_path / "r.db"):
        pass
    connection = sqlite3.connect(tmp_path / "r.db")
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    columns = {
        table: [r[1] for r in connection.execute(f"PRAGMA table_info({table})")]
        for table in ("models", "cells")
    }
    assert columns["models"] == list(MODEL_COLUMNS)
    assert columns["cells"] == list(CELL_COLUMNS)
    assert MODEL_COLUMNS[-4:] == ("identification", "neuron_table", "pruning_curve", "created_at")
    assert CELL_COLUMNS[-4:] == ("log", "versions", "started_at", "finished_at")


def test_rows_round_trip_with_json_columns_decoded(tmp_path):
    with Store(tmp_path / "r.db") as store:
        store.add_model(model_row())
        assert store.add_cell(cell_row())
    with Store(tmp_path / "r.db") as store:  # reopened: the rows were committed
        assert store.models() == [model_row(created_at=store.models()[0]["created_at"])]
        cell = store.cells()[0]
        assert cell["log"] == {"history": [{"epoch": 1, "loss": 0.3}]}
        assert cell["defense_params"] == {"epochs": 1, "lr": 0.01}
        assert store.has_cell("c1") and not store.has_cell("c2")
        assert store.model("m1")["pruning_curve"] is None and store.model("m2") is None
    # Plain SQL sees JSON text, as a report reads it.
    raw = sqlite3.connect(tmp_path / "r.db").execute("SELECT log FROM cells").fetchone()[0]
    assert raw == '{"history": [{"epoch": 1, "loss": 0.3}]}'


def test_nothing_is_ever_duplicated(tmp_path):
    with Store(tmp_path / "r.db") as store:
        store.add_model(model_row())
        store.add_model(model_row(acc=0.95))  # retrained or diagnosed later: replaced
        assert store.add_cell(cell_row())
        assert not store.add_cell(cell_row(acc_after=0.5))  # the first finished row stays
        assert store.add_cell(cell_row("c2"))
        assert [m["acc"] for m in store.models()] == [0.95]
        assert [c["acc_after"] for c in store.cells()] == [0.88, 0.88]
        assert store.cell_keys() == {"c1", "c2"}
        assert [c["key"] for c in store.cells(["c2"])] == ["c2"]


def test_a_row_with_a_wrong_column_is_refused(tmp_path):
    with Store(tmp_path / "r.db") as store:
        row = cell_row()
        del row["der"]
        with pytest.raises(ValueError, match="missing \\['der'\\]"):
            store.add_cell(row)
        assert store.cells() == []


def test_a_file_that_is_not_a_store_is_a_user_error(tmp_path):
    (tmp_path / "notes.db").write_text("not a database, just text " * 100)
    with pytest.raises(UserError, match="is not a torchpurify results store"):
        Store(tmp_path / "notes.db")
    with pytest.raises(UserError, match="is a directory"):
        Store(tmp_path)
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE cells (key TEXT PRIMARY KEY)")
    other.commit()
    with pytest.raises(UserError, match="another layout"):
        Store(tmp_path / "other.db")
