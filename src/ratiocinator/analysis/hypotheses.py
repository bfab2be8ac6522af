"""Verdicts on the study's stated hypotheses, judged from the runs by the report's own rules.

Each hypothesis (``spec.hypotheses``) names what it expects in a testable form. Here each
form becomes one or two tests, every p-value of every hypothesis enters one Holm family
(the stated hypotheses are the study's confirmatory family), and each hypothesis gets a
verdict:

- *supported*: the corrected test rejects, the difference is larger than the noise floor,
  and it points the way the hypothesis says;
- *contradicted*: the same, pointing the other way (a clear effect against it);
- *inconclusive*: anything else. A test that does not reject never contradicts: absence of
  evidence is not evidence of absence.

The noise floor is the one the report uses: the replicate standard deviation of the
baseline arm, of the quantity being compared. Pure functions; the verdict's sentence comes
as text parts and ``Number`` parts so the paper cites every number as a traced fact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from ratiocinator.analysis.inference import (
    ALPHA,
    ArmGoal,
    FactorAnalysis,
    FactorLevel,
    Inference,
    NoiseFloor,
    Verdict,
    arm_goals,
    factor_analysis,
    judge,
    noise_floor,
)
from ratiocinator.analysis.lazy import scipy_stats as sps
from ratiocinator.analysis.stats import Comparison, describe, holm, welch
from ratiocinator.analysis.summary import ArmSummary, metric_stats
from ratiocinator.spec.hypotheses import (
    Beats,
    FactorEffect,
    GapGrows,
    Hypothesis,
    Interaction,
    MetricOrder,
    Selector,
    level_text,
)


class Status(str, Enum):
    SUPPORTED = "supported"
    CONTRADICTED = "contradicted"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Number:
    """One number a verdict rests on; ``kind`` is how the report writes it (metric, stat, p, count)."""

    name: str
    value: float | None
    kind: str
    label: str
    run_ids: tuple[int, ...]


Part = str | Number


@dataclass(frozen=True)
class Judgement:
    hypothesis: Hypothesis
    status: Status
    because: tuple[Part, ...]  # one sentence: the evidence, numbers as ``Number``
    family: int  # how many tests the Holm family of all hypotheses held

    @property
    def id(self) -> str:
        return self.hypothesis.id

    @property
    def numbers(self) -> tuple[Number, ...]:
        return tuple(p for p in self.because if isinstance(p, Number))


@dataclass(frozen=True)
class _Pending:
    """A hypothesis's tests, and how to judge it once the family's Holm-adjusted p-values are known."""

    tests: list[float | None]
    finish: Callable[[list[float | None], int], Judgement]


def judge_hypotheses(hypotheses: Sequence[Hypothesis], inference: Inference, design: str) -> tuple[Judgement, ...]:
    """A verdict for each hypothesis, in the order stated."""
    ctx = _Context(inference, design)
    pending = [ctx.evaluate(h) for h in hypotheses]
    adjusted = holm([p for pend in pending for p in pend.tests])
    out, i = [], 0
    for pend in pending:
        out.append(pend.finish(adjusted[i:i + len(pend.tests)], len(adjusted)))
        i += len(pend.tests)
    return tuple(out)


def _fixed(h: Hypothesis, status: Status, *because: Part) -> _Pending:
    return _Pending([], lambda _p, family: Judgement(h, status, because, family))


def _welch_parts(c: Comparison, p_holm: float | None, about: str, run_ids: tuple[int, ...],
                 prefix: str = "") -> list[Part]:
    """``a difference of Δ (95% CI [a, b], Holm-adjusted p = p)``; ``prefix`` keeps a second test's names apart."""
    diff = Number(f"{prefix}diff", c.diff, "metric", f"difference, {about}", run_ids)
    parts: list[Part] = ["a difference of ", diff, " ("]
    if c.diff_ci is not None:
        parts += ["95% CI [", Number(f"{prefix}diff_low", c.diff_ci.low, "metric", f"95% Welch CI lower bound, {about}",
                                     run_ids),
                  ", ", Number(f"{prefix}diff_high", c.diff_ci.high, "metric", f"95% Welch CI upper bound, {about}",
                                     run_ids),
                  "], "]
    p = Number(f"{prefix}p_holm", p_holm, "p", f"Holm-adjusted p-value, {about}", run_ids)
    parts += ["Holm-adjusted p = ", p, ")"]
    return parts


