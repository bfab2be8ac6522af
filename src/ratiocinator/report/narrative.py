"""The LLM's discussion of the results, admitted into the paper one verified sentence at a time.

The writing stage records the model's text in the ledger; the paper re-reads it from
there (so ``report`` and ``verify`` rebuild it without calling anyone). Every number in
a sentence must be one of the paper's facts, written exactly as the paper writes it, or a
configuration value quoted from the spec (a knob level, the replicate count). A matching
number becomes a citation of that fact, traced to its runs like every other number. A
sentence with any other number is removed and listed as removed, never published as fact.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import BaseModel, Field, ValidationError

from ratiocinator.report.facts import Fact, FactBook
from ratiocinator.store.ledger import Ledger

# A number as prose writes it: optional $ and sign, digits with thousands separators, a
# fraction, an exponent, a percent sign; not part of a word (H1, fp16, 3rd are no numbers).
NUMBER = re.compile(r"(?<![\w.$])\$?[-−]?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?%?(?![\w])")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'“])")
LABEL_WORD = re.compile(r"[A-Za-z][A-Za-z_=.,-]{3,}")


class Narrative(BaseModel):
    paragraphs: list[str] = Field(min_length=1, max_length=8,
                                  description="the discussion, one string per paragraph, plain text")


@dataclass
class CheckedNarrative:
    """Paragraphs with numbers replaced by fact citations, and the sentences that were removed."""

    model: str
    paragraphs: list[str] = field(default_factory=list)
    removed: list[tuple[str, list[str]]] = field(default_factory=list)  # (sentence, its unsupported numbers)
    cited: int = 0


def recorded_narrative(ledger: Ledger, experiment_id: str) -> tuple[Narrative, str] | None:
    """The latest discussion the model wrote for this experiment (and the model), if it parses."""
    from ratiocinator.llm.structured import json_candidates

    calls = ledger.llm_calls(experiment_id, stage="write")
    for call in reversed(calls):
        for candidate in json_candidates(call.text):
            try:
                return Narrative.model_validate(candidate), call.model
            except ValidationError:
                continue
    return None


def config_numbers(values: Iterable[str]) -> set[str]:
    """Numbers that are configuration, not results: every number inside knob values and arm names."""
    found: set[str] = set()
    for value in values:
        found.update(m.group(0) for m in NUMBER.finditer(str(value)))
        found.update(re.findall(r"\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", str(value)))
    return found


def check_narrative(narrative: Narrative, model: str, book: FactBook, allowed: set[str]) -> CheckedNarrative:
    """Cite each number as the fact it states; drop every sentence with a number that is neither fact nor config."""
    by_text: dict[str, list[Fact]] = {}
    for fact in book:
        by_text.setdefault(fact.text, []).append(fact)
    checked = CheckedNarrative(model)
    for paragraph in narrative.paragraphs:
        kept = []
        for sentence in SENTENCE_END.split(paragraph.strip()):
            if not sentence:
                continue
            unsupported = [m.group(0) for m in NUMBER.finditer(sentence)
                           if _normal(m.group(0)) not in by_text and _normal(m.group(0)) not in allowed]
            if unsupported:
                checked.removed.append((sentence, unsupported))
                continue
            # The lambda runs inside this iteration (NUMBER.sub calls it at once), so `sentence` is the current one.
            kept.append(NUMBER.sub(lambda m: _cite(m.group(0), sentence, by_text, book, checked), sentence))  # noqa: B023
        if kept:
            checked.paragraphs.append(" ".join(kept))
    return checked


def _normal(token: str) -> str:
    return token.replace("−", "-")


def _cite(token: str, sentence: str, by_text: dict[str, list[Fact]], book: FactBook, checked: CheckedNarrative) -> str:
    facts = by_text.get(_normal(token))
    if not facts:
        return token  # a configuration value, quoted as written
    checked.cited += 1
    return book.ref(_best(facts, sentence))


def _best(facts: list[Fact], sentence: str) -> Fact:
    """Of the facts with this text, the one whose label shares most words with the sentence."""
    words = {w.lower() for w in LABEL_WORD.findall(sentence)}
    return max(facts, key=lambda f: (len(words & {w.lower() for w in LABEL_WORD.findall(f.label)}), -facts.index(f)))
