"""Older ledgers open and are upgraded in place, whatever tables they already have."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ratiocinator.store import instances as inst
from ratiocinator.store.ledger import SCHEMA_VERSION, Ledger


def _columns(path: Path, table: str) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}


def _downgrade(path: Path, script: str, version: int) -> None:
    db = sqlite3.connect(path)
    try:
        db.executescript(f"{script}\nPRAGMA user_version={version};")
    finally:
        db.close()


def test_a_v7_ledger_gains_the_instance_owner_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = Ledger(path)
    row = inst.record_requested(ledger, experiment_id="e1", provider="vast", offer={"dph_total": 0.3}, deadline=1.0,
                                charges=[])
    ledger.close()
    _downgrade(path, "ALTER TABLE instances DROP COLUMN ar_session_id;", 7)
    assert "ar_session_id" not in _columns(path, "instances")
    upgraded = Ledger(path)
    assert inst.get(upgraded, row.id).experiment_id == "e1" and inst.get(upgraded, row.id).ar_session_id is None
    assert upgraded.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    upgraded.close()


def test_a_ledger_from_before_the_instances_table_gets_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    Ledger(path).close()
    _downgrade(path, "DROP TABLE instances; DROP TABLE home;"
                     " ALTER TABLE ar_attempts DROP COLUMN failure; ALTER TABLE ar_attempts DROP COLUMN evidence_json;"
                     " ALTER TABLE ar_attempts DROP COLUMN host;", 4)
    upgraded = Ledger(path)
    assert {"ar_session_id", "experiment_id"} <= _columns(path, "instances")
    assert {"failure", "evidence_json", "host"} <= _columns(path, "ar_attempts")
    assert upgraded.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    upgraded.close()
