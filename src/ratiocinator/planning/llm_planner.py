"""The LLM planner: designs the arms from the research question and decides each next step.

Design (iteration 1, when the spec lists no arms or factors): the model gets the topic,
the goal metric *and its direction*, the knobs the runner really reads (with defaults),
the hardware and what the budget can pay for, and returns hypotheses, arms, a baseline
and replicates as JSON validated by pydantic. Arms that set unknown knobs, duplicate
arms, a baseline that is not an arm, and plans whose worst case exceeds the budget are
sent back with the reason (bounded re-asks).

Iteration (2, 3, ...): the model gets the statistics of what ran (per-arm intervals,
verdicts against the baseline with Holm-corrected p, the noise floor, factor effects,
failures by class), not raw JSON, and decides to stop or to run new arms and
confirmation replicates. It may not stop on a promising arm that has not been confirmed
while budget and iterations remain. Every decision and its stated reason is recorded.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field

from ratiocinator.errors import PlanError
from ratiocinator.llm.session import LlmSession
from ratiocinator.llm.structured import ask_structured
from ratiocinator.planning.plan import Plan, PlannedArm, plan_iteration
from ratiocinator.planning.planner import Decision, Planner, PlanningContext
from ratiocinator.spec.hypotheses import Hypothesis as SpecHypothesis
from ratiocinator.spec.hypotheses import check_hypotheses
from ratiocinator.spec.models import ARM_NAME, LoadedSpec, Scalar, scalar_to_env
from ratiocinator.store.ledger import Ledger

MAX_ATTEMPTS = 3
MAX_ARMS = 40
MAX_REPLICATES = 20


class ArmProposal(BaseModel):
    name: str = Field(description="short arm name: letters, digits and _.,=+- only")
    knobs: dict[str, Scalar] = Field(default_factory=dict,
                                     description="knob -> value; unset knobs keep the code's default")
    description: str = ""


class Hypothesis(SpecHypothesis):
    """A hypothesis in the spec's testable form (``id``, ``statement``, ``expect``), plus the arms that test it."""

    arms: list[str] = Field(default_factory=list, description="names of the arms that test it")


class DesignProposal(BaseModel):
    hypotheses: list[Hypothesis] = Field(min_length=1)
    arms: list[ArmProposal] = Field(min_length=2)
    baseline: str = Field(description="the name of the arm every other arm is compared with")
    replicates: int = Field(ge=2, le=MAX_REPLICATES, description="runs per arm, each with its own seed")
    rationale: str = ""


class Confirmation(BaseModel):
    arm: str
    extra_replicates: int = Field(ge=1, le=MAX_REPLICATES)


class NextStep(BaseModel):
    action: Literal["stop", "run"]
    reason: str = Field(min_length=1, description="why: the evidence that decides")
    new_arms: list[ArmProposal] = []
    confirm: list[Confirmation] = []


DESIGN_SYSTEM = """You design machine-learning experiments that answer a research question with as few,
as informative runs as the budget allows. Each arm is one configuration of the knobs the code
really reads; every arm is compared with one baseline arm over several seeded replicates.
Vary one thing per arm where you can, so each comparison answers one question.
State each hypothesis so the runs can decide it: an id (H1, H2, ...), one sentence, and an
`expect` the analysis tests. Use {"arm": ARM, "beats": ARM or "baseline"} (optionally with
"metric": a metric the runs report) for "this configuration does better than that one", or
{"metric": A, "above": B} / {"metric": A, "below": B} for "metric A of the same runs is above
(below) metric B". A hypothesis is judged supported, contradicted or inconclusive by a
Holm-corrected test and the baseline's replicate noise."""

ITERATE_SYSTEM = """You run an experiment loop. You see the statistics of every arm so far and decide
whether to stop (the question is answered, the goal is reached, or nothing more is worth the money)
or to run new arms and/or confirmation replicates. Claim a winner only after it was confirmed with
extra replicates. Base every statement on the statistics given."""


