"""Rented instances in the ledger: the ``instances`` rows, their labels, and each run's share of their cost.

Safety rests on three things: a ledger row is written (``requested``) *before* the rent
call, and the instance carries a label naming this home and that row
(``ratiocinator-<home id>-<row>``), so a crash between the call and the ledger update still
leaves it findable by listing the account's instances, and no other home (another user of
the account, another project) can mistake it for its own; every instance has a
self-destruct deadline (its TTL), recorded in the row; and `reap` destroys every instance
the ledger thinks may be live, plus instances with this home's label whose row is closed
or missing, and settles its money. Instances labelled by other homes are left alone and
named, unless the caller asks for them too.

An instance belongs to a research experiment (``experiment_id``: its money is in ``charges``)
or to an autoresearch session (``ar_session_id``: its money is in ``ar_charges``, under the
session's ``max_dollars`` with its LLM turns). Whoever rents one reserves and settles through
an `InstanceAccount`, and whoever settles a row later (a reap, a reconciliation) goes through
`settle_charges`, which picks the owner's table from the row.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Protocol

from ratiocinator.errors import BackendError
from ratiocinator.store.ledger import Ledger
from ratiocinator.store.records import LIVE

LABEL_PREFIX = "ratiocinator-"
LIVE_STATES = LIVE  # rows that may still bill
_LABEL = re.compile(re.escape(LABEL_PREFIX) + r"(?:(?P<home>[0-9a-f]{8})-)?(?P<row>\d+)")


def label_for(home_id: str, row_id: int) -> str:
    """``ratiocinator-<home id>-<row id>``: unique across homes, so no reaper takes another home's instance."""
    return f"{LABEL_PREFIX}{home_id}-{row_id}"


def label_owner(label: str, home_id: str) -> str | None:
    """Whose instance a label names: ``mine`` (this home), ``other`` (another home, or the scheme before
    labels carried a home id, which cannot tell homes apart), or None (not rented by Ratiocinator)."""
    if not label.startswith(LABEL_PREFIX):
        return None
    m = _LABEL.fullmatch(label)
    return "mine" if m is not None and m.group("home") == home_id else "other"


def is_legacy_label(label: str) -> bool:
    """``ratiocinator-<row>``: the scheme before labels carried a home id (any home may have written it)."""
    m = _LABEL.fullmatch(label)
    return m is not None and m.group("home") is None


# -- ledger rows ---------------------------------------------------------------------------


class InstanceAccount(Protocol):
    """Who pays for the instances a backend rents: a research experiment's `~ratiocinator.store.budget.Budget`
    or an autoresearch session's account. Exactly one of the two ids is set."""

    @property
    def ledger(self) -> Ledger: ...

    @property
    def experiment_id(self) -> str | None: ...

    @property
    def ar_session_id(self) -> int | None: ...

    def reserve(self, amount: float, *, kind: str, note: str = "") -> int | None:
        """A charge id for up to ``amount`` dollars, or None when it could overrun the budget."""

    def settle(self, charge_id: int, amount: float) -> None:
        """What the reserved thing really cost."""

    def refusal(self, what: str, amount: float) -> str:
        """Why ``what`` (which could cost ``amount``) may not go ahead."""


@dataclass(frozen=True)
class InstanceRow:
    id: int
    experiment_id: str | None
    ar_session_id: int | None
    provider: str
    provider_id: str | None
    label: str
    offer: dict[str, Any]
    gpu_name: str
    dph: float
    state: str
    deadline: float
    created_at: float
    running_at: float | None
    destroyed_at: float | None
    cost: float | None
    cost_source: str
    charges: list[int]
    note: str


def _row(r: sqlite3.Row) -> InstanceRow:
    d = dict(r)
    d["offer"] = json.loads(d.pop("offer_json"))
    d["charges"] = json.loads(d.pop("charges_json"))
    return InstanceRow(**d)


def record_requested(ledger: Ledger, *, experiment_id: str | None, provider: str, offer: dict[str, Any],
                     deadline: float, charges: list[int], ar_session_id: int | None = None) -> InstanceRow:
    """The row written before renting; its id names the instance (label) so a crash leaves it findable."""
    now = time.time()
    home = ledger.home_id()
    with ledger.transaction() as db:
        cur = db.execute(
            "INSERT INTO instances (experiment_id, ar_session_id, provider, label, offer_json, gpu_name, dph, state,"
            " deadline, created_at, charges_json) VALUES (?, ?, ?, '', ?, ?, ?, 'requested', ?, ?, ?)",
            (experiment_id, ar_session_id, provider, json.dumps(offer), str(offer.get("gpu_name", "")),
             float(offer.get("dph_total", 0.0)), deadline, now, json.dumps(charges)))
        row_id = int(cur.lastrowid or 0)
        db.execute("UPDATE instances SET label = ? WHERE id = ?", (label_for(home, row_id), row_id))
    return get(ledger, row_id)


