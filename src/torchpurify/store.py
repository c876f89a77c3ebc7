"""The results store: one SQLite file with a row per trained model and a row per defense cell.

Rows are written only when their work has finished, each in one transaction, and keyed by the
digests of :mod:`torchpurify.spec`: an interrupted run leaves no half-written row, and running
the same spec again skips what is there. JSON columns hold nested records; reports read the file
with plain SQL.

Several runners may share one store: before a model is trained or a cell is run, its runner
*claims* it with a row in ``leases`` (owner and heartbeat time); the others skip what is claimed.
A background thread refreshes the heartbeat of the owner's leases, and a lease whose heartbeat
is older than ``lease_seconds`` (a killed runner) may be claimed again.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torchpurify.errors import UserError, check

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
  key TEXT PRIMARY KEY,            -- sha256 of everything that determines the trained model
  dataset TEXT NOT NULL, model TEXT NOT NULL, attack TEXT NOT NULL,  -- attack 'none' = clean
  attack_params TEXT NOT NULL,     -- JSON
  poison_rate REAL, target INTEGER, target_mode TEXT, seed INTEGER NOT NULL,
  train_recipe TEXT NOT NULL,      -- JSON (TrainConfig fields)
  path TEXT NOT NULL,              -- the saved model folder (model.safetensors + model.json)
  acc REAL, asr REAL, ra REAL, train_seconds REAL,
  identification TEXT,             -- JSON: diagnostics.neuron_identification(...) or NULL
  neuron_table TEXT,               -- JSON: diagnostics.neuron_table(...) rows or NULL
  pruning_curve TEXT,              -- JSON: diagnostics.pruning_curve(...) rows or NULL
  created_at TEXT NOT NULL,        -- ISO 8601 UTC
  weights_sha256 TEXT,             -- SHA-256 of model.safetensors (NULL: stored before 12-06)
  versions TEXT                    -- JSON: versions and git commit that trained it
);
CREATE TABLE IF NOT EXISTS cells (
  key TEXT PRIMARY KEY, -- sha256 of model key + defense name + resolved params + defender_fraction
  spec_hash TEXT NOT NULL, model_key TEXT NOT NULL REFERENCES models(key),
  dataset TEXT NOT NULL, model TEXT NOT NULL, attack TEXT NOT NULL, attack_params TEXT NOT NULL,
  poison_rate REAL, target_mode TEXT, seed INTEGER NOT NULL,
  defense TEXT NOT NULL, label TEXT NOT NULL,   -- label: the spec's label, else the defense name
  defense_params TEXT NOT NULL,    -- JSON: the defense's hyper-parameters, Defense.params()
                                   -- (before 12-07 also its run context and guard settings)
  defender_fraction REAL NOT NULL,
  acc_before REAL, asr_before REAL, ra_before REAL,
  acc_after REAL, asr_after REAL, ra_after REAL, der REAL,
  seconds REAL, forward_passes INTEGER, backward_passes INTEGER,
  log TEXT,                        -- JSON: the defense's log (card["defense"]["log"])
  versions TEXT NOT NULL,          -- JSON: torchpurify, torch, numpy, python versions
  started_at TEXT NOT NULL, finished_at TEXT NOT NULL,
  estimate TEXT,                   -- JSON: the backdoor estimate before/after (estimate.compare)
  est_asr_before REAL, est_asr_after REAL,  -- its estimated ASR, for plain SQL
  weights_sha256 TEXT,             -- SHA-256 of the weights it purified (NULL: before 12-06)
  run_context TEXT,                -- JSON: device, seed, batch size (NULL: before 12-07)
  guard_settings TEXT              -- JSON: max_acc_drop, guard_retries (NULL: before 12-07)
);
CREATE TABLE IF NOT EXISTS leases (
  key TEXT PRIMARY KEY,            -- a cell key, or 'model:' + a model key
  owner TEXT NOT NULL,             -- host:pid:random of the runner working on it
  heartbeat REAL NOT NULL          -- Unix time of the owner's last sign of life
);
"""
TABLES = ("models", "cells", "leases")
SQLITE_HEADER = b"SQLite format 3\x00"
LEASE_SECONDS = 120.0  # a runner silent this long is taken for dead
MODEL_JSON = (
    "attack_params",
    "train_recipe",
    "identification",
    "neuron_table",
    "pruning_curve",
    "versions",
)
CELL_JSON = (
    "attack_params", "defense_params", "log", "versions", "estimate", "run_context",
    "guard_settings",
)  # fmt: skip
# Columns added to a table after its first release: a store without them gains them (NULL for
# the rows already there) when opened for writing, and reads as if they were NULL when not.
ADDED_COLUMNS = {
    "models": {"weights_sha256": "TEXT", "versions": "TEXT"},
    "cells": {
        "estimate": "TEXT", "est_asr_before": "REAL", "est_asr_after": "REAL",
        "weights_sha256": "TEXT", "run_context": "TEXT", "guard_settings": "TEXT",
    },
}  # fmt: skip


