"""The run's archive: candidates, their trajectories and cycles, in SQLite (WAL).

Writes are keyed by candidate id (upserts), so a node that runs again after a
crash or a resume overwrites its own row instead of adding one. One connection
is shared by the graph's threads behind a lock; readers (the live view,
`deltanas status`) open their own read-only connection.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    id TEXT PRIMARY KEY,
    cycle INTEGER NOT NULL,            -- -1 for baselines
    idx INTEGER NOT NULL,
    kind TEXT NOT NULL,                -- baseline | delta | full
    parent_id TEXT,
    dataset TEXT NOT NULL,
    status TEXT NOT NULL,              -- proposed | applied_failed | duplicate | rejected | ok | timeout | oom | crashed | invalid | diverged | output_limit
    error_code TEXT,
    error_message TEXT,
    source TEXT,
    diff TEXT,
    completion TEXT,                   -- the model's first raw answer
    added INTEGER, removed INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    novel INTEGER, similarity REAL, nearest_id TEXT,
    minhash BLOB,
    accuracy REAL, param_count INTEGER, train_seconds REAL, eval_seconds REAL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    gen_seconds REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, finished_at REAL,
    constrain TEXT,                    -- grammar | prefix | none: how the answer was held to the format
    sites TEXT                         -- JSON: the parent lines (0-based) the edits were placed at, if the search chose them
);
CREATE INDEX IF NOT EXISTS candidates_cycle ON candidates(cycle);
CREATE TABLE IF NOT EXISTS trajectories (candidate_id TEXT PRIMARY KEY, messages TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cycles (
    cycle INTEGER PRIMARY KEY, started_at REAL, finished_at REAL, summary TEXT
);
CREATE TABLE IF NOT EXISTS adapters (   -- one LoRA update per finished cycle
    cycle INTEGER PRIMARY KEY,
    status TEXT NOT NULL,              -- trained | reused | skipped | failed
    path TEXT,                         -- adapters/cycle-<k>, relative to the run dir
    examples INTEGER NOT NULL DEFAULT 0,
    loss REAL, steps INTEGER, seconds REAL,
    note TEXT,
    created_at REAL NOT NULL,
    example_ids TEXT                   -- JSON list of the candidates (and cold-start pairs) it learnt from
);
CREATE TABLE IF NOT EXISTS pairs (      -- cold-start training pairs from outside the run (agent/learning/cold_start_pairs.py)
    id TEXT PRIMARY KEY,
    origin TEXT NOT NULL,              -- the run directory, archive or LEMUR data it came from
    example TEXT NOT NULL,             -- JSON: the prompt-completion example the LoRA updates train on
    meta TEXT                          -- JSON: dataset, names, accuracies, diff lines
);
CREATE TABLE IF NOT EXISTS verify (     -- longer retraining of chosen candidates (agent/run/verify.py)
    candidate_id TEXT NOT NULL,
    epochs INTEGER NOT NULL,
    device TEXT NOT NULL,
    status TEXT NOT NULL,              -- as a candidate's: ok | timeout | oom | crashed | ...
    accuracy REAL,
    proxy_accuracy REAL,               -- the candidate's 1-epoch accuracy when it was chosen
    chosen_as TEXT NOT NULL,           -- top | sample
    seconds REAL,
    error TEXT,
    finished_at REAL NOT NULL,
    PRIMARY KEY (candidate_id, epochs)
);
"""

FINAL_STATUSES = ("apply_failed", "duplicate", "rejected", "ok", "timeout", "oom", "crashed", "invalid", "diverged",
                  "output_limit")


class StoreError(RuntimeError):
    """The archive cannot be used; the message names the file."""


@dataclass
class CandidateRow:
    id: str
    cycle: int
    idx: int
    kind: str
    dataset: str
    status: str
    parent_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    source: str | None = None
    diff: str | None = None
    completion: str | None = None
    added: int | None = None
    removed: int | None = None
    attempts: int = 0
    novel: bool | None = None
    similarity: float | None = None
    nearest_id: str | None = None
    minhash: bytes | None = None
    accuracy: float | None = None
    param_count: int | None = None
    train_seconds: float | None = None
    eval_seconds: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    gen_seconds: float = 0.0
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    constrain: str | None = None
    sites: list[int] | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES


