"""The paper: sections built from the ledger, every result number a traceable fact.

``build_paper`` reads one experiment from the ledger (its stored spec, arms, runs,
final metrics, events, charges) and the runs' log files, runs the statistics, and
returns the document blocks plus the ``FactBook`` of every number cited. Building
is deterministic, so ``ratiocinator verify`` rebuilds the facts the same way and
compares. Prose is written from templates here; an LLM narrative added later cites
the same facts.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ratiocinator.analysis.hypotheses import Judgement, Number, judge_hypotheses
from ratiocinator.analysis.inference import (
    ALPHA,
    SMALL_N,
    ArmGoal,
    BaselineComparison,
    FactorAnalysis,
    FactorEffect,
    Inference,
    NoiseFloor,
    Verdict,
    infer,
)
from ratiocinator.analysis.summary import ArmSummary, Finals, MetricStats, summarize_experiment
from ratiocinator.data.provenance import describe as describe_data
from ratiocinator.errors import SpecError
from ratiocinator.execution.failures import DESCRIPTIONS
from ratiocinator.planning.plan import constants
from ratiocinator.report.document import (
    Abstract,
    Block,
    Bullets,
    Code,
    Fields,
    Figure,
    Heading,
    Paragraph,
    Table,
    clean,
)
from ratiocinator.report.facts import MISSING, FactBook, Kind
from ratiocinator.report.figures import COST_STEM, FigureFile, all_drawings, render_all
from ratiocinator.report.narrative import check_narrative, config_numbers, recorded_narrative
from ratiocinator.report.verdicts import abstract_sentence, conclusion, evidence, expectation
from ratiocinator.spec.hypotheses import Hypothesis
from ratiocinator.spec.models import Spec
from ratiocinator.spec.source import load_stored
from ratiocinator.store import instances
from ratiocinator.store.ledger import Experiment, Ledger, RunRow
from ratiocinator.store.records import ReadinessRecord

LOG_TAIL_LINES = 20
# Only the end of a log is read, so a multi-gigabyte log costs no more than a small one.
LOG_TAIL_BYTES = 64 * 1024
LOG_LINE_CHARS = 400
EXAMPLES_PER_FAILURE = 2
HOST_KEYS = ("name", "cpus", "gpus", "ram_gb", "cuda")


@dataclass(frozen=True)
class Paper:
    experiment: Experiment
    spec: Spec
    title: str
    blocks: tuple[Block, ...]
    book: FactBook
    inference: Inference
    runs: tuple[RunRow, ...]
    finals: Finals
    figures: tuple[FigureFile, ...]
    # The companion document: detail tables and every number with its runs; the paper's numbers link here.
    appendix: tuple[Block, ...] = ()
    judgements: tuple[Judgement, ...] = ()


def experiment_spec(experiment: Experiment) -> Spec:
    """The spec the experiment ran under, re-validated from the text stored with it."""
    try:
        return Spec.model_validate(load_stored(experiment.spec_text))
    except (yaml.YAMLError, ValidationError) as exc:
        raise SpecError(f"experiment {experiment.id}: its stored spec no longer validates: {exc}") from None


def analyse(ledger: Ledger, experiment_id: str) -> tuple[Experiment, Spec, list[RunRow], Finals, Inference]:
    experiment = ledger.experiment(experiment_id)
    spec = experiment_spec(experiment)
    runs = ledger.runs(experiment_id)
    finals = ledger.run_metrics(experiment_id)
    summary = summarize_experiment(
        experiment_id, ledger.arms(experiment_id), runs, finals, goal_metric=spec.goal_metric, maximize=spec.maximize
    )
    return experiment, spec, runs, finals, infer(summary, spec.design)


def build_paper(ledger: Ledger, experiment_id: str, *, figures: bool = True) -> Paper:
    experiment, spec, runs, finals, inference = analyse(ledger, experiment_id)
    w = _Writer(ledger, experiment, spec, runs, inference)
    drawings = all_drawings(ledger, inference, runs, curves=spec.report.curves) if figures else []
    if w.cost_is_empty():  # a free study's paper has no cost section: its figure is not worth rendering
        drawings = [d for d in drawings if d.stem != COST_STEM]
    drawn = render_all(drawings)
    blocks, appendix = w.build({f.stem: f for f in drawn})
    shown = {b.file.stem for b in (*blocks, *appendix) if isinstance(b, Figure)}
    drawn = [f for f in drawn if f.stem in shown]  # a figure of a dropped section is not written
    return Paper(experiment, spec, spec.title, tuple(blocks), w.book, inference, tuple(runs), finals, tuple(drawn),
                 tuple(appendix), w.judgements)


def stated_hypotheses(spec: Spec, ledger: Ledger, experiment_id: str) -> list[Hypothesis]:
    """The spec's hypotheses, else those the LLM design stage wrote in the testable form."""
    if spec.hypotheses:
        return list(spec.hypotheses)
    out: list[Hypothesis] = []
    for decision in ledger.decisions(experiment_id):
        for raw in decision.record.get("hypotheses", []):
            if not isinstance(raw, dict) or "expect" not in raw:
                continue
            try:
                out.append(Hypothesis.model_validate({"id": raw.get("id") or f"H{len(out) + 1}",
                                                      "statement": raw.get("statement", ""),
                                                      "expect": raw["expect"]}))
            except ValidationError:
                continue  # an untestable hypothesis stays in the planner's record, listed with the decisions
    ids = [h.id for h in out]
    return out if len(set(ids)) == len(ids) else [h.model_copy(update={"id": f"H{i}"}) for i, h in enumerate(out, 1)]


# -- formatting helpers -----------------------------------------------------------------


def _value(value: Any) -> str:
    """A spec or event value in one line: floats at 4 significant digits, lists joined."""
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(v) for v in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_value(v)}" for k, v in value.items()) or "none"
    return str(value)


def _knobs(arm: ArmSummary, spec: Spec) -> str:
    """What sets the arm apart: its knobs beyond the spec's constants (the design lists those once)."""
    fixed = constants(spec)
    parts = [f"{k}={v}" for k, v in arm.arm.env.items() if fixed.get(k) != v]
    if arm.arm.args:
        parts.append(shlex.join(arm.arm.args))
    return ", ".join(parts) or ("(the constant knobs only)" if spec.env else "(runner defaults)")


def _is_url(repo_url: str) -> bool:
    """A git URL (scheme:// or scp-like user@host:path), as opposed to a local path."""
    return bool(re.match(r"[A-Za-z][A-Za-z0-9+.\-]*://|[^/\s]+@[^/\s]+:", repo_url))


def _plural(n: int, word: str) -> str:
    return f"{word}{'' if n == 1 else 's'}"