class LlmPlanner(Planner):
    name = "llm"

    def __init__(self, loaded: LoadedSpec) -> None:
        self.loaded = loaded
        self.spec = loaded.spec

    def next_iteration(self, context: PlanningContext) -> Decision:
        if context.llm is None:
            raise PlanError("the LLM planner needs a configured LLM (spec `llm:` or RATIOCINATOR_LLM_* variables)")
        if context.iteration == 1:
            if self.spec.arms or self.spec.factors:
                return Decision(plan_iteration(self.loaded), "the spec's arms and factors (iteration 1)")
            return self._design(context, context.llm)
        return self._iterate(context, context.llm)

    # -- design --------------------------------------------------------------------------

    def _design(self, context: PlanningContext, llm: LlmSession) -> Decision:
        known = self._known_knobs(context)
        budget_runs = self._affordable_runs(context)
        prompt = "\n".join([
            f"Research question and hypotheses:\n{self.spec.topic.strip()}",
            "",
            f"Goal metric: {self.spec.goal_metric} — {'MAXIMIZE' if self.spec.maximize else 'MINIMIZE'} it.",
            "",
            "Knobs the runner reads (environment variables; the only ones an arm may set):",
            *self._knob_lines(context),
            "",
            f"Hardware: {_hardware(self.loaded)}",
            f"Budget: {_budget_line(context, budget_runs)}",
            f"Iterations after this design: at most {self.spec.max_iterations - 1}.",
            "",
            "Propose the hypotheses (each with id, statement and a testable expect), the arms (name, knobs,"
            " description), the baseline arm and the replicates.",
        ])

        def problems(design: DesignProposal) -> list[str]:
            found = self._arm_problems(design.arms, known, existing={})
            names = {a.name for a in design.arms}
            if design.baseline not in names:
                found.append(f"baseline '{design.baseline}' is not one of the arms ({', '.join(sorted(names))})")
            for h in design.hypotheses:
                missing = [a for a in h.arms if a not in names]
                if missing:
                    found.append(f"hypothesis '{h.statement[:60]}' names arms that do not exist: {', '.join(missing)}")
            try:  # the designed arms have no factors: the arm and metric forms are the testable ones
                check_hypotheses(list(design.hypotheses), {}, sorted(names))
            except ValueError as exc:
                found.append(str(exc))
            runs = len(design.arms) * design.replicates
            if budget_runs is not None and runs > budget_runs:
                found.append(f"{len(design.arms)} arms × {design.replicates} replicates = {runs} runs, but the budget"
                             f" pays for at most {budget_runs} runs of ${context.run_worst_case:.4f} worst case each")
            return found

        result = ask_structured(llm.provider("design", context.iteration), system=DESIGN_SYSTEM, user=prompt,
                                schema=DesignProposal, max_attempts=MAX_ATTEMPTS, check=problems)
        design: DesignProposal = result.value
        arms = tuple(_planned(a) for a in design.arms)
        plan = Plan(arms=arms, baseline=design.baseline, replicates=design.replicates)
        return Decision(plan, f"LLM design: {len(arms)} arms × {design.replicates} replicates, baseline"
                              f" {design.baseline}",
                        {"hypotheses": [h.model_dump() for h in design.hypotheses], "rationale": design.rationale,
                         "cost": result.cost_dollars})

    # -- iteration -----------------------------------------------------------------------

    def _iterate(self, context: PlanningContext, llm: LlmSession) -> Decision:
        ledger, exp_id = context.ledger, context.experiment_id
        budget_runs = self._affordable_runs(context)
        if budget_runs == 0:
            return Decision(None, "stop: the remaining budget cannot pay for another run")
        existing = {a.name: a for a in ledger.arms(exp_id)}
        baseline = next((a.name for a in existing.values() if a.is_baseline), None)
        replicates = _replicate_counts(ledger, exp_id)
        brief = statistics_brief(ledger, exp_id)
        iterations_left = self.spec.max_iterations - context.iteration
        prompt = "\n".join([
            f"Research question:\n{self.spec.topic.strip()}",
            "",
            f"Goal metric: {self.spec.goal_metric} — {'MAXIMIZE' if self.spec.maximize else 'MINIMIZE'} it.",
            "",
            f"Results so far (iteration {context.iteration - 1} done):",
            brief.text,
            "",
            "Knobs the runner reads:",
            *self._knob_lines(context),
            "",
            f"Budget: {_budget_line(context, budget_runs)}",
            f"Iterations left after this one: {iterations_left}.",
            "",
            "Decide: stop, or run new arms (new knob settings) and/or confirmation replicates of existing arms.",
        ])
        known = self._known_knobs(context)

        def problems(step: NextStep) -> list[str]:
            found = self._arm_problems(step.new_arms, known, existing={n: a.env for n, a in existing.items()})
            for c in step.confirm:
                if c.arm not in existing:
                    found.append(f"confirm: there is no arm '{c.arm}' (arms: {', '.join(sorted(existing))})")
            runs = sum(self.spec.replicates for _ in step.new_arms) + sum(c.extra_replicates for c in step.confirm)
            if step.action == "run" and runs == 0:
                found.append("action 'run' needs new_arms or confirm")
            if budget_runs is not None and runs > budget_runs:
                found.append(f"that is {runs} runs, but the budget pays for at most {budget_runs}")
            if step.action == "stop" and brief.unconfirmed and (budget_runs is None or budget_runs > 0):
                arm = brief.unconfirmed[0]
                found.append(f"arm '{arm}' is an improvement on only {replicates.get(arm, 0)} runs; run confirmation"
                             " replicates (confirm) before stopping on it")
            return found

        result = ask_structured(llm.provider("iterate", context.iteration), system=ITERATE_SYSTEM, user=prompt,
                                schema=NextStep, max_attempts=MAX_ATTEMPTS, check=problems)
        step: NextStep = result.value
        record = {"step": step.model_dump(), "statistics": brief.text, "cost": result.cost_dollars}
        if step.action == "stop":
            return Decision(None, f"LLM: stop — {step.reason}", record)
        arms = [_planned(a) for a in step.new_arms]
        targets: dict[str, int] = {}
        for c in step.confirm:
            row = existing[c.arm]
            arms.append(PlannedArm(row.name, dict(row.env), tuple(row.args), row.description, dict(row.factors)))
            targets[c.arm] = replicates.get(c.arm, 0) + c.extra_replicates
        plan = Plan(arms=tuple(arms), baseline=baseline or arms[0].name, replicates=self.spec.replicates,
                    arm_replicates=targets)
        what = [f"{len(step.new_arms)} new arm(s)"] + [f"{c.extra_replicates} more of {c.arm}" for c in step.confirm]
        return Decision(plan, f"LLM: run {', '.join(what)} — {step.reason}", record)

    # -- shared checks -----------------------------------------------------------------------

    def _known_knobs(self, context: PlanningContext) -> set[str]:
        return set(context.knobs.env_names()) | {k for k in self.spec.extra_knobs if not k.startswith("-")}

    def _knob_lines(self, context: PlanningContext) -> list[str]:
        lines = []
        for knob in context.knobs.knobs.values():
            if knob.kind != "env":
                continue
            default = "no default" if knob.default is None else f"default {knob.default}"
            lines.append(f"- {knob.name} ({default}; read at {', '.join(knob.sources[:2])})")
        lines += [f"- {k} (declared in extra_knobs)" for k in self.spec.extra_knobs if not k.startswith("-")]
        return lines or ["- (none found)"]

    def _affordable_runs(self, context: PlanningContext) -> int | None:
        """How many more runs the budget can pay for at their worst case (None: runs are free)."""
        worst = context.run_worst_case
        if worst <= 0:
            return None
        return max(int(math.floor(context.budget.remaining() / worst + 1e-9)), 0)

    def _arm_problems(self, arms: list[ArmProposal], known: set[str], existing: dict[str, dict[str, str]]) -> list[str]:
        found: list[str] = []
        if len(arms) > MAX_ARMS:
            found.append(f"{len(arms)} arms is more than the {MAX_ARMS} allowed in one iteration")
        seen: dict[tuple, str] = {tuple(sorted(env.items())): name for name, env in existing.items()}
        names = set(existing)
        for arm in arms:
            if not ARM_NAME.fullmatch(arm.name):
                found.append(f"arm name '{arm.name}' must be letters, digits and _.,=+- (at most 100 characters)")
            if arm.name in names:
                found.append(f"arm name '{arm.name}' is already taken")
            names.add(arm.name)
            unknown = sorted(set(arm.knobs) - known)
            if unknown:
                found.append(f"arm '{arm.name}' sets {', '.join(unknown)}, which the runner never reads"
                             f" (knobs it reads: {', '.join(sorted(known)) or 'none'})")
            key = tuple(sorted((k, scalar_to_env(v)) for k, v in arm.knobs.items()))
            if key in seen:
                found.append(f"arm '{arm.name}' has the same knobs as arm '{seen[key]}'")
            seen[key] = arm.name
        return found


