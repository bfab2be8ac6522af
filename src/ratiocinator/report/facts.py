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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property, lru_cache


class Kind(str, Enum):
    """How a fact's value is written; the text, not the float, is what verify compares."""

    METRIC = "metric"  # a metric value or difference: 4 significant digits
    STAT = "stat"  # a test statistic, effect size, df: 3 significant digits
    P = "p"  # a p-value
    COUNT = "count"
    MONEY = "money"  # dollars
    SECONDS = "seconds"
    PERCENT = "percent"
    DECIMAL6 = "decimal6"  # a metric to six decimals, as autoresearch compares them (0.997900 vs 0.997912)


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
    if kind is Kind.DECIMAL6:
        return f"{value:.6f}"
    return f"{value:.2f}%"


@dataclass(frozen=True)
class Fact:
    id: str
    key: str
    value: float
    kind: Kind
    label: str
    run_ids: tuple[int, ...]
    unit: str = "run"  # what the ids count: a study's runs, or an autoresearch session's attempts

    @property
    def text(self) -> str:
        return format_value(self.kind, self.value)

    @cached_property
    def runs_text(self) -> str:
        return run_ranges(self.run_ids) if self.run_ids else "none (from the spec)"

    @cached_property
    def hover(self) -> str:
        n = len(self.run_ids)
        runs = (self.runs_text if len(self.runs_text) <= HOVER_RUNS_CHARS
                else f"{n:,} {self.unit}s, listed in the appendix")
        return f"{self.label} · {self.unit}{'s' if n != 1 else ''} {runs}"

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
FACT_OPEN = _OPEN  # no fact is cited in a text without it
PLACEHOLDER = re.compile(f"{_OPEN}(f[0-9]+){_CLOSE}")
MISSING = "—"


class FactConflict(RuntimeError):
    """One key cited with two different values: a bug in the paper builder, never user error."""


@dataclass
class FactBook:
    """The facts of one paper, in order of first citation (which fixes their ids)."""

    facts: dict[str, Fact] = field(default_factory=dict)
    by_id: dict[str, Fact] = field(default_factory=dict)
    unit: str = "run"

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
        fact = Fact(f"f{len(self.facts) + 1}", key, float(value), kind, label, runs, self.unit)
        self.facts[key] = fact
        self.by_id[fact.id] = fact
        return f"{_OPEN}{fact.id}{_CLOSE}"

    def ref(self, fact: Fact) -> str:
        """A placeholder for a fact already in the book (the appendix cites each one again)."""
        return f"{_OPEN}{self.by_id[fact.id].id}{_CLOSE}"

    def __iter__(self) -> Iterator[Fact]:
        return iter(self.facts.values())

    def __len__(self) -> int:
        return len(self.facts)


def split(text: str) -> list[str]:
    """Text and fact ids alternating: even items are text, odd items are fact ids."""
    return PLACEHOLDER.split(text)


def run_ranges(run_ids: Sequence[int]) -> str:
    """``1–3, 7, 9–99 step 10``: run ids as runs of evenly spaced ids, so 10,000 runs stay short.

    Runs are recorded one replicate of every arm at a time, so an arm's ids step by the
    number of arms; a plain list of them would fill pages.
    """
    return _run_ranges(tuple(sorted(set(run_ids))))


@lru_cache(maxsize=4096)  # an arm's dozen facts share one run set
def _run_ranges(ids: tuple[int, ...]) -> str:
    if not ids:
        return "none"
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        if i + 1 < len(ids):
            step = ids[i + 1] - ids[i]
            while j + 1 < len(ids) and ids[j + 1] - ids[j] == step:
                j += 1
            if j - i < 2 and step != 1:  # two ids a step apart read better listed
                j = i
        if j == i:
            parts.append(str(ids[i]))
        elif ids[j] - ids[i] == j - i:
            parts.append(f"{ids[i]}–{ids[j]}")
        else:
            parts.append(f"{ids[i]}–{ids[j]} step {ids[i + 1] - ids[i]}")
        i = j + 1
    return ", ".join(parts)


# Past this length the hover text names the count and leaves the ids to the appendix row.
HOVER_RUNS_CHARS = 240


def provenance(fact: Fact) -> str:
    """What a reader sees on hover: the label and the runs."""
    return fact.hover