_COLUMNS = tuple(CandidateRow.__dataclass_fields__)


def best_per_dataset(rows: list[CandidateRow]) -> dict[str, CandidateRow]:
    """The most accurate trained row of each dataset, in the rows' dataset order: accuracies are
    compared within a dataset, never across (a pool run, agent/config.py `DataConfig.datasets`)."""
    best: dict[str, CandidateRow] = {}
    for r in rows:
        if r.status != "ok" or r.accuracy is None:
            continue
        b = best.get(r.dataset)
        if b is None or r.accuracy > b.accuracy:
            best[r.dataset] = r
    return best


def _row_to_candidate(row: sqlite3.Row) -> CandidateRow:
    d = dict(row)
    old_site = d.pop("site", None)  # an archive from before edits had several sites held one line
    d["sites"] = json.loads(d["sites"]) if d.get("sites") else ([old_site] if old_site is not None else None)
    if d.get("novel") is not None:
        d["novel"] = bool(d["novel"])
    return CandidateRow(**d)


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
    try:
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout=30000")
        if not readonly:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path}: cannot open the archive database ({e}); "
                         "it is corrupt or not a deltanas archive") from None


class Store:
    def __init__(self, path: str | Path, *, readonly: bool = False):
        self.path = Path(path)
        if readonly and not self.path.exists():
            raise StoreError(f"{self.path}: no archive database here")
        self._conn = _connect(self.path, readonly)
        self._lock = threading.RLock()
        if not readonly:
            try:
                with self._conn:
                    self._conn.executescript(_SCHEMA)
                    self._add_columns()
                    self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                                       (str(SCHEMA_VERSION),))
            except sqlite3.DatabaseError as e:
                raise StoreError(f"{self.path}: cannot initialise the archive ({e})") from None
        self._check_integrity()

    def _add_columns(self) -> None:
        """Columns added since an archive was made: a resumed older run gains them, empty."""
        have = {r[1] for r in self._conn.execute("PRAGMA table_info(candidates)")}
        for name, sql_type in (("constrain", "TEXT"), ("sites", "TEXT")):
            if name not in have:
                self._conn.execute(f"ALTER TABLE candidates ADD COLUMN {name} {sql_type}")

    def _check_integrity(self) -> None:
        try:
            tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: the archive is corrupt ({e})") from None
        missing = {"meta", "candidates", "trajectories", "cycles"} - tables
        if missing:
            raise StoreError(f"{self.path}: not a deltanas archive (missing tables: {', '.join(sorted(missing))})")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._conn:
            yield self._conn

    # --- meta -------------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    # --- candidates -----------------------------------------------------------------------
    def upsert(self, cand: CandidateRow) -> None:
        values = [json.dumps(cand.sites) if c == "sites" and cand.sites is not None else getattr(cand, c)
                  for c in _COLUMNS]
        placeholders = ",".join("?" * len(_COLUMNS))
        updates = ",".join(f"{c}=excluded.{c}" for c in _COLUMNS if c not in ("id", "created_at"))
        with self._tx() as c:
            c.execute(f"INSERT INTO candidates ({','.join(_COLUMNS)}) VALUES ({placeholders}) "
                      f"ON CONFLICT(id) DO UPDATE SET {updates}", values)

    def get(self, cand_id: str) -> CandidateRow | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM candidates WHERE id=?", (cand_id,)).fetchone()
        return _row_to_candidate(row) if row else None

    def candidates(self, *, cycle: int | None = None, status: str | None = None) -> list[CandidateRow]:
        q, args = "SELECT * FROM candidates WHERE 1=1", []
        if cycle is not None:
            q += " AND cycle=?"
            args.append(cycle)
        if status is not None:
            q += " AND status=?"
            args.append(status)
        q += " ORDER BY cycle, idx"
        with self._lock:
            return [_row_to_candidate(r) for r in self._conn.execute(q, args)]

    def count(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT count(*) FROM candidates").fetchone()[0]

    # --- trajectories ---------------------------------------------------------------------
    def put_trajectory(self, cand_id: str, messages: list[dict]) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO trajectories VALUES (?, ?)", (cand_id, json.dumps(messages)))

    def get_trajectory(self, cand_id: str) -> list[dict] | None:
        with self._lock:
            row = self._conn.execute("SELECT messages FROM trajectories WHERE candidate_id=?", (cand_id,)).fetchone()
        return json.loads(row[0]) if row else None

    # --- cycles -------------------------------------------------------------------------
    def start_cycle(self, cycle: int) -> None:
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO cycles (cycle, started_at) VALUES (?, ?)", (cycle, time.time()))

    def finish_cycle(self, cycle: int, summary: dict) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO cycles (cycle, started_at, finished_at, summary) VALUES (?, ?, ?, ?) "
                      "ON CONFLICT(cycle) DO UPDATE SET finished_at=excluded.finished_at, summary=excluded.summary",
                      (cycle, time.time(), time.time(), json.dumps(summary)))

    # --- adapters -----------------------------------------------------------------------
    def put_adapter(self, cycle: int, status: str, *, path: str | None = None, examples: int = 0,
                    loss: float | None = None, steps: int | None = None, seconds: float | None = None,
                    note: str = "", example_ids: list[str] | None = None) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (cycle, status, path, examples, loss, steps, seconds, note, time.time(),
                       json.dumps(example_ids) if example_ids is not None else None))

    def adapters(self) -> list[dict]:
        with self._lock:
            try:
                rows = self._conn.execute("SELECT * FROM adapters ORDER BY cycle").fetchall()
            except sqlite3.OperationalError:  # an archive from before adapters, opened read-only
                return []
        out = [dict(r) for r in rows]
        for a in out:
            a["example_ids"] = json.loads(a["example_ids"]) if a.get("example_ids") else None
        return out

    # --- cold-start pairs -----------------------------------------------------------------
    def put_pairs(self, pairs: list[dict]) -> None:
        """Each pair is {"id", "origin", "example", "meta"}; a pair stored before keeps its place."""
        with self._tx() as c:
            c.executemany("INSERT INTO pairs VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                          "origin=excluded.origin, example=excluded.example, meta=excluded.meta",
                          [(p["id"], p["origin"], json.dumps(p["example"]), json.dumps(p.get("meta")))
                           for p in pairs])

    def pairs(self) -> list[dict]:
        """The stored pairs, in the order they were first stored."""
        with self._lock:
            try:
                rows = self._conn.execute("SELECT * FROM pairs ORDER BY rowid").fetchall()
            except sqlite3.OperationalError:  # an archive from before cold-start pairs, opened read-only
                return []
        return [{"id": r["id"], "origin": r["origin"], "example": json.loads(r["example"]),
                 "meta": json.loads(r["meta"]) if r["meta"] else None} for r in rows]

    # --- verify -------------------------------------------------------------------------
    def put_verify(self, row: dict) -> None:
        """One retrained candidate (agent/run/verify.py); a candidate retrained again for the
        same epochs replaces its row."""
        keys = ("candidate_id", "epochs", "device", "status", "accuracy", "proxy_accuracy", "chosen_as", "seconds",
                "error")
        with self._tx() as c:
            c.execute(f"INSERT OR REPLACE INTO verify ({', '.join(keys)}, finished_at) VALUES "
                      f"({', '.join('?' * len(keys))}, ?)", (*(row.get(k) for k in keys), time.time()))

    def verifications(self, epochs: int | None = None) -> list[dict]:
        """The retrained candidates, oldest first (for `epochs` only, if given)."""
        q, args = "SELECT * FROM verify", ()
        if epochs is not None:
            q, args = q + " WHERE epochs=?", (epochs,)
        with self._lock:
            try:
                rows = self._conn.execute(q + " ORDER BY finished_at", args).fetchall()
            except sqlite3.OperationalError:  # an archive from before verify, opened read-only
                return []
        return [dict(r) for r in rows]

    def cycles(self) -> list[dict]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM cycles ORDER BY cycle").fetchall()
        return [{**dict(r), "summary": json.loads(r["summary"]) if r["summary"] else None} for r in rows]