def _planned(arm: ArmProposal) -> PlannedArm:
    return PlannedArm(arm.name, {k: scalar_to_env(v) for k, v in arm.knobs.items()}, (), arm.description)


def _hardware(loaded: LoadedSpec) -> str:
    hw = loaded.spec.hardware
    parts = [f"{hw.num_gpus} × {hw.gpu or 'GPU'}" if hw.num_gpus else "CPU only"]
    parts.append(f"each run at most {loaded.spec.train_timeout_s:g} s")
    return ", ".join(parts)


def _budget_line(context: PlanningContext, runs: int | None) -> str:
    if runs is None:
        return "runs cost nothing here (price_per_hour 0); keep the plan proportionate anyway."
    return (f"${context.budget.remaining():.4f} left; one run may cost up to ${context.run_worst_case:.4f},"
            f" so at most {runs} more runs.")


def _replicate_counts(ledger: Ledger, experiment_id: str) -> dict[str, int]:
    """Replicates each arm has (any attempt), so confirmation replicates get new seeds."""
    counts: dict[str, int] = {}
    for run in ledger.runs(experiment_id):
        counts[run.arm] = max(counts.get(run.arm, 0), run.replicate + 1)
    return counts


# -- the statistics the model sees --------------------------------------------------------------


class Brief(BaseModel):
    text: str
    unconfirmed: list[str] = []


