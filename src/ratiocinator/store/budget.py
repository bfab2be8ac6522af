"""Money, enforced: reserve the worst case before a launch, settle the truth after.

A run may cost at most price/hour × its timeout; that is reserved against
``max_dollars`` before it starts, atomically in the ledger, and replaced by the
actual cost (price × wall time) when it ends. A launch whose worst case does not fit
is never started.
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
    ledger: Ledger
    experiment_id: str
    limit: float

    def reserve_run(self, price_per_hour: float, timeout_s: float) -> int | None:
        """A charge id, or None when this run could overrun the budget."""
        amount = run_worst_case(price_per_hour, timeout_s)
        return self.ledger.reserve(
            self.experiment_id, amount=amount, limit=self.limit, kind="compute",
            note=f"${price_per_hour:g}/h × {timeout_s:g}s"
        )

    def spent_and_reserved(self) -> tuple[float, float]:
        return self.ledger.money(self.experiment_id)

    def remaining(self) -> float:
        spent, reserved = self.spent_and_reserved()
        return max(self.limit - spent - reserved, 0.0)
