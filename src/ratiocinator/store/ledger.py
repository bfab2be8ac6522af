"""The ledger: one SQLite file (WAL) holding every experiment, arm, run attempt,
metric point, event and dollar.

Every state change is one transaction, so a ``kill -9`` at any instant leaves the
ledger consistent: a run is either not started, ``running`` (to be reconciled as
``interrupted`` on resume) or finished with its metrics. Readers (``status``,
``report``) can open the file while an experiment writes to it.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import sys
import threading
import time
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ratiocinator.errors import UsageError, machine_fault
from ratiocinator.execution.metrics import PointBatch
from ratiocinator.store.paths import no_ledger
from ratiocinator.store.records import DataRecord, DecisionRecord, EventKind, ReadinessRecord

if TYPE_CHECKING:  # numpy loads on the first metric series read: not at a command's start, nor to write points
    import numpy as np

SCHEMA_VERSION = 8

SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    spec_path    TEXT NOT NULL,
    spec_text    TEXT NOT NULL,
    spec_sha256  TEXT NOT NULL,
    backend      TEXT NOT NULL,
    commit_sha   TEXT,
    status       TEXT NOT NULL,
    note         TEXT NOT NULL DEFAULT '',
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS experiments_by_spec ON experiments(name, spec_sha256);

CREATE TABLE IF NOT EXISTS arms (
    id            INTEGER PRIMARY KEY,
    experiment_id TEXT NOT NULL REFERENCES experiments(id),
    iteration     INTEGER NOT NULL,
    name          TEXT NOT NULL,
    env_json      TEXT NOT NULL,
    args_json     TEXT NOT NULL,
    factors_json  TEXT NOT NULL,
    description   TEXT NOT NULL,
    is_baseline   INTEGER NOT NULL,
    UNIQUE (experiment_id, name)
);

CREATE TABLE IF NOT EXISTS runs (
    id            INTEGER PRIMARY KEY,
    experiment_id TEXT NOT NULL REFERENCES experiments(id),
    arm_id        INTEGER NOT NULL REFERENCES arms(id),
    replicate     INTEGER NOT NULL,
    seed          INTEGER NOT NULL,
    attempt       INTEGER NOT NULL,
    status        TEXT NOT NULL,
    failure       TEXT,
    reason        TEXT NOT NULL DEFAULT '',
    exit_code     INTEGER,
    signal        INTEGER,
    started_at    REAL NOT NULL,
    ended_at      REAL,
    host          TEXT NOT NULL,
    slot          TEXT NOT NULL,
    commit_sha    TEXT NOT NULL,
    env_json      TEXT NOT NULL,
    argv_json     TEXT NOT NULL,
    pid           INTEGER,
    pid_start     INTEGER,
    log_dir       TEXT NOT NULL,
    out_dir       TEXT NOT NULL,
    cost          REAL,
    evidence_json TEXT NOT NULL DEFAULT '{}',
    transient     INTEGER NOT NULL DEFAULT 0,
    UNIQUE (arm_id, replicate, attempt)
);
CREATE INDEX IF NOT EXISTS runs_by_experiment ON runs(experiment_id, status);

-- Time series are stored in chunks of packed little-endian arrays (seq int64, step
-- int64 with NO_STEP for none, value float64 with NaN/inf kept): a runner printing a
-- million points costs a few hundred rows, not a million.
CREATE TABLE IF NOT EXISTS metric_chunks (
    run_id     INTEGER NOT NULL REFERENCES runs(id),
    name       TEXT NOT NULL,
    first_seq  INTEGER NOT NULL,
    n          INTEGER NOT NULL,
    seqs       BLOB NOT NULL,
    steps      BLOB NOT NULL,
    vals       BLOB NOT NULL,
    PRIMARY KEY (run_id, name, first_seq)
);

CREATE TABLE IF NOT EXISTS run_metrics (
    run_id   INTEGER NOT NULL REFERENCES runs(id),
    name     TEXT NOT NULL,
    value    REAL,
    finite   INTEGER NOT NULL,
    n_points INTEGER NOT NULL,
    PRIMARY KEY (run_id, name)
);

CREATE TABLE IF NOT EXISTS events (
    id            INTEGER PRIMARY KEY,
    experiment_id TEXT,
    run_id        INTEGER,
    ts            REAL NOT NULL,
    level         TEXT NOT NULL,
    kind          TEXT NOT NULL,
    message       TEXT NOT NULL,
    data_json     TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_by_experiment ON events(experiment_id, ts);

CREATE TABLE IF NOT EXISTS charges (
    id            INTEGER PRIMARY KEY,
    experiment_id TEXT NOT NULL REFERENCES experiments(id),
    run_id        INTEGER REFERENCES runs(id),
    kind          TEXT NOT NULL,
    state         TEXT NOT NULL,
    reserved      REAL NOT NULL,
    settled       REAL,
    created_at    REAL NOT NULL,
    settled_at    REAL,
    note          TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS charges_by_experiment ON charges(experiment_id, state);

-- Every LLM call: what was asked (the request body, never a key), what came back, what it
-- cost. A replay answers from these rows instead of the network.
CREATE TABLE IF NOT EXISTS llm_calls (
    id            INTEGER PRIMARY KEY,
    experiment_id TEXT REFERENCES experiments(id),
    stage         TEXT NOT NULL,
    iteration     INTEGER NOT NULL,
    ordinal       INTEGER NOT NULL,
    provider      TEXT NOT NULL,
    model         TEXT NOT NULL,
    prompt_sha256 TEXT NOT NULL,
    request_json  TEXT NOT NULL,
    response_json TEXT NOT NULL,
    text          TEXT NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost          REAL NOT NULL,
    latency_s     REAL NOT NULL,
    attempts      INTEGER NOT NULL,
    replayed_from INTEGER,
    created_at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS llm_calls_by_experiment ON llm_calls(experiment_id, stage, iteration, ordinal);

-- Autoresearch (`ratiocinator autoresearch`): one session per run tag, every attempt of
-- every worker with its full diff, and the money each run reserved and spent. Methods are
-- in ratiocinator.autoresearch.store.
CREATE TABLE IF NOT EXISTS ar_sessions (
    id             INTEGER PRIMARY KEY,
    tag            TEXT NOT NULL UNIQUE,
    repo           TEXT NOT NULL,
    branch         TEXT NOT NULL,
    base_branch    TEXT NOT NULL,
    base_commit    TEXT NOT NULL,
    program_path   TEXT NOT NULL,
    program_text   TEXT NOT NULL,
    program_sha256 TEXT NOT NULL,
    protected_json TEXT NOT NULL DEFAULT '{}',
    best_commit    TEXT,
    best_attempt   INTEGER,
    status         TEXT NOT NULL,
    reason         TEXT NOT NULL DEFAULT '',
    created_at     REAL NOT NULL,
    updated_at     REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS ar_attempts (
    id             INTEGER PRIMARY KEY,
    session_id     INTEGER NOT NULL REFERENCES ar_sessions(id),
    worker         INTEGER NOT NULL,
    iteration      INTEGER NOT NULL,
    parent_commit  TEXT NOT NULL,
    commit_sha     TEXT,
    agent_ref      TEXT NOT NULL DEFAULT '',
    hypothesis     TEXT NOT NULL DEFAULT '',
    diff           BLOB NOT NULL DEFAULT x'',
    status         TEXT NOT NULL,
    metric         REAL,
    secondary_json TEXT NOT NULL DEFAULT '{}',
    values_json    TEXT NOT NULL DEFAULT '[]',
    log_tail       TEXT NOT NULL DEFAULT '',
    log_path       TEXT NOT NULL DEFAULT '',
    pid            INTEGER,
    pid_start      INTEGER,
    started_at     REAL NOT NULL,
    ended_at       REAL,
    agent_s        REAL,
    run_s          REAL NOT NULL DEFAULT 0,
    cost           REAL NOT NULL DEFAULT 0,
    reason         TEXT NOT NULL DEFAULT '',
    failure        TEXT,
    evidence_json  TEXT NOT NULL DEFAULT '{}',
    host           TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS ar_attempts_by_session ON ar_attempts(session_id, iteration);

CREATE TABLE IF NOT EXISTS ar_charges (
    id          INTEGER PRIMARY KEY,
    session_id  INTEGER NOT NULL REFERENCES ar_sessions(id),
    attempt_id  INTEGER REFERENCES ar_attempts(id),
    kind        TEXT NOT NULL,
    state       TEXT NOT NULL,
    reserved    REAL NOT NULL,
    settled     REAL,
    created_at  REAL NOT NULL,
    settled_at  REAL
);
CREATE INDEX IF NOT EXISTS ar_charges_by_session ON ar_charges(session_id, state);

-- Every rented machine (instances.py), written before the rent call so a crash never
-- leaves an instance the ledger does not know; `instances --reap` destroys the live ones.
CREATE TABLE IF NOT EXISTS instances (
    id            INTEGER PRIMARY KEY,
    experiment_id TEXT,
    ar_session_id INTEGER,  -- an autoresearch session's instance: its charges are in ar_charges
    provider      TEXT NOT NULL,
    provider_id   TEXT,
    label         TEXT NOT NULL,
    offer_json    TEXT NOT NULL DEFAULT '{}',
    gpu_name      TEXT NOT NULL DEFAULT '',
    dph           REAL NOT NULL,
    state         TEXT NOT NULL,
    deadline      REAL NOT NULL,
    created_at    REAL NOT NULL,
    running_at    REAL,
    destroyed_at  REAL,
    cost          REAL,
    cost_source   TEXT NOT NULL DEFAULT '',
    charges_json  TEXT NOT NULL DEFAULT '[]',
    note          TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS instances_by_state ON instances(state);

-- Facts about the home itself: its random id (home_id), which labels what it rents.
CREATE TABLE IF NOT EXISTS home (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Upgrades from each older schema version, applied in order inside one transaction.
MIGRATIONS: dict[int, str] = {
    # v2: the evidence behind each run's failure class, and whether the class is transient (retryable).
    2: "ALTER TABLE runs ADD COLUMN evidence_json TEXT NOT NULL DEFAULT '{}';\n"
       "ALTER TABLE runs ADD COLUMN transient INTEGER NOT NULL DEFAULT 0;",
    3: "",  # v3: the llm_calls table, created by SCHEMA
    4: "",  # v4: the autoresearch tables (ar_sessions, ar_attempts, ar_charges), created by SCHEMA
    5: "",  # v5: the instances table (rented machines), created by SCHEMA
    6: "",  # v6: the home table (the home's id), created by SCHEMA
    # v7: an autoresearch attempt's failure class with its evidence, and where its runs ran.
    7: "ALTER TABLE ar_attempts ADD COLUMN failure TEXT;\n"
       "ALTER TABLE ar_attempts ADD COLUMN evidence_json TEXT NOT NULL DEFAULT '{}';\n"
       "ALTER TABLE ar_attempts ADD COLUMN host TEXT NOT NULL DEFAULT '';",
    # v8: an instance rented by an autoresearch session names it (its money is in ar_charges, not charges).
    8: "ALTER TABLE instances ADD COLUMN ar_session_id INTEGER;",
}

def _upgrades(db: sqlite3.Connection, version: int) -> str:
    """The migrations from ``version`` on, less the columns added to tables this ledger does not have yet:
    SCHEMA, run after them, creates those tables whole (a v4 ledger has no ``instances`` to alter)."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    statements = []
    for v in range(version + 1, SCHEMA_VERSION + 1):
        for statement in filter(None, (part.strip() for part in MIGRATIONS[v].split(";"))):
            words = statement.split()
            if words[:2] == ["ALTER", "TABLE"] and words[2] not in tables:
                continue
            statements.append(statement + ";")
    return "\n".join(statements)


