"""An autoresearch session's report, built by the paper's document pipeline.

The same blocks become ``report.md``, ``report.html`` and ``report.tex`` (and
``report.pdf`` once the session has ended), and every number in them is a traced
fact whose "runs" are the ledger's attempt ids: the baseline, the best, the keep
rate, the noise floor and every attempt's metric. ``facts.json`` beside them lets
``ratiocinator verify`` rebuild the facts from the ledger and compare, exactly as
for a study's paper. The report reads only the ledger (session, attempts, charges),
so verify rebuilds it from the same rows. Its cost section says what each kept
improvement cost (`~ratiocinator.autoresearch.costs`), each dollar a fact whose
attempts are the stretch that paid it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ratiocinator.autoresearch.costs import KeptCost, SessionCosts, Stretch, session_costs
from ratiocinator.autoresearch.decide import noise_floor
from ratiocinator.autoresearch.program import Program
from ratiocinator.autoresearch.store import Attempt, Session, Store
from ratiocinator.report.document import (
    Abstract,
    Block,
    Fields,
    Figure,
    Heading,
    Paragraph,
    Table,
    fact_counts,
    render_html,
    render_latex,
    render_markdown,
)
from ratiocinator.report.facts import FactBook, Kind
from ratiocinator.report.figures import FigureFile
from ratiocinator.spec.source import load_stored

DOCUMENTS = {"report.md": "md", "report.html": "html", "report.tex": "tex"}
FACTS_FILE = "facts.json"
# facts.json of a session names it under this key (a study's names its experiment_id).
SESSION_KEY = "autoresearch_session"
STATUSES = ("keep", "discard", "crash", "violation", "interrupted")


@dataclass(frozen=True)
class _StretchRow:
    """A row of the cost table: a stretch of the session and what it cost."""

    key: str  # its facts' key: cost.<key>.total_usd
    name: str
    commit: str
    change: str  # the metric from -> to, as facts
    called: str  # how the facts' labels name it
    spent: Stretch
    kept: KeptCost | None = None  # the keep that ended it


@dataclass(frozen=True)
class SessionReport:
    title: str
    blocks: tuple[Block, ...]
    book: FactBook


def session_program(session: Session) -> Program:
    """The program the session last ran under, from the text the ledger stores with it."""
    return Program.model_validate(load_stored(session.program_text))


def session_floor(attempts: Sequence[Attempt], program: Program) -> float | None:
    """The noise floor the keep rule uses: the spread of the last baseline's runs (None for one run per commit)."""
    if program.k == 1:
        return None
    baselines = [a for a in attempts if a.status == "baseline"]
    return noise_floor(baselines[-1].values) if baselines else None


def build_session_report(session: Session, attempts: Sequence[Attempt], program: Program, *, spent: float,
                         costs: SessionCosts, progress: FigureFile | None = None) -> SessionReport:
    return _Writer(session, attempts, program, spent, costs).build(progress)


