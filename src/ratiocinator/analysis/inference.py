"""What the runs of an experiment support: baseline comparisons, factor effects, findings.

Built on the per-arm summary (``analysis``) and the tests in ``stats``; pure functions,
no I/O. The rules here decide which claims a report may make, so they are deliberately
conservative: a difference is an improvement only when the Holm-adjusted Welch test
rejects at ``ALPHA``, it points the way the spec's ``maximize`` asks, and it is larger
than the noise floor (the sample standard deviation of the baseline's replicates). A
factor "matters" only when its ANOVA term survives Holm correction; a factor that does
not is reported as showing no detectable effect, never as not mattering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from ratiocinator.analysis.stats import (
    Anova,
    AnovaRow,
    Comparison,
    Describe,
    LevelMean,
    anova,
    describe,
    holm,
    marginal_means,
    welch,
)
from ratiocinator.analysis.summary import ArmSummary, ExperimentSummary, MetricStats

ALPHA = 0.05
# Below this many replicates per arm the report warns that σ and every test are fragile.
SMALL_N = 5


class Verdict(str, Enum):
    IMPROVEMENT = "improvement"
    REGRESSION = "regression"
    WITHIN_NOISE = "within noise floor"
    NOT_SIGNIFICANT = "not significant"
    UNTESTABLE = "untestable"
    TOO_FEW_RUNS = "too few runs"


@dataclass(frozen=True)
class ArmGoal:
    """The goal metric of one arm: its values (with run ids) and their description."""

    summary: ArmSummary
    stats: MetricStats
    describe: Describe

    @property
    def name(self) -> str:
        return self.summary.name


@dataclass(frozen=True)
class NoiseFloor:
    """The spread of the baseline's replicates: differences inside it are not findings."""

    arm: str
    n: int
    std: float | None
    range: float | None
    run_ids: tuple[int, ...]


@dataclass(frozen=True)
class BaselineComparison:
    arm: str
    baseline: str
    comparison: Comparison
    p_holm: float | None
    verdict: Verdict
    reason: str
    run_ids: tuple[int, ...]


@dataclass(frozen=True)
class FactorLevel:
    """Pooled goal values at one level of a factor, with the runs they came from."""

    level: str
    describe: Describe
    run_ids: tuple[int, ...]


@dataclass(frozen=True)
class FactorEffect:
    factor: str
    levels: tuple[FactorLevel, ...]
    pooling: str  # how other factors were treated when pooling runs into a level
    anova_row: AnovaRow | None
    p_holm: float | None

    @property
    def significant(self) -> bool:
        return self.p_holm is not None and self.p_holm < ALPHA

    @property
    def spread(self) -> float | None:
        """Largest minus smallest level mean: the size of the factor's main effect."""
        means = [lv.describe.mean for lv in self.levels if lv.describe.mean is not None]
        return max(means) - min(means) if len(means) >= 2 else None

    def best_level(self, maximize: bool) -> FactorLevel | None:
        usable = [(lv.describe.mean, lv) for lv in self.levels if lv.describe.mean is not None]
        if not usable:
            return None
        return (max if maximize else min)(usable, key=lambda pair: pair[0])[1]


@dataclass(frozen=True)
class InteractionEffect:
    row: AnovaRow
    p_holm: float | None

    @property
    def significant(self) -> bool:
        return self.p_holm is not None and self.p_holm < ALPHA


@dataclass(frozen=True)
class FactorAnalysis:
    design: str
    effects: tuple[FactorEffect, ...]
    interactions: tuple[InteractionEffect, ...]
    anova: Anova | None
    run_ids: tuple[int, ...]
    why_no_anova: str

    def effect(self, factor: str) -> FactorEffect:
        return next(e for e in self.effects if e.factor == factor)

    def p_holm(self, term: str) -> float | None:
        """The Holm-adjusted p of an ANOVA term: a factor or an interaction."""
        for e in self.effects:
            if e.factor == term:
                return e.p_holm
        return next((i.p_holm for i in self.interactions if i.row.term == term), None)


