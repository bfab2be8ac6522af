"""Money, enforced in one place: reserve the worst case before spending, settle the truth after.

Every reservation of an experiment goes through its `Budget`: runs and smoke runs (price/hour
× timeout), LLM calls (their worst-case tokens), rented instances (price × TTL) and their
deadline extensions. Each is reserved against ``max_dollars`` atomically in the ledger before
the money can be spent, and replaced by the actual cost when known; what does not fit is
never started.
"""

from __future__ import annotations

from dataclasses import dataclass

from ratiocinator.store.ledger import Ledger


def run_worst_case(price_per_hour: float, timeout_s: float) -> float:
    return price_per_hour * timeout_s / 3600.0


def run_cost(price_per_hour: float, duration_s: float, timeout_s: float) -> float:
    """Actual cost, never above the reservation (the run is killed at its timeout)."""
    return price_per_hour * min(max(duration_s, 0.0), timeout_s) / 3600.0


@dataclass
class Budget:
    """One experiment's ``max_dollars``, over its charges in the ledger."""

    ledger: Ledger
    experiment_id: str
    limit: float

    @property
    def ar_session_id(self) -> None:
        """An experiment's budget is no autoresearch session's (see `~ratiocinator.store.instances.InstanceAccount`)."""
        return None

    def reserve(self, amount: float, *, kind: str, note: str = "") -> int | None:
        """A charge id for up to ``amount`` dollars (``kind``: compute, llm, instance), or None when
        it could overrun the budget."""
        return self.ledger.reserve(self.experiment_id, amount=amount, limit=self.limit, kind=kind, note=note)

    def settle(self, charge_id: int, amount: float) -> None:
        """What the reserved thing really cost (at most what was reserved, for the kinds that cap it)."""
        self.ledger.settle(charge_id, amount)

    def reserve_run(self, price_per_hour: float, timeout_s: float) -> int | None:
        """A charge id, or None when this run could overrun the budget."""
        return self.reserve(run_worst_case(price_per_hour, timeout_s), kind="compute",
                            note=f"${price_per_hour:g}/h × {timeout_s:g}s")

    def refusal(self, what: str, amount: float) -> str:
        """Why ``what`` (which could cost ``amount``) may not go ahead."""
        spent, reserved = self.spent_and_reserved()
        return (f"{what} could cost ${amount:.4f}, and ${spent:.4f} spent + ${reserved:.4f} reserved"
                f" of max_dollars ${self.limit:.2f} leaves too little")

    def spent_and_reserved(self) -> tuple[float, float]:
        return self.ledger.money(self.experiment_id)

    def remaining(self) -> float:
        spent, reserved = self.spent_and_reserved()
        return max(self.limit - spent - reserved, 0.0)
