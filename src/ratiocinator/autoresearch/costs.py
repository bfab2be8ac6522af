"""What each kept improvement cost: the money a session spent from the previous keep to this one.

An improvement is paid for by every attempt since the previous keep (the discards and crashes
that led to it, and the keep itself: their runs and LLM turns), by the LLM turns that made no
attempt (a failed turn), and, on rented GPUs, by the instances' time in that stretch — their
boot, the agent's turns, the runs — each ended instance's settled cost spread evenly over its
lifetime. Instances still live are not counted until they are settled. The baseline's cost
and what was spent after the last keep are given apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ratiocinator.autoresearch.store import Attempt, Session, Store
from ratiocinator.store import instances as inst


@dataclass(frozen=True)
class Stretch:
    """The money spent in one stretch of a session (to a keep, or after the last one)."""

    attempt_ids: tuple[int, ...]  # attempts that ended in it (the keep included)
    attempts_usd: float  # their runs and LLM turns
    llm_turns_usd: float  # LLM turns that made no attempt
    instances_usd: float  # rented instances' time in it

    @property
    def attempts(self) -> int:
        return len(self.attempt_ids)

    @property
    def total_usd(self) -> float:
        return self.attempts_usd + self.llm_turns_usd + self.instances_usd

    def to_json(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "attempt_ids": list(self.attempt_ids), "attempts_usd": self.attempts_usd,
                "llm_turns_usd": self.llm_turns_usd, "instances_usd": self.instances_usd,
                "total_usd": self.total_usd}


@dataclass(frozen=True)
class KeptCost:
    attempt_id: int
    iteration: int
    commit: str | None
    metric: float | None
    previous_metric: float | None  # the best it improved on
    previous_attempt_id: int | None  # the attempt that measured it (the baseline, or the previous keep)
    spent: Stretch

    def to_json(self) -> dict[str, Any]:
        return {"attempt_id": self.attempt_id, "iteration": self.iteration, "commit": self.commit,
                "metric": self.metric, "previous_metric": self.previous_metric,
                "previous_attempt_id": self.previous_attempt_id, **self.spent.to_json()}


@dataclass(frozen=True)
class SessionCosts:
    """Each keep's stretch, the stretches around them, what is still reserved, and how many instances were rented."""

    kept: list[KeptCost]
    baseline: Stretch
    after_last_keep: Stretch
    reserved: float
    instances: int


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
        return Stretch(attempt_ids=tuple(a.id for a in done), attempts_usd=sum(a.cost for a in done),
                       llm_turns_usd=sum(amount for at, amount in loose if start <= at < end),
                       instances_usd=_instance_spend(rows, start, end))

    start = session.created_at
    pending: list[Attempt] = []
    baseline = Stretch((), 0.0, 0.0, 0.0)
    kept: list[KeptCost] = []
    best: Attempt | None = None
    for a in finished:
        pending.append(a)
        end = a.ended_at or start
        if a.status == "baseline":
            baseline = stretch(pending, start, end)
        elif a.status == "keep":
            kept.append(KeptCost(a.id, a.iteration, a.commit_sha, a.metric, best.metric if best else None,
                                 best.id if best else None, stretch(pending, start, end)))
        else:
            continue
        start, pending, best = end, [], a
    after = stretch(pending, start, float("inf"))
    return kept, baseline, after


def session_costs(store: Store, session: Session, attempts: list[Attempt]) -> SessionCosts:
    """What the session's report states about money (the settled total is read with ``store.money`` beside it)."""
    kept, baseline, after = kept_costs(store, session, attempts)
    _, reserved = store.money(session.id)
    return SessionCosts(kept, baseline, after, reserved, len(inst.rows(store.ledger, ar_session_id=session.id)))


def costs_record(store: Store, session: Session, attempts: list[Attempt]) -> dict[str, Any]:
    """``autoresearch-log --json``'s ``costs``: per keep, and the stretches around them."""
    kept, baseline, after = kept_costs(store, session, attempts)
    spent, reserved = store.money(session.id)
    return {"kept": [k.to_json() for k in kept], "baseline": baseline.to_json(),
            "after_last_keep": after.to_json(), "spent_usd": spent, "reserved_usd": reserved}


__all__ = ["KeptCost", "SessionCosts", "Stretch", "costs_record", "kept_costs", "session_costs"]
