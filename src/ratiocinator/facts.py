"""Traceable numbers: every number a paper states is a fact with the runs it came from.

The paper builder never writes a result number as text. It *cites* a fact: a stable
key (``arm[a].score.mean``), the value, how to format it, a label, and the ledger run
ids behind it. Citing returns a placeholder that each renderer turns into its own
markup (a Markdown link, an HTML anchor with the runs on hover, a LaTeX macro), all
pointing at the fact's row in the paper's appendix. ``facts.json`` beside the paper
records every fact, and ``ratiocinator verify`` recomputes them from the ledger.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum


class Kind(str, Enum):
    """How a fact's value is written; the text, not the float, is what verify compares."""

    METRIC = "metric"  # a metric value or difference: 4 significant digits
    STAT = "stat"  # a test statistic, effect size, df: 3 significant digits
    P = "p"  # a p-value
    COUNT = "count"
    MONEY = "money"  # dollars
    SECONDS = "seconds"
    PERCENT = "percent"


def format_value(kind: Kind, value: float) -> str:
    if kind is Kind.COUNT:
        return str(int(value))
    if kind is Kind.METRIC or kind is Kind.SECONDS:
        return f"{value:.4g}"
    if kind is Kind.STAT:
        return f"{value:.3g}"
    if kind is Kind.P:
        return f"{value:.1e}" if value < 0.001 else f"{value:.3f}"
    if kind is Kind.MONEY:
        return f"${value:,.2f}" if value == 0 or abs(value) >= 0.01 else f"${value:.2g}"
    return f"{value:.2f}%"


@dataclass(frozen=True)
class Fact:
    id: str
    key: str
    value: float
    kind: Kind
    label: str
    run_ids: tuple[int, ...]

    @property
    def text(self) -> str:
        return format_value(self.kind, self.value)

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "key": self.key,
            "text": self.text,
            "value": self.value,
            "kind": self.kind.value,
            "label": self.label,
            "run_ids": list(self.run_ids),
        }


# Placeholders live in block text between two private-use characters no user text has.
_OPEN, _CLOSE = "\ue000", "\ue001"
PLACEHOLDER = re.compile(f"{_OPEN}(f[0-9]+){_CLOSE}")
MISSING = "—"


class FactConflict(RuntimeError):
    """One key cited with two different values: a bug in the paper builder, never user error."""


@dataclass
class FactBook:
    """The facts of one paper, in order of first citation (which fixes their ids)."""

    facts: dict[str, Fact] = field(default_factory=dict)
    by_id: dict[str, Fact] = field(default_factory=dict)

    def cite(self, key: str, value: float | None, kind: Kind, label: str, run_ids: Iterable[int]) -> str:
        """A placeholder for the fact, or an em dash when there is no value to state."""
        if value is None or not math.isfinite(value):
            return MISSING
        runs = tuple(sorted(set(run_ids)))
        known = self.facts.get(key)
        if known is not None:
            if known.text != format_value(kind, value) or known.run_ids != runs:
                raise FactConflict(f"fact {key} cited as {format_value(kind, value)} and {known.text}")
            return f"{_OPEN}{known.id}{_CLOSE}"
        fact = Fact(f"f{len(self.facts) + 1}", key, float(value), kind, label, runs)
        self.facts[key] = fact
        self.by_id[fact.id] = fact
        return f"{_OPEN}{fact.id}{_CLOSE}"

    def ref(self, fact: Fact) -> str:
        """A placeholder for a fact already in the book (the appendix cites each one again)."""
        return f"{_OPEN}{self.by_id[fact.id].id}{_CLOSE}"

    def __iter__(self):
        return iter(self.facts.values())

    def __len__(self) -> int:
        return len(self.facts)


def split(text: str) -> list[str]:
    """Text and fact ids alternating: even items are text, odd items are fact ids."""
    return PLACEHOLDER.split(text)


def run_ranges(run_ids: Sequence[int]) -> str:
    """``1–3, 7, 9–12``: run ids compressed into ranges so 10,000 runs stay one short line."""
    if not run_ids:
        return "none"
    ids = sorted(set(run_ids))
    parts: list[str] = []
    start = prev = ids[0]
    for run_id in [*ids[1:], None]:
        if run_id is not None and run_id == prev + 1:
            prev = run_id
            continue
        parts.append(str(start) if start == prev else f"{start}–{prev}")
        if run_id is not None:
            start = prev = run_id
    return ", ".join(parts)


def provenance(fact: Fact) -> str:
    """What a reader sees on hover: the label and the runs."""
    runs = run_ranges(fact.run_ids)
    return f"{fact.label} · run{'s' if len(fact.run_ids) != 1 else ''} {runs}"
