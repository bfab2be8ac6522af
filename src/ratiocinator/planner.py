"""Who decides what runs in each iteration.

The research loop asks its planner for the next iteration's plan until the planner
says stop or ``max_iterations`` is reached. The spec planner proposes the spec's own
arms once; an LLM or search-based planner implements the same interface and reads
the results of earlier iterations from the ledger.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from .ledger import Ledger
from .planning import Plan, plan_iteration
from .spec import LoadedSpec


@dataclass(frozen=True)
class Decision:
    plan: Plan | None
    reason: str


class Planner(abc.ABC):
    name: str

    def check(self) -> None:
        """Raise a PlanError now if the planner cannot plan at all (before the ledger is touched)."""

    @abc.abstractmethod
    def next_iteration(self, iteration: int, ledger: Ledger, experiment_id: str) -> Decision:
        """The plan for ``iteration`` (1-based), or a stop with its reason."""


class SpecPlanner(Planner):
    """Iteration 1 runs the spec's arms and factors; there is nothing to learn after that."""

    name = "spec"

    def __init__(self, loaded: LoadedSpec) -> None:
        self.loaded = loaded

    def check(self) -> None:
        plan_iteration(self.loaded)

    def next_iteration(self, iteration: int, ledger: Ledger, experiment_id: str) -> Decision:
        if iteration == 1:
            return Decision(plan_iteration(self.loaded), "the spec's arms and factors")
        return Decision(None, "the spec planner proposes no further iterations (no LLM or search planner configured)")
