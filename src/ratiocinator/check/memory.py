"""Remembering a readiness review that passed, so the same review is never paid for twice.

A review's verdict depends on the commit, on the distinct arm configurations it smoke-ran
and on the spec fields that shape a run (runner, metrics, deps, data, hardware, backend,
the check settings), and on whether smoke runs and an LLM took part. Those make the key; the
rest of the spec (topic, budget, replicates, the paper's title) leaves it unchanged. A review
``check`` passed is then reused by ``research`` at the same key, and says so.
"""

from __future__ import annotations

import hashlib
import json

from ratiocinator.planning.plan import Plan
from ratiocinator.spec.models import LoadedSpec
from ratiocinator.store.ledger import Ledger
from ratiocinator.store.records import ReadinessRecord

# Spec fields a review does not depend on. The arms themselves (arms, factors, design, env) count
# through the plan's distinct configurations, the LLM through the model named in the key.
NOT_REVIEWED = frozenset({"name", "topic", "paper_title", "maximize", "max_dollars", "max_iterations", "replicates",
                          "train_timeout_s", "concurrency", "failure_policy", "search", "baseline", "design", "factors",
                          "arms", "env", "llm"})


def review_key(loaded: LoadedSpec, plan: Plan, commit: str, *, smoke: bool, llm_model: str | None) -> str:
    configs = sorted({json.dumps([sorted(a.env.items()), list(a.args)]) for a in plan.arms})
    material = {
        "commit": commit,
        "configs": configs,
        "spec": loaded.spec.model_dump(mode="json", exclude=set(NOT_REVIEWED)),
        "smoke": smoke and loaded.spec.check.smoke,
        "llm": llm_model,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def remembered_pass(ledger: Ledger, key: str, *, smoke: bool) -> ReadinessRecord | None:
    """The latest review under ``key`` that passed with its smoke runs (when they were asked for), or None."""
    for record in reversed(ledger.reviews_under(key)):
        if not record.is_code_ready:
            continue
        statuses = {c.get("name"): c.get("status") for c in record.checks}
        if smoke and statuses.get("smoke") != "passed":
            continue  # a pass without smoke runs (no host, --no-smoke) does not stand for one with them
        return record
    return None
