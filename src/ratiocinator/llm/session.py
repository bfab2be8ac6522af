"""LLM calls inside an experiment: paid from its budget, recorded in its ledger, replayable.

Every stage (design, iterate, write, review) asks `LlmSession.provider(stage, iteration)`
for a provider. A *live* session wraps the real provider: before a call it reserves the
call's worst case (prompt at ~4 characters per token, output at the token cap) against
``max_dollars`` exactly as a run's compute is reserved, then settles the real cost and
records the call (request body, response, tokens, cost, latency; never a key). A
*replay* session answers each call from another experiment's recorded calls, matched by
stage, iteration and order, with no network, so the same decisions come out again.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field

from ratiocinator.errors import RatiocinatorError
from ratiocinator.llm.config import LlmConfig
from ratiocinator.llm.providers import Completion, LlmError, Message, Provider, estimate_cost
from ratiocinator.store.budget import Budget
from ratiocinator.store.ledger import Ledger, LlmCallRow


class LlmBudgetExceeded(RatiocinatorError):
    """The next LLM call could overrun ``max_dollars``; it was not made."""


def prompt_sha256(messages: list[Message], system: str | None) -> str:
    """A provider-independent fingerprint of what was asked (replays compare these)."""
    canonical = json.dumps({"system": system, "messages": [[m.role, m.content] for m in messages]}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def record_call(ledger: Ledger, experiment_id: str | None, stage: str, iteration: int, digest: str,
                completion: Completion) -> LlmCallRow:
    """One live call as a ledger row (never a key: the request body is what the SDK sent)."""
    return ledger.record_llm_call(
        experiment_id, stage=stage, iteration=iteration, provider=completion.provider, model=completion.model,
        prompt_sha256=digest, request=completion.request, response=completion.response, text=completion.text,
        input_tokens=completion.input_tokens, output_tokens=completion.output_tokens, cost=completion.cost_dollars,
        latency_s=completion.latency_s, attempts=completion.attempts,
    )


@dataclass
class LlmSession:
    """The experiment's LLM: live (``inner`` set) or replaying ``replay_from``'s calls."""

    budget: Budget
    config: LlmConfig
    inner: Provider | None = None
    replay_from: str | None = None
    _replayed: dict[tuple[str, int], list[LlmCallRow]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.inner is None) == (self.replay_from is None):
            raise ValueError("an LlmSession is either live (inner) or a replay (replay_from)")
        if self.replay_from is not None:
            calls: dict[tuple[str, int], list[LlmCallRow]] = defaultdict(list)
            for call in self.ledger.llm_calls(self.replay_from):
                calls[(call.stage, call.iteration)].append(call)
            self._replayed = dict(calls)

    @property
    def ledger(self) -> Ledger:
        return self.budget.ledger

    @property
    def experiment_id(self) -> str:
        return self.budget.experiment_id

    @property
    def replaying(self) -> bool:
        return self.replay_from is not None

    def provider(self, stage: str, iteration: int = 0) -> Provider:
        return _StageProvider(self, stage, iteration)

    def estimate(self, prompt_chars: int, max_tokens: int | None = None) -> float:
        return 0.0 if self.replaying else estimate_cost(self.config, prompt_chars, max_tokens)

    def spent(self) -> float:
        return sum(c.cost for c in self.ledger.llm_calls(self.experiment_id))

    # -- one call ---------------------------------------------------------------------

    def call(self, stage: str, iteration: int, messages: list[Message], system: str | None,
             max_tokens: int | None, stream: bool) -> Completion:
        digest = prompt_sha256(messages, system)
        if self.replaying:
            return self._replay(stage, iteration, digest)
        assert self.inner is not None
        prompt_chars = len(system or "") + sum(len(m.content) for m in messages)
        worst = estimate_cost(self.config, prompt_chars, max_tokens)
        charge = self.budget.reserve(worst, kind="llm", note=f"{stage} call, worst case")
        if charge is None:
            raise LlmBudgetExceeded(self.budget.refusal(f"the {stage} LLM call", worst),
                                    hint="raise max_dollars, lower llm.max_tokens, or use a cheaper model")
        try:
            completion = self.inner.complete(messages, system=system, max_tokens=max_tokens, stream=stream)
        except LlmError as exc:  # replies paid for before the provider gave up still cost money
            self.budget.settle(charge, sum(c.cost_dollars for c in getattr(exc, "completions", ()) or ()))
            raise
        except BaseException:
            self.budget.settle(charge, 0.0)
            raise
        self.budget.settle(charge, completion.cost_dollars)
        record_call(self.ledger, self.experiment_id, stage, iteration, digest, completion)
        return completion

    def _replay(self, stage: str, iteration: int, digest: str) -> Completion:
        done = sum(1 for c in self.ledger.llm_calls(self.experiment_id, stage=stage) if c.iteration == iteration)
        recorded = self._replayed.get((stage, iteration), [])
        if done >= len(recorded):
            raise LlmError(
                f"replay of {self.replay_from}: it recorded {len(recorded)} {stage} call(s) for iteration {iteration},"
                f" this run needs call #{done + 1}",
                hint="the replayed experiment stopped earlier or took another path; run without --replay to ask the"
                     " model",
            )
        source = recorded[done]
        if source.prompt_sha256 != digest:
            self.ledger.event(self.experiment_id, "replay_diverged",
                              f"{stage} call #{done + 1} of iteration {iteration} asks something else than the recorded"
                              " one (the inputs changed); the recorded answer is used", level="warning",
                              recorded=source.prompt_sha256, now=digest, source_call=source.id)
        self.ledger.record_llm_call(
            self.experiment_id, stage=stage, iteration=iteration, provider=source.provider, model=source.model,
            prompt_sha256=digest, request=source.request, response=source.response, text=source.text,
            input_tokens=source.input_tokens, output_tokens=source.output_tokens, cost=0.0, latency_s=0.0, attempts=0,
            replayed_from=source.id,
        )
        return Completion(provider=source.provider, model=source.model, text=source.text, finish_reason=None,
                          input_tokens=source.input_tokens, output_tokens=source.output_tokens, latency_s=0.0,
                          cost_dollars=0.0, request=source.request, response=source.response, attempts=0)


class RecordingProvider(Provider):
    """A provider used outside any experiment (the standalone `check`): each call is recorded in
    the ledger with no experiment, so it can be audited; there is no experiment budget to charge."""

    def __init__(self, inner: Provider, ledger: Ledger, stage: str) -> None:
        self.inner = inner
        self.ledger = ledger
        self.stage = stage
        self.config = inner.config
        self.recorded: list[int] = []  # ledger ids of the calls made through this provider

    def complete(self, messages: list[Message], *, system: str | None = None, max_tokens: int | None = None,
                 stream: bool = False) -> Completion:
        completion = self.inner.complete(messages, system=system, max_tokens=max_tokens, stream=stream)
        call = record_call(self.ledger, None, self.stage, 0, prompt_sha256(messages, system), completion)
        self.recorded.append(call.id)
        return completion


class _StageProvider(Provider):
    """The session seen by one stage: calls are tagged with the stage and iteration."""

    def __init__(self, session: LlmSession, stage: str, iteration: int) -> None:
        self.session = session
        self.stage = stage
        self.iteration = iteration
        self.config = session.config

    def complete(self, messages: list[Message], *, system: str | None = None, max_tokens: int | None = None,
                 stream: bool = False) -> Completion:
        return self.session.call(self.stage, self.iteration, messages, system, max_tokens, stream)

