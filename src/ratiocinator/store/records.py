"""Typed saved state: the statuses the ledger stores, and the records whose writers and readers
(resume, the paper, the dashboard) must agree, so no reader digs keys out of an event by hand.

The statuses are `StrEnum`s, stored as their text: an old ledger reads unchanged, and a member
compares equal to its text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class RunStatus(StrEnum):
    """A run attempt's state; `TERMINAL` ones never change again."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # the orchestrator stopped; a resume runs it again as a new attempt


TERMINAL: tuple[RunStatus, ...] = (RunStatus.SUCCEEDED, RunStatus.FAILED)


class ExperimentStatus(StrEnum):
    CREATED = "created"
    PLANNED = "planned"  # `plan` recorded the first iteration's decision
    RUNNING = "running"
    COMPLETED = "completed"
    BUDGET_EXHAUSTED = "budget_exhausted"
    STOPPED = "stopped"  # early stop, or a degenerate metric
    NOT_READY = "not_ready"  # the readiness review refused the code
    PAUSED = "paused"  # the LLM provider was unavailable
    INTERRUPTED = "interrupted"
    FAILED = "failed"


FINISHED: tuple[ExperimentStatus, ...] = (ExperimentStatus.COMPLETED, ExperimentStatus.BUDGET_EXHAUSTED,
                                          ExperimentStatus.STOPPED)


class InstanceState(StrEnum):
    """A rented instance's row; `LIVE` ones may still bill."""

    REQUESTED = "requested"  # written before the rent call
    BOOTING = "booting"
    RUNNING = "running"
    DESTROYING = "destroying"  # a destroy was asked for, not yet confirmed
    DESTROYED = "destroyed"
    LOST = "lost"  # gone at the provider


LIVE: tuple[InstanceState, ...] = (InstanceState.REQUESTED, InstanceState.BOOTING, InstanceState.RUNNING,
                                   InstanceState.DESTROYING)


class EventKind(StrEnum):
    """The event kinds that carry a typed record."""

    DECISION = "decision"
    READINESS = "readiness"
    READINESS_SKIPPED = "readiness_skipped"
    DATA = "data"


@dataclass(frozen=True)
class DecisionRecord:
    """What the planner decided for an iteration, with the plan itself, so a resume runs exactly it."""

    iteration: int
    planner: str
    reason: str
    plan: dict[str, Any] | None  # `Plan.to_json()`; None: the planner stops here
    record: dict[str, Any] = field(default_factory=dict)  # the planner's own notes (hypotheses, proposals)

    def data(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "planner": self.planner, "has_plan": self.plan is not None,
                "plan": self.plan, "record": self.record}

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> DecisionRecord:
        data = event["data"]
        return cls(int(data["iteration"]), str(data.get("planner", "planner")), str(event["message"]),
                   data.get("plan"), dict(data.get("record") or {}))


@dataclass(frozen=True)
class ReadinessRecord:
    """The readiness review's verdict at a commit (or that it was skipped)."""

    commit: str | None
    skipped: bool
    is_code_ready: bool
    code_issue: str | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)  # {name, status, summary, evidence}
    review_key: str | None = None  # what the review depended on (check.memory): a pass is reused under it

    def data(self) -> dict[str, Any]:
        if self.skipped:
            return {"commit": self.commit}
        return {"commit": self.commit, "is_code_ready": self.is_code_ready, "code_issue": self.code_issue,
                "checks": self.checks, **({"review_key": self.review_key} if self.review_key else {})}

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> ReadinessRecord:
        data = event["data"]
        if event["kind"] == EventKind.READINESS_SKIPPED:
            return cls(data.get("commit"), skipped=True, is_code_ready=False)
        return cls(data.get("commit"), skipped=False, is_code_ready=bool(data.get("is_code_ready")),
                   code_issue=data.get("code_issue"), checks=list(data.get("checks") or []),
                   review_key=data.get("review_key"))


@dataclass(frozen=True)
class DataRecord:
    """The data the runs read: each source (where it came from, size, checksum), the tree hash of the
    directory runs see, and the seconds each host spent receiving it."""

    tree_hash: str
    size: int
    files: int
    sources: list[dict[str, Any]]  # {kind, location, resolved, size, sha256}
    staging_s: dict[str, float] = field(default_factory=dict)  # host -> seconds

    def data(self) -> dict[str, Any]:
        return {"tree_hash": self.tree_hash, "size": self.size, "files": self.files, "sources": self.sources,
                "staging_s": self.staging_s}

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> DataRecord:
        data = event["data"]
        return cls(str(data["tree_hash"]), int(data["size"]), int(data["files"]), list(data.get("sources") or []),
                   {str(k): float(v) for k, v in (data.get("staging_s") or {}).items()})


__all__ = ["FINISHED", "LIVE", "TERMINAL", "DataRecord", "DecisionRecord", "EventKind", "ExperimentStatus",
           "InstanceState", "ReadinessRecord", "RunStatus"]