@dataclass(frozen=True)
class Inference:
    summary: ExperimentSummary
    goals: tuple[ArmGoal, ...]
    baseline: str | None
    noise_floor: NoiseFloor | None
    comparisons: tuple[BaselineComparison, ...]
    factors: FactorAnalysis | None

    def goal(self, arm: str) -> ArmGoal:
        return next(g for g in self.goals if g.name == arm)

    def comparison(self, arm: str) -> BaselineComparison | None:
        return next((c for c in self.comparisons if c.arm == arm), None)

    @property
    def improvements(self) -> tuple[BaselineComparison, ...]:
        return tuple(c for c in self.comparisons if c.verdict is Verdict.IMPROVEMENT)

    def arm_keeps(self) -> dict[str, str]:
        """keep/discard per arm, as the autoresearch log means it: the baseline and real improvements are kept."""
        kept = {c.arm for c in self.improvements} | ({self.baseline} if self.baseline else set())
        return {g.name: "keep" if g.name in kept else "discard" for g in self.goals}


# -- per arm -----------------------------------------------------------------------


def _seed(run_ids: Sequence[int]) -> int:
    """A bootstrap seed fixed by the runs themselves, so recomputation gives the same interval."""
    return sum((i + 1) * r for i, r in enumerate(run_ids)) % (2**32)


def arm_goals(summary: ExperimentSummary, metric: str | None = None) -> tuple[ArmGoal, ...]:
    """Each arm's values of the goal metric (or of another metric its runs reported)."""
    goals = []
    for arm in summary.arms:
        stats = arm.metrics[metric or summary.goal_metric]
        goals.append(ArmGoal(arm, stats, describe(stats.values, seed=_seed(stats.run_ids))))
    return tuple(goals)


def baseline_arm(summary: ExperimentSummary) -> str | None:
    """The spec's baseline arm, else the first arm (the ledger records which one it is)."""
    for arm in summary.arms:
        if arm.arm.is_baseline:
            return arm.name
    return summary.arms[0].name if summary.arms else None


# -- comparisons -------------------------------------------------------------------


def noise_floor(goal: ArmGoal) -> NoiseFloor:
    values = goal.stats.values
    return NoiseFloor(
        arm=goal.name,
        n=len(values),
        std=goal.describe.std,
        range=(max(values) - min(values)) if len(values) >= 2 else None,
        run_ids=goal.stats.run_ids,
    )


def judge(c: Comparison, p_holm: float | None, floor: NoiseFloor, maximize: bool) -> tuple[Verdict, str]:
    """The verdict on one comparison against the reference arm whose spread is ``floor``, and why."""
    if c.n_baseline < 2 or c.n_other < 2:
        return Verdict.TOO_FEW_RUNS, (
            f"a test needs at least 2 succeeded runs on each side (baseline {c.n_baseline}, arm {c.n_other})"
        )
    assert c.diff is not None
    if c.p is None:
        if c.diff == 0:
            return Verdict.WITHIN_NOISE, "every run of both arms gave the same value"
        return Verdict.UNTESTABLE, (
            "both arms gave identical values across their replicates, so there is no variance to test against"
        )
    assert floor.std is not None
    if abs(c.diff) <= floor.std:
        return Verdict.WITHIN_NOISE, "the difference is no larger than the baseline's replicate standard deviation"
    assert p_holm is not None
    if p_holm >= ALPHA:
        return Verdict.NOT_SIGNIFICANT, f"Holm-adjusted p ≥ {ALPHA}"
    better = c.diff > 0 if maximize else c.diff < 0
    if better:
        return Verdict.IMPROVEMENT, "significant after Holm correction, beyond the noise floor, in the goal's direction"
    return Verdict.REGRESSION, "significant after Holm correction, beyond the noise floor, against the goal's direction"


