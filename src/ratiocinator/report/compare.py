"""``ratiocinator compare``: two experiments' arms side by side, with the same statistics.

Arms are matched by their knobs (the environment and arguments the runner got), so two
studies that named the same configuration differently still pair up; arms whose knobs
match nothing fall back to matching by name. Each matched pair is tested with Welch's
t-test (B against A), Holm-corrected across the pairs, and judged against A's replicate
spread by the same rules a report judges arms against its baseline. Comparing an
experiment with itself is refused; a comparison where nothing pairs up says so.
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
    arm: str  # A's arm name, "A = B" when the paired arms are named differently, or the unpaired arm's
    a: ArmGoal | None
    b: ArmGoal | None
    comparison: Comparison | None
    p_holm: float | None
    verdict: str
    matched_by: str | None = None  # "knobs", "name", or None for an arm only one side has


@dataclass(frozen=True)
class ExperimentComparison:
    a: str
    b: str
    metric: str
    maximize: bool
    pairs: tuple[ArmPair, ...]
    warnings: tuple[str, ...] = ()


# Verdicts of B's arm against A's, in the words of a side-by-side table.
_WORDING = {Verdict.IMPROVEMENT: "B better", Verdict.REGRESSION: "B worse"}


def compare_experiments(ledger: Ledger, a_ref: str, b_ref: str, *, metric: str | None = None) -> ExperimentComparison:
    a_exp, b_exp = ledger.find_experiment(a_ref), ledger.find_experiment(b_ref)
    if a_exp.id == b_exp.id:
        raise UsageError(f"{a_ref} and {b_ref} are the same experiment ({a_exp.id}): there is nothing to compare",
                         hint="name two different experiments; `ratiocinator status` lists them")
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
    matches = match_arms(a_goals, b_goals)
    tests = {a: welch(a_goals[a].stats.values, b_goals[b].stats.values) for a, (b, _) in matches.items()}
    adjusted = dict(zip(tests, holm([t.p for t in tests.values()]), strict=True))
    pairs = []
    for name, a in a_goals.items():
        if name not in matches:
            pairs.append(ArmPair(name, a, None, None, None, "only in A"))
            continue
        b_name, how = matches[name]
        test = tests[name]
        judged, _ = judge(test, adjusted[name], noise_floor(a), a_spec.maximize)
        label = name if b_name == name else f"{name} = {b_name}"
        pairs.append(ArmPair(label, a, b_goals[b_name], test, adjusted[name], _WORDING.get(judged, judged.value), how))
    paired_b = {b for b, _ in matches.values()}
    pairs += [ArmPair(n, None, b, None, None, "only in B") for n, b in b_goals.items() if n not in paired_b]
    warnings = () if matches else (
        f"no arm of {a_exp.id} matches an arm of {b_exp.id} by knobs or by name, so no arm is compared; check that"
        " they ran the same runner with the same knob names",)
    return ExperimentComparison(a_exp.id, b_exp.id, metric, a_spec.maximize, tuple(pairs), warnings)


def knob_key(goal: ArmGoal) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """What the runner got: the arm's environment knobs and arguments (its name is only a label)."""
    arm = goal.summary.arm
    return tuple(sorted(arm.env.items())), tuple(arm.args)


def match_arms(a_goals: dict[str, ArmGoal], b_goals: dict[str, ArmGoal]) -> dict[str, tuple[str, str]]:
    """A's arm name -> (B's arm name, "knobs" or "name"): knobs first, names for what knobs left unpaired."""
    by_knobs: dict[object, list[str]] = {}
    for name, goal in b_goals.items():
        by_knobs.setdefault(knob_key(goal), []).append(name)
    matches: dict[str, tuple[str, str]] = {}
    taken: set[str] = set()
    for name, goal in a_goals.items():
        candidates = [b for b in by_knobs.get(knob_key(goal), []) if b not in taken]
        if candidates:
            chosen = name if name in candidates else candidates[0]
            matches[name] = (chosen, "knobs")
            taken.add(chosen)
    for name in a_goals:
        if name not in matches and name in b_goals and name not in taken:
            matches[name] = (name, "name")
            taken.add(name)
    return matches


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
        "warnings": list(result.warnings),
        "arms": [
            {
                "arm": p.arm, "a_arm": p.a.name if p.a else None, "b_arm": p.b.name if p.b else None,
                "matched_by": p.matched_by, "a": side(p.a), "b": side(p.b),
                "diff": p.comparison.diff if p.comparison else None,
                "diff_ci95": ([p.comparison.diff_ci.low, p.comparison.diff_ci.high]
                              if p.comparison and p.comparison.diff_ci else None),
                "p": p.comparison.p if p.comparison else None, "p_holm": p.p_holm,
                "hedges_g": p.comparison.hedges_g if p.comparison else None, "verdict": p.verdict,
            }
            for p in result.pairs
        ],
    }