def utc_now() -> str:
    """ISO 8601 time in UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _encode(row: dict[str, Any], json_columns: tuple[str, ...]) -> dict[str, Any]:
    encoded = dict(row)
    for key in json_columns:
        if encoded.get(key) is not None:
            encoded[key] = json.dumps(encoded[key], sort_keys=True)
    return encoded


def _decode(row: sqlite3.Row, json_columns: tuple[str, ...]) -> dict[str, Any]:
    return {
        key: json.loads(row[key]) if key in json_columns and row[key] is not None else row[key]
        for key in row.keys()
    }


class Store:
    """A results file (created on first use). Use as a context manager, or call :meth:`close`.

    Write methods take rows whose JSON columns are Python values; read methods give them back
    decoded. Several processes may read while one writes (WAL mode). ``readonly`` opens an
    existing store without ever writing to it (reports).
    """

    def __init__(
        self, path: str | Path, readonly: bool = False, lease_seconds: float | None = None
    ) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.lease_seconds = LEASE_SECONDS if lease_seconds is None else lease_seconds
        self._check_file()
        try:
            if readonly:
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                self.connection = sqlite3.connect(uri, uri=True, timeout=60)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.connection = sqlite3.connect(self.path, timeout=60)
            self.connection.row_factory = sqlite3.Row
            self._check_tables()
            if not readonly:
                self.connection.execute("PRAGMA journal_mode=WAL")
                self.connection.executescript(SCHEMA)
        except sqlite3.DatabaseError as error:
            raise UserError(f"{self.path} is not a torchpurify results store ({error})") from None
        self._check_columns()

    def _check_file(self) -> None:
        """One line for each way the file cannot be a store here, before SQLite touches it."""
        path = self.path
        if path.is_dir():
            raise UserError(f"results store {path} is a directory; give a file like results.db")
        exists = path.is_file()
        if self.readonly and not exists:
            raise UserError(
                f"{path} does not exist; give the results store (SQLite file) the runner wrote"
            )
        if exists and path.stat().st_size > 0:
            with open(path, "rb") as file:
                if file.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                    raise UserError(
                        f"{path} is not a torchpurify results store (not an SQLite file); "
                        "give a new file name or the store the runner wrote"
                    )
        if self.readonly:
            return
        if exists and not os.access(path, os.R_OK | os.W_OK):
            raise UserError(
                f"results store {path} is read-only; make it writable or give another "
                "--results file"
            )
        folder = path.resolve().parent
        while not folder.exists():
            folder = folder.parent
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(
                f"cannot write in {folder}, where the results store {path.name} and its journal "
                "go; choose a writable place"
            )

    def _check_tables(self) -> None:
        """Refuse the SQLite file of another program instead of adding tables to it."""
        rows = self.connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        ).fetchall()
        found = {row[0] for row in rows}
        ours = {"models", "cells"} <= found and found <= set(TABLES)
        if found and not ours:
            raise UserError(
                f"{self.path} is an SQLite database of another program (tables: "
                f"{', '.join(sorted(found)[:5])}); give a new results file"
            )
        if self.readonly and not found:
            raise UserError(f"{self.path} is an empty SQLite file, not a torchpurify results store")

    def _check_columns(self) -> None:
        for table, columns in (("models", MODEL_COLUMNS), ("cells", CELL_COLUMNS)):
            found = [r[1] for r in self.connection.execute(f"PRAGMA table_info({table})")]
            added = ADDED_COLUMNS.get(table, {})
            missing = list(columns[len(found) :])
            if found == list(columns[: len(found)]) and missing and set(missing) <= set(added):
                if self.readonly:
                    continue  # reading an older store: the new columns read as absent
                with self.connection:  # migration: an older store gains the new columns
                    for name in missing:
                        self.connection.execute(
                            f"ALTER TABLE {table} ADD COLUMN {name} {added[name]}"
                        )
                continue
            if found != list(columns):
                raise UserError(
                    f"{self.path} has a {table} table of another layout; use a new results file"
                )

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------- writing

    def add_model(self, row: dict[str, Any]) -> None:
        """Record a trained model; a row of the same key is replaced (retrained, or diagnostics
        added later)."""
        self._insert("INSERT OR REPLACE", "models", MODEL_COLUMNS, _encode(row, MODEL_JSON))

    def add_cell(self, row: dict[str, Any]) -> bool:
        """Record a finished cell in one transaction (its lease, if any, ends with it); False
        when its key was already there."""
        return self._insert("INSERT OR IGNORE", "cells", CELL_COLUMNS, _encode(row, CELL_JSON))

    def _insert(self, verb: str, table: str, columns: tuple[str, ...], row: dict) -> bool:
        row = {**dict.fromkeys(ADDED_COLUMNS.get(table, {})), **row}  # optional: NULL
        missing = [c for c in columns if c not in row]
        unknown = [c for c in row if c not in columns]
        if missing or unknown:
            raise ValueError(f"{table} row: missing {missing}, unknown {unknown}")
        names = ", ".join(columns)
        marks = ", ".join(f":{c}" for c in columns)
        lease = row["key"] if table == "cells" else model_lease(row["key"])
        with self.connection:  # one transaction: the whole row (and its lease's end) or nothing
            cursor = self.connection.execute(f"{verb} INTO {table} ({names}) VALUES ({marks})", row)
            self.connection.execute("DELETE FROM leases WHERE key = ?", (lease,))
        return cursor.rowcount == 1

    def retire(self, model_keys: Iterable[str], archive: Store) -> tuple[int, int]:
        """Move the rows of the models ``model_keys`` and of every cell measured on them into
        ``archive`` (another store), then delete them here, so the runner can train those
        models afresh under the same keys (their weights were lost, and a retrained model with
        another hash may not inherit their cells). Nothing is dropped: the archive keeps every
        column. Returns (models, cells) moved."""
        keys = sorted(set(model_keys))
        check(bool(keys), "name at least one model to retire")
        check(archive.path.resolve() != self.path.resolve(),
              "the archive must be another store than the one retired from")  # fmt: skip
        models = self.models(keys)
        cells = [c for c in self.cells() if c["model_key"] in set(keys)]
        taken = [r["key"] for r in archive.models(keys)] + sorted(
            archive.cell_keys() & {c["key"] for c in cells}
        )
        if taken:
            raise UserError(
                f"{archive.path} already holds {taken[0][:12]}… (retired before?): give another "
                "archive, so no retired row replaces or drops another"
            )
        for row in models:
            archive.add_model(row)
        for row in cells:
            archive.add_cell(row)
        marks = ", ".join("?" * len(keys))
        with self.connection:  # the archive holds them: delete here in one transaction
            self.connection.execute(f"DELETE FROM cells WHERE model_key IN ({marks})", keys)
            self.connection.execute(f"DELETE FROM models WHERE key IN ({marks})", keys)
        return len(models), len(cells)

    # ------------------------------------------------------------------------- leases

    def claim(self, key: str, owner: str) -> bool:
        """Take the lease on ``key`` for ``owner``: True when it was free, stale or already
        ``owner``'s; False while another runner holds it. Atomic across processes."""
        now = time.time()
        with self.connection:
            cursor = self.connection.execute(
                "INSERT INTO leases (key, owner, heartbeat) VALUES (?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET owner = excluded.owner, "
                "heartbeat = excluded.heartbeat "
                "WHERE leases.owner = excluded.owner OR leases.heartbeat < ?",
                (key, owner, now, now - self.lease_seconds),
            )
        return cursor.rowcount == 1

    def release(self, key: str, owner: str) -> None:
        with self.connection:
            self.connection.execute("DELETE FROM leases WHERE key = ? AND owner = ?", (key, owner))

    def live_leases(self) -> dict[str, str]:
        """Keys claimed by a runner that is still beating, and their owners."""
        rows = self.connection.execute(
            "SELECT key, owner FROM leases WHERE heartbeat >= ?",
            (time.time() - self.lease_seconds,),
        ).fetchall()
        return {key: owner for key, owner in rows}

    def runner(self) -> Runner:
        """A new owner for leases, with its heartbeat (use as a context manager)."""
        return Runner(self)

    # ------------------------------------------------------------------------- reading

    def has_cell(self, key: str) -> bool:
        found = self.connection.execute("SELECT 1 FROM cells WHERE key = ?", (key,)).fetchone()
        return found is not None

    def cell_keys(self) -> set[str]:
        return {r[0] for r in self.connection.execute("SELECT key FROM cells")}

    def model(self, key: str) -> dict[str, Any] | None:
        row = self.connection.execute("SELECT * FROM models WHERE key = ?", (key,)).fetchone()
        return None if row is None else _decode(row, MODEL_JSON)

    def models(self, keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
        return self._select("models", MODEL_JSON, keys)

    def cells(self, keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Finished cells (those of ``keys`` when given), oldest first."""
        return self._select("cells", CELL_JSON, keys)

    def _select(self, table: str, json_columns, keys: Iterable[str] | None) -> list[dict]:
        order = "finished_at" if table == "cells" else "created_at"
        rows = self.connection.execute(f"SELECT * FROM {table} ORDER BY {order}, key").fetchall()
        wanted = None if keys is None else set(keys)
        return [_decode(r, json_columns) for r in rows if wanted is None or r["key"] in wanted]


def model_lease(key: str) -> str:
    """The lease key of training (or diagnosing) the model ``key``."""
    return f"model:{key}"


class Runner:
    """One runner's identity on a store: claims keys, and while it is open a thread refreshes
    the heartbeat of its leases every quarter of ``lease_seconds``; closing releases them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="store-heartbeat")

    def __enter__(self) -> Runner:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        with self.store.connection:
            self.store.connection.execute("DELETE FROM leases WHERE owner = ?", (self.owner,))

    def claim(self, key: str) -> bool:
        return self.store.claim(key, self.owner)

    def release(self, key: str) -> None:
        self.store.release(key, self.owner)

    def _beat(self) -> None:
        # SQLite connections belong to one thread: the heartbeat has its own.
        connection = sqlite3.connect(self.store.path, timeout=60)
        try:
            while not self._stop.wait(self.store.lease_seconds / 4):
                try:
                    with connection:
                        connection.execute(
                            "UPDATE leases SET heartbeat = ? WHERE owner = ?",
                            (time.time(), self.owner),
                        )
                except sqlite3.OperationalError:  # busy past the timeout: beat next time
                    continue
        finally:
            connection.close()


def _columns(table: str) -> tuple[str, ...]:
    """Column names of ``table`` in :data:`SCHEMA`, in order."""
    body = SCHEMA.split(f"CREATE TABLE IF NOT EXISTS {table} (")[1].split(");")[0]
    code = " ".join(line.split("--")[0] for line in body.splitlines())
    names = []
    for part in code.split(","):
        words = part.split()
        if words:
            names.append(words[0])
    return tuple(names)


MODEL_COLUMNS = _columns("models")
CELL_COLUMNS = _columns("cells")
