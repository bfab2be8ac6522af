"""The paper's words for hypothesis verdicts: what each hypothesis tests, its verdict with
the numbers behind it (each cited as a traced fact), the abstract's one sentence per
hypothesis, and the conclusion written from the verdicts without a language model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ratiocinator.analysis.hypotheses import Judgement, Number, Status
from ratiocinator.spec.hypotheses import Beats, FactorEffect, GapGrows, Hypothesis, Interaction, MetricOrder, Selector

# Cites one number of one hypothesis; returns the placeholder the renderers turn into a link.
Cite = Callable[[Judgement, Number], str]


def _selector(sel: Selector) -> str:
    if isinstance(sel, str):
        return sel
    return ", ".join(f"{k}={v}" for k, v in sel.items())


def expectation(h: Hypothesis, goal: str) -> str:
    """How the hypothesis is tested, in one clause."""
    e = h.expect
    if isinstance(e, Beats):
        return f"{_selector(e.arm)} has a better mean {e.metric or goal} than {_selector(e.beats)}"
    if isinstance(e, FactorEffect):
        best = f", and {e.factor}={e.best} is its best level" if e.best is not None else ""
        return f"{e.factor} affects {e.metric or goal}{best}"
    if isinstance(e, Interaction):
        a, b = e.interaction
        return f"the effect of {a} on {e.metric or goal} depends on {b} (a {a} × {b} interaction)"
    if isinstance(e, MetricOrder):
        where = f" in arms {_selector(e.arm)}" if e.arm is not None else " in every arm"
        return f"{e.metric} is {'above' if e.above else 'below'} {e.other} in the same runs{where}"
    assert isinstance(e, GapGrows)
    a, b = e.gap
    return f"the per-run gap {a} − {b} grows from the first level of {e.grows_with} to the last"


def evidence(j: Judgement, cite: Cite) -> str:
    return "".join(p if isinstance(p, str) else cite(j, p) for p in j.because)


def _p(j: Judgement, cite: Cite) -> str:
    """The p-value that decided the verdict: a level's lead over its rival when there is one, else the test's."""
    by_name = {n.name: n for n in j.numbers}
    p = by_name.get("pair_p_holm") if j.status is not Status.INCONCLUSIVE else None
    p = p or by_name.get("p_holm")
    return f" (Holm-adjusted p = {cite(j, p)})" if p is not None and p.value is not None else ""


def abstract_sentence(j: Judgement, cite: Cite) -> str:
    statement = j.hypothesis.statement.strip().rstrip(".")
    return f"{j.id} ({statement}) is {j.status.value}{_p(j, cite)}."


def conclusion(judgements: Sequence[Judgement], cite: Cite) -> list[str]:
    """Paragraphs: what the runs say about each hypothesis, grouped by verdict."""
    groups = {s: [j for j in judgements if j.status is s] for s in Status}
    counts = ", ".join(f"{len(groups[s])} {s.value}" for s in Status if groups[s])
    out = [f"The study stated {len(judgements)} hypothes{'i' if len(judgements) == 1 else 'e'}s; the runs leave"
           f" {counts}."]
    for status, lead in ((Status.SUPPORTED, "The evidence supports"), (Status.CONTRADICTED, "The evidence contradicts"),
                         (Status.INCONCLUSIVE, "The runs cannot decide")):
        for j in groups[status]:
            out.append(f"{lead} {j.id}: {expectation_text(j)}{_p(j, cite)}.")
    if groups[Status.INCONCLUSIVE]:
        out.append("An inconclusive verdict is not evidence against its hypothesis: the test did not reject, or the"
                   " difference was no larger than the run-to-run noise; more replicates narrow the intervals.")
    return out


def expectation_text(j: Judgement) -> str:
    return j.hypothesis.statement.strip().rstrip(".")