class _Writer:
    """Writes the sections; every number goes through ``self.book``."""

    def __init__(self, ledger: Ledger, experiment: Experiment, spec: Spec, runs: Sequence[RunRow],
                 inference: Inference) -> None:
        self.ledger = ledger
        self.experiment = experiment
        self.spec = spec
        self.runs = list(runs)
        self.by_arm: dict[int, list[RunRow]] = defaultdict(list)
        for run in self.runs:
            self.by_arm[run.arm_id].append(run)
        self.inf = inference
        self.summary = inference.summary
        self.goal = spec.goal_metric
        self.book = FactBook()

    # -- facts ---------------------------------------------------------------------------

    def fact(self, key: str, value: float | None, kind: Kind, label: str, run_ids: Sequence[int]) -> str:
        return self.book.cite(key, value, kind, label, run_ids)

    def count(self, key: str, value: int, label: str, run_ids: Sequence[int]) -> str:
        return self.fact(key, value, Kind.COUNT, label, run_ids)

    def arm_stat(self, goal: ArmGoal, what: str) -> str:
        d, s = goal.describe, goal.stats
        arm = goal.name
        label = f"{what} of {self.goal} over the succeeded runs of arm {arm}"
        if what == "n":
            return self.count(f"arm[{arm}].{self.goal}.n", d.n, label, s.run_ids)
        if what in ("min", "max"):
            run = s.min_run_id if what == "min" else s.max_run_id
            return self.fact(f"arm[{arm}].{self.goal}.{what}", getattr(d, what), Kind.METRIC, label,
                             [run] if run else [])
        if what in ("ci_low", "ci_high", "boot_low", "boot_high"):
            interval = d.ci if what.startswith("ci") else d.bootstrap_ci
            value = None if interval is None else (interval.low if what.endswith("low") else interval.high)
            name = {"ci_low": "95% t CI lower bound", "ci_high": "95% t CI upper bound",
                    "boot_low": "95% bootstrap CI lower bound", "boot_high": "95% bootstrap CI upper bound"}[what]
            return self.fact(f"arm[{arm}].{self.goal}.{what}", value, Kind.METRIC,
                             f"{name} of {self.goal} for arm {arm}", s.run_ids)
        return self.fact(f"arm[{arm}].{self.goal}.{what}", getattr(d, what), Kind.METRIC, label, s.run_ids)

    def noise_std(self, floor: NoiseFloor) -> str:
        return self.fact("noise.std", floor.std, Kind.METRIC, f"noise floor: replicate std of baseline {floor.arm}",
                         floor.run_ids)

    def interval(self, low: str, high: str) -> str:
        return MISSING if MISSING in (low, high) else f"[{low}, {high}]"

    def arm_ci(self, goal: ArmGoal) -> str:
        return self.interval(self.arm_stat(goal, "ci_low"), self.arm_stat(goal, "ci_high"))

    def arm_headline(self, goal: ArmGoal) -> str:
        """``mean (95% CI [a, b], n = k)`` or, below two runs, the bare value."""
        mean = self.arm_stat(goal, "mean")
        if goal.describe.n >= 2:
            return f"{mean} (95% CI {self.arm_ci(goal)}, n = {self.arm_stat(goal, 'n')})"
        return f"{mean} (a single run, no interval)"

    def cmp(self, c: BaselineComparison, what: str) -> str:
        t = c.comparison
        key = f"cmp[{c.arm}].{what}"
        about = f"arm {c.arm} vs baseline {c.baseline}"
        table = {
            "diff": (t.diff, Kind.METRIC, f"difference of mean {self.goal}, {about}"),
            "diff_low": (t.diff_ci.low if t.diff_ci else None, Kind.METRIC,
                         f"95% Welch CI lower bound of the difference, {about}"),
            "diff_high": (t.diff_ci.high if t.diff_ci else None, Kind.METRIC,
                          f"95% Welch CI upper bound of the difference, {about}"),
            "t": (t.t, Kind.STAT, f"Welch t statistic, {about}"),
            "df": (t.df, Kind.STAT, f"Welch–Satterthwaite degrees of freedom, {about}"),
            "p": (t.p, Kind.P, f"two-sided Welch p-value, {about}"),
            "p_holm": (c.p_holm, Kind.P, f"Holm-adjusted p-value, {about}"),
            "g": (t.hedges_g, Kind.STAT, f"Hedges' g, {about}"),
            "sigma": (t.sigma_units, Kind.STAT, f"difference in units of the baseline's replicate std, {about}"),
        }
        value, kind, label = table[what]
        return self.fact(key, value, kind, label, c.run_ids)

    # -- the document ---------------------------------------------------------------------

    def build(self, figures: dict[str, FigureFile]) -> tuple[list[Block], list[Block]]:
        """The paper (short: what a reviewer reads) and its appendix (every detail, every number's runs)."""
        self.figures = figures
        self.judgements = judge_hypotheses(stated_hypotheses(self.spec, self.ledger, self.experiment.id), self.inf,
                                           self.spec.design)
        blocks: list[Block] = [Abstract(self.abstract())]
        blocks += self.question()
        blocks += self.setup()
        blocks += self.results()
        blocks += self.failures()
        blocks += self.cost()
        blocks += self.conclusion()
        blocks += self.discussion()
        blocks += self.threats()
        blocks += self.reproducibility()
        appendix: list[Block] = [
            Paragraph("The detail behind the paper: full tables, the configuration, failed runs' logs and the command"
                      " of every arm. Each number of the paper links to its row at the end of this appendix."),
            *self.appendix_tables(),
            *self.fact_appendix(),  # last: it lists every fact cited in the paper and above
        ]
        return blocks, appendix

    def figure(self, stem: str) -> list[Block]:
        return [Figure(self.figures[stem])] if stem in self.figures else []

    def cite(self, j: Judgement, n: Number) -> str:
        """A number a hypothesis verdict rests on, as a traced fact."""
        return self.fact(f"hyp[{j.id}].{n.name}", n.value, Kind(n.kind), f"{j.id}: {n.label}", n.run_ids)

    # -- abstract -----------------------------------------------------------------------

    def run_counts(self) -> tuple[str, str]:
        all_ids = [r.id for r in self.runs]
        ok = [r.id for r in self.runs if r.status == "succeeded"]
        return (
            self.count("exp.runs.attempts", len(all_ids), "runs attempted (every status and attempt)", all_ids),
            self.count("exp.runs.succeeded", len(ok), "runs that succeeded", ok),
        )

    def design_text(self) -> str:
        spec = self.spec
        if spec.factors:
            levels = " × ".join(f"{k} ∈ {{{_value(v)}}}" for k, v in spec.factors.items())
            return f"{spec.design} over {levels}"
        return "explicit arms"

    def abstract(self) -> str:
        spec, s = self.spec, self.summary
        direction = "higher is better" if spec.maximize else "lower is better"
        attempts, succeeded = self.run_counts()
        commit = (self.experiment.commit_sha or "an unrecorded commit")[:12]
        parts = [
            f"Question: {spec.topic.strip()}",
            f"Design: {len(s.arms)} {_plural(len(s.arms), 'arm')} ({self.design_text()}) with up to {spec.replicates}"
            f" replicates each ({attempts} runs, {succeeded} succeeded) of {spec.runner_script} at commit {commit},"
            f" measuring {self.goal} ({direction}).",
        ]
        if self.judgements:
            parts += [abstract_sentence(j, self.cite) for j in self.judgements]
        else:
            parts.append(self.headline())
            if self.inf.factors is not None:
                findings = self.factor_findings(self.inf.factors)
                if findings:
                    parts.append(findings[0])
        caveat = self.caveat()
        if caveat:
            parts.append(f"Main caveat: {caveat}")
        return " ".join(parts)

    def caveat(self) -> str:
        """The one thing a reader of the abstract must not miss: an interaction, failures, or noise."""
        fa = self.inf.factors
        if fa is not None and fa.anova is not None:
            for i in fa.interactions:
                if i.significant:
                    a, b = i.row.term.split(" × ")
                    p = self.book.cite(f"anova[{i.row.term}].p_holm", *_anova_fact(fa, i.row.term, "p_holm", self.goal),
                                       fa.run_ids)
                    return (f"the effect of {a} depends on {b} (interaction Holm-adjusted p = {p}), so each factor's"
                            " main effect averages over unequal effects; read the cells, not only the margins.")
        failed = [r.id for r in self.runs if r.status != "succeeded"]
        if failed:
            n = self.count("exp.runs.not_succeeded", len(failed), "runs that did not succeed", failed)
            attempts, _ = self.run_counts()
            return (f"{n} of {attempts} runs did not succeed; if failures depend on the configuration, the surviving"
                    " runs are a biased sample.")
        floor = self.inf.noise_floor
        decided = [c for c in self.inf.comparisons if c.verdict in (Verdict.IMPROVEMENT, Verdict.REGRESSION)]
        if self.inf.comparisons and not decided and floor is not None and floor.std is not None:
            return (f"no arm differs from the baseline beyond the noise floor (the baseline's replicate standard"
                    f" deviation, {self.noise_std(floor)}): the differences between arms are of the size of run-to-run"
                    " noise.")
        return ""

    def headline(self) -> str:
        inf, s = self.inf, self.summary
        if s.n_succeeded == 0 or not any(g.describe.n for g in inf.goals):
            return f"No run produced a finite {self.goal}, so the study has no result."
        base = inf.goal(inf.baseline) if inf.baseline else None
        assert base is not None  # a study with a result has a baseline arm
        if not inf.comparisons:
            return f"Arm {base.name} reached {self.goal} = {self.arm_headline(base)}."
        if inf.improvements:
            best = min(inf.improvements,
                       key=lambda c: -(c.comparison.diff or 0) if s.maximize else (c.comparison.diff or 0))
            goal = inf.goal(best.arm)
            return (
                f"The best improving arm, {best.arm}, reached {self.goal} = {self.arm_headline(goal)} against the "
                f"baseline {base.name}'s {self.arm_headline(base)}: a difference of {self.cmp(best, 'diff')} "
                f"(95% CI {self.interval(self.cmp(best, 'diff_low'), self.cmp(best, 'diff_high'))}, Holm-adjusted "
                f"p = {self.cmp(best, 'p_holm')}), larger than the baseline's replicate spread."
            )
        top = s.best
        text = (f"No arm improved on the baseline {base.name} ({self.arm_headline(base)}) by a significant margin"
                " beyond its replicate spread.")
        if top is not None and top.name != base.name:
            c = inf.comparison(top.name)
            assert c is not None
            text += (
                f" The arm with the best mean, {top.name}, reached {self.arm_headline(inf.goal(top.name))}; "
                f"its difference from the baseline, {self.cmp(c, 'diff')}, is judged {c.verdict.value} ({c.reason})."
            )
        return text

    # -- question ------------------------------------------------------------------------

    def question(self) -> list[Block]:
        """The hypotheses and how they are judged (the question itself opens the abstract, once)."""
        spec, inf = self.spec, self.inf
        direction = "maximized" if spec.maximize else "minimized"
        blocks: list[Block] = [
            Heading("Hypotheses", 1),
            Paragraph(f"The goal metric is {self.goal}, to be {direction}; each run reports it through the"
                      f" {spec.metrics.protocol} protocol and its final value is the run's result."),
        ]
        if self.judgements:
            n_tests = self.judgements[0].family
            blocks.append(Paragraph("The study states these hypotheses, each with a test the runs decide:"))
            blocks.append(Bullets(tuple(f"{j.id}: {j.hypothesis.statement.strip()} Tested as: "
                                        f"{expectation(j.hypothesis, self.goal)}." for j in self.judgements)))
            blocks.append(Paragraph(
                f"A hypothesis is supported when its test rejects at α = {ALPHA} after the Holm–Bonferroni correction"
                f" across all {n_tests} {_plural(n_tests, 'test')} of the stated hypotheses, the difference is larger"
                " than the noise floor (the replicate standard deviation of the baseline arm), and it points the way"
                " the hypothesis says; contradicted when the same holds the other way; inconclusive otherwise."
            ))
        elif inf.comparisons:
            blocks.append(Paragraph("The spec states no hypotheses (`hypotheses:`), so the paper answers none; it"
                                    " compares every arm with the baseline and tests each factor's effect."))
        else:
            blocks.append(Paragraph("The study has a single arm and states no hypothesis; it measures that arm's"
                                    f" {self.goal} and its replicate spread."))
        if inf.comparisons:
            blocks.append(Paragraph(
                f"Comparisons (not hypotheses): each other arm is compared with the baseline {inf.baseline} by a"
                f" two-sided Welch t-test, Holm-corrected across the {len(inf.comparisons)}"
                f" {_plural(len(inf.comparisons), 'comparison')}; an arm counts as an improvement only when the"
                " corrected test rejects, the difference points the way the goal asks, and it exceeds the noise floor."
            ))
        blocks += self.planner_decisions()
        return blocks

    def planner_decisions(self) -> list[Block]:
        """What the planner decided each iteration and why (an LLM's hypotheses, a search's proposals)."""
        decisions = self.ledger.decisions(self.experiment.id)
        if not decisions or all(d.planner == "spec" for d in decisions):
            return []
        items = []
        for d in decisions:
            items.append(f"Iteration {d.iteration} ({d.planner}): {d.reason}")
            items += [f"Hypothesis (iteration {d.iteration}): {h.get('statement', '')}"
                      + (f" — arms {', '.join(h['arms'])}" if h.get("arms") else "")
                      for h in d.record.get("hypotheses", []) if isinstance(h, dict)]
        return [Paragraph("How the arms were chosen, as the planner recorded it:"), Bullets(tuple(items))]

    # -- setup ---------------------------------------------------------------------------

    def configuration(self) -> list[Block]:
        """Every configuration value, quoted from the stored spec (the appendix's copy)."""
        spec, experiment = self.spec, self.experiment
        run_commits = sorted({r.commit_sha for r in self.runs
                              if r.commit_sha and r.commit_sha != experiment.commit_sha})
        commit = experiment.commit_sha or "not recorded"
        if run_commits:
            commit += f" (runs also used: {', '.join(run_commits)})"
        design = (
            f"{spec.design} over " + "; ".join(f"{k} ∈ {{{_value(v)}}}" for k, v in spec.factors.items())
            if spec.factors else "explicit arms"
        )
        metrics: str = spec.metrics.protocol
        if spec.metrics.protocol == "json_line":
            metrics += f" (prefix {spec.metrics.json_prefix})"
        elif spec.metrics.patterns:
            metrics += f" ({_value(spec.metrics.patterns)})"
        deps = spec.deps
        excluded = f" (excluding {', '.join(deps.exclude_from_requirements)})" if deps.exclude_from_requirements else ""
        rows = [
            ("Experiment",
             f"{experiment.id} ({experiment.name}), status {experiment.status}, backend {experiment.backend}"),
            ("Repository", self.repository()),
            ("Branch", spec.repo_branch),
            ("Commit", commit),
            ("Runner script", spec.runner_script),
            ("Arms", f"{len(self.summary.arms)} ({design}); baseline: {self.inf.baseline or 'none'}"),
            ("Replicates per arm", f"{spec.replicates}; {self.seeding()[1]}"),
            ("Iterations (max)", str(spec.max_iterations)),
            ("Hardware (spec)", _value(spec.hardware.model_dump(exclude_none=True))),
            *self.host_rows(),
            ("Data", self.data_line()),
            ("Dependencies: pre-install", "; ".join(deps.pre_install) or "none"),
            ("Dependencies: requirements", (deps.requirements or "none") + excluded),
            ("Dependencies: verify", deps.verify or "none"),
            ("Metrics protocol", metrics),
            ("Budget", f"{_value(float(spec.max_dollars))} dollars (max_dollars)"),
            ("Timeouts", f"training {spec.train_timeout_s} s per run, download {spec.download_timeout_s} s"),
            ("Spec", f"{self.spec_file()} (sha256 {experiment.spec_sha256})"),
            ("Readiness review", self.readiness()),
        ]
        return [
            Heading("Configuration", 1),
            Paragraph("Configuration values below are quoted from the spec stored with the experiment."),
            Fields(tuple(rows)),
        ]

    def setup(self) -> list[Block]:
        """The design in a few lines; the full configuration is in the appendix."""
        spec, experiment = self.spec, self.experiment
        one_level = [k for k, v in spec.factors.items() if len(v) == 1]
        arms = f"{len(self.summary.arms)} ({self.design_text()}); baseline: {self.inf.baseline or 'none'}"
        fixed = constants(spec)
        rows = [
            ("Arms", arms),
            *([("Constant knobs", ", ".join(f"{k}={v}" for k, v in fixed.items())
                + " (the spec's env: every arm runs with them unless it sets its own)")] if fixed else []),
            ("Replicates per arm", f"{spec.replicates}; {self.seeding()[1]}"),
            ("Code", f"{spec.runner_script} in {self.repository()} at commit"
                     f" {experiment.commit_sha or 'not recorded'}"),
            *self.host_rows(),
            *([("Data", self.data_line())] if spec.data.source != "none" else []),
            ("Readiness review", self.readiness()),
        ]
        blocks: list[Block] = [
            Heading("Design", 1),
            Paragraph("Configuration values are quoted from the spec stored with the experiment (all of them are in"
                      " the appendix); every result number links to the appendix row that lists the runs it comes"
                      " from."),
            Fields(tuple(rows)),
        ]
        notes = [f"Factor {k} has a single level ({_value(spec.factors[k])}) in every arm: a constant, so it is"
                 " left out of the factor analysis." for k in one_level]
        if self.cost_is_empty():
            notes.append("Cost: none. The host's price per hour is 0 and nothing was rented, so there is no cost"
                         " section.")
        if notes:
            blocks.append(Bullets(tuple(notes)))
        return blocks

    @functools.cached_property
    def _readiness_verdicts(self) -> list[ReadinessRecord]:
        """Read once: every arm's command asks whether runs are seeded, and each read parses every event."""
        return self.ledger.readiness_verdicts(self.experiment.id)

    def seeding(self) -> tuple[str, str]:
        """Whether the runner reads its seed, as the readiness review found: (state, one line)."""
        verdicts = self._readiness_verdicts
        check = next((c for v in reversed(verdicts) for c in v.checks if c.get("name") == "seed"), None)
        if check is None:
            where = f" (in {self.spec.seed_env} and RATIOCINATOR_SEED)" if self.spec.seed_env else \
                " (in RATIOCINATOR_SEED)"
            return "unknown", (f"replicate r is given seed r{where}; whether the runner reads it was not checked"
                               " (no readiness review recorded a seed check)")
        if check.get("status") == "warning":
            return "unseeded", ("runs are not seeded: the runner reads neither the seed knob nor RATIOCINATOR_SEED, so"
                                " replicates measure run-to-run noise and no run can be reproduced exactly")
        return "seeded", f"replicate r runs seed r in every arm ({check.get('summary', 'the runner reads its seed')})"


    def readiness(self) -> str:
        """What the pre-run review found, from its ledger event (or that it was skipped)."""
        verdicts = self._readiness_verdicts
        if not verdicts:
            return "not recorded"
        last = verdicts[-1]
        if last.skipped:
            return "skipped (--skip-check): the code was not reviewed before runs were paid for"
        counts = Counter(c["status"] for c in last.checks)
        shown = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        notes = "; ".join(f"{c['name']}: {c['summary']}" for c in last.checks if c["status"] in ("failed", "warning"))
        verdict = "ready" if last.is_code_ready else "not ready"
        return f"{verdict} ({shown})" + (f"; {notes}" if notes else "")

    def data_line(self) -> str:
        """What the runs read, as recorded when it was staged: each source, its size and checksum."""
        records = self.ledger.data_records(self.experiment.id)
        if not records:
            spec = self.spec.data
            return spec.source + (f" ({spec.path})" if spec.path else "") + (
                "" if spec.source == "none" else "; not recorded (no run was prepared)")
        last = records[-1]
        hosts = ", ".join(f"{host} {seconds:.1f} s" for host, seconds in last.staging_s.items())
        return f"{describe_data(last)}" + (f"; staged on {hosts}" if hosts else "")

    def repository(self) -> str:
        """The repository as the spec names it (a path relative to the spec file) and its remote, never a local
        absolute path."""
        written = self.spec.repo_url
        remote = None
        for event in self.ledger.events(self.experiment.id):
            if event["kind"] == "code" and event["data"].get("remote"):
                remote = event["data"]["remote"]
        if _is_url(written):
            return written
        text = f"{written} (relative to the spec file)"
        return f"{text}; remote {remote}" if remote and remote != written else text

    def spec_file(self) -> str:
        """The spec's file name (where it lies on the machine that ran it is no part of the result)."""
        return Path(self.experiment.spec_path).name

    def host_rows(self) -> list[tuple[str, str]]:
        hosts: list[dict[str, Any]] = []
        for event in self.ledger.events(self.experiment.id):
            if event["kind"] == "host" and event["data"] not in hosts:
                hosts.append(event["data"])
        if not hosts:
            return [("Host", "not recorded")]
        ordered = [{**{k: h[k] for k in HOST_KEYS if k in h}, **h} for h in hosts]
        if len(ordered) == 1:
            return [("Host", _value(ordered[0]))]
        return [(f"Host {i}", _value(h)) for i, h in enumerate(ordered, 1)]

    # -- results -------------------------------------------------------------------------

    def results(self) -> list[Block]:
        blocks: list[Block] = [Heading("Results", 1)]
        if not self.summary.arms:
            return [*blocks, Paragraph("The ledger holds no arms for this experiment.")]
        blocks += self.verdicts()
        blocks += self.arm_overview()
        blocks += self.figure("fig_goal")
        if self.inf.factors is not None:
            blocks += self.factor_section(self.inf.factors)
        blocks += self.other_metrics_note()
        curves = self.curve_figures()
        if curves:
            # The main text keeps the first figure (the goal's panel comes first); the rest go to the appendix.
            blocks += [Heading("Learning curves", 2), Figure(curves[0])]
            if len(curves) > 1:
                blocks.append(Paragraph(f"The learning curves of the other streamed metrics ({len(curves) - 1}"
                                        " more figure(s), one per metric) are in the appendix."))
        return blocks

    def curve_figures(self) -> list[FigureFile]:
        return [f for stem, f in self.figures.items() if stem.startswith("fig_curves")]

    def more_curves(self) -> list[Block]:
        """Every learning-curve figure after the first, which the main text shows."""
        rest = self.curve_figures()[1:]
        return [Heading("More learning curves", 2), *(Figure(f) for f in rest)] if rest else []

    def verdicts(self) -> list[Block]:
        if not self.judgements:
            return []
        return [Heading("Verdicts on the hypotheses", 2),
                Bullets(tuple(f"{j.id}: {j.status.value}. {evidence(j, self.cite)}" for j in self.judgements))]

    def arm_overview(self) -> list[Block]:
        """One row per arm: its result and its comparison with the baseline (the full tables are in the appendix)."""
        inf = self.inf
        rows = []
        for goal in inf.goals:
            arm = goal.summary
            ok = self.count(f"arm[{goal.name}].runs.succeeded", arm.n_succeeded, f"succeeded runs of arm {goal.name}",
                            arm.succeeded_run_ids)
            tried = self.count(f"arm[{goal.name}].runs.attempted", arm.n_attempts, f"attempted runs of arm {goal.name}",
                               arm.run_ids)
            c = inf.comparison(goal.name)
            marks = [m for m, on in (("baseline", goal.name == inf.baseline),
                                     ("best mean", goal.name == self.summary.best_arm)) if on]
            label = f"{goal.name} ({', '.join(marks)})" if marks else goal.name
            rows.append((label, f"{ok} / {tried}", self.arm_stat(goal, "mean"), self.arm_ci(goal),
                         self.cmp(c, "diff") if c else MISSING, self.cmp(c, "p_holm") if c else MISSING,
                         c.verdict.value if c else ("baseline" if goal.name == inf.baseline else MISSING)))
        blocks: list[Block] = [
            Heading(f"{self.goal} per arm", 2),
            Paragraph(f"Mean {self.goal} over each arm's succeeded runs with its 95% t interval; Δ is the arm's mean"
                      f" minus the baseline's ({'higher' if self.spec.maximize else 'lower'} is better), p the"
                      " two-sided Welch test Holm-corrected across the comparisons. Spread, bootstrap intervals, t,"
                      " df and effect sizes are in the appendix."),
            Table(("Arm", "Runs (ok / tried)", f"mean {self.goal}", "95% CI (t)", "Δ vs baseline", "p (Holm)",
                   "Verdict"), tuple(rows)),
        ]
        floor = inf.noise_floor
        if inf.comparisons and floor is not None:
            if floor.std is None:
                blocks.append(Paragraph(f"The baseline {floor.arm} has fewer than two succeeded runs, so the noise"
                                        " floor is unknown and no arm can be judged against it."))
            else:
                blocks.append(Paragraph(f"Noise floor: the baseline {floor.arm}'s replicates have a standard deviation"
                                        f" of {self.noise_std(floor)}; a difference no larger than that is never"
                                        " called an improvement."))
        return blocks

    def arm_table(self) -> list[Block]:
        header = ("Arm", "Knobs", "Runs (succeeded / attempted)", "n", f"mean {self.goal}", "std", "SE",
                  "95% CI (t)", "95% CI (bootstrap)", "min", "max")
        rows = []
        for goal in self.inf.goals:
            arm = goal.summary
            marks = [m for m, on in (("baseline", goal.name == self.inf.baseline),
                                     ("best mean", goal.name == self.summary.best_arm)) if on]
            label = f"{goal.name} ({', '.join(marks)})" if marks else goal.name
            ok = self.count(f"arm[{goal.name}].runs.succeeded", arm.n_succeeded, f"succeeded runs of arm {goal.name}",
                            arm.succeeded_run_ids)
            tried = self.count(f"arm[{goal.name}].runs.attempted", arm.n_attempts, f"attempted runs of arm {goal.name}",
                               arm.run_ids)
            boot = self.interval(self.arm_stat(goal, "boot_low"), self.arm_stat(goal, "boot_high"))
            knobs = _knobs(arm, self.spec)
            rows.append((label, knobs, f"{ok} / {tried}", self.arm_stat(goal, "n"), self.arm_stat(goal, "mean"),
                         self.arm_stat(goal, "std"), self.arm_stat(goal, "se"), self.arm_ci(goal), boot,
                         self.arm_stat(goal, "min"), self.arm_stat(goal, "max")))
        excluded = [r for g in self.inf.goals for r in (*g.stats.nonfinite_run_ids, *g.stats.missing_run_ids)]
        note = (
            f"Statistics of {self.goal} over each arm's succeeded runs: sample standard deviation (ddof = 1), standard "
            "error, a 95% confidence interval from the t distribution, and a BCa bootstrap interval where an arm has"
            " at least 10 values. Failed runs are counted, never averaged; — marks a quantity undefined for the data"
            f" (no spread from one value, no bootstrap below 10 values)."
        )
        if excluded:
            note += (f" Runs {', '.join(map(str, sorted(excluded)))} succeeded without a finite {self.goal}"
                     " and are left out.")
        return [Heading(f"Statistics of {self.goal} per arm", 2), Paragraph(note), Table(header, tuple(rows))]

    def baseline_section(self) -> list[Block]:
        inf = self.inf
        if not inf.comparisons or inf.noise_floor is None:
            return []
        floor = inf.noise_floor
        std = self.noise_std(floor)
        spread = self.fact("noise.range", floor.range, Kind.METRIC,
                           f"replicate range (max − min) of baseline {floor.arm}", floor.run_ids)
        if floor.std is None:
            floor_text = (f"The baseline {floor.arm} has fewer than two succeeded runs, so the noise floor is unknown"
                          " and no arm can be judged against it.")
        else:
            floor_text = (f"Noise floor: the baseline {floor.arm}'s replicates have a standard deviation of {std} "
                          f"(range {spread}); a difference no larger than that is never called an improvement.")
        header = ("Arm", "Δ mean vs baseline", "95% CI of Δ (Welch)", "t", "df", "p", "p (Holm)", "Hedges' g",
                  "Δ in baseline σ", "Verdict")
        rows = tuple(
            (c.arm, self.cmp(c, "diff"), self.interval(self.cmp(c, "diff_low"), self.cmp(c, "diff_high")),
             self.cmp(c, "t"),
             self.cmp(c, "df"), self.cmp(c, "p"), self.cmp(c, "p_holm"), self.cmp(c, "g"), self.cmp(c, "sigma"),
             c.verdict.value)
            for c in inf.comparisons
        )
        legend = (
            f"Verdicts: improvement / regression — significant after Holm correction (α = {ALPHA}) and larger than the "
            "noise floor, for / against the goal's direction; within noise floor — no larger than the baseline's"
            " replicate standard deviation, whatever the test says; not significant — larger than the noise floor but"
            " the corrected test does not reject; untestable — both arms gave identical values in every replicate, so"
            " there is no variance to test against; too few runs — fewer than two succeeded runs on a side."
        )
        return [
            Heading(f"Comparison with the baseline {floor.arm}", 2),
            Paragraph(floor_text),
            Paragraph(
                f"Δ is an arm's mean minus the baseline's ({'higher' if self.spec.maximize else 'lower'} is better). "
                "\"Δ in baseline σ\" divides Δ by the baseline's replicate standard deviation: a distance in units of "
                "the noise, not a z-score and not a significance level. p-values are two-sided Welch tests; the Holm "
                "column corrects them for the family of comparisons."
            ),
            Table(header, rows),
            Paragraph(legend),
        ]

    def factor_section(self, fa: FactorAnalysis) -> list[Block]:
        blocks: list[Block] = [Heading("Factor analysis", 2)]
        rows = []
        varied = [e for e in fa.effects if len(e.levels) >= 2]
        for effect in varied:
            for level in effect.levels:
                key = f"factor[{effect.factor}].level[{level.level}]"
                what = f"{self.goal} at {effect.factor}={level.level} ({effect.pooling})"
                d = level.describe
                ci = self.interval(
                    self.fact(f"{key}.ci_low", d.ci.low if d.ci else None, Kind.METRIC,
                              f"95% t CI lower bound of {what}", level.run_ids),
                    self.fact(f"{key}.ci_high", d.ci.high if d.ci else None, Kind.METRIC,
                              f"95% t CI upper bound of {what}", level.run_ids),
                )
                rows.append((effect.factor, level.level,
                             self.count(f"{key}.n", d.n, f"runs pooled for {what}", level.run_ids),
                             self.fact(f"{key}.mean", d.mean, Kind.METRIC, f"mean {what}", level.run_ids), ci))
        if rows:
            pooling = "; ".join(sorted({e.pooling for e in varied}))
            blocks.append(Paragraph(f"Main effects: the runs at each level of each factor ({pooling})."))
            blocks.append(Table(("Factor", "Level", "n", f"mean {self.goal}", "95% CI (t)"), tuple(rows)))
        blocks += self.figure("fig_main_effects")
        blocks += self.figure("fig_interaction")
        if fa.anova is None:
            blocks.append(Paragraph(f"No analysis of variance: {fa.why_no_anova}."))
        else:
            a = fa.anova
            label = "ANOVA"
            terms: list[tuple[str, str, str, str, str, str, str]] = []
            for row in a.rows:
                p_holm = fa.p_holm(row.term)
                key = f"anova[{row.term}]"
                terms.append((
                    row.term,
                    self.fact(f"{key}.df", row.df, Kind.COUNT, f"{label} degrees of freedom of {row.term}", fa.run_ids),
                    self.fact(f"{key}.ss", row.sum_sq, Kind.STAT, f"{label} sum of squares of {row.term}", fa.run_ids),
                    self.fact(f"{key}.F", row.f, Kind.STAT, f"{label} F statistic of {row.term}", fa.run_ids),
                    self.fact(f"{key}.p", row.p, Kind.P, f"{label} p-value of {row.term}", fa.run_ids),
                    self.fact(f"{key}.p_holm", p_holm, Kind.P, f"{label} Holm-adjusted p-value of {row.term}",
                              fa.run_ids),
                    self.fact(f"{key}.eta", row.partial_eta_sq, Kind.STAT, f"{label} partial η² of {row.term}",
                              fa.run_ids),
                ))
            terms.append(("Residual", self.fact("anova.residual.df", a.residual_df, Kind.COUNT,
                                               "ANOVA residual degrees of freedom", fa.run_ids),
                         self.fact("anova.residual.ss", a.residual_sum_sq, Kind.STAT, "ANOVA residual sum of squares",
                                   fa.run_ids),
                         "", "", "", ""))
            structure = "main effects and two-way interactions" if a.interactions else "main effects only"
            if fa.design == "grid" and not a.interactions:
                structure += (" (interactions need every combination of levels observed and residual degrees of"
                              " freedom left)")
            blocks.append(Paragraph(f"Analysis of variance of {self.goal} over the succeeded runs ({a.kind};"
                                    f" {structure}); p-values are Holm-corrected across the terms of the table."))
            blocks.append(Table(("Term", "df", "Sum of squares", "F", "p", "p (Holm)", "partial η²"), tuple(terms)))
        findings = self.factor_findings(fa)
        if findings:
            blocks += [Paragraph("Findings (each from a test in the table above):"), Bullets(tuple(findings))]
        return blocks

    def factor_findings(self, fa: FactorAnalysis) -> list[str]:
        """Plain-language statements, each backed by a Holm-corrected ANOVA term and its numbers."""
        if fa.anova is None:
            return []
        out: list[str] = []

        def term(name: str, what: str) -> str:
            return self.book.cite(f"anova[{name}].{what}", *_anova_fact(fa, name, what, self.goal), fa.run_ids)

        def eta(e: FactorEffect) -> float:
            return (e.anova_row.partial_eta_sq or 0.0) if e.anova_row is not None else 0.0

        significant = sorted((e for e in fa.effects if e.significant and e.anova_row is not None),
                             key=lambda e: -eta(e))
        for e in significant:
            best = e.best_level(self.spec.maximize)
            best_text = ""
            if best is not None:
                mean = self.fact(f"factor[{e.factor}].level[{best.level}].mean", best.describe.mean, Kind.METRIC,
                                 f"mean {self.goal} at {e.factor}={best.level} ({e.pooling})", best.run_ids)
                best_text = f"; its best level is {e.factor}={best.level} with mean {self.goal} {mean}"
            out.append(f"{e.factor} affects {self.goal} (F = {term(e.factor, 'F')}, Holm-adjusted"
                       f" p = {term(e.factor, 'p_holm')}, partial η² = {term(e.factor, 'eta')}){best_text}.")
        if significant:
            top = significant[0]
            others = [e for e in fa.effects
                      if e is not top and e.anova_row is not None and e.anova_row.partial_eta_sq is not None
                      and eta(top) > e.anova_row.partial_eta_sq]
            if others:
                names = ", ".join(f"{e.factor} (partial η² = {term(e.factor, 'eta')})" for e in others)
                out.insert(0, f"{top.factor} matters more than {', '.join(e.factor for e in others)} here: it explains"
                              " the larger share of variance"
                              f" (partial η² = {term(top.factor, 'eta')} against {names}).")
        floor = self.inf.noise_floor
        for e in fa.effects:
            if e.significant or e.anova_row is None:
                continue
            spread = e.spread
            text = (f"No detectable effect of {e.factor} (Holm-adjusted p = {term(e.factor, 'p_holm')}); absence of "
                    f"evidence is not evidence of absence")
            if spread is not None:
                spread_fact = self.fact(f"factor[{e.factor}].spread", spread, Kind.METRIC,
                                        f"largest minus smallest level mean of {e.factor}",
                                        [r for lv in e.levels for r in lv.run_ids])
                text += f", and its level means span {spread_fact}"
                if floor is not None and floor.std is not None:
                    inside = spread <= floor.std
                    std = self.noise_std(floor)
                    text += f", {'inside' if inside else 'beyond'} the noise floor of {std}"
            out.append(text + ".")
        for i in fa.interactions:
            if i.significant:
                a, b = i.row.term.split(" × ")
                out.append(f"The effect of {a} depends on {b} (interaction F = {term(i.row.term, 'F')}, Holm-adjusted "
                           f"p = {term(i.row.term, 'p_holm')}): read its main effect with care.")
        return out

    def other_metrics_note(self) -> list[Block]:
        """The main text names the other metrics; their per-arm table is the appendix's."""
        others = list(self.summary.metrics[1:])
        if not others:
            return []
        return [Heading("Other metrics", 2),
                Paragraph(f"The runs also reported {', '.join(others)}; their per-arm means and standard deviations"
                          " are in the appendix.")]

    def other_metrics(self, full: bool = False) -> list[Block]:
        """The other metrics per arm; the paper leaves out those constant over every run, with a note."""
        others = list(self.summary.metrics[1:])
        if not others:
            return []
        constant: dict[str, float] = {}
        for metric in others:
            values = {v for arm in self.summary.arms for v in arm.metrics[metric].values}
            if len(values) == 1:
                constant[metric] = values.pop()
        shown = [m for m in others if m not in constant]
        rows = []
        for arm in self.summary.arms:
            cells = []
            for metric in shown:
                stats: MetricStats = arm.metrics[metric]
                mean = self.fact(f"arm[{arm.name}].{metric}.mean", stats.mean, Kind.METRIC,
                                 f"mean {metric} of arm {arm.name}", stats.run_ids)
                std = (self.fact(f"arm[{arm.name}].{metric}.std", stats.std, Kind.METRIC,
                                 f"std of {metric} of arm {arm.name}", stats.run_ids)
                       if full or stats.std else MISSING)
                cells.append(mean if std == MISSING else f"{mean} ± {std}")
            rows.append((arm.name, *cells))
        blocks: list[Block] = [
            Heading("Other metrics", 2),
            Paragraph("Final values of the other metrics the runs reported: mean ± sample standard deviation over"
                      " succeeded runs" + (" (a bare mean: every run of the arm gave that value)." if not full else
                                           ".")),
        ]
        if shown:
            blocks.append(Table(("Arm", *shown), tuple(rows)))
        if constant:
            ids = [r for arm in self.summary.arms for m in constant for r in arm.metrics[m].run_ids]
            listed = ", ".join(
                f"{m} = " + self.fact(f"metric[{m}].constant", v, Kind.METRIC, f"{m}, the same in every succeeded run",
                                      [r for arm in self.summary.arms for r in arm.metrics[m].run_ids])
                for m, v in constant.items())
            blocks.append(Paragraph(f"The same in every succeeded run, so not tabulated ({len(set(ids))} runs):"
                                    f" {listed}."))
        return blocks

    # -- failures ------------------------------------------------------------------------

    def failures(self) -> list[Block]:
        blocks: list[Block] = [Heading("Failure analysis", 1)]
        bad = [r for r in self.runs if r.status in ("failed", "interrupted")]
        if not bad:
            return [Paragraph("No run failed or was interrupted.")]
        by_class: dict[str, list[RunRow]] = defaultdict(list)
        for run in bad:
            by_class[run.failure or run.status].append(run)
        rows = []
        for cls, runs in sorted(by_class.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            arms = Counter(r.arm for r in runs)
            rows.append((cls, DESCRIPTIONS.get(cls, "stopped before it finished" if cls == "interrupted" else ""),
                         self.count(f"failures[{cls}].runs", len(runs), f"runs that ended as {cls}",
                                    [r.id for r in runs]),
                         ", ".join(f"{arm} ({n})" for arm, n in arms.items())))
        policy = self.spec.failure_policy
        blocks.append(Paragraph(
            "Runs that did not succeed, by failure class; each class was decided from the run's own evidence "
            "(its exit code or signal and its log lines, quoted in the appendix). Only transient classes (infra, and"
            " host memory "
            f"exhaustion while other runs shared the host) were retried, as new attempts, up to {policy.max_attempts} "
            "attempts per replicate; deterministic failures were never repeated. Every attempt is listed."))
        transient = [r for r in bad if r.transient]
        if transient:
            blocks.append(Paragraph(
                self.count("failures.transient", len(transient), "transient failures that were retried",
                           [r.id for r in transient])
                + " of these failures were transient and their replicate was attempted again."))
        blocks.append(Table(("Failure class", "Meaning", "Runs", "Arms (runs)"), tuple(rows)))
        return blocks

    def failure_details(self) -> list[Block]:
        """Examples of each failure class with their evidence and log tails (the appendix's)."""
        bad = [r for r in self.runs if r.status in ("failed", "interrupted")]
        if not bad:
            return []
        by_class: dict[str, list[RunRow]] = defaultdict(list)
        for run in bad:
            by_class[run.failure or run.status].append(run)
        blocks: list[Block] = [Heading("Failed runs", 1)]
        for cls, runs in sorted(by_class.items()):
            for run in runs[:EXAMPLES_PER_FAILURE]:
                blocks += self.failed_run(run)
            if len(runs) > EXAMPLES_PER_FAILURE:
                blocks.append(Paragraph(f"{len(runs) - EXAMPLES_PER_FAILURE} more {cls} runs: "
                                        f"{', '.join(str(r.id) for r in runs[EXAMPLES_PER_FAILURE:])}."))
        return blocks

    def failed_run(self, run: RunRow) -> list[Block]:
        blocks: list[Block] = [
            Heading(f"Run {run.id}: arm {run.arm}, replicate {run.replicate}, attempt {run.attempt}", 2),
            Fields((
                ("Status", run.status),
                ("Failure", run.failure or "—"),
                ("Reason", run.reason or "—"),
                *(("Evidence", line) for line in run.evidence.get("evidence", [])),
                ("Exit code", "—" if run.exit_code is None else str(run.exit_code)),
                ("Signal", "—" if run.signal is None else str(run.signal)),
                ("Logs", self.home_path(run.log_dir) if run.log_dir else "—"),
            )),
        ]
        tail = _log_tail(Path(run.log_dir)) if run.log_dir else None
        if tail is None:
            blocks.append(Paragraph(f"No log output: stderr.log and stdout.log in {self.home_path(run.log_dir)} are"
                                    " missing or empty."))
        else:
            path, text = tail
            blocks += [Paragraph(f"Last lines of {self.home_path(str(path))}:"), Code(text)]
        return blocks

    def home_path(self, path: str) -> str:
        """A path inside the Ratiocinator home, relative to it (the home is where the ledger lies)."""
        try:
            return f"{Path(path).relative_to(self.ledger.path.resolve().parent)} (in the Ratiocinator home)"
        except ValueError:
            return path

    # -- cost ----------------------------------------------------------------------------

    def spent_fact(self, spent: float) -> str:
        charged = [r.id for r in self.runs if r.cost is not None]
        return self.fact("cost.spent", spent, Kind.MONEY, "dollars spent (settled charges)", charged)

    def limit_fact(self) -> str:
        return self.fact("cost.limit", float(self.spec.max_dollars), Kind.MONEY, "the budget (max_dollars in the spec)",
                         [])

    def cost_is_empty(self) -> bool:
        """A free study: nothing spent or reserved, nothing rented, a host priced at 0 (a note replaces the section)."""
        spent, reserved = self.ledger.money(self.experiment.id)
        return (spent == 0 and reserved == 0 and self.spec.hardware.price_per_hour == 0
                and not instances.rows(self.ledger, experiment_id=self.experiment.id))

    def cost(self) -> list[Block]:
        if self.cost_is_empty():
            return []
        spent, reserved = self.ledger.money(self.experiment.id)
        rented = instances.rows(self.ledger, experiment_id=self.experiment.id)
        shares = instances.run_shares(rented, {r.id: (r.slot or "", r.duration_s or 0.0) for r in self.runs})
        rows = []
        for arm in self.summary.arms:
            runs = self.by_arm[arm.arm.id]
            costed = [r for r in runs if (r.id in shares if rented else r.cost is not None)]
            timed = [r for r in runs if r.duration_s is not None]
            cost = sum(shares[r.id] if rented else r.cost or 0.0 for r in costed) if costed else None
            total = sum(r.duration_s or 0.0 for r in timed) if timed else None
            mean = total / len(timed) if total is not None else None  # total is set exactly when timed is not empty
            rows.append((
                arm.name,
                self.count(f"arm[{arm.name}].runs.attempted", arm.n_attempts, f"attempted runs of arm {arm.name}",
                           arm.run_ids),
                self.fact(f"cost.arm[{arm.name}]", cost, Kind.MONEY,
                          f"dollars of rented-instance cost allotted to arm {arm.name} by wall time" if rented
                          else f"dollars charged to arm {arm.name}", [r.id for r in costed]),
                self.fact(f"time.arm[{arm.name}].total", total, Kind.SECONDS,
                          f"wall seconds of all runs of arm {arm.name}", [r.id for r in timed]),
                self.fact(f"time.arm[{arm.name}].mean", mean, Kind.SECONDS,
                          f"mean wall seconds per run of arm {arm.name}", [r.id for r in timed]),
            ))
        text = f"Spent {self.spent_fact(spent)} of the {self.limit_fact()} budget"
        staging = self.ledger.settled(self.experiment.id, kind="staging")
        if staging is not None:
            cited = self.fact("cost.staging", staging, Kind.MONEY, "dollars charged for staging the data", [])
            text += (f", of which {cited} went to staging the data on the hosts (at the host's price, for the time"
                     " the data took to arrive)")
        if reserved:
            still = self.fact("cost.reserved", reserved, Kind.MONEY, "dollars still reserved by unfinished runs", [])
            text += f"; {still} is still reserved by unfinished runs"
        if rented:
            text += (". Compute was rented by the instance, so money is counted per instance: its lifetime × price"
                     " (or the provider's billing), boot, setup and idle time included; before each instance was"
                     " rented, its worst case (price × the time to its self-destruct deadline) was reserved so the"
                     " budget could never be overrun. An arm's cost below is its runs' share of their instances' cost,"
                     " split by wall time.")
        else:
            price = self.spec.hardware.price_per_hour
            text += (f". Each run is charged the host's price per hour ({_value(float(price))} dollars, from the spec)"
                     " for its wall time; before a run starts, its worst case (price × timeout) is reserved so the"
                     " budget can never be overrun.")
        return [
            Heading("Cost", 1),
            Paragraph(text),
            Table(("Arm", "Runs", "Cost", "Wall time, all runs (s)", "Wall time per run (s)"), tuple(rows)),
            *(self.instance_table(rented) if rented else []),
            *self.figure("fig_cost"),
        ]

    def instance_table(self, rented: list[instances.InstanceRow]) -> list[Block]:
        slots = {r.id: r.slot or "" for r in self.runs}
        rows = []
        for row in rented:
            served = instances.runs_on(row, slots)
            end = row.destroyed_at
            life = (end - row.created_at) if end is not None else None
            rows.append((
                f"{row.provider}:{row.provider_id or '(never rented)'}", row.gpu_name or "?", _value(row.dph),
                self.fact(f"instance[{row.id}].lifetime", life, Kind.SECONDS,
                          f"seconds instance {row.provider_id} was rented",
                          served),
                self.count(f"instance[{row.id}].runs", len(served), f"runs instance {row.provider_id} served", served),
                self.fact(f"instance[{row.id}].cost", row.cost, Kind.MONEY, f"dollars instance {row.provider_id} cost",
                          served),
                f"{row.state}; {row.cost_source or 'not settled'}",
            ))
        return [Paragraph("Rented instances (each run's slot names its instance and GPU model):"),
                Table(("Instance", "GPU", "$/h", "Rented (s)", "Runs", "Cost", "State; cost from"), tuple(rows))]

    # -- threats -------------------------------------------------------------------------

    def threats(self) -> list[Block]:
        inf = self.inf
        items: list[str] = []
        small = [g for g in inf.goals if 0 < g.describe.n < SMALL_N]
        if small:
            items.append(f"Small samples: {len(small)} of {len(inf.goals)} arms have fewer than {SMALL_N} succeeded"
                         f" runs ({', '.join(g.name for g in small[:10])}{'…' if len(small) > 10 else ''}). Standard"
                         " deviations from so few values are themselves uncertain and the intervals are wide; more"
                         " replicates would tighten them.")
        empty = [g.name for g in inf.goals if g.describe.n == 0]
        if empty:
            items.append(f"No result: arms {', '.join(empty)} have no succeeded run with a finite {self.goal} and are"
                         " absent from every comparison.")
        floor = inf.noise_floor
        if floor is not None and floor.std is not None:
            inside = [c.arm for c in inf.comparisons if c.verdict is Verdict.WITHIN_NOISE]
            std = self.noise_std(floor)
            items.append(f"Noise floor: replicates of the baseline spread by a standard deviation of {std}; "
                         + (f"{len(inside)} arm(s) differ from it by no more than that." if inside else
                            "no arm's difference was inside it."))
        failed = [g for g in inf.goals if g.summary.n_attempts > g.summary.n_succeeded]
        if failed:
            items.append("Failed runs: " + ", ".join(f"{g.name} lost {g.summary.n_attempts - g.summary.n_succeeded} of "
                                                      f"{g.summary.n_attempts}" for g in failed[:10])
                         + (" …" if len(failed) > 10 else "")
                         + ". If failures depend on the configuration (e.g. diverging seeds), the surviving runs are a"
                           " biased sample.")
        nonfinite = [r for g in inf.goals for r in g.stats.nonfinite_run_ids]
        if nonfinite:
            items.append(f"Non-finite results: runs {', '.join(map(str, nonfinite[:20]))} ended with a NaN or infinite "
                         f"{self.goal}; they are excluded from the statistics, which flatters the arms they belong to.")
        if len(inf.comparisons) > 1:
            items.append(f"Multiple comparisons: {len(inf.comparisons)} arms are tested against one baseline; the Holm "
                         "correction controls the family-wise error rate, so uncorrected p-values should not be read"
                         " alone.")
        untestable = [c.arm for c in inf.comparisons if c.verdict in (Verdict.UNTESTABLE, Verdict.TOO_FEW_RUNS)]
        if untestable:
            items.append(f"Untested: the comparisons of {', '.join(untestable)} with the baseline could not be tested"
                         " (see the verdicts).")
        if inf.factors is not None and inf.factors.anova is None:
            items.append(f"No analysis of variance: {inf.factors.why_no_anova}.")
        if self.readiness().startswith("skipped"):
            items.append("Unreviewed code: the readiness review (static checks and trial-mode smoke runs) was skipped, "
                         "so problems it catches, such as a knob that changes nothing, were not ruled out.")
        state, _ = self.seeding()
        if state == "seeded":
            items.append("Seeds are shared across arms (replicate r runs seed r in every arm); the Welch test treats"
                         " arms as independent samples and does not use that pairing, which makes it conservative.")
        elif state == "unseeded":
            items.append("Unseeded runs: the runner reads neither the seed knob nor RATIOCINATOR_SEED, so runs are not"
                         " seeded; replicates measure run-to-run noise, and no run can be reproduced exactly.")
        else:
            items.append("Seeding unchecked: each replicate was given a seed, but no readiness review checked that the"
                         " runner reads it; if it does not, replicates measure run-to-run noise and no run can be"
                         " reproduced exactly.")
        items.append(f"Scope: one commit, one backend ({self.experiment.backend}) and the hardware recorded above; the"
                     f" metric is computed by the target repository's own code, which this study did not audit.")
        return [Heading("Threats to validity", 1), Bullets(tuple(items))]

    # -- conclusion ------------------------------------------------------------------------

    def conclusion(self) -> list[Block]:
        """Written from the verdicts (and the best arm), by template: the paper always answers its question."""
        paragraphs: list[str] = []
        if self.judgements:
            paragraphs += conclusion(self.judgements, self.cite)
        else:
            paragraphs.append(self.headline())
            if self.inf.factors is not None:
                paragraphs += self.factor_findings(self.inf.factors)[:2]
        caveat = self.caveat()
        if caveat:
            paragraphs.append(f"Caveat: {caveat}")
        return [Heading("Conclusion", 1), *(Paragraph(p) for p in paragraphs)]

    # -- the appendix --------------------------------------------------------------------

    def appendix_tables(self) -> list[Block]:
        blocks: list[Block] = []
        if self.summary.arms:
            blocks += self.arm_table()
            blocks += self.baseline_section()
            blocks += self.other_metrics(full=True)
            blocks += self.more_curves()
        blocks += self.configuration()
        blocks += self.failure_details()
        blocks += self.arm_commands()
        return blocks

    # -- discussion (LLM-written, verified) ---------------------------------------------

    def discussion(self) -> list[Block]:
        recorded = recorded_narrative(self.ledger, self.experiment.id)
        if recorded is None:
            return []
        narrative, model = recorded
        arms = [a.arm for a in self.summary.arms]
        spec = self.spec
        allowed = config_numbers([*(v for a in arms for v in a.env.values()), *(a.name for a in arms),
                                  str(spec.replicates), str(spec.max_iterations), "95%"])
        checked = check_narrative(narrative, model, self.book, allowed)
        blocks: list[Block] = [
            Heading("Discussion", 1),
            Paragraph(f"Written by the language model {model} from this paper's facts. Every number in it was checked "
                      "against the ledger and links to its fact; configuration values are quoted from the spec."),
            *(Paragraph(p) for p in checked.paragraphs),
        ]
        if checked.removed:
            blocks.append(Paragraph(f"Removed from the model's text because they state numbers the ledger does not "
                                    f"support ({len(checked.removed)}"
                                    f" sentence{'s' if len(checked.removed) != 1 else ''};"
                                    " not results of this study):"))
            blocks.append(Bullets(tuple(f"“{sentence}” (unsupported: {', '.join(numbers)})"
                                        for sentence, numbers in checked.removed)))
        return blocks

    # -- reproducibility ----------------------------------------------------------------

    def reproducibility(self) -> list[Block]:
        spec, experiment = self.spec, self.experiment
        commit = experiment.commit_sha or "<commit not recorded>"
        source = self.clone_source()
        setup = [f"git clone {shlex.quote(source)} target && cd target && git checkout {commit}"]
        setup += spec.deps.pre_install
        if spec.deps.requirements:
            setup.append(f"pip install -r {shlex.quote(spec.deps.requirements)}")
        if spec.deps.verify:
            setup.append(spec.deps.verify)
        state, seeding = self.seeding()
        base = next((a for a in self.summary.arms if a.name == self.inf.baseline), None)
        spec_file = self.spec_file()
        blocks: list[Block] = [
            Heading("Reproducibility", 1),
            Fields((
                ("Spec", f"{spec_file} (sha256 {experiment.spec_sha256})"),
                ("Repository", self.repository()),
                ("Commit", commit),
                ("Seeding", seeding),
                ("Environment", self.environment()),
                ("Rerun everything", f"ratiocinator research {shlex.quote(spec_file)} --new"),
            )),
            Paragraph("To reproduce one arm by hand, prepare the target at the recorded commit"
                      + (" (the repository path is the spec's, relative to the spec file)" if not _is_url(source)
                         else "") + ":"),
            Code("\n".join(setup)),
        ]
        if base is not None:
            how = ("each replicate's seed as SEED" if state != "unseeded" else
                   "as often as there were replicates (the runner reads no seed, so repeated runs differ)")
            blocks += [Paragraph(f"then run the arm's command from the checkout, {how}; the baseline's is below and"
                                 " every arm's is in the appendix:"),
                       Code(self.arm_command(base))]
        return blocks

    def environment(self) -> str:
        """The runs' software environment as the ledger recorded it (read with the runs' own interpreter)."""
        recorded = [e["data"] for e in self.ledger.events(self.experiment.id) if e["kind"] == "environment"]
        if not recorded:
            hosts = "; ".join(value for _, value in self.host_rows())
            pinned = f"; packages from {self.spec.deps.requirements}" if self.spec.deps.requirements else ""
            return (f"{hosts}{pinned}. The runs' interpreter and package versions were not recorded (this backend"
                    " cannot read them), so a rerun may resolve different versions.")
        out = []
        for data in recorded:
            where = data.get("host") or data.get("node", "?")
            if data.get("node") and str(data["node"]) not in where:  # "host local:vm" names its machine already
                where += f", machine {data['node']}"
            parts = [f"{data.get('implementation', 'Python')} {data.get('python', '?')} on {data.get('platform', '?')}"
                     f" (host {where})"]
            listed = data.get("requirements") or {}
            if listed:
                parts.append("requirements: " + ", ".join(f"{name} {version or 'not installed'}"
                                                           for name, version in listed.items()))
            packages = data.get("packages") or []
            if data.get("freeze_sha256"):
                parts.append(f"{len(packages)} installed distributions, sha256 of their name==version list"
                             f" {str(data['freeze_sha256'])[:16]}")
            if data.get("gpu"):
                parts.append(f"GPU {data['gpu']}, driver {data.get('driver', '?')}, CUDA {data.get('cuda', '?')}")
            else:
                parts.append("no NVIDIA GPU seen")
            out.append("; ".join(parts))
        return " | ".join(out) + " (the full package list is in the ledger's environment event)."

    def arm_command(self, arm: ArmSummary) -> str:
        env = {**arm.arm.env}
        if self.seeding()[0] != "unseeded":
            env["RATIOCINATOR_SEED"] = "$SEED"
            if self.spec.seed_env:
                env[self.spec.seed_env] = "$SEED"
        assignments = " ".join(f"{k}={v if v == '$SEED' else shlex.quote(v)}" for k, v in env.items())
        return f"{assignments} {shlex.join(self.runner_argv(arm))}".strip()

    def arm_commands(self) -> list[Block]:
        rows = []
        for arm in self.summary.arms:
            seeds = sorted({r.seed for r in self.by_arm[arm.arm.id]})
            rows.append((arm.name, ", ".join(map(str, seeds)) or "none run", self.arm_command(arm)))
        return [Heading("Every arm's command", 1),
                Paragraph("Run from a checkout prepared as the paper's reproducibility section says; SEED is the"
                          " replicate's seed."),
                Table(("Arm", "Seeds", "Command"), tuple(rows))]

    def clone_source(self) -> str:
        """What to clone: the spec's URL, else the repository's recorded remote, else the spec's relative path."""
        if _is_url(self.spec.repo_url):
            return self.spec.repo_url
        for event in self.ledger.events(self.experiment.id):
            if event["kind"] == "code" and event["data"].get("remote"):
                return str(event["data"]["remote"])
        return self.spec.repo_url

    def runner_argv(self, arm: ArmSummary) -> list[str]:
        """The command line the arm's runs were started with, relative to the checkout."""
        script = self.spec.runner_script
        recorded = next((r.argv for r in self.by_arm[arm.arm.id] if r.argv), None)
        if recorded is None:
            return [*(["python", script] if script.endswith(".py") else ["bash", script]), *arm.arm.args]
        suffix = "/" + script
        return [f"./{script}" if a.endswith(suffix) else a for a in recorded]

    # -- the facts appendix --------------------------------------------------------------

    def fact_appendix(self) -> list[Block]:
        facts = list(self.book)
        rows = tuple((f.id, self.book.ref(f), f.label, f.runs_text) for f in facts)
        return [
            Heading("Every number and its runs", 1),
            Paragraph("Each number in the paper and in this appendix links here. Run ids are the ledger's;"
                      " `ratiocinator runs EXPERIMENT`"
                      " lists them, and `ratiocinator verify` on this directory recomputes every row from the ledger."),
            Table(("Id", "Value", "What", "Runs"), rows, anchors=tuple(f.id for f in facts)),
        ]


def _anova_fact(fa: FactorAnalysis, term: str, what: str, goal: str) -> tuple[float | None, Kind, str]:
    assert fa.anova is not None  # cited only from the ANOVA table's findings
    row = next(r for r in fa.anova.rows if r.term == term)
    if what == "F":
        return row.f, Kind.STAT, f"ANOVA F statistic of {term}"
    if what == "eta":
        return row.partial_eta_sq, Kind.STAT, f"ANOVA partial η² of {term}"
    return fa.p_holm(term), Kind.P, f"ANOVA Holm-adjusted p-value of {term}"


def _log_tail(log_dir: Path) -> tuple[Path, str] | None:
    """The last lines of stderr.log, or of stdout.log when stderr is missing or blank."""
    for name in ("stderr.log", "stdout.log"):
        path = log_dir / name
        try:
            with path.open("rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(size - LOG_TAIL_BYTES, 0))
                data = fh.read()
        except OSError:
            continue
        lines = clean(data.decode("utf-8", "replace")).split("\n")
        if size > LOG_TAIL_BYTES:
            lines = lines[1:]  # the first line was cut by the seek
        while lines and not lines[-1].strip():
            lines.pop()
        if lines:
            tail = lines[-LOG_TAIL_LINES:]
            return path, "\n".join(line if len(line) <= LOG_LINE_CHARS else line[:LOG_LINE_CHARS] + " …"
                                   for line in tail)
    return None
