"""The SQLite results store: its exact layout, round trips and no duplicates."""

import os
import sqlite3
import time
from pathlib import Path

import pytest

from torchpurify.errors import UserError
from torchpurify.store import CELL_COLUMNS, MODEL_COLUMNS, Store, model_lease, utc_now


def model_row(key="m1", **extra):
    return {
        "key": key, "dataset": "digits", "model": "small-cnn", "attack": "badnets",
        "attack_params": {"size": 2, "position": "bottom-right"}, "poison_rate": 0.1,
        "target": 0, "target_mode": "all-to-one", "seed": 0,
        "train_recipe": {"epochs": 1, "lr": 0.05}, "path": "/cache/m1", "acc": 0.9,
        "asr": 1.0, "ra": 0.0, "train_seconds": 1.5, "identification": {"rules": {}},
        "neuron_table": [{"channel": 0}], "pruning_curve": None, "created_at": utc_now(),
        "weights_sha256": "ab" * 32, "versions": {"torch": "x", "commit": "c0ffee"},
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
        "weights_sha256": "ab" * 32, **extra,
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
    assert MODEL_COLUMNS[-6:-2] == (
        "identification", "neuron_table", "pruning_curve", "created_at"
    )  # fmt: skip
    assert MODEL_COLUMNS[-2:] == ("weights_sha256", "versions")  # added later
    assert CELL_COLUMNS[-10:-6] == ("log", "versions", "started_at", "finished_at")
    assert CELL_COLUMNS[-6:] == (  # added later
        "estimate", "est_asr_before", "est_asr_after", "weights_sha256", "run_context",
        "guard_settings",
    )  # fmt: skip


def test_an_older_store_gains_the_provenance_columns_and_keeps_its_rows(tmp_path):
    """A store written before weights hashes were recorded opens for writing with the new
    columns added (NULL for its rows), and reads as before when opened read-only."""
    with Store(tmp_path / "r.db") as store:
        store.add_model(model_row())
        store.add_cell(cell_row())
    connection = sqlite3.connect(tmp_path / "r.db")
    for table, columns in (("models", MODEL_COLUMNS[:-2]), ("cells", CELL_COLUMNS[:-3])):
        connection.executescript(  # the table as it was before the provenance columns
            f"CREATE TABLE old AS SELECT {', '.join(columns)} FROM {table}; "
            f"DROP TABLE {table}; ALTER TABLE old RENAME TO {table};"
        )
    connection.close()
    with Store(tmp_path / "r.db", readonly=True) as store:
        assert "weights_sha256" not in store.models()[0]
    with Store(tmp_path / "r.db") as store:
        (model,), (cell,) = store.models(), store.cells()
        assert model["weights_sha256"] is None and model["versions"] is None
        assert cell["weights_sha256"] is None and cell["acc_after"] == 0.88
        store.add_model(model_row("m2"))
        assert store.model("m2")["weights_sha256"] == "ab" * 32


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
    old = sqlite3.connect(tmp_path / "old.db")
    old.execute("CREATE TABLE models (key TEXT PRIMARY KEY)")
    old.execute("CREATE TABLE cells (key TEXT PRIMARY KEY)")
    old.commit()
    with pytest.raises(UserError, match="another layout"):
        Store(tmp_path / "old.db")


def test_the_sqlite_file_of_another_program_is_refused_and_left_unchanged(tmp_path):
    path = tmp_path / "app.db"
    other = sqlite3.connect(path)
    other.execute("CREATE TABLE people (name TEXT)")
    other.commit()
    other.close()
    before = path.read_bytes()
    with pytest.raises(UserError, match="another program \\(tables: people\\)"):
        Store(path)
    assert path.read_bytes() == before
    tables = sqlite3.connect(path).execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == [("people",)]


def test_a_read_only_store_is_named_as_read_only(tmp_path, monkeypatch):
    path = tmp_path / "r.db"
    with Store(path) as store:
        store.add_model(model_row())
    # chmod cannot stop root, so the permission answer is faked; the message is what is tested.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != path and real_access(p, mode))
    with pytest.raises(UserError, match="r.db is read-only"):
        Store(path)
    with Store(path, readonly=True) as store:  # reading needs no write permission
        assert [m["key"] for m in store.models()] == ["m1"]


def test_readonly_opening_never_creates_or_writes(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Store(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()
    (tmp_path / "empty.db").touch()
    with pytest.raises(UserError, match="empty SQLite file"):
        Store(tmp_path / "empty.db", readonly=True)
    assert (tmp_path / "empty.db").stat().st_size == 0


def test_a_claimed_key_is_skipped_by_another_runner_until_its_lease_is_stale(tmp_path):
    path = tmp_path / "r.db"
    with Store(path) as first, Store(path) as second:
        assert first.claim("c1", "a") and first.claim("c1", "a")  # a lease is re-entrant
        assert not second.claim("c1", "b")
        assert second.live_leases() == {"c1": "a"}
        first.connection.execute("UPDATE leases SET heartbeat = heartbeat - 1000")
        first.connection.commit()
        assert second.claim("c1", "b")  # "a" fell silent: the cell is taken over
        assert not first.claim("c1", "a")
        second.add_cell(cell_row("c1"))  # a finished cell ends its lease
        assert second.live_leases() == {}


def test_a_runner_keeps_its_leases_alive_and_releases_them_on_exit(tmp_path):
    path = tmp_path / "r.db"
    with Store(path, lease_seconds=0.4) as store, Store(path, lease_seconds=0.4) as other:
        with store.runner() as runner:
            assert runner.claim("c1") and runner.claim(model_lease("m1"))
            time.sleep(1.0)  # more than a lease's life: only the heartbeat keeps it
            assert not other.claim("c1", "someone else")
            assert set(other.live_leases()) == {"c1", "model:m1"}
        assert other.live_leases() == {}
        assert other.claim("c1", "someone else")
