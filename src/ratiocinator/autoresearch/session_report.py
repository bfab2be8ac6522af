"""An autoresearch session's report, built by the paper's document pipeline.

The same blocks become ``report.md``, ``report.html`` and ``report.tex`` (and
``report.pdf`` once the session has ended), and every number in them is a traced
fact whose "runs" are the ledger's attempt ids: the baseline, the best, the keep
rate, the noise floor and every attempt's metric. ``facts.json`` beside them lets
``ratiocinator verify`` rebuild the facts from the ledger and compare, exactly as
for a study's paper. The report reads only the ledger (session, attempts, charges),
so verify rebuilds it from the same rows.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

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
    fact_occurrences,
    render_html,
    render_latex,
    render_markdown,
)
from ratiocinator.report.facts import FactBook, Kind
from ratiocinator.report.figures import FigureFile

DOCUMENTS = {"report.md": "md", "report.html": "html", "report.tex": "tex"}
FACTS_FILE = "facts.json"
# facts.json of a session names it under this key (a study's names its experiment_id).
SESSION_KEY = "autoresearch_session"
STATUSES = ("keep", "discard", "crash", "violation", "interrupted")


@dataclass(frozen=True)
class SessionReport:
    title: str
    blocks: tuple[Block, ...]
    book: FactBook


def session_program(session: Session) -> Program:
    """The program the session last ran under, from the text the ledger stores with it."""
    return Program.model_validate(yaml.safe_load(session.program_text))


def session_floor(attempts: Sequence[Attempt], program: Program) -> float | None:
    """The noise floor the keep rule uses: the spread of the last baseline's runs (None for one run per commit)."""
    if program.k == 1:
        return None
    baselines = [a for a in attempts if a.status == "baseline"]
    return noise_floor(baselines[-1].values) if baselines else None


def build_session_report(session: Session, attempts: Sequence[Attempt], program: Program, *, spent: float,
                         progress: FigureFile | None = None) -> SessionReport:
    return _Writer(session, attempts, program, spent).build(progress)


class _Writer:
    def __init__(self, session: Session, attempts: Sequence[Attempt], program: Program, spent: float) -> None:
        self.session = session
        self.program = program
        self.metric = program.metric
        self.done = [a for a in attempts if a.status != "running"]
        self.tried = [a for a in self.done if not a.is_baseline]
        self.baseline = next((a for a in self.done if a.status == "baseline"), None)
        self.best = next((a for a in self.done if a.id == session.best_attempt), self.baseline)
        self.floor = session_floor(attempts, program)
        self.spent = spent
        self.book = FactBook(unit="attempt")

    def value(self, key: str, value: float | None, label: str, ids: Sequence[int]) -> str:
        return self.book.cite(key, value, Kind.DECIMAL6, label, ids)

    def count(self, key: str, n: int, label: str, ids: Sequence[int]) -> str:
        return self.book.cite(key, n, Kind.COUNT, label, ids)

    def build(self, progress: FigureFile | None) -> SessionReport:
        blocks: list[Block] = [Abstract(self.abstract()), *self.setup()]
        blocks += [Heading("Progress", 1), Figure(progress)] if progress is not None else []
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
        spend = self.book.cite("spent", self.spent, Kind.MONEY, "dollars spent on compute and LLM calls (settled)",
                               [a.id for a in self.done if a.cost])
        rows = [
            ("Repository", s.repo), ("Branch", f"{s.branch} (from {s.base_branch} at {s.base_commit})"),
            ("Program", f"{s.program_path} (sha256 {s.program_sha256})"),
            ("Metric", f"{p.metric.name}, {p.metric.direction} is better"),
            ("Decision rule", self.rule()),
            ("Run budget", f"{p.budget_s:g} s per run (hard timeout {p.hard_timeout_s:g} s)"),
            ("Spend", spend + (f" of a {p.max_dollars:g} dollar limit" if p.max_dollars is not None else "")),
            ("Status", s.status + (f" ({s.reason})" if s.reason else "")),
        ]
        return [Heading("Session", 1), Fields(tuple(rows))]

    def attempt_table(self) -> list[Block]:
        metric = self.metric.name
        rows = []
        for a in self.done:
            runs = "the mean of its runs" if len(a.values) > 1 else "its run"
            value = self.value(f"attempt[{a.id}].{metric}", a.metric, f"{metric} of attempt {a.iteration} ({runs})",
                               [a.id])
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
                   progress: FigureFile | None) -> tuple[SessionReport, dict[str, str]]:
    """The report and its three renderings, keyed by file name."""
    report = build_session_report(session, attempts, program, spent=spent, progress=progress)
    return report, {
        "report.md": render_markdown(report.title, report.blocks, report.book),
        "report.html": render_html(report.title, report.blocks, report.book),
        "report.tex": render_latex(report.title, report.blocks, report.book),
    }


def facts_document(session: Session, report: SessionReport, rendered: dict[str, str],
                   ledger: Path | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    occurrences: dict[str, dict[str, int]] = {}
    for name, text in rendered.items():
        counts: dict[str, int] = {}
        for fid, _ in fact_occurrences(DOCUMENTS[name], text):
            counts[fid] = counts.get(fid, 0) + 1
        occurrences[name] = counts
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
    return build_session_report(session, store.attempts(session.id), session_program(session), spent=spent).book