def statistics_brief(ledger: Ledger, experiment_id: str) -> Brief:
    """The results as a statistician would summarise them: intervals, verdicts, effects, failures."""
    from ratiocinator.report.paper import analyse

    _, spec, _, _, inf = analyse(ledger, experiment_id)
    lines = [f"per arm ({spec.goal_metric}, succeeded runs only; mean, sample sd, 95% CI):"]
    for goal in inf.goals:
        d = goal.describe
        failures = ", ".join(f"{k} {v}" for k, v in goal.summary.failure_counts.items())
        if d.n == 0:
            lines.append(f"- {goal.name}: no result ({goal.summary.n_attempts} attempt(s);"
                         f" {failures or 'none finished'})")
            continue
        ci = f"[{d.ci.low:.6g}, {d.ci.high:.6g}]" if d.ci else "n/a"
        sd = f"{d.std:.4g}" if d.std is not None else "n/a"
        lines.append(f"- {goal.name}: n={d.n}, mean={d.mean:.6g}, sd={sd}, CI {ci}"
                     + (f"; failed: {failures}" if failures else ""))
    if inf.noise_floor is not None and inf.noise_floor.std is not None:
        lines.append(f"noise floor (baseline {inf.noise_floor.arm} replicate sd): {inf.noise_floor.std:.4g}")
    unconfirmed = []
    if inf.comparisons:
        lines.append(f"against the baseline {inf.baseline} (Welch t-test, Holm-corrected across arms):")
        for c in inf.comparisons:
            cmp = c.comparison
            diff = f"{cmp.diff:+.4g}" if cmp.diff is not None else "n/a"
            p = f"{c.p_holm:.3g}" if c.p_holm is not None else "n/a"
            lines.append(f"- {c.arm}: diff {diff}, p_holm {p}, verdict: {c.verdict.value}")
            if c.verdict.value == "improvement" and cmp.n_other <= spec.replicates:
                unconfirmed.append(c.arm)
    if inf.factors is not None:
        for effect in inf.factors.effects:
            p = f"{effect.p_holm:.3g}" if effect.p_holm is not None else "n/a"
            levels = ", ".join(f"{lv.level}: {lv.describe.mean:.4g}" for lv in effect.levels
                               if lv.describe.mean is not None)
            lines.append(f"factor {effect.factor}: ANOVA p_holm {p}; level means {levels}")
    return Brief(text="\n".join(lines), unconfirmed=unconfirmed)
