"""Finished runs' terminal records, kept beside the ledger: a run whose record the ledger could not take
(a full disk), or that finished just before the orchestrator was killed, is recorded on resume from here
instead of being run again.

They are appended to one journal per experiment, ``runs/<experiment>/outcomes.jsonl``, a JSON line per
run. A file per run cost a create and a rename: 0.2-0.3 ms of kernel time a run on some file systems (ext4
on a VM), where an append to a file that exists costs 8 µs. A write that returned is in the kernel's hands,
so a ``kill -9`` loses none; a line torn by a crash of the machine (or a full disk) is skipped when read,
and the next append starts on a new line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JOURNAL = "outcomes.jsonl"
LEGACY_FILE = "outcome.json"  # one per run folder, as versions before the journal kept them


@dataclass(frozen=True)
class RunOutcome:
    """A finished run's terminal record, as the ledger takes it and as the journal keeps it."""

    status: str
    failure: str | None
    reason: str
    exit_code: int | None
    signal: int | None
    final: dict[str, float]
    counts: dict[str, int]
    cost: float
    ended_at: float
    charge: int
    evidence: dict[str, Any]
    transient: bool

    def ledger_fields(self) -> dict[str, Any]:
        return {"status": self.status, "failure": self.failure, "reason": self.reason, "exit_code": self.exit_code,
                "signal": self.signal, "final": self.final, "counts": self.counts, "cost": self.cost,
                "ended_at": self.ended_at, "evidence": self.evidence, "transient": self.transient}

    @classmethod
    def from_json(cls, data: Any) -> RunOutcome | None:
        try:
            return cls(**data)
        except TypeError:  # not a mapping, or not this record's fields
            return None


def keep(runs_dir: Path, run_id: int, outcome: RunOutcome) -> None:
    """Append ``outcome`` to the experiment's journal in ``runs_dir``. A disk too full for even this leaves the
    run to be run again on resume."""
    record = json.dumps({"run_id": run_id, **vars(outcome)}, default=str, allow_nan=True)  # plain data
    try:
        fd = os.open(runs_dir / JOURNAL, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return
    try:
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"  # the last append did not end its line
        os.write(fd, (b"\n" if torn else b"") + record.encode() + b"\n")
    except OSError:
        pass
    finally:
        os.close(fd)


def kept(runs_dir: Path) -> dict[int, RunOutcome]:
    """The outcomes the journal in ``runs_dir`` keeps, by run id (damaged lines skipped)."""
    found: dict[int, RunOutcome] = {}
    try:
        with open(runs_dir / JOURNAL, "rb") as journal:
            lines = journal.read().splitlines()
    except OSError:
        return found
    for line in lines:
        try:
            data = json.loads(line)
        except ValueError:
            continue
        run_id = data.pop("run_id", None) if isinstance(data, dict) else None
        if isinstance(run_id, int) and (outcome := RunOutcome.from_json(data)) is not None:
            found[run_id] = outcome
    return found


def kept_in_run_folder(run_dir: Path) -> RunOutcome | None:
    """The ``outcome.json`` an earlier version kept in a run's folder, for a study it left unfinished."""
    try:
        return RunOutcome.from_json(json.loads((run_dir / LEGACY_FILE).read_text()))
    except (OSError, ValueError):
        return None