class _Writer:
    def __init__(self, session: Session, attempts: Sequence[Attempt], program: Program, spent: float,
                 costs: SessionCosts) -> None:
        self.session = session
        self.program = program
        self.metric = program.metric
        self.done = [a for a in attempts if a.status != "running"]
        self.tried = [a for a in self.done if not a.is_baseline]
        self.baseline = next((a for a in self.done if a.status == "baseline"), None)
        self.best = next((a for a in self.done if a.id == session.best_attempt), self.baseline)
        self.floor = session_floor(attempts, program)
        self.spent = spent
        self.costs = costs
        self.book = FactBook(unit="attempt")

    def value(self, key: str, value: float | None, label: str, ids: Sequence[int]) -> str:
        return self.book.cite(key, value, Kind.DECIMAL6, label, ids)

    def count(self, key: str, n: int, label: str, ids: Sequence[int]) -> str:
        return self.book.cite(key, n, Kind.COUNT, label, ids)

    def money(self, key: str, dollars: float | None, label: str, ids: Sequence[int]) -> str:
        return self.book.cite(key, dollars, Kind.MONEY, label, ids)

    def attempt_metric(self, a: Attempt) -> str:
        runs = "the mean of its runs" if len(a.values) > 1 else "its run"
        return self.value(f"attempt[{a.id}].{self.metric.name}", a.metric,
                          f"{self.metric.name} of attempt {a.iteration} ({runs})", [a.id])

    def build(self, progress: FigureFile | None) -> SessionReport:
        blocks: list[Block] = [Abstract(self.abstract()), *self.setup()]
        blocks += [Heading("Progress", 1), Figure(progress)] if progress is not None else []
        blocks += self.cost() if not self.cost_is_empty() else []
        blocks += self.attempt_table()
        blocks += self.appendix()
        return SessionReport(f"Autoresearch {self.session.tag}", tuple(blocks), self.book)

    # -- the headline numbers ---------------------------------------------------------

    def baseline_fact(self) -> str | None:
        b = self.baseline
        if b is None or b.metric is None:
            return None
        return self.value("baseline.metric", b.metric, f"{self.metric.name} of the baseline (attempt {b.id})", [b.id])

    def floor_fact(self) -> str:
        assert self.baseline is not None and self.floor is not None
        return self.value("noise.floor", self.floor, "noise floor: sample standard deviation of the baseline's"
                          f" {len(self.baseline.values)} runs", [self.baseline.id])

    def rule(self) -> str:
        if self.program.k == 1:
            return "the strictly-better rule: one run per commit, kept when strictly better than the best so far"
        text = (f"the noise-aware rule: {self.program.k} runs per candidate, kept only when a one-sided Welch test at"
                f" {self.program.confidence:.0%} confidence rejects and the mean improvement exceeds the noise floor")
        if self.floor is not None and self.baseline is not None:
            text += f" ({self.floor_fact()})"
        return text

    def counts(self) -> tuple[str, str]:
        """("N attempts: a keep, b discard, ...", keep-rate sentence)."""
        ids = [a.id for a in self.tried]
        parts = []
        for status in STATUSES:
            group = [a.id for a in self.tried if a.status == status]
            if group:
                parts.append(f"{self.count(f'attempts.{status}', len(group), f'attempts that ended {status}', group)}"
                             f" {status}")
        total = self.count("attempts.n", len(ids), "attempts the agent made (every status)", ids)
        decided = [a.id for a in self.tried if a.status in ("keep", "discard")]
        kept = [a.id for a in self.tried if a.status == "keep"]
        rate = ""
        if decided:
            share = self.book.cite("keep_rate", 100.0 * len(kept) / len(decided), Kind.PERCENT,
                                   "kept attempts as a share of the measured ones (keep or discard)", decided)
            rate = f"The keep rate is {share} of the measured attempts (crashes and rejected edits excluded)."
        return f"{total} attempts" + (f": {', '.join(parts)}" if parts else ""), rate

    def abstract(self) -> str:
        s, metric = self.session, self.metric
        text = [f"An agent edited {s.repo} on branch {s.branch} (from {s.base_branch} at {s.base_commit[:12]}),"
                f" one fixed-budget run per edit, keeping an edit only when {metric.name} improved ({metric.direction}"
                f" is better) under {self.rule()}."]
        base = self.baseline_fact()
        if base is None:
            text.append("The baseline produced no measurement, so no edit could be judged.")
        else:
            text.append(f"The baseline measured {metric.name} = {base}.")
            b = self.best
            if b is not None and b is not self.baseline and b.metric is not None and self.baseline is not None:
                assert self.baseline.metric is not None
                gain = (self.baseline.metric - b.metric if metric.lower_is_better else b.metric - self.baseline.metric)
                best = self.value("best.metric", b.metric, f"{metric.name} of the best kept commit (attempt {b.id})",
                                  [b.id])
                delta = self.value("best.gain", gain, f"improvement of the best over the baseline ({metric.direction}"
                                   " is better; positive is better)", [b.id, self.baseline.id])
                text.append(f"The best kept commit, {(b.commit_sha or '')[:12]} (attempt {b.iteration}), reached"
                            f" {best}, an improvement of {delta}.")
            else:
                text.append("No edit was kept: the baseline is still the best.")
        total, rate = self.counts()
        text.append(f"{total}.")
        if rate:
            text.append(rate)
        text.append(f"The session is {s.status}" + (f": {s.reason}." if s.reason else "."))
        return " ".join(text)

    # -- sections -----------------------------------------------------------------------

    def setup(self) -> list[Block]:
        s, p = self.session, self.program
        spend = self.spent_fact()
        rows = [
            ("Repository", s.repo), ("Branch", f"{s.branch} (from {s.base_branch} at {s.base_commit})"),
            ("Program", f"{s.program_path} (sha256 {s.program_sha256})"),
            ("Metric", f"{p.metric.name}, {p.metric.direction} is better"),
            ("Decision rule", self.rule()),
            ("Run budget", f"{p.budget_s:g} s per run (hard timeout {p.hard_timeout_s:g} s)"),
            ("Spend", spend + (f" of a {p.max_dollars:g} dollar limit" if p.max_dollars is not None else "")),
            ("Status", s.status + (f" ({s.reason})" if s.reason else "")),
        ]
        blocks: list[Block] = [Heading("Session", 1), Fields(tuple(rows))]
        if self.cost_is_empty():
            blocks.append(Paragraph("Cost: none. The runs were free, no LLM turn was paid for and nothing was rented,"
                                    " so there is no cost section."))
        return blocks

    # -- money ----------------------------------------------------------------------------

    def spent_fact(self) -> str:
        return self.money("spent", self.spent, "dollars spent on compute and LLM calls (settled)",
                          [a.id for a in self.done if a.cost])

    def cost_is_empty(self) -> bool:
        """A free session: nothing spent or reserved and nothing rented (a note replaces the cost section)."""
        return self.spent == 0 and self.costs.reserved == 0 and self.costs.instances == 0

    def cost(self) -> list[Block]:
        stretches = self._stretches()
        llm = self.program.agent.kind == "llm" or any(s.spent.llm_turns_usd for s in stretches)
        rented = self.costs.instances > 0 or any(s.spent.instances_usd for s in stretches)
        divided = any(self._gain(k) is not None for k in self.costs.kept)
        rows = []
        for s in stretches:
            money, ids, key = s.spent, s.spent.attempt_ids, f"cost.{s.key}"
            cells = [s.name, s.commit, s.change,
                     self.count(f"{key}.attempts", money.attempts, f"attempts that ended in {s.called}", ids),
                     self.money(f"{key}.attempts_usd", money.attempts_usd,
                                f"dollars of the runs and LLM turns of the attempts in {s.called}", ids)]
            if llm:
                cells.append(self.money(f"{key}.llm_turns_usd", money.llm_turns_usd,
                                        f"dollars of LLM turns that made no attempt, in {s.called}", ids))
            if rented:
                cells.append(self.money(f"{key}.instances_usd", money.instances_usd,
                                        f"dollars of rented instances' time in {s.called} (each ended instance's"
                                        " settled cost spread evenly over its lifetime)", ids))
            cells.append(self.money(f"{key}.total_usd", money.total_usd, f"dollars spent in {s.called}", ids))
            if divided:
                cells.append(self._per_unit(s.kept) if s.kept is not None else "—")
            rows.append(tuple(cells))
        metric = self.metric.name
        header = ["Stretch", "Commit", metric, "Attempts", "Runs + LLM" if llm else "Runs"]
        header += ["Empty turns"] if llm else []
        header += ["Instances"] if rented else []
        header += ["Total"] + (["$/unit"] if divided else [])
        return [Heading("Cost", 1), Paragraph(self._cost_text(llm, rented, divided)),
                Table(tuple(header), tuple(rows))]

    def _stretches(self) -> list[_StretchRow]:
        """The baseline's stretch, each keep's, and the one after the last keep, as the cost table's rows."""
        costs, by_id = self.costs, {a.id: a for a in self.done}

        def metric_of(attempt_id: int | None) -> str:
            a = by_id.get(attempt_id) if attempt_id is not None else None
            return self.attempt_metric(a) if a is not None else "—"

        base = self.baseline
        rows = [_StretchRow("baseline", "baseline", self.session.base_commit[:7],
                            metric_of(base.id if base is not None else None),
                            "the baseline's stretch (from the session's start)", costs.baseline)]
        for k in costs.kept:
            rows.append(_StretchRow(f"keep[{k.attempt_id}]", f"keep #{k.iteration}", (k.commit or "")[:7],
                                    f"{metric_of(k.previous_attempt_id)} → {metric_of(k.attempt_id)}",
                                    f"the stretch that ended with keep #{k.iteration}", k.spent, k))
        last = f"keep #{costs.kept[-1].iteration}" if costs.kept else "the baseline"
        rows.append(_StretchRow("after_last_keep", f"after {last}", "—", "—", f"the stretch after {last}",
                                costs.after_last_keep))
        return rows

    def _gain(self, k: KeptCost) -> float | None:
        """A keep's improvement over the best it replaced, positive when better (None where there is none)."""
        if k.metric is None or k.previous_metric is None or k.previous_attempt_id is None:
            return None
        gain = k.previous_metric - k.metric if self.metric.lower_is_better else k.metric - k.previous_metric
        return gain if gain > 0 else None

    def _per_unit(self, k: KeptCost) -> str:
        """Dollars per unit of improvement over the previous best (a dash where there is no improvement)."""
        gain = self._gain(k)
        if gain is None or k.previous_attempt_id is None:
            return "—"
        return self.money(f"cost.keep[{k.attempt_id}].per_unit", k.spent.total_usd / gain,
                          f"dollars spent in the stretch that ended with keep #{k.iteration} per unit of"
                          f" {self.metric.name} it improved", [*k.spent.attempt_ids, k.previous_attempt_id])

    def _cost_text(self, llm: bool, rented: bool, per_unit: bool) -> str:
        p = self.program
        limit = f" of a {p.max_dollars:g} dollar limit" if p.max_dollars is not None else ""
        reserved = self.money("reserved", self.costs.reserved, "dollars still reserved (runs, LLM turns and rented"
                              " instances not yet settled)", [])
        text = [f"Spent {self.spent_fact()}{limit} (settled charges); {reserved} is still reserved.",
                "A kept improvement is paid for by every attempt since the previous keep: the discards, crashes and"
                " rejected edits that led to it and the keep itself (their runs"
                + (" and LLM turns" if llm else "") + ")"]
        if llm:
            text[-1] += ", the LLM turns in that stretch that made no attempt (empty turns)"
        if rented:
            text[-1] += (", and the rented instances' time in it (boot, the agent's turns, the runs: each ended"
                         " instance's settled cost spread evenly over its lifetime; an instance still live counts"
                         " once it is settled)")
        text[-1] += ". The baseline's stretch and what was spent after the last keep are rows of their own."
        if per_unit:
            text.append(f"A keep's {self.metric.name} goes from the best it replaced to its own; $/unit divides"
                        f" its stretch's total by that improvement, in dollars per unit of {self.metric.name}.")
        return " ".join(text)

    def attempt_table(self) -> list[Block]:
        metric = self.metric.name
        rows = []
        for a in self.done:
            value = self.attempt_metric(a)
            spread = ""
            if len(a.values) > 1:
                sd = self.value(f"attempt[{a.id}].sd", statistics.stdev(a.values),
                                f"sample standard deviation of attempt {a.iteration}'s {len(a.values)} runs", [a.id])
                spread = f"{len(a.values)} (sd {sd})"
            elif a.values:
                spread = "1"
            rows.append((str(a.iteration), a.status, value, spread, (a.commit_sha or "")[:7],
                         "baseline" if a.is_baseline else a.hypothesis, a.reason or "—"))
        return [
            Heading("Every attempt", 1),
            Paragraph("Each attempt in order, with the decision and its reason as the loop recorded them; a crashed"
                      " or rejected attempt has no value. `ratiocinator autoresearch-log PROGRAM` lists their ids,"
                      " full diffs and log tails, and `--apply ID --branch NAME` recreates any of them."),
            Table(("#", "Decision", metric, "Runs", "Commit", "Hypothesis", "Reason"), tuple(rows)),
        ]

    def appendix(self) -> list[Block]:
        facts = list(self.book)
        rows = tuple((f.id, self.book.ref(f), f.label, f.runs_text) for f in facts)
        return [
            Heading("Appendix: every number and its attempts", 1),
            Paragraph("Each number in this report links here. Ids are the ledger's attempt ids; `ratiocinator verify`"
                      " on this directory recomputes every row from the ledger."),
            Table(("Id", "Value", "What", "Attempts"), rows, anchors=tuple(f.id for f in facts)),
        ]


