"""A finished run's terminal record, kept beside the ledger so that a run the ledger could not record
(a full disk, an orchestrator killed in between) is recorded on resume instead of run again."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunOutcome:
    """A finished run's terminal record, also kept as ``outcome.json`` in its run directory: when the
    ledger cannot take it (a full disk), a resume records it from there instead of running it again."""

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

    FILE = "outcome.json"

    def ledger_fields(self) -> dict[str, Any]:
        return {"status": self.status, "failure": self.failure, "reason": self.reason, "exit_code": self.exit_code,
                "signal": self.signal, "final": self.final, "counts": self.counts, "cost": self.cost,
                "ended_at": self.ended_at, "evidence": self.evidence, "transient": self.transient}

    def save(self, run_dir: Path) -> None:
        """Write it atomically; a disk too full for even this leaves the run to be run again on resume."""
        tmp = run_dir / (self.FILE + ".tmp")
        try:
            tmp.write_text(json.dumps(vars(self), default=str, allow_nan=True))  # its fields hold plain data
            os.replace(tmp, run_dir / self.FILE)
        except OSError:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, run_dir: Path) -> RunOutcome | None:
        try:
            data = json.loads((run_dir / cls.FILE).read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None
