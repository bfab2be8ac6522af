"""What each kept improvement cost: the money a session spent from the previous keep to this one.

An improvement is paid for by every attempt since the previous keep (the discards and crashes
that led to it, and the keep itself: their runs and LLM turns), by the LLM turns that made no
attempt (a failed turn), and, on rented GPUs, by the instances' time in that stretch — their
boot, the agent's turns, the runs — each ended instance's settled cost spread evenly over its
lifetime. Instances still live are not counted until they are settled. The baseline's cost
and what was spent after the last keep are given apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ratiocinator.autoresearch.store import Attempt, Session, Store
from ratiocinator.store import instances as inst


@dataclass(frozen=True)
class Stretch:
    """The money spent in one stretch of a session (to a keep, or after the last one)."""

    attempts: int  # attempts that ended in it (the keep included)
    attempts_usd: float  # their runs and LLM turns
    llm_turns_usd: float  # LLM turns that made no attempt
    instances_usd: float  # rented instances' time in it

    @property
    def total_usd(self) -> float:
        return self.attempts_usd + self.llm_turns_usd + self.instances_usd


@dataclass(frozen=True)
class KeptCost:
    attempt_id: int
    iteration: int
    commit: str | None
    metric: float | None
    previous_metric: float | None  # the best it improved on
    spent: Stretch

    def to_json(self) -> dict[str, Any]:
        return {"attempt_id": self.attempt_id, "iteration": self.iteration, "commit": self.commit,
                "metric": self.metric, "previous_metric": self.previous_metric,
                **asdict(self.spent), "total_usd": self.spent.total_usd}


def _instance_spend(rows: list[inst.InstanceRow], start: float, end: float) -> float:
    """The ended instances' settled cost falling in [start, end), each spread evenly over its lifetime."""
    total = 0.0
    for row in rows:
        if row.cost is None or row.destroyed_at is None:
            continue
        life = row.destroyed_at - row.created_at
        if life <= 0:
            total += row.cost if start <= row.created_at < end else 0.0
            continue
        overlap = max(0.0, min(end, row.destroyed_at) - max(start, row.created_at))
        total += row.cost * overlap / life
    return total


def kept_costs(store: Store, session: Session, attempts: list[Attempt]) -> tuple[list[KeptCost], Stretch, Stretch]:
    """Each keep with what its stretch cost, the baseline's stretch, and the stretch after the last keep."""
    finished = sorted((a for a in attempts if a.ended_at is not None), key=lambda a: (a.ended_at or 0.0, a.id))
    rows = inst.rows(store.ledger, ar_session_id=session.id)
    loose = [(float(r[0]), float(r[1])) for r in store.db.execute(
        "SELECT settled_at, settled FROM ar_charges WHERE session_id = ? AND attempt_id IS NULL AND kind != 'instance'"
        " AND state = 'settled'", (session.id,))]

    def stretch(done: list[Attempt], start: float, end: float) -> Stretch:
        return Stretch(attempts=len(done), attempts_usd=sum(a.cost for a in done),
                       llm_turns_usd=sum(amount for at, amount in loose if start <= at < end),
                       instances_usd=_instance_spend(rows, start, end))

    start = session.created_at
    pending: list[Attempt] = []
    baseline = Stretch(0, 0.0, 0.0, 0.0)
    kept: list[KeptCost] = []
    best: float | None = None
    for a in finished:
        pending.append(a)
        end = a.ended_at or start
        if a.status == "baseline":
            baseline, best = stretch(pending, start, end), a.metric
        elif a.status == "keep":
            kept.append(KeptCost(a.id, a.iteration, a.commit_sha, a.metric, best, stretch(pending, start, end)))
            best = a.metric
        else:
            continue
        start, pending = end, []
    after = stretch(pending, start, float("inf"))
    return kept, baseline, after


def costs_record(store: Store, session: Session, attempts: list[Attempt]) -> dict[str, Any]:
    """``autoresearch-log --json``'s ``costs``: per keep, and the stretches around them."""
    kept, baseline, after = kept_costs(store, session, attempts)
    spent, reserved = store.money(session.id)
    return {"kept": [k.to_json() for k in kept],
            "baseline": {**asdict(baseline), "total_usd": baseline.total_usd},
            "after_last_keep": {**asdict(after), "total_usd": after.total_usd},
            "spent_usd": spent, "reserved_usd": reserved}


__all__ = ["KeptCost", "Stretch", "costs_record", "kept_costs"]