def get(ledger: Ledger, row_id: int) -> InstanceRow:
    r = ledger.db.execute("SELECT * FROM instances WHERE id = ?", (row_id,)).fetchone()
    if r is None:
        raise BackendError(f"no instance row {row_id} in {ledger.path}")
    return _row(r)


def update(ledger: Ledger, row_id: int, **fields: Any) -> None:
    if "charges" in fields:
        fields["charges_json"] = json.dumps(fields.pop("charges"))
    cols = ", ".join(f"{k} = ?" for k in fields)
    with ledger.transaction() as db:
        db.execute(f"UPDATE instances SET {cols} WHERE id = ?", (*fields.values(), row_id))


def rows(ledger: Ledger, *, live: bool = False, experiment_id: str | None = None,
         ar_session_id: int | None = None) -> list[InstanceRow]:
    query, args = "SELECT * FROM instances WHERE 1", list[object]()
    if live:
        query += f" AND state IN ({','.join('?' * len(LIVE_STATES))})"
        args += list(LIVE_STATES)
    if experiment_id is not None:
        query += " AND experiment_id = ?"
        args.append(experiment_id)
    if ar_session_id is not None:
        query += " AND ar_session_id = ?"
        args.append(ar_session_id)
    return [_row(r) for r in ledger.db.execute(query + " ORDER BY id", args)]


def owner(row: InstanceRow) -> str:
    """Who the instance worked for, as ``instances`` prints it."""
    if row.ar_session_id is not None:
        return f"autoresearch session {row.ar_session_id}"
    return row.experiment_id or "?"


def charge_table(row: InstanceRow) -> str:
    """The table holding the row's reservations: its owner's (``charges`` or ``ar_charges``)."""
    return "ar_charges" if row.ar_session_id is not None else "charges"


def settle_charges(ledger: Ledger, row: InstanceRow, cost: float, *, state: str) -> None:
    """Spread ``cost`` over the instance's charges in ``state``, in order, each capped at what it reserved.

    ``reserved`` charges are settled (the instance ended); ``settled`` ones are corrected (the
    provider's bill replaced the estimate). Each goes to the owner's table, in one transaction.
    """
    table = charge_table(row)
    left = cost
    now = time.time()
    with ledger.transaction() as db:
        for charge_id in row.charges:
            r = db.execute(f"SELECT reserved, state FROM {table} WHERE id = ?", (charge_id,)).fetchone()
            if r is None or r["state"] != state:
                continue
            part = min(left, float(r["reserved"]))
            db.execute(f"UPDATE {table} SET state = 'settled', settled = ?, settled_at = ? WHERE id = ?",
                       (part, now, charge_id))
            left -= part


# -- what each run's share of an instance cost ---------------------------------------------------


def runs_on(row: InstanceRow, slots: dict[int, str]) -> list[int]:
    """The run ids whose slot (``<provider><provider id>:<gpu>/...``) names this instance."""
    prefix = f"{row.provider}{row.provider_id}:"  # the slot label its backend gave each run
    return [run_id for run_id, slot in slots.items() if row.provider_id and slot.startswith(prefix)]


def run_shares(instance_rows: list[InstanceRow], runs: dict[int, tuple[str, float]]) -> dict[int, float]:
    """Each instance's settled cost split over the runs it served, by wall time (boot, setup and idle included).

    ``runs``: run id -> (slot label, wall seconds). An instance that served no run keeps its cost
    to itself (it shows in the instances table, not in any arm).
    """
    shares: dict[int, float] = {}
    slots = {run_id: slot for run_id, (slot, _) in runs.items()}
    for row in instance_rows:
        served = runs_on(row, slots)
        total = sum(runs[r][1] for r in served)
        for run_id in served:
            shares[run_id] = shares.get(run_id, 0.0) + (row.cost or 0.0) * (
                runs[run_id][1] / total if total > 0 else 1.0 / len(served))
    return shares


__all__ = ["LIVE_STATES", "InstanceAccount", "InstanceRow", "charge_table", "get", "is_legacy_label", "label_for",
           "label_owner", "owner", "record_requested", "rows", "run_shares", "runs_on", "settle_charges", "update"]