# A non-finite float is stored as NULL in REAL columns; `finite` keeps the flag and
# the textual value survives in the run's log.
MONEY_EPSILON = 1e-9
NO_STEP = -(2**63)  # the smallest int64: no step
# Ledgers written before the json_line parser stopped it also hold each line's step index as a
# metric named "step" (a series and a final value): readers skip that name, so old ledgers read as new.
STEP_NAME = "step"


@dataclass(frozen=True)
class Experiment:
    id: str
    name: str
    spec_path: str
    spec_text: str
    spec_sha256: str
    backend: str
    commit_sha: str | None
    status: str
    note: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class LlmCallRow:
    id: int
    experiment_id: str | None
    stage: str
    iteration: int
    ordinal: int
    provider: str
    model: str
    prompt_sha256: str
    request: dict[str, Any]
    response: dict[str, Any]
    text: str
    input_tokens: int
    output_tokens: int
    cost: float
    latency_s: float
    attempts: int
    replayed_from: int | None
    created_at: float


@dataclass(frozen=True)
class ArmRow:
    id: int
    experiment_id: str
    iteration: int
    name: str
    env: dict[str, str]
    args: list[str]
    factors: dict[str, str]
    description: str
    is_baseline: bool


@dataclass(frozen=True)
class RunRow:
    id: int
    experiment_id: str
    arm_id: int
    arm: str
    replicate: int
    seed: int
    attempt: int
    status: str
    failure: str | None
    reason: str
    exit_code: int | None
    signal: int | None
    started_at: float
    ended_at: float | None
    host: str
    slot: str
    commit_sha: str
    env: dict[str, str]
    argv: list[str]
    pid: int | None
    pid_start: int | None
    log_dir: str
    out_dir: str
    cost: float | None
    evidence: dict[str, Any]
    transient: bool

    @property
    def duration_s(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at


def inserted_id(cursor: sqlite3.Cursor) -> int:
    """The rowid of the row the INSERT run on ``cursor`` just added."""
    rowid = cursor.lastrowid
    assert rowid is not None  # set by every successful INSERT
    return rowid


def _float_or_none(value: float) -> float | None:
    return value if value == value and value not in (float("inf"), float("-inf")) else None


class Ledger:
    """Typed access to the ledger file; one instance per process, usable from any thread.

    Each thread gets its own SQLite connection: a transaction is per connection, so one shared
    connection would let a worker thread's BEGIN collide with (or write into) the event loop's.
    """

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """``read_only``: SQLite itself refuses every write (the dashboard, watching a running experiment),
        and the file is never created or upgraded."""
        self.path = Path(path)
        self.read_only = read_only
        self._home_id: str | None = None
        if read_only and not self.path.is_file():
            raise no_ledger(self.path)
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        db = self.db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise UsageError(
                f"{self.path}: ledger schema v{version} is newer than this Ratiocinator (v{SCHEMA_VERSION})",
                hint="upgrade ratiocinator, or use another --home",
            )
        if version < SCHEMA_VERSION and read_only:
            raise UsageError(f"{self.path}: ledger schema v{version} is older than this Ratiocinator's"
                             f" (v{SCHEMA_VERSION}) and is opened read-only",
                             hint="`ratiocinator status` upgrades it in place")
        if version < SCHEMA_VERSION:
            fresh = db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'runs'").fetchone()[0] == 0
            upgrades = "" if fresh else _upgrades(db, version)
            db.executescript(f"BEGIN IMMEDIATE;\n{upgrades}\n{SCHEMA}\nPRAGMA user_version={SCHEMA_VERSION};\nCOMMIT;")

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                if self.read_only:
                    db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30,
                                         isolation_level=None, check_same_thread=False)
                    db.row_factory = sqlite3.Row
                else:
                    db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                    db.row_factory = sqlite3.Row
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("PRAGMA synchronous=NORMAL")
                    db.execute("PRAGMA foreign_keys=ON")
            except sqlite3.Error as exc:  # read-only, full, damaged: say which and how to fix it
                raise machine_fault(exc, str(self.path)) or UsageError(f"{self.path}: cannot open the ledger: {exc}") \
                    from None
            self._local.db = db
            with self._connections_lock:
                self._connections.append(db)
        return db

    def close(self) -> None:
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()
        self._local = threading.local()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, so check-then-write (budget) is atomic across processes."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def home_id(self) -> str:
        """This home's random id, made once: the labels of what it rents carry it, so two homes on one
        provider account never take each other's instances for their own."""
        home = self._home_id
        if home is None:
            with self.transaction() as db:
                db.execute("INSERT OR IGNORE INTO home (key, value) VALUES ('home_id', ?)", (secrets.token_hex(4),))
                home = str(db.execute("SELECT value FROM home WHERE key = 'home_id'").fetchone()[0])
            self._home_id = home
        return home

    # -- experiments -------------------------------------------------------------

    def create_experiment(self, *, id: str, name: str, spec_path: str, spec_text: str, spec_sha256: str,
                          backend: str) -> Experiment:
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO experiments (id, name, spec_path, spec_text, spec_sha256, backend, status, created_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, 'created', ?, ?)",
                (id, name, spec_path, spec_text, spec_sha256, backend, now, now),
            )
        return self.experiment(id)

    def has_experiment(self, id: str) -> bool:
        return self.db.execute("SELECT 1 FROM experiments WHERE id = ?", (id,)).fetchone() is not None

    def experiment(self, id: str) -> Experiment:
        row = self.db.execute("SELECT * FROM experiments WHERE id = ?", (id,)).fetchone()
        if row is None:
            raise UsageError(f"no experiment '{id}' in {self.path}", hint="`ratiocinator status` lists the experiments")
        return Experiment(**dict(row))

    def find_experiment(self, ref: str) -> Experiment:
        """By exact id, unique id prefix, or name (the newest experiment of that name)."""
        rows = self.db.execute(
            "SELECT id FROM experiments WHERE id = ? OR id LIKE ? ESCAPE '\\' OR name = ? ORDER BY created_at DESC",
            (ref, ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%", ref),
        ).fetchall()
        exact = [r["id"] for r in rows if r["id"] == ref]
        if exact:
            return self.experiment(exact[0])
        ids = [r["id"] for r in rows]
        by_name = self.db.execute("SELECT id FROM experiments WHERE name = ? ORDER BY created_at DESC",
                                  (ref,)).fetchall()
        if by_name:
            return self.experiment(by_name[0]["id"])
        if len(ids) == 1:
            return self.experiment(ids[0])
        if len(ids) > 1:
            raise UsageError(f"'{ref}' matches several experiments: {', '.join(ids[:8])}", hint="give more of the id")
        raise UsageError(f"no experiment '{ref}' in {self.path}", hint="`ratiocinator status` lists the experiments")

    def experiments_for_spec(self, name: str, spec_sha256: str) -> list[Experiment]:
        rows = self.db.execute(
            "SELECT * FROM experiments WHERE name = ? AND spec_sha256 = ? ORDER BY created_at",
            (name, spec_sha256),
        ).fetchall()
        return [Experiment(**dict(r)) for r in rows]

    def experiments(self) -> list[Experiment]:
        return [Experiment(**dict(r)) for r in self.db.execute("SELECT * FROM experiments ORDER BY created_at")]

    def experiment_ids(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT id FROM experiments")}

    def update_experiment(self, id: str, *, status: str | None = None, note: str | None = None,
                          commit_sha: str | None = None) -> None:
        with self.transaction() as db:
            if status is not None:
                db.execute("UPDATE experiments SET status = ? WHERE id = ?", (status, id))
            if note is not None:
                db.execute("UPDATE experiments SET note = ? WHERE id = ?", (note, id))
            if commit_sha is not None:
                db.execute("UPDATE experiments SET commit_sha = ? WHERE id = ?", (commit_sha, id))
            db.execute("UPDATE experiments SET updated_at = ? WHERE id = ?", (time.time(), id))

    # -- arms --------------------------------------------------------------------

    def record_arms(self, experiment_id: str, iteration: int, arms: Iterable[Any], baseline: str) -> None:
        """Insert the iteration's arms; re-recording the same arms on resume is a no-op."""
        with self.transaction() as db:
            for arm in arms:
                db.execute(
                    "INSERT INTO arms (experiment_id, iteration, name, env_json, args_json, factors_json, description,"
                    " is_baseline) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (experiment_id, name) DO NOTHING",
                    (
                        experiment_id,
                        iteration,
                        arm.name,
                        json.dumps(arm.env, sort_keys=True),
                        json.dumps(list(arm.args)),
                        json.dumps(arm.factors, sort_keys=True),
                        arm.description,
                        int(arm.name == baseline),
                    ),
                )

    def arms(self, experiment_id: str) -> list[ArmRow]:
        rows = self.db.execute("SELECT * FROM arms WHERE experiment_id = ? ORDER BY id", (experiment_id,)).fetchall()
        return [
            ArmRow(
                id=r["id"],
                experiment_id=r["experiment_id"],
                iteration=r["iteration"],
                name=r["name"],
                env=json.loads(r["env_json"]),
                args=json.loads(r["args_json"]),
                factors=json.loads(r["factors_json"]),
                description=r["description"],
                is_baseline=bool(r["is_baseline"]),
            )
            for r in rows
        ]

    # -- runs --------------------------------------------------------------------

    def start_run(
        self,
        *,
        experiment_id: str,
        arm_id: int,
        replicate: int,
        seed: int,
        host: str,
        slot: str,
        commit_sha: str,
        env: dict[str, str],
        argv: list[str],
        run_root: Path,
        charge_id: int | None = None,
    ) -> int:
        """Record a new attempt as ``running`` with its directory ``run_root/<run id>``.

        Attempt numbers count per (arm, replicate).
        """
        with self.transaction() as db:
            attempt = db.execute(
                "SELECT COALESCE(MAX(attempt), 0) + 1 FROM runs WHERE arm_id = ? AND replicate = ?",
                (arm_id, replicate),
            ).fetchone()[0]
            cur = db.execute(
                "INSERT INTO runs (experiment_id, arm_id, replicate, seed, attempt, status, started_at, host, slot,"
                " commit_sha, env_json, argv_json, log_dir, out_dir)"
                " VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, '', '')",
                (experiment_id, arm_id, replicate, seed, attempt, time.time(), host, slot, commit_sha,
                 json.dumps(env, sort_keys=True), json.dumps(argv)),
            )
            run_id = inserted_id(cur)
            run_dir = Path(run_root) / str(run_id)
            db.execute(
                "UPDATE runs SET log_dir = ?, out_dir = ? WHERE id = ?", (str(run_dir), str(run_dir / "out"), run_id)
            )
            if charge_id is not None:
                db.execute("UPDATE charges SET run_id = ? WHERE id = ?", (run_id, charge_id))
            return run_id

    def set_run_process(self, run_id: int, pid: int, pid_start: int | None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE runs SET pid = ?, pid_start = ? WHERE id = ?", (pid, pid_start, run_id))

    def add_points(self, run_id: int, points: Iterable[Any]) -> None:
        """Append a batch of metric points (objects with name, seq, step, value), one chunk per metric."""
        with self.transaction() as db:
            self._insert_points(db, run_id, points)

    @staticmethod
    def _insert_points(db: sqlite3.Connection, run_id: int, points: Iterable[Any]) -> None:
        if isinstance(points, PointBatch):  # already in columns
            grouped: Mapping[str, tuple[list[int], Sequence[int | None], list[float]]] = points.series
        else:
            grouped = _grouped(points)
        if grouped:
            db.executemany(
                "INSERT INTO metric_chunks (run_id, name, first_seq, n, seqs, steps, vals)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    (run_id, name, seqs[0], len(seqs), _int64_bytes(seqs), _int64_bytes(_step_column(steps)),
                     _float64_bytes(vals))
                    for name, (seqs, steps, vals) in grouped.items()
                ),
            )

    def finish_run(
        self,
        run_id: int,
        *,
        status: str,
        failure: str | None,
        reason: str,
        exit_code: int | None,
        signal: int | None,
        final: dict[str, float],
        counts: dict[str, int],
        cost: float | None,
        ended_at: float | None = None,
        points: Iterable[Any] = (),
        settle_charge: int | None = None,
        evidence: dict[str, Any] | None = None,
        transient: bool = False,
    ) -> None:
        """Terminal state, the last metric points, final metrics and the settled cost in one transaction."""
        with self.transaction() as db:
            self._insert_points(db, run_id, points)
            if settle_charge is not None:
                self._settle(db, settle_charge, cost or 0.0)
            db.execute(
                "UPDATE runs SET status = ?, failure = ?, reason = ?, exit_code = ?, signal = ?, ended_at = ?,"
                " cost = ?, evidence_json = ?, transient = ? WHERE id = ?",
                (status, failure, reason, exit_code, signal, ended_at or time.time(), cost,
                 json.dumps(evidence or {}, sort_keys=True, default=str), int(transient), run_id),
            )
            db.executemany(
                "INSERT OR REPLACE INTO run_metrics (run_id, name, value, finite, n_points) VALUES (?, ?, ?, ?, ?)",
                (
                    (run_id, name, _float_or_none(value), int(_float_or_none(value) is not None), counts.get(name, 0))
                    for name, value in final.items()
                ),
            )

    def runs(self, experiment_id: str, *, status: str | None = None) -> list[RunRow]:
        query = (
            "SELECT runs.*, arms.name AS arm FROM runs JOIN arms ON arms.id = runs.arm_id"
            " WHERE runs.experiment_id = ?" + (" AND runs.status = ?" if status else "") + " ORDER BY runs.id"
        )
        params: tuple = (experiment_id, status) if status else (experiment_id,)
        return [self._run_row(r) for r in self.db.execute(query, params)]

    def run(self, run_id: int) -> RunRow:
        row = self.db.execute(
            "SELECT runs.*, arms.name AS arm FROM runs JOIN arms ON arms.id = runs.arm_id WHERE runs.id = ?", (run_id,)
        ).fetchone()
        if row is None:
            raise UsageError(f"no run {run_id} in {self.path}")
        return self._run_row(row)

    @staticmethod
    def _run_row(r: sqlite3.Row) -> RunRow:
        d = dict(r)
        d["env"] = json.loads(d.pop("env_json"))
        d["argv"] = json.loads(d.pop("argv_json"))
        d["evidence"] = json.loads(d.pop("evidence_json"))
        d["transient"] = bool(d["transient"])
        return RunRow(**d)

    def reclassify_run(self, run_id: int, *, failure: str, reason: str, evidence: dict[str, Any]) -> None:
        """A finished run judged after the fact (say, constant metrics across arms): failed, with why."""
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET status = 'failed', failure = ?, reason = ?, evidence_json = ?, transient = 0 WHERE"
                " id = ?",
                (failure, reason, json.dumps(evidence, sort_keys=True, default=str), run_id),
            )

    def run_metrics(self, experiment_id: str,
                    name: str | None = None) -> dict[int, dict[str, tuple[float | None, bool]]]:
        """{run_id: {metric: (value or None if non-finite, finite)}}; only metric ``name`` where given."""
        out: dict[int, dict[str, tuple[float | None, bool]]] = {}
        for r in self.db.execute(
            "SELECT m.run_id, m.name, m.value, m.finite FROM run_metrics m JOIN runs ON runs.id = m.run_id"
            " WHERE runs.experiment_id = ? AND m.name != ?" + (" AND m.name = ?" if name is not None else ""),
            (experiment_id, STEP_NAME) if name is None else (experiment_id, STEP_NAME, name),
        ):
            out.setdefault(r["run_id"], {})[r["name"]] = (r["value"], bool(r["finite"]))
        return out

    def series(self, run_id: int, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(seq, step, value) arrays of one metric of one run, in order; step is NO_STEP where absent."""
        import numpy as np

        rows = self.db.execute(
            "SELECT seqs, steps, vals FROM metric_chunks WHERE run_id = ? AND name = ? ORDER BY first_seq",
            (run_id, name)
        ).fetchall()
        if not rows:
            empty = np.empty(0, dtype="<i8")
            return empty, empty.copy(), np.empty(0, dtype="<f8")
        seqs, steps, vals = (np.concatenate([np.frombuffer(r[i], dtype=dt) for r in rows])
                             for i, dt in enumerate(("<i8", "<i8", "<f8")))
        return seqs, steps, vals

    def points(self, run_id: int, name: str) -> list[tuple[int, int | None, float | None]]:
        """(seq, step, value) of one metric of one run, in order; non-finite values as None."""
        import numpy as np

        seqs, steps, vals = self.series(run_id, name)
        return [
            (int(q), None if t == NO_STEP else int(t), float(v) if np.isfinite(v) else None)
            for q, t, v in zip(seqs, steps, vals, strict=True)
        ]

    def point_names(self, run_id: int) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT name FROM metric_chunks WHERE run_id = ? AND name != ?"
                                              " ORDER BY name", (run_id, STEP_NAME))]

    def terminal_replicates(self, experiment_id: str, max_attempts: int = 1) -> set[tuple[str, int]]:
        """(arm name, replicate) pairs that are done: succeeded, failed deterministically, or out of retries.

        A transient failure (``transient`` set) leaves its replicate open until it has failed
        transiently ``max_attempts`` times.
        """
        rows = self.db.execute(
            "SELECT arms.name, runs.replicate,"
            " SUM(runs.status = 'succeeded' OR (runs.status = 'failed' AND runs.transient = 0)),"
            " SUM(runs.status = 'failed' AND runs.transient = 1)"
            " FROM runs JOIN arms ON arms.id = runs.arm_id WHERE runs.experiment_id = ?"
            " GROUP BY arms.name, runs.replicate",
            (experiment_id,),
        )
        return {(r[0], r[1]) for r in rows if r[2] or r[3] >= max_attempts}

    def transient_failures(self, experiment_id: str) -> dict[tuple[str, int], int]:
        """How many times each (arm name, replicate) has failed transiently."""
        rows = self.db.execute(
            "SELECT arms.name, runs.replicate, COUNT(*) FROM runs JOIN arms ON arms.id = runs.arm_id"
            " WHERE runs.experiment_id = ? AND runs.status = 'failed' AND runs.transient = 1"
            " GROUP BY arms.name, runs.replicate",
            (experiment_id,),
        )
        return {(r[0], r[1]): r[2] for r in rows}

    # -- events ------------------------------------------------------------------

    def event(self, experiment_id: str | None, kind: str, message: str, *, level: str = "info",
              run_id: int | None = None, **data: Any) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO events (experiment_id, run_id, ts, level, kind, message, data_json) VALUES"
                " (?, ?, ?, ?, ?, ?, ?)",
                (experiment_id, run_id, time.time(), level, kind, message,
                 json.dumps(data, default=str, sort_keys=True)),
            )

    def events(self, experiment_id: str) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM events WHERE experiment_id = ? ORDER BY id", (experiment_id,))
        return [{**dict(r), "data": json.loads(r["data_json"])} for r in rows]

    # -- typed records: written and read through one type each (see `records`) -----------

    def record_decision(self, experiment_id: str, decision: DecisionRecord) -> None:
        self.event(experiment_id, EventKind.DECISION, decision.reason, **decision.data())

    def decisions(self, experiment_id: str) -> list[DecisionRecord]:
        """Every planner decision recorded with its plan, oldest first."""
        return [DecisionRecord.from_event(e) for e in self.events(experiment_id)
                if e["kind"] == EventKind.DECISION and "plan" in e["data"]]

    def record_readiness(self, experiment_id: str | None, verdict: ReadinessRecord, message: str, *,
                         level: str = "info") -> None:
        """A review's verdict; with no experiment, a standalone ``check``'s (kept for ``research`` to reuse)."""
        kind = EventKind.READINESS_SKIPPED if verdict.skipped else EventKind.READINESS
        self.event(experiment_id, kind, message, level=level, **verdict.data())

    def readiness_verdicts(self, experiment_id: str) -> list[ReadinessRecord]:
        """Every readiness review (or its skipping), oldest first."""
        return [ReadinessRecord.from_event(e) for e in self.events(experiment_id)
                if e["kind"] in (EventKind.READINESS, EventKind.READINESS_SKIPPED)]

    def record_data(self, experiment_id: str, record: DataRecord, message: str) -> None:
        self.event(experiment_id, EventKind.DATA, message, **record.data())

    def data_records(self, experiment_id: str) -> list[DataRecord]:
        """The data each start of the experiment staged, oldest first."""
        return [DataRecord.from_event(e) for e in self.events(experiment_id) if e["kind"] == EventKind.DATA]

    def reviews_under(self, review_key: str) -> list[ReadinessRecord]:
        """Every recorded review with this key (standalone checks and experiments'), oldest first."""
        rows = self.db.execute("SELECT * FROM events WHERE kind = ? AND json_extract(data_json, '$.review_key') = ?"
                               " ORDER BY id", (EventKind.READINESS, review_key))
        return [ReadinessRecord.from_event({**dict(r), "data": json.loads(r["data_json"])}) for r in rows]

    # -- LLM calls ---------------------------------------------------------------

    def record_llm_call(self, experiment_id: str | None, *, stage: str, iteration: int, provider: str, model: str,
                        prompt_sha256: str, request: dict[str, Any], response: dict[str, Any], text: str,
                        input_tokens: int, output_tokens: int, cost: float, latency_s: float, attempts: int,
                        replayed_from: int | None = None) -> LlmCallRow:
        """Append one call; its ordinal counts the calls of the same stage and iteration so far."""
        with self.transaction() as db:
            ordinal = db.execute(
                "SELECT COUNT(*) FROM llm_calls WHERE experiment_id IS ? AND stage = ? AND iteration = ?",
                (experiment_id, stage, iteration),
            ).fetchone()[0]
            cur = db.execute(
                "INSERT INTO llm_calls (experiment_id, stage, iteration, ordinal, provider, model, prompt_sha256,"
                " request_json, response_json, text, input_tokens, output_tokens, cost, latency_s, attempts,"
                " replayed_from, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (experiment_id, stage, iteration, ordinal, provider, model, prompt_sha256,
                 json.dumps(request, sort_keys=True, default=str), json.dumps(response, sort_keys=True, default=str),
                 text, input_tokens, output_tokens, cost, latency_s, attempts, replayed_from, time.time()),
            )
            call_id = inserted_id(cur)
        return self.llm_call(call_id)

    def llm_call(self, call_id: int) -> LlmCallRow:
        row = self.db.execute("SELECT * FROM llm_calls WHERE id = ?", (call_id,)).fetchone()
        if row is None:
            raise UsageError(f"no LLM call {call_id} in {self.path}")
        return self._llm_row(row)

    def llm_calls(self, experiment_id: str, *, stage: str | None = None) -> list[LlmCallRow]:
        query = "SELECT * FROM llm_calls WHERE experiment_id = ?" + (" AND stage = ?" if stage else "") + " ORDER BY id"
        return [self._llm_row(r) for r in self.db.execute(query, (experiment_id, stage) if stage else (experiment_id,))]

    @staticmethod
    def _llm_row(r: sqlite3.Row) -> LlmCallRow:
        d = dict(r)
        d["request"] = json.loads(d.pop("request_json"))
        d["response"] = json.loads(d.pop("response_json"))
        return LlmCallRow(**d)

    # -- money -------------------------------------------------------------------

    def reserve(self, experiment_id: str, *, amount: float, limit: float, kind: str, run_id: int | None = None,
                note: str = "") -> int | None:
        """Atomically reserve ``amount`` if spent + reserved + amount stays within ``limit``.

        Returns the charge id, or None when the reservation would overrun.
        """
        with self.transaction() as db:
            committed = db.execute(
                "SELECT COALESCE(SUM(CASE state WHEN 'reserved' THEN reserved ELSE settled END), 0)"
                " FROM charges WHERE experiment_id = ? AND state != 'released'",
                (experiment_id,),
            ).fetchone()[0]
            if committed + amount > limit + MONEY_EPSILON:
                return None
            cur = db.execute(
                "INSERT INTO charges (experiment_id, run_id, kind, state, reserved, created_at, note) VALUES (?, ?, ?,"
                " 'reserved', ?, ?, ?)",
                (experiment_id, run_id, kind, amount, time.time(), note),
            )
            return inserted_id(cur)

    def settle(self, charge_id: int, amount: float) -> None:
        with self.transaction() as db:
            self._settle(db, charge_id, amount)

    def resettle(self, charge_id: int, amount: float) -> None:
        """Correct a settled charge (the provider's bill arrived after the estimate); never above its reservation."""
        with self.transaction() as db:
            db.execute("UPDATE charges SET settled = MIN(?, reserved), settled_at = ? WHERE id = ? AND"
                       " state = 'settled'",
                       (amount, time.time(), charge_id))

    @staticmethod
    def _settle(db: sqlite3.Connection, charge_id: int, amount: float) -> None:
        db.execute(
            "UPDATE charges SET state = 'settled', settled = ?, settled_at = ? WHERE id = ? AND state = 'reserved'",
            (amount, time.time(), charge_id),
        )

    def open_charges(self, experiment_id: str) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT * FROM charges WHERE experiment_id = ? AND state = 'reserved'", (experiment_id,)
        ).fetchall()

    def settled(self, experiment_id: str, *, kind: str) -> float | None:
        """Dollars settled for one kind of charge (``staging``, ``smoke``, ...); None when there was none."""
        row = self.db.execute("SELECT COUNT(*), COALESCE(SUM(settled), 0) FROM charges WHERE experiment_id = ?"
                              " AND kind = ? AND state = 'settled'", (experiment_id, kind)).fetchone()
        return float(row[1]) if row[0] else None

    def money(self, experiment_id: str) -> tuple[float, float]:
        """(spent, reserved) dollars for an experiment."""
        row = self.db.execute(
            "SELECT COALESCE(SUM(CASE WHEN state = 'settled' THEN settled ELSE 0 END), 0),"
            " COALESCE(SUM(CASE WHEN state = 'reserved' THEN reserved ELSE 0 END), 0)"
            " FROM charges WHERE experiment_id = ?",
            (experiment_id,),
        ).fetchone()
        return float(row[0]), float(row[1])


def _grouped(points: Iterable[Any]) -> dict[str, tuple[list[int], list[int], list[float]]]:
    """Points (objects with name, seq, step, value) as columns per name, NO_STEP for no step."""
    grouped: dict[str, tuple[list[int], list[int], list[float]]] = {}
    for p in points:
        series = grouped.get(p.name)
        if series is None:
            series = grouped[p.name] = ([], [], [])
        series[0].append(p.seq)
        series[1].append(NO_STEP if p.step is None else p.step)
        series[2].append(p.value)
    return grouped


def _step_column(steps: Sequence[int | None]) -> Sequence[int]:
    """A batch's steps as stored, NO_STEP for none; a series often has a step on every point, or on none."""
    missing = steps.count(None)
    if missing == len(steps):
        return [NO_STEP] * len(steps)
    return [NO_STEP if step is None else step for step in steps] if missing else cast("Sequence[int]", steps)


def _int64_bytes(column: Sequence[int]) -> bytes:
    """A column as little-endian int64, the stored form (the standard library's array: no numpy on the
    write path, so a study that only runs never imports it)."""
    packed = array("q", column)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def _float64_bytes(column: Sequence[float]) -> bytes:
    packed = array("d", column)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()
