"""The results store: one SQLite file with a row per trained model and a row per defense cell.

Rows are written only when their work has finished, each in one transaction, and keyed by the
digests of :mod:`torchpurify.spec`: an interrupted run leaves no half-written row, and running
the same spec again skips what is there. JSON columns hold nested records; reports read the file
with plain SQL.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torchpurify.errors import UserError

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
  created_at TEXT NOT NULL         -- ISO 8601 UTC
);
CREATE TABLE IF NOT EXISTS cells (
  key TEXT PRIMARY KEY, -- sha256 of model key + defense name + resolved params + defender_fraction
  spec_hash TEXT NOT NULL, model_key TEXT NOT NULL REFERENCES models(key),
  dataset TEXT NOT NULL, model TEXT NOT NULL, attack TEXT NOT NULL, attack_params TEXT NOT NULL,
  poison_rate REAL, target_mode TEXT, seed INTEGER NOT NULL,
  defense TEXT NOT NULL, label TEXT NOT NULL,   -- label: the spec's label, else the defense name
  defense_params TEXT NOT NULL,    -- JSON: the defense's full resolved params (Defense.params())
  defender_fraction REAL NOT NULL,
  acc_before REAL, asr_before REAL, ra_before REAL,
  acc_after REAL, asr_after REAL, ra_after REAL, der REAL,
  seconds REAL, forward_passes INTEGER, backward_passes INTEGER,
  log TEXT,                        -- JSON: the defense's log (card["defense"]["log"])
  versions TEXT NOT NULL,          -- JSON: torchpurify, torch, numpy, python versions
  started_at TEXT NOT NULL, finished_at TEXT NOT NULL
);
"""
MODEL_JSON = ("attack_params", "train_recipe", "identification", "neuron_table", "pruning_curve")
CELL_JSON = ("attack_params", "defense_params", "log", "versions")


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
    decoded. Several processes may read while one writes (WAL mode).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise UserError(
                f"results store {self.path} is a directory; give a file like results.db"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.connection = sqlite3.connect(self.path, timeout=60)
            self.connection.row_factory = sqlite3.Row
            self.connection.execute("PRAGMA journal_mode=WAL")
            self.connection.executescript(SCHEMA)
        except sqlite3.DatabaseError as error:
            raise UserError(f"{self.path} is not a torchpurify results store ({error})") from None
        self._check_columns()

    def _check_columns(self) -> None:
        for table, columns in (("models", MODEL_COLUMNS), ("cells", CELL_COLUMNS)):
            found = [r[1] for r in self.connection.execute(f"PRAGMA table_info({table})")]
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
        """Record a finished cell in one transaction; False when its key was already there."""
        return self._insert("INSERT OR IGNORE", "cells", CELL_COLUMNS, _encode(row, CELL_JSON))

    def _insert(self, verb: str, table: str, columns: tuple[str, ...], row: dict) -> bool:
        missing = [c for c in columns if c not in row]
        unknown = [c for c in row if c not in columns]
        if missing or unknown:
            raise ValueError(f"{table} row: missing {missing}, unknown {unknown}")
        names = ", ".join(columns)
        marks = ", ".join(f":{c}" for c in columns)
        with self.connection:  # one transaction: the whole row or nothing
            cursor = self.connection.execute(f"{verb} INTO {table} ({names}) VALUES ({marks})", row)
        return cursor.rowcount == 1

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
