"""``ratiocinator compare``: two experiments' arms side by side, with the same statistics.

Arms are matched by name (the same knobs give the same name); each matched pair is
tested with Welch's t-test (B against A), Holm-corrected across the pairs, and judged
against A's replicate spread by the same rules a report judges arms against its baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

from ratiocinator.analysis.inference import ArmGoal, Inference, Verdict, arm_goals, judge, noise_floor
from ratiocinator.analysis.stats import Comparison, holm, welch
from ratiocinator.errors import UsageError
from ratiocinator.report.paper import analyse
from ratiocinator.store.ledger import Ledger


@dataclass(frozen=True)
class ArmPair:
    arm: str
    a: ArmGoal | None
    b: ArmGoal | None
    comparison: Comparison | None
    p_holm: float | None
    verdict: str


@dataclass(frozen=True)
class ExperimentComparison:
    a: str
    b: str
    metric: str
    maximize: bool
    pairs: tuple[ArmPair, ...]


# Verdicts of B's arm against A's, in the words of a side-by-side table.
_WORDING = {Verdict.IMPROVEMENT: "B better", Verdict.REGRESSION: "B worse"}


def compare_experiments(ledger: Ledger, a_ref: str, b_ref: str, *, metric: str | None = None) -> ExperimentComparison:
    a_exp, b_exp = ledger.find_experiment(a_ref), ledger.find_experiment(b_ref)
    _, a_spec, _, _, a_inf = analyse(ledger, a_exp.id)
    _, b_spec, _, _, b_inf = analyse(ledger, b_exp.id)
    if a_spec.maximize != b_spec.maximize:
        raise UsageError(f"{a_exp.id} maximizes its goal and {b_exp.id} minimizes it (or the reverse): they cannot be"
                         " ranked together")
    if metric is None:
        if a_spec.goal_metric != b_spec.goal_metric:
            raise UsageError(
                f"the experiments have different goal metrics ({a_spec.goal_metric} and {b_spec.goal_metric})",
                hint="choose one both runs report with --metric NAME",
            )
        metric = a_spec.goal_metric
    a_goals, b_goals = _goals(a_inf, metric), _goals(b_inf, metric)
    if not any(g.describe.n for g in a_goals.values()) and not any(g.describe.n for g in b_goals.values()):
        raise UsageError(f"neither experiment has a finite {metric} in any succeeded run")
    names = [*a_goals, *(n for n in b_goals if n not in a_goals)]
    tests = {n: welch(a_goals[n].stats.values, b_goals[n].stats.values) for n in names if n in a_goals and n in b_goals}
    adjusted = dict(zip(tests, holm([t.p for t in tests.values()]), strict=True))
    pairs = []
    for name in names:
        a, b, test = a_goals.get(name), b_goals.get(name), tests.get(name)
        if test is None:
            verdict = "only in A" if b is None else "only in B"
        else:
            assert a is not None
            judged, _ = judge(test, adjusted[name], noise_floor(a), a_spec.maximize)
            verdict = _WORDING.get(judged, judged.value)
        pairs.append(ArmPair(name, a, b, test, adjusted.get(name), verdict))
    return ExperimentComparison(a_exp.id, b_exp.id, metric, a_spec.maximize, tuple(pairs))


def _goals(inference: Inference, metric: str) -> dict[str, ArmGoal]:
    summary = inference.summary
    if metric == summary.goal_metric:
        return {g.name: g for g in inference.goals}
    if metric not in summary.metrics:
        raise UsageError(f"experiment {summary.experiment_id} has no succeeded run reporting {metric}",
                         hint=f"its metrics: {', '.join(summary.metrics)}")
    return {g.name: g for g in arm_goals(summary, metric)}


def comparison_json(result: ExperimentComparison) -> dict[str, object]:
    def side(goal: ArmGoal | None) -> dict[str, object] | None:
        if goal is None:
            return None
        d = goal.describe
        return {"n": d.n, "mean": d.mean, "std": d.std, "ci95": [d.ci.low, d.ci.high] if d.ci else None,
                "run_ids": list(goal.stats.run_ids)}

    return {
        "a": result.a, "b": result.b, "metric": result.metric, "maximize": result.maximize,
        "arms": [
            {
                "arm": p.arm, "a": side(p.a), "b": side(p.b),
                "diff": p.comparison.diff if p.comparison else None,
                "diff_ci95": ([p.comparison.diff_ci.low, p.comparison.diff_ci.high]
                              if p.comparison and p.comparison.diff_ci else None),
                "p": p.comparison.p if p.comparison else None, "p_holm": p.p_holm,
                "hedges_g": p.comparison.hedges_g if p.comparison else None, "verdict": p.verdict,
            }
            for p in result.pairs
        ],
    }