def compare_to_baseline(goals: Sequence[ArmGoal], baseline: str,
                        maximize: bool) -> tuple[NoiseFloor, tuple[BaselineComparison, ...]]:
    """Welch test of every other arm against the baseline, Holm-corrected as one family."""
    base = next(g for g in goals if g.name == baseline)
    floor = noise_floor(base)
    others = [g for g in goals if g.name != baseline]
    tests = [welch(base.stats.values, g.stats.values) for g in others]
    adjusted = holm([t.p for t in tests])
    out = []
    for goal, test, p_holm in zip(others, tests, adjusted, strict=True):
        verdict, reason = judge(test, p_holm, floor, maximize)
        out.append(BaselineComparison(goal.name, baseline, test, p_holm, verdict, reason,
                                      base.stats.run_ids + goal.stats.run_ids))
    return floor, tuple(out)


# -- factors -----------------------------------------------------------------------


def factor_analysis(goals: Sequence[ArmGoal], design: str, baseline: str | None) -> FactorAnalysis | None:
    """Main effects per factor, and a Type II ANOVA where the design allows one.

    Grid designs pool each level over every other factor. Ablations vary one factor at
    a time, so a level is read only from arms whose other factors sit at the baseline's
    levels; pooling across them would mix in the other factors' effects.
    """
    factored = [g for g in goals if g.summary.arm.factors]
    if not factored:
        return None
    names = list(factored[0].summary.arm.factors)
    values: list[float] = []
    run_ids: list[int] = []
    levels: dict[str, list[str]] = {n: [] for n in names}
    for goal in factored:
        for run_id, value in zip(goal.stats.run_ids, goal.stats.values, strict=True):
            values.append(value)
            run_ids.append(run_id)
            for n in names:
                levels[n].append(goal.summary.arm.factors[n])

    table = anova(values, levels, interactions=design == "grid") if values else None
    why = ""
    if table is None:
        why = (
            "no succeeded run reported a finite goal value"
            if not values
            else "the design leaves no residual degrees of freedom (more replicates, or fewer arms, would allow one)"
        )
    rows = {r.term: r for r in table.rows} if table else {}
    adjusted = dict(zip(rows, holm([r.p for r in rows.values()]), strict=True))

    base_levels = next((g.summary.arm.factors for g in factored if g.name == baseline), None)
    spec_order = {n: _level_order(factored, n) for n in names}
    effects = []
    for n in names:
        if design == "ablation" and base_levels is not None:
            keep = [i for i in range(len(values)) if all(levels[m][i] == base_levels[m] for m in names if m != n)]
            held = ", ".join(f"{m}={base_levels[m]}" for m in names if m != n) or "none"
            pooling = f"other factors held at the baseline ({held})"
        else:
            keep = list(range(len(values)))
            pooling = "pooled over the other factors' levels" if len(names) > 1 else "one factor"
        means: tuple[LevelMean, ...] = marginal_means([values[i] for i in keep], [levels[n][i] for i in keep],
                                                      order=spec_order[n])
        effects.append(
            FactorEffect(
                factor=n,
                levels=tuple(FactorLevel(m.level, m.describe, tuple(run_ids[keep[i]] for i in m.indices))
                             for m in means),
                pooling=pooling,
                anova_row=rows.get(n),
                p_holm=adjusted.get(n),
            )
        )
    interactions = tuple(InteractionEffect(r, adjusted[t]) for t, r in rows.items() if t not in names)
    return FactorAnalysis(design, tuple(effects), interactions, table, tuple(run_ids), why)


def _level_order(goals: Sequence[ArmGoal], factor: str) -> list[str]:
    seen: list[str] = []
    for goal in goals:
        level = goal.summary.arm.factors.get(factor)
        if level is not None and level not in seen:
            seen.append(level)
    return seen


# -- the whole experiment -----------------------------------------------------------


def infer(summary: ExperimentSummary, design: str) -> Inference:
    goals = arm_goals(summary)
    base = baseline_arm(summary)
    floor, comparisons = (None, ()) if base is None else compare_to_baseline(goals, base, summary.maximize)
    return Inference(
        summary=summary,
        goals=goals,
        baseline=base,
        noise_floor=floor,
        comparisons=comparisons,
        factors=factor_analysis(goals, design, base),
    )