class _Context:
    def __init__(self, inference: Inference, design: str) -> None:
        self.inf = inference
        self.summary = inference.summary
        self.design = design
        self.goal = self.summary.goal_metric

    # -- helpers ----------------------------------------------------------------------

    def values(self, arms: Sequence[ArmSummary], metric: str) -> tuple[list[float], tuple[int, ...]]:
        values: list[float] = []
        ids: list[int] = []
        for arm in arms:
            stats = arm.metrics.get(metric)
            if stats is not None:
                values += stats.values
                ids += stats.run_ids
        return values, tuple(ids)

    def select(self, sel: Selector) -> list[ArmSummary]:
        if isinstance(sel, str):
            name = self.inf.baseline if sel == "baseline" else sel
            return [a for a in self.summary.arms if a.name == name]
        wanted = {k: level_text(v) for k, v in sel.items()}
        return [a for a in self.summary.arms
                if all({**a.arm.env, **a.arm.factors}.get(k) == v for k, v in wanted.items())]

    def describe_selector(self, sel: Selector, arms: Sequence[ArmSummary]) -> str:
        if isinstance(sel, str):
            return f"the baseline {arms[0].name}" if sel == "baseline" and arms else f"arm {sel}"
        knobs = ", ".join(f"{k}={level_text(v)}" for k, v in sel.items())
        if len(arms) == 1 and arms[0].name != knobs:
            return f"arm {arms[0].name}"
        return f"arm {knobs}" if len(arms) == 1 else f"{knobs} (pooled over {len(arms)} arms)"

    def floor(self, metric: str, per_run: dict[int, float] | None = None) -> NoiseFloor | None:
        """The baseline arm's replicate spread of ``metric`` (or of a per-run derived quantity)."""
        base = next((a for a in self.summary.arms if a.name == self.inf.baseline), None)
        if base is None:
            return None
        stats = base.metrics.get(metric)
        if per_run is not None:
            ids = tuple(r for r in base.succeeded_run_ids if r in per_run)
            values = [per_run[r] for r in ids]
            d = describe(values, bootstrap=False)
            return NoiseFloor(base.name, len(values), d.std, (max(values) - min(values)) if len(values) >= 2 else None,
                              ids)
        if stats is None:
            return None
        return noise_floor(ArmGoal(base, stats, describe(stats.values, bootstrap=False)))

    def factors_of(self, metric: str) -> FactorAnalysis | None:
        if metric == self.goal:
            return self.inf.factors
        if metric not in self.summary.metrics:
            return None
        return factor_analysis(arm_goals(self.summary, metric), self.design, self.inf.baseline)

    def level_values(self, level: FactorLevel, by_run: dict[int, float]) -> list[float]:
        return [by_run[r] for r in level.run_ids if r in by_run]

    def by_run(self, metric: str) -> dict[int, float]:
        out: dict[int, float] = {}
        for arm in self.summary.arms:
            stats = arm.metrics.get(metric)
            if stats is not None:
                out.update(zip(stats.run_ids, stats.values, strict=True))
        return out

    def missing_metric(self, h: Hypothesis, metric: str) -> _Pending | None:
        if metric not in self.summary.metrics:
            return _fixed(h, Status.INCONCLUSIVE, f"No succeeded run reported {metric}, so it cannot be judged.")
        return None

    # -- the forms ---------------------------------------------------------------------

    def evaluate(self, h: Hypothesis) -> _Pending:
        e = h.expect
        if isinstance(e, Beats):
            return self.beats(h, e)
        if isinstance(e, FactorEffect):
            return self.effect(h, e)
        if isinstance(e, Interaction):
            return self.interaction(h, e)
        if isinstance(e, MetricOrder):
            return self.order(h, e)
        assert isinstance(e, GapGrows)
        return self.gap(h, e)

    def beats(self, h: Hypothesis, e: Beats) -> _Pending:
        metric = e.metric or self.goal
        maximize = e.maximize if e.maximize is not None else self.summary.maximize
        missing = self.missing_metric(h, metric)
        if missing:
            return missing
        winners, losers = self.select(e.arm), self.select(e.beats)
        for sel, arms in ((e.arm, winners), (e.beats, losers)):
            if not arms:
                return _fixed(h, Status.INCONCLUSIVE, f"No arm of this study matches {sel}, so it cannot be judged.")
        a_name, b_name = self.describe_selector(e.arm, winners), self.describe_selector(e.beats, losers)
        a, a_ids = self.values(winners, metric)
        b, b_ids = self.values(losers, metric)
        test = welch(b, a)
        ids = tuple(sorted(a_ids + b_ids))
        about = f"{a_name} minus {b_name}, {metric}"
        floor = self.floor(metric)

        def finish(p: list[float | None], family: int) -> Judgement:
            head: list[Part] = [
                f"{a_name[0].upper()}{a_name[1:]} reached mean {metric} ",
                Number("mean_a", float(np.mean(a)) if a else None, "metric", f"mean {metric} of {a_name}", a_ids),
                f" against {b_name}'s ",
                Number("mean_b", float(np.mean(b)) if b else None, "metric", f"mean {metric} of {b_name}", b_ids),
                ": ", *_welch_parts(test, p[0], about, ids),
            ]
            status, why = self.verdict(test, p[0], floor, maximize)
            return Judgement(h, status, (*head, f"; {why}."), family)

        return _Pending([test.p], finish)

    def verdict(self, test: Comparison, p_holm: float | None, floor: NoiseFloor | None,
                maximize: bool) -> tuple[Status, str]:
        """The report's rule (Holm, noise floor, direction) as a hypothesis verdict."""
        if test.p is not None and (floor is None or floor.std is None):
            return Status.INCONCLUSIVE, "the baseline has fewer than two runs, so the noise floor is unknown"
        verdict, reason = judge(test, p_holm, floor or NoiseFloor("", 0, None, None, ()), maximize)
        reason = reason.replace("the goal's direction", "the direction the hypothesis states")
        if verdict is Verdict.IMPROVEMENT:
            return Status.SUPPORTED, reason
        if verdict is Verdict.REGRESSION:
            return Status.CONTRADICTED, reason
        return Status.INCONCLUSIVE, f"{verdict.value}: {reason}"

    def anova_parts(self, fa: FactorAnalysis, term: str, p_holm: float | None) -> list[Part]:
        assert fa.anova is not None
        row = next(r for r in fa.anova.rows if r.term == term)
        about = f"ANOVA term {term}"
        return ["F = ", Number("F", row.f, "stat", f"{about}: F statistic", fa.run_ids),
                ", Holm-adjusted p = ", Number("p_holm", p_holm, "p", f"{about}: Holm-adjusted p-value over the"
                                                                        " hypotheses' tests", fa.run_ids),
                ", partial η² = ", Number("eta", row.partial_eta_sq, "stat", f"{about}: partial η²", fa.run_ids)]

    def effect(self, h: Hypothesis, e: FactorEffect) -> _Pending:
        metric = e.metric or self.goal
        missing = self.missing_metric(h, metric)
        if missing:
            return missing
        fa = self.factors_of(metric)
        if fa is None or fa.anova is None:
            why = fa.why_no_anova if fa is not None else "the arms carry no factor levels"
            return _fixed(h, Status.INCONCLUSIVE, f"No analysis of variance of {metric} was possible: {why}.")
        effect = next((x for x in fa.effects if x.factor == e.factor), None)
        if effect is None or effect.anova_row is None:
            return _fixed(h, Status.INCONCLUSIVE, f"{e.factor} did not vary between the arms that ran.")
        maximize = self.summary.maximize
        by_run = self.by_run(metric)
        ranked = sorted((lv for lv in effect.levels if lv.describe.mean is not None),
                        key=lambda lv: lv.describe.mean or 0.0, reverse=maximize)
        tests: list[float | None] = [effect.anova_row.p]
        pair: tuple[FactorLevel, FactorLevel, Comparison] | None = None
        stated = next((lv for lv in effect.levels if e.best is not None and lv.level == level_text(e.best)), None)
        if stated is not None and len(ranked) >= 2:
            rival = ranked[1] if ranked[0] is stated else ranked[0]
            # diff = stated − rival: positive (for maximize) means the stated level is ahead.
            pair = (stated, rival, welch(self.level_values(rival, by_run), self.level_values(stated, by_run)))
            tests.append(pair[2].p)
        floor = self.floor(metric)

        def level_mean(lv: FactorLevel, name: str) -> Number:
            return Number(name, lv.describe.mean, "metric", f"mean {metric} at {e.factor}={lv.level}"
                                                            f" ({effect.pooling})", lv.run_ids)

        def finish(p: list[float | None], family: int) -> Judgement:
            stats = self.anova_parts(fa, e.factor, p[0])
            if p[0] is None or p[0] >= ALPHA:
                return Judgement(h, Status.INCONCLUSIVE,
                                 (f"No detectable effect of {e.factor} on {metric} (", *stats, ")."), family)
            best = ranked[0]
            head: tuple[Part, ...] = (f"{e.factor} affects {metric} (", *stats, "); its best level is "
                                      f"{e.factor}={best.level} with mean ", level_mean(best, "best_mean"))
            if pair is None:
                return Judgement(h, Status.SUPPORTED, (*head, "."), family)
            s, r, test = pair
            ids = tuple(sorted(s.run_ids + r.run_ids))
            about = f"{e.factor}={s.level} minus {e.factor}={r.level}, {metric}"
            status, why = self.verdict(test, p[1], floor, maximize)
            if s is best:
                text: tuple[Part, ...] = (f", ahead of {e.factor}={r.level} (mean ", level_mean(r, "rival_mean"),
                                          ") by ", *_welch_parts(test, p[1], about, ids, "pair_")[1:], f"; {why}.")
                return Judgement(h, status, (*head, *text), family)
            # The stated level is not the best: only a clear lead of the best level (diff < 0) contradicts it.
            if status is Status.SUPPORTED:  # the stated level cannot lead the best level by mean
                status = Status.INCONCLUSIVE
            text = (f", not {e.factor}={s.level} (mean ", level_mean(s, "stated_mean"), "): ",
                    *_welch_parts(test, p[1], about, ids, "pair_"), f"; {why}.")
            return Judgement(h, status, (*head, *text), family)

        return _Pending(tests, finish)

    def interaction(self, h: Hypothesis, e: Interaction) -> _Pending:
        metric = e.metric or self.goal
        missing = self.missing_metric(h, metric)
        if missing:
            return missing
        fa = self.factors_of(metric)
        a, b = e.interaction
        if fa is None or fa.anova is None:
            why = fa.why_no_anova if fa is not None else "the arms carry no factor levels"
            return _fixed(h, Status.INCONCLUSIVE, f"No analysis of variance of {metric} was possible: {why}.")
        row = next((r for r in fa.anova.rows if r.term in (f"{a} × {b}", f"{b} × {a}")), None)
        if row is None:
            return _fixed(h, Status.INCONCLUSIVE, f"The analysis of variance has no {a} × {b} term (interactions need"
                                                  " a grid with every combination observed and residual degrees of"
                                                  " freedom left).")
        term = row.term

        def finish(p: list[float | None], family: int) -> Judgement:
            stats = self.anova_parts(fa, term, p[0])
            if p[0] is not None and p[0] < ALPHA:
                return Judgement(h, Status.SUPPORTED, (f"The effect of {a} on {metric} depends on {b} (", *stats,
                                                       ")."), family)
            return Judgement(h, Status.INCONCLUSIVE, (f"No detectable {term} interaction on {metric} (", *stats,
                                                      ")."), family)

        return _Pending([row.p], finish)

    def paired(self, arms: Sequence[ArmSummary], a: str, b: str) -> dict[int, float]:
        """Per succeeded run, metric ``a`` minus metric ``b`` (runs with both finite)."""
        first, second = self.by_run(a), self.by_run(b)
        wanted = {r for arm in arms for r in arm.succeeded_run_ids}
        return {r: first[r] - second[r] for r in sorted(wanted) if r in first and r in second}

    def order(self, h: Hypothesis, e: MetricOrder) -> _Pending:
        for metric in (e.metric, e.other):
            missing = self.missing_metric(h, metric)
            if missing:
                return missing
        arms = list(self.summary.arms) if e.arm is None else self.select(e.arm)
        if not arms:
            return _fixed(h, Status.INCONCLUSIVE, f"No arm of this study matches {e.arm}, so it cannot be judged.")
        diffs = self.paired(arms, e.metric, e.other)
        ids = tuple(diffs)
        values = list(diffs.values())
        if len(values) < 2:
            return _fixed(h, Status.INCONCLUSIVE, f"Fewer than two runs reported both {e.metric} and {e.other}.")
        sign = 1.0 if e.above else -1.0
        word = "above" if e.above else "below"
        d = describe(values, bootstrap=False)
        varies = d.std is not None and d.std > 0
        p_raw = float(sps.ttest_1samp(values, 0.0).pvalue) if varies else None
        arm_means = {arm.name: np.mean([diffs[r] for r in arm.succeeded_run_ids if r in diffs])
                     for arm in arms if any(r in diffs for r in arm.succeeded_run_ids)}
        holding = [n for n, m in arm_means.items() if m * sign > 0]
        floor = self.floor(e.metric, per_run=diffs)
        mean_a, a_ids = self.values(arms, e.metric)
        mean_b, b_ids = self.values(arms, e.other)
        where = "every arm" if e.arm is None else self.describe_selector(e.arm, arms)
        about = f"{e.metric} minus {e.other} per run, {where}"

        def finish(p: list[float | None], family: int) -> Judgement:
            parts: list[Part] = [
                f"Over {where}, mean {e.metric} is ",
                Number("mean_a", float(np.mean(mean_a)), "metric", f"mean {e.metric}, {where}", a_ids),
                f" and mean {e.other} ",
                Number("mean_b", float(np.mean(mean_b)), "metric", f"mean {e.other}, {where}", b_ids),
                "; the paired difference per run is ",
                Number("diff", d.mean, "metric", f"mean of {about}", ids),
            ]
            if d.ci is not None:
                parts += [" (95% CI [", Number("diff_low", d.ci.low, "metric", f"95% t CI lower bound of {about}", ids),
                          ", ", Number("diff_high", d.ci.high, "metric", f"95% t CI upper bound of {about}", ids),
                          "]"]
                if p[0] is not None:
                    parts += [", Holm-adjusted p = ", Number("p_holm", p[0], "p", f"Holm-adjusted paired t-test p,"
                                                                                   f" {about}", ids)]
                parts.append(")")
            parts += [f", and {e.metric} is {word} {e.other} in ",
                      Number("arms_holding", len(holding), "count", f"arms whose mean {e.metric} is {word} {e.other}",
                             ids),
                      " of ", Number("arms", len(arm_means), "count", f"arms with runs reporting both {e.metric} and"
                                                                      f" {e.other}", ids), " arms"]
            mean = d.mean or 0.0
            std = floor.std if floor is not None else None
            if p[0] is None:
                return Judgement(h, Status.INCONCLUSIVE, (*parts, "; every run gave the same difference, so there is"
                                                                   " no variance to test against."), family)
            if std is None:
                return Judgement(h, Status.INCONCLUSIVE, (*parts, "; the baseline has fewer than two such runs, so the"
                                                                   " noise floor is unknown."), family)
            beyond = abs(mean) > std
            significant = p[0] < ALPHA
            if significant and beyond and mean * sign > 0 and len(holding) == len(arm_means):
                return Judgement(h, Status.SUPPORTED, (*parts, "; significant after Holm correction, beyond the noise"
                                                               " floor, in every arm."), family)
            if significant and beyond and mean * sign < 0:
                return Judgement(h, Status.CONTRADICTED, (*parts, "; significant after Holm correction and beyond the"
                                                                  " noise floor, the other way."), family)
            why = ("not significant after Holm correction" if not significant else
                   "no larger than the noise floor" if not beyond else "it does not hold in every arm")
            return Judgement(h, Status.INCONCLUSIVE, (*parts, f"; {why}."), family)

        return _Pending([p_raw], finish)

    def gap(self, h: Hypothesis, e: GapGrows) -> _Pending:
        high, low = e.gap
        for metric in (high, low):
            missing = self.missing_metric(h, metric)
            if missing:
                return missing
        diffs = self.paired(self.summary.arms, high, low)
        finals = {r: {"gap": (v, True)} for r, v in diffs.items()}
        goals = [ArmGoal(arm, s, describe(s.values, bootstrap=False)) for arm in self.summary.arms
                 for s in [metric_stats("gap", arm.succeeded_run_ids, finals)]]
        fa = factor_analysis(goals, self.design, self.inf.baseline)
        effect = None if fa is None else next((x for x in fa.effects if x.factor == e.grows_with), None)
        levels = [] if effect is None else [lv for lv in effect.levels if lv.describe.n]
        if effect is None or len(levels) < 2:
            return _fixed(h, Status.INCONCLUSIVE, f"Fewer than two levels of {e.grows_with} have runs reporting both"
                                                  f" {high} and {low}.")
        first, last = levels[0], levels[-1]
        test = welch(self.level_values(first, diffs), self.level_values(last, diffs))
        floor = self.floor(high, per_run=diffs)
        what = f"gap {high} − {low}"
        ids = tuple(sorted(first.run_ids + last.run_ids))
        about = f"{what} at {e.grows_with}={last.level} minus at {e.grows_with}={first.level}"

        def finish(p: list[float | None], family: int) -> Judgement:
            means: list[Part] = []
            for i, lv in enumerate(levels):
                means += [", " if i else "", f"{e.grows_with}={lv.level}: ",
                          Number(f"level[{lv.level}]", lv.describe.mean, "metric",
                                 f"mean {what} at {e.grows_with}={lv.level} ({effect.pooling})", lv.run_ids)]
            status, why = self.verdict(test, p[0], floor, maximize=True)
            parts = (f"The mean {what} per level of {e.grows_with} is ", *means, "; from the first level to the"
                     " last it changes by ", *_welch_parts(test, p[0], about, ids)[1:], f"; {why}.")
            return Judgement(h, status, parts, family)

        return _Pending([test.p], finish)
