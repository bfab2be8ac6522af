"""The autoresearch rows of the ledger: sessions, attempts (with their full diffs) and charges.

Each state change is one transaction, as everywhere in the ledger, so a ``kill -9`` at
any instant leaves an attempt either absent, ``running`` (reconciled to
``interrupted`` on resume) or finished; a keep and the session's new best are written
together. One ``Store`` per thread: each wraps its own ``Ledger`` connection, and SQLite
serialises the writers.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from ratiocinator.errors import UsageError
from ratiocinator.store.ledger import MONEY_EPSILON, Ledger, inserted_id

STATUSES = ("running", "baseline", "keep", "discard", "crash", "violation", "interrupted")
FINISHED = ("baseline", "keep", "discard", "crash", "violation", "interrupted")
MEASURED = ("baseline", "keep", "discard")
_COLUMNS = frozenset({"commit_sha", "pid", "pid_start", "log_tail", "log_path", "run_s", "metric", "cost", "reason",
                      "diff", "hypothesis", "failure", "host"})


@dataclass(frozen=True)
class Session:
    id: int
    tag: str
    repo: str
    branch: str
    base_branch: str
    base_commit: str
    program_path: str
    program_text: str
    program_sha256: str
    protected: dict[str, str]
    best_commit: str | None
    best_attempt: int | None
    status: str
    reason: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class Attempt:
    id: int
    session_id: int
    worker: int
    iteration: int
    parent_commit: str
    commit_sha: str | None
    agent_ref: str
    hypothesis: str
    diff: bytes
    status: str
    metric: float | None
    secondary: dict[str, list[float]]  # each secondary metric's value in every run
    values: list[float]
    log_tail: str
    log_path: str
    pid: int | None
    pid_start: int | None
    started_at: float
    ended_at: float | None
    agent_s: float | None
    run_s: float
    cost: float
    reason: str
    failure: str | None  # the engine's failure class of a crash (execution.failures), None otherwise
    evidence: dict[str, Any]  # the lines that decided it
    host: str  # where its runs ran

    @property
    def is_baseline(self) -> bool:
        return self.iteration == 0


class Store:
    """Typed access to the ``ar_*`` tables of one ledger connection."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    @property
    def db(self) -> sqlite3.Connection:
        return self.ledger.db

    def close(self) -> None:
        self.ledger.close()

    # -- sessions --------------------------------------------------------------------

    def session_by_tag(self, tag: str) -> Session | None:
        row = self.db.execute("SELECT * FROM ar_sessions WHERE tag = ?", (tag,)).fetchone()
        return None if row is None else _session(row)

    def session(self, session_id: int) -> Session:
        row = self.db.execute("SELECT * FROM ar_sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            raise UsageError(f"no autoresearch session {session_id} in {self.ledger.path}")
        return _session(row)

    def create_session(self, *, tag: str, repo: str, branch: str, base_branch: str, base_commit: str,
                       program_path: str, program_text: str, program_sha256: str, protected: dict[str, str],
                       status: str = "running") -> Session:
        now = time.time()
        with self.ledger.transaction() as db:
            cur = db.execute(
                "INSERT INTO ar_sessions (tag, repo, branch, base_branch, base_commit, program_path, program_text,"
                " program_sha256, protected_json, status, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (tag, repo, branch, base_branch, base_commit, program_path, program_text, program_sha256,
                 json.dumps(protected, sort_keys=True), status, now, now),
            )
            session_id = inserted_id(cur)
        return self.session(session_id)

    def update_session(self, session_id: int, **fields: Any) -> None:
        allowed = {"status", "reason", "program_path", "program_text", "program_sha256", "protected"}
        sets, params = [], []
        for name, value in fields.items():
            if name not in allowed:
                raise ValueError(f"cannot update session field {name!r}")
            sets.append(f"{'protected_json' if name == 'protected' else name} = ?")
            params.append(json.dumps(value, sort_keys=True) if name == "protected" else value)
        with self.ledger.transaction() as db:
            db.execute(f"UPDATE ar_sessions SET {', '.join(sets)}, updated_at = ? WHERE id = ?",
                       (*params, time.time(), session_id))

    # -- attempts --------------------------------------------------------------------

    def add_attempt(self, session_id: int, *, worker: int, parent: str, baseline: bool = False,
                    hypothesis: str = "", diff: bytes = b"", agent_ref: str = "",
                    agent_s: float | None = None) -> Attempt:
        """A new ``running`` attempt; its iteration is 0 for a baseline, else the next free number."""
        with self.ledger.transaction() as db:
            iteration = 0 if baseline else db.execute(
                "SELECT COALESCE(MAX(iteration), 0) + 1 FROM ar_attempts WHERE session_id = ?", (session_id,)
            ).fetchone()[0]
            cur = db.execute(
                "INSERT INTO ar_attempts (session_id, worker, iteration, parent_commit, agent_ref, hypothesis, diff,"
                " status, started_at, agent_s) VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, ?)",
                (session_id, worker, iteration, parent, agent_ref, hypothesis, diff, time.time(), agent_s),
            )
            attempt_id = inserted_id(cur)
        return self.attempt(attempt_id)

    def update_attempt(self, attempt_id: int, **fields: Any) -> None:
        """Set columns of a running attempt (commit_sha, pid, values, log_tail, ...)."""
        with self.ledger.transaction() as db:
            self._set(db, attempt_id, fields)

    def finish_attempt(self, attempt_id: int, *, status: str, reason: str, best_of: int | None = None,
                       **fields: Any) -> None:
        """The terminal status (and final fields) in one transaction; ``best_of`` = session id whose best it becomes."""
        if status not in FINISHED:
            raise ValueError(f"not a terminal attempt status: {status!r}")
        with self.ledger.transaction() as db:
            self._set(db, attempt_id, fields)
            db.execute("UPDATE ar_attempts SET status = ?, reason = ?, ended_at = ?, pid = NULL WHERE id = ?",
                       (status, reason, time.time(), attempt_id))
            if best_of is not None:
                commit = db.execute("SELECT commit_sha FROM ar_attempts WHERE id = ?", (attempt_id,)).fetchone()[0]
                db.execute("UPDATE ar_sessions SET best_commit = ?, best_attempt = ?, updated_at = ? WHERE id = ?",
                           (commit, attempt_id, time.time(), best_of))

    @staticmethod
    def _set(db: Any, attempt_id: int, fields: dict[str, Any]) -> None:
        if not fields:
            return
        sets, params = [], []
        for name, value in fields.items():
            if name in ("values", "secondary", "evidence"):
                sets.append(f"{name}_json = ?")
                params.append(json.dumps(value, sort_keys=True))
            elif name in _COLUMNS:
                sets.append(f"{name} = ?")
                params.append(value)
            else:
                raise ValueError(f"cannot set attempt field {name!r}")
        db.execute(f"UPDATE ar_attempts SET {', '.join(sets)} WHERE id = ?", (*params, attempt_id))

    def attempt(self, attempt_id: int) -> Attempt:
        row = self.db.execute("SELECT * FROM ar_attempts WHERE id = ?", (attempt_id,)).fetchone()
        if row is None:
            raise UsageError(f"no autoresearch attempt {attempt_id} in {self.ledger.path}",
                             hint="`ratiocinator autoresearch-log PROGRAM` lists the attempts with their ids")
        return _attempt(row)

    def attempts(self, session_id: int) -> list[Attempt]:
        rows = self.db.execute("SELECT * FROM ar_attempts WHERE session_id = ? ORDER BY iteration, id", (session_id,))
        return [_attempt(r) for r in rows]

    def agent_refs(self, session_id: int) -> set[str]:
        rows = self.db.execute("SELECT agent_ref FROM ar_attempts WHERE session_id = ? AND agent_ref != ''",
                               (session_id,))
        return {r[0] for r in rows}

    def agent_attempts(self, session_id: int) -> int:
        """Attempts the agent has made (everything but baselines)."""
        return self.db.execute("SELECT COUNT(*) FROM ar_attempts WHERE session_id = ? AND iteration > 0",
                               (session_id,)).fetchone()[0]

    # -- money -----------------------------------------------------------------------

    def reserve(self, session_id: int, *, amount: float, limit: float | None, kind: str,
                attempt_id: int | None = None) -> int | None:
        """Atomically reserve ``amount`` if spent + reserved + amount stays within ``limit`` (None: no limit)."""
        with self.ledger.transaction() as db:
            if limit is not None:
                committed = db.execute(
                    "SELECT COALESCE(SUM(CASE state WHEN 'reserved' THEN reserved ELSE settled END), 0)"
                    " FROM ar_charges WHERE session_id = ?", (session_id,)
                ).fetchone()[0]
                if committed + amount > limit + MONEY_EPSILON:
                    return None
            cur = db.execute(
                "INSERT INTO ar_charges (session_id, attempt_id, kind, state, reserved, created_at)"
                " VALUES (?, ?, ?, 'reserved', ?, ?)", (session_id, attempt_id, kind, amount, time.time()),
            )
            return inserted_id(cur)

    def settle(self, charge_id: int, amount: float, *, attempt_id: int | None = None) -> None:
        """Replace a reservation by what was spent, adding it to the attempt's cost."""
        with self.ledger.transaction() as db:
            db.execute("UPDATE ar_charges SET state = 'settled', settled = ?, settled_at = ?,"
                       " attempt_id = COALESCE(?, attempt_id) WHERE id = ? AND state = 'reserved'",
                       (amount, time.time(), attempt_id, charge_id))
            row = db.execute("SELECT attempt_id FROM ar_charges WHERE id = ?", (charge_id,)).fetchone()
            if row is not None and row[0] is not None:
                db.execute("UPDATE ar_attempts SET cost = cost + ? WHERE id = ?", (amount, row[0]))

    def settle_open(self, session_id: int) -> int:
        """Reservations a dead orchestrator left open are settled at their worst case (the true cost is unknown)."""
        with self.ledger.transaction() as db:
            rows = db.execute("SELECT id, attempt_id, reserved FROM ar_charges WHERE session_id = ? AND"
                              " state = 'reserved'",
                              (session_id,)).fetchall()
            for row in rows:
                db.execute("UPDATE ar_charges SET state = 'settled', settled = reserved, settled_at = ? WHERE id = ?",
                           (time.time(), row[0]))
                if row[1] is not None:
                    db.execute("UPDATE ar_attempts SET cost = cost + ? WHERE id = ?", (row[2], row[1]))
        return len(rows)

    def money(self, session_id: int) -> tuple[float, float]:
        """(spent, reserved) dollars of a session."""
        row = self.db.execute(
            "SELECT COALESCE(SUM(CASE WHEN state = 'settled' THEN settled ELSE 0 END), 0),"
            " COALESCE(SUM(CASE WHEN state = 'reserved' THEN reserved ELSE 0 END), 0)"
            " FROM ar_charges WHERE session_id = ?", (session_id,),
        ).fetchone()
        return float(row[0]), float(row[1])


def _session(row: Any) -> Session:
    d = dict(row)
    d["protected"] = json.loads(d.pop("protected_json"))
    return Session(**d)


def _attempt(row: Any) -> Attempt:
    d = dict(row)
    d["secondary"] = json.loads(d.pop("secondary_json"))
    d["values"] = json.loads(d.pop("values_json"))
    d["evidence"] = json.loads(d.pop("evidence_json"))
    d["diff"] = bytes(d["diff"]) if d["diff"] is not None else b""
    return Attempt(**d)
