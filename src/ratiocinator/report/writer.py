"""The writing stage: the LLM discusses the computed results, in prose, from the paper's own facts.

The model sees the numbers the paper states (each with what it is and how it is written)
and is told to use no others. Whatever it writes is still checked sentence by sentence
when the paper is built (`narrative.check_narrative`): instructions are not guarantees.
"""

from __future__ import annotations

from ratiocinator.llm.providers import Provider
from ratiocinator.llm.structured import ask_structured
from ratiocinator.report.narrative import Narrative
from ratiocinator.store.ledger import Ledger

MAX_FACTS_SHOWN = 400

SYSTEM = """You write the discussion section of an empirical machine-learning paper. The tables, figures
and statistics are already computed; you interpret them: what the evidence supports, how strongly, what it
does not show, and what to try next. Every number you write must be copied exactly, character for
character, from the list of facts you are given; write no other numbers (spell out small counts in words
if you need them). Do not invent results. Plain text, no Markdown."""


def write_narrative(ledger: Ledger, experiment_id: str, provider: Provider) -> Narrative:
    """Ask for the discussion; the call (and its cost) is recorded by the provider's session."""
    from ratiocinator.report.paper import build_paper

    paper = build_paper(ledger, experiment_id, figures=False)
    spec = paper.spec
    facts = [f"- {fact.text} — {fact.label}" for fact in list(paper.book)[:MAX_FACTS_SHOWN]]
    verdicts = [f"- {c.arm}: {c.verdict.value} ({c.reason})" for c in paper.inference.comparisons]
    hypotheses = [f"- {j.id} ({j.hypothesis.statement.strip()}): {j.status.value}" for j in paper.judgements]
    prompt = "\n".join([
        f"Paper title: {paper.title}",
        f"Research question: {spec.topic.strip()}",
        f"Goal metric: {spec.goal_metric} ({'higher' if spec.maximize else 'lower'} is better)",
        "",
        "The study's hypotheses and their verdicts (computed from the runs; discuss each):",
        *(hypotheses or ["- (the spec states none)"]),
        "",
        "Verdicts against the baseline (computed; a difference inside the noise floor is not an improvement):",
        *(verdicts or ["- (no comparison was possible)"]),
        "",
        "Facts (the only numbers you may write, exactly as shown):",
        *facts,
        "",
        "Write two to four paragraphs of discussion.",
    ])
    result = ask_structured(provider, system=SYSTEM, user=prompt, schema=Narrative)
    return result.value
