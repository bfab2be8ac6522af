"""Who decides what runs in each iteration.

The research loop asks its planner for the next iteration's plan until the planner
says stop or ``max_iterations`` is reached. The spec planner proposes the spec's own
arms once; an LLM or search-based planner implements the same interface and reads
the results of earlier iterations from the ledger.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ratiocinator.planning.plan import Plan, plan_iteration
from ratiocinator.repo.knobs import KnobReport
from ratiocinator.spec.models import LoadedSpec
from ratiocinator.store.budget import Budget, run_worst_case
from ratiocinator.store.ledger import Ledger

if TYPE_CHECKING:
    from ratiocinator.llm.session import LlmSession


@dataclass(frozen=True)
class Decision:
    """A plan (or None: stop) with its stated reason; ``record`` is what else the planner wants kept."""

    plan: Plan | None
    reason: str
    record: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PlanningContext:
    """What a planner may look at when it decides an iteration."""

    iteration: int
    ledger: Ledger
    experiment_id: str
    knobs: KnobReport
    budget: Budget
    price_per_hour: float
    train_timeout_s: float
    llm: LlmSession | None = None  # the experiment's LLM (live or replaying), when one is configured

    @property
    def run_worst_case(self) -> float:
        """What one more run may cost at most (reserved before it starts)."""
        return run_worst_case(self.price_per_hour, self.train_timeout_s)


class Planner(abc.ABC):
    name: str

    def check(self) -> None:  # noqa: B027  # an optional hook: by default every planner can plan
        """Raise a PlanError now if the planner cannot plan at all (before the ledger is touched)."""

    @abc.abstractmethod
    def next_iteration(self, context: PlanningContext) -> Decision:
        """The plan for ``context.iteration`` (1-based), or a stop with its reason."""


class SpecPlanner(Planner):
    """Iteration 1 runs the spec's arms and factors; there is nothing to learn after that."""

    name = "spec"

    def __init__(self, loaded: LoadedSpec) -> None:
        self.loaded = loaded

    def check(self) -> None:
        plan_iteration(self.loaded)

    def next_iteration(self, context: PlanningContext) -> Decision:
        if context.iteration == 1:
            return Decision(plan_iteration(self.loaded), "the spec's arms and factors")
        return Decision(None, "the spec planner proposes no further iterations (no LLM or search planner configured)")