def progress_caption(program: Program) -> str:
    return (f"{program.metric.name} of every attempt ({program.metric.direction} is better): dots by decision,"
            " crashed and rejected attempts as crosses along the bottom, the running best as a step line"
            + (", and the baseline's noise band (± the noise floor)." if program.k > 1 else "."))


def render_session(session: Session, attempts: Sequence[Attempt], program: Program, *, spent: float,
                   costs: SessionCosts, progress: FigureFile | None) -> tuple[SessionReport, dict[str, str]]:
    """The report and its three renderings, keyed by file name."""
    report = build_session_report(session, attempts, program, spent=spent, costs=costs, progress=progress)
    return report, {
        "report.md": render_markdown(report.title, report.blocks, report.book),
        "report.html": render_html(report.title, report.blocks, report.book),
        "report.tex": render_latex(report.title, report.blocks, report.book),
    }


def facts_document(session: Session, report: SessionReport, rendered: dict[str, str],
                   ledger: Path | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    occurrences = fact_counts(rendered, DOCUMENTS)
    head: dict[str, Any] = {SESSION_KEY: session.tag, "documents": occurrences}
    if ledger is not None:
        head["ledger"] = str(Path(ledger).resolve())
    return head, [f.to_json() for f in report.book]


def rebuilt_book(store: Store, tag: str) -> FactBook | None:
    """The facts of session ``tag`` as the ledger gives them now (None when the ledger has no such session)."""
    session = store.session_by_tag(tag)
    if session is None:
        return None
    spent, _ = store.money(session.id)
    attempts = store.attempts(session.id)
    return build_session_report(session, attempts, session_program(session), spent=spent,
                                costs=session_costs(store, session, attempts)).book

