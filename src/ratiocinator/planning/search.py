"""The offline planner: without an LLM, Optuna's TPE proposes each later iteration.

Iteration 1 runs the spec's arms and factors (or, with neither, configurations sampled
at random from ``search.space``). Every later iteration rebuilds an in-memory Optuna
study from the ledger, so the ledger stays the only state and a resume or a re-plan
sees exactly what was measured:

* every arm whose knobs lie in the space, and whose other knobs and flags match the
  baseline's, is a trial: COMPLETE with the mean goal of its succeeded finite runs, or
  FAIL when it has none (a crash says nothing about the goal, and TPE ignores FAIL
  trials; the ledger still keeps the configuration from being proposed again). A space
  knob an arm leaves unset takes the runner's default where its code shows one; arms
  that still fall outside are skipped, and the record says why;
* TPE is asked for ``arms_per_iteration`` configurations the ledger does not hold yet;
  an asked configuration that is a duplicate is told PRUNED, which TPE ranks below every
  completed trial, so it steers away from a point it cannot use;
* the ``confirm_top`` best arms get ``confirm_replicates`` more replicates, once each
  (an arm is raised to ``replicates + confirm_replicates`` and never past it);
* the runs are cut to what the budget covers at their worst case, proposals first.

It stops, with the reason, when the spec has no ``search`` section, when a search knob
is one the runner never reads, when the budget cannot pay for a run, or when there is
nothing new to propose and nothing to confirm.

Proposals are named like factor arms (``LR=0.003162,ARCH=gat``); floats are written
with 4 significant digits (more only where needed to stay inside the range or on the
step grid), so an arm's name, its environment and its warm-start value agree.

Optuna comes with the ``search`` extra and is imported only when a search runs: a spec with
a ``search`` section and no Optuna installed is refused before anything is recorded.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ratiocinator.errors import PlanError
from ratiocinator.extras import require
from ratiocinator.planning.plan import Plan, PlannedArm, factor_arm_name, plan_iteration
from ratiocinator.planning.planner import Decision, Planner, PlanningContext
from ratiocinator.spec.models import LoadedSpec, Scalar, Search, SearchDimension, scalar_to_env
from ratiocinator.store.ledger import ArmRow, Ledger

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

# Asks per wanted configuration before concluding the space holds nothing new.
ASKS_PER_ARM = 16
MIN_ASKS = 64

NO_SPACE = (
    "the spec declares no search space: nothing to explore after iteration 1;"
    " add `search.space` or configure an LLM planner"
)


def format_value(dim: SearchDimension, value: Scalar) -> str:
    """A sampled value as the knob's environment string; it parses back inside ``dim``.

    4 significant digits keep names short and proposals from differing by noise; more
    are used only when rounding would leave the range or the step grid.
    """
    if dim.choices is not None or isinstance(value, (str, bool)):
        return scalar_to_env(value)
    if dim.is_int:
        return str(int(value))
    number = float(value)
    tolerance = math.inf
    if dim.step is not None:  # a grid point must stay that grid point, not a neighbour
        assert dim.low is not None
        number = dim.low + round((number - dim.low) / dim.step) * dim.step
        tolerance = 1e-9 * max(1.0, abs(dim.step))
    for digits in range(4, 18):
        text = f"{number:.{digits}g}"
        if dim.value_of(text) is not None and abs(float(text) - number) <= tolerance:
            return text
    return repr(number)


def _optuna() -> Any:
    """Optuna, imported on first use (the ``search`` extra)."""
    return require("optuna", extra="search", purpose="the search planner (the spec's `search` section)")


def distribution(dim: SearchDimension) -> BaseDistribution:
    """The Optuna distribution of one search dimension."""
    distributions = _optuna().distributions
    if dim.choices is not None:
        return distributions.CategoricalDistribution(tuple(dim.choices))
    assert dim.low is not None and dim.high is not None
    if dim.is_int:
        return distributions.IntDistribution(int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))
    return distributions.FloatDistribution(float(dim.low), float(dim.high), log=dim.log,
                             step=None if dim.step is None else float(dim.step))


@dataclass(frozen=True)
class _Confirmation:
    arm: ArmRow
    mean: float
    n: int
    current: int
    target: int


class SearchPlanner(Planner):
    """The spec's arms first, then TPE proposals warm-started from the ledger, plus confirmations."""

    name = "search"

    def __init__(self, loaded: LoadedSpec) -> None:
        self.loaded = loaded
        self.spec = loaded.spec

    # -- before anything runs ------------------------------------------------------------

    def check(self) -> None:
        spec = self.spec
        if spec.search is not None:
            _optuna()  # a missing extra is said now, before the ledger is touched
        if spec.arms or spec.factors:
            plan_iteration(self.loaded)
            return
        if spec.search is None:
            raise PlanError(
                f"{self.loaded.path}: the spec gives the first iteration nothing to run"
                " (no 'arms', no 'factors' and no 'search.space'), and no LLM is configured to propose arms",
                hint=(
                    "either add arms or factors, e.g.\n"
                    "    factors: {LR: [0.001, 0.01], ARCH: [gcn, gat]}\n"
                    "  or a search space the offline planner samples from, e.g.\n"
                    "    search:\n"
                    "      space:\n"
                    "        LR: {low: 1.0e-4, high: 1.0e-1, log: true}\n"
                    "        ARCH: {choices: [gcn, gat]}\n"
                    "  or configure an LLM planner (an `llm:` section, or RATIOCINATOR_LLM_* variables)"
                ),
            )
        if isinstance(spec.baseline, str):
            raise PlanError(
                f"{self.loaded.where('baseline')}: baseline '{spec.baseline}' names an arm, but the spec has no arms",
                hint="remove baseline (the first sampled configuration becomes the baseline) or add that arm",
            )

    # -- each iteration ------------------------------------------------------------------

    def next_iteration(self, context: PlanningContext) -> Decision:
        search = self.spec.search
        if search is not None:
            unknown = self._unknown_knobs(context, search)
            if unknown:
                return unknown
        if context.iteration == 1 and (self.spec.arms or self.spec.factors):
            return Decision(plan_iteration(self.loaded), "the spec's arms and factors",
                            {"planner": self.name, "source": "spec"})
        if search is None:
            if context.iteration == 1:
                self.check()  # raises: nothing at all to run
            return Decision(None, NO_SPACE, {"planner": self.name})
        affordable = self._affordable_runs(context)
        if affordable == 0:
            return Decision(None, self._broke(context),
                            {"planner": self.name, "budget": self._budget_record(context, 0)})
        return self._search(context, search, affordable)

    def _search(self, context: PlanningContext, search: Search, affordable: int | None) -> Decision:
        optuna = _optuna()
        TrialState = optuna.trial.TrialState
        ledger, exp_id = context.ledger, context.experiment_id
        arms = ledger.arms(exp_id)
        baseline = next((a for a in arms if a.is_baseline), arms[0] if arms else None)
        values = _goal_values(ledger, exp_id, self.spec.goal_metric)
        seed = _iteration_seed(search.seed, context.iteration)
        distributions = {k: distribution(d) for k, d in search.space.items()}
        with _quiet_optuna():
            study = optuna.create_study(
                direction="maximize" if self.spec.maximize else "minimize",
                sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=search.arms_per_iteration,
                                                   multivariate=True, constant_liar=True),
            )
            defaults = _defaults(context, search)
            warm, skipped = self._warm_start(study, search, arms, baseline, values, distributions, defaults)
            told = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
            startup = told < search.arms_per_iteration
            proposals, asked, duplicates = self._propose(study, search, arms, baseline, distributions, defaults,
                                                         context.iteration)
        confirmations, already = self._confirmations(ledger, exp_id, arms, values, search)
        proposals, confirmations, dropped = self._fit_budget(ledger, exp_id, proposals, confirmations, affordable)

        record: dict[str, Any] = {
            "planner": self.name,
            "sampler": f"optuna {optuna.__version__} TPESampler (multivariate, constant liar)",
            "seed": search.seed,
            "sampler_seed": seed,
            "mode": "random startup" if startup else "tpe",
            "space": {k: d.describe() for k, d in search.space.items()},
            "baseline": baseline.name if baseline else None,
            "warm_start": warm,
            "skipped": skipped,
            "asked": asked,
            "duplicates": duplicates,
            "proposed": [{"arm": a.name, "env": a.env} for a in proposals],
            "confirm": [
                {"arm": c.arm.name, "mean": c.mean, "n": c.n, "from": c.current, "to": c.target,
                 "why": f"{'highest' if self.spec.maximize else 'lowest'} mean {self.spec.goal_metric} "
                        f"{c.mean:.4g} over {c.n} run(s) among the arms with a finite goal value; replicates"
                        f" raised from {c.current} to {c.target} (at most replicates + confirm_replicates ="
                        f" {self.spec.replicates + search.confirm_replicates}, so once per arm)"}
                for c in confirmations
            ],
            "already_confirmed": already,
            "budget": {**self._budget_record(context, affordable), "dropped": dropped},
        }
        if not proposals and not confirmations:
            if dropped:
                return Decision(None, self._broke(context, affordable), record)
            why = (f"the search found no configuration the ledger does not already hold ({asked} asked,"
                   f" {duplicates} duplicates) and no arm needs confirmation replicates")
            return Decision(None, why, record)
        plan = Plan(
            arms=tuple([_planned(c.arm) for c in confirmations] + proposals),
            baseline=baseline.name if baseline else proposals[0].name,
            replicates=self.spec.replicates,
            arm_replicates={c.arm.name: c.target for c in confirmations},
        )
        return Decision(plan, self._reason(record, proposals, confirmations), record)

    # -- warm start and proposals ------------------------------------------------------------

    def _warm_start(self, study: optuna.Study, search: Search, arms: list[ArmRow], baseline: ArmRow | None,
                    values: dict[str, list[float]], distributions: dict[str, BaseDistribution],
                    defaults: dict[str, str]) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        """Every ledger arm in the space becomes a trial; the rest are listed with why not.

        A space knob an arm leaves unset has the runner's default, when the code shows one.
        """
        optuna = _optuna()
        TrialState = optuna.trial.TrialState
        space = search.space
        context = _context(baseline, space)
        warm: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        for arm in arms:
            params, why = _params({**defaults, **arm.env}, space)
            if params is None:
                skipped.append({"arm": arm.name, "why": why})
                continue
            if _context(arm, space) != context:
                why = "sets knobs or flags outside the space to other values than the baseline"
                skipped.append({"arm": arm.name, "why": why})
                continue
            runs = values.get(arm.name, [])
            value = float(np.mean(runs)) if runs else None
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions=distributions, value=value,
                state=TrialState.COMPLETE if runs else TrialState.FAIL, user_attrs={"arm": arm.name},
            ))
            warm.append({"arm": arm.name, "params": params, "value": value, "n": len(runs),
                         "state": "complete" if runs else "fail (no succeeded run with a finite goal value)",
                         "runner_defaults": {k: defaults[k] for k in space if k not in arm.env}})
        return warm, skipped

    def _propose(self, study: optuna.Study, search: Search, arms: list[ArmRow], baseline: ArmRow | None,
                 distributions: dict[str, BaseDistribution], defaults: dict[str, str],
                 iteration: int) -> tuple[list[PlannedArm], int, int]:
        """Ask until ``arms_per_iteration`` new configurations, or the attempts run out."""
        TrialState = _optuna().trial.TrialState
        space = search.space
        base_env = {k: v for k, v in (baseline.env if baseline else {}).items() if k not in space}
        base_args = tuple(baseline.args) if baseline else ()
        taken = {_config_key({**defaults, **a.env}, a.args, space) for a in arms}
        names = {a.name for a in arms}
        proposals: list[PlannedArm] = []
        asked = duplicates = 0
        while (len(proposals) < search.arms_per_iteration
               and asked < max(MIN_ASKS, ASKS_PER_ARM * search.arms_per_iteration)):
            trial = study.ask(fixed_distributions=distributions)
            asked += 1
            levels = {k: format_value(space[k], trial.params[k]) for k in space}
            env = {**base_env, **levels}
            key = _config_key(env, base_args, space)
            name = factor_arm_name(levels)
            if key in taken or name in names:
                study.tell(trial, state=TrialState.PRUNED)
                duplicates += 1
                continue
            taken.add(key)
            names.add(name)
            # Left RUNNING: the constant liar keeps the rest of this batch away from it.
            description = (f"search proposal, iteration {iteration}: "
                           + ", ".join(f"{k} = {v}" for k, v in levels.items()))
            proposals.append(PlannedArm(name=name, env=env, args=base_args, description=description))
        return proposals, asked, duplicates

    # -- confirmation ------------------------------------------------------------------------

    def _confirmations(self, ledger: Ledger, exp_id: str, arms: list[ArmRow], values: dict[str, list[float]],
                       search: Search) -> tuple[list[_Confirmation], list[str]]:
        """The best arms by mean goal, raised once to replicates + confirm_replicates."""
        if search.confirm_top == 0 or search.confirm_replicates == 0:
            return [], []
        sign = -1.0 if self.spec.maximize else 1.0
        ranked = sorted((a for a in arms if values.get(a.name)),
                        key=lambda a: (sign * float(np.mean(values[a.name])), a.id))
        counts: dict[str, int] = {}
        for run in ledger.runs(exp_id):
            counts[run.arm] = max(counts.get(run.arm, 0), run.replicate + 1)
        target = self.spec.replicates + search.confirm_replicates
        out: list[_Confirmation] = []
        already: list[str] = []
        for arm in ranked[: search.confirm_top]:
            current = counts.get(arm.name, 0)
            if current >= target:
                already.append(arm.name)
                continue
            out.append(_Confirmation(arm, float(np.mean(values[arm.name])), len(values[arm.name]), current, target))
        return out, already

    # -- money -------------------------------------------------------------------------------

    @staticmethod
    def _affordable_runs(context: PlanningContext) -> int | None:
        """Runs the remaining budget covers at their worst case; None when runs are free."""
        worst = context.run_worst_case
        if worst <= 0:
            return None
        return max(math.floor(context.budget.remaining() / worst + 1e-9), 0)

    def _fit_budget(self, ledger: Ledger, exp_id: str, proposals: list[PlannedArm], confirmations: list[_Confirmation],
                    affordable: int | None) -> tuple[list[PlannedArm], list[_Confirmation], list[str]]:
        """Drop proposals from the end, then trim confirmations from the end, until the runs fit."""
        if affordable is None:
            return proposals, confirmations, []
        done = ledger.terminal_replicates(exp_id, self.spec.failure_policy.max_attempts)

        def pending(c: _Confirmation) -> int:
            return sum((c.arm.name, r) not in done for r in range(c.target))

        proposals, confirmations = list(proposals), list(confirmations)
        dropped: list[str] = []
        excess = sum(map(pending, confirmations)) + self.spec.replicates * len(proposals) - affordable
        while excess > 0 and proposals:
            dropped.append(proposals.pop().name)
            excess -= self.spec.replicates
        for i in reversed(range(len(confirmations))):
            c = confirmations[i]
            while excess > 0 and c.target > c.current:
                before = pending(c)
                c = _Confirmation(c.arm, c.mean, c.n, c.current, c.target - 1)
                excess -= before - pending(c)
            if c.target == confirmations[i].target:
                continue
            if c.target <= c.current or pending(c) == 0:
                dropped.append(f"confirmation of {c.arm.name}")
                del confirmations[i]
            else:
                dropped.append(f"{confirmations[i].target - c.target} confirmation replicate(s) of {c.arm.name}")
                confirmations[i] = c
        return proposals, confirmations, dropped

    def _budget_record(self, context: PlanningContext, affordable: int | None) -> dict[str, Any]:
        return {"remaining": context.budget.remaining(), "run_worst_case": context.run_worst_case,
                "affordable_runs": affordable}

    def _broke(self, context: PlanningContext, affordable: int | None = 0) -> str:
        remaining = context.budget.remaining()
        what = ("cannot cover one more run" if not affordable
                else f"covers {affordable} run(s), fewer than one new arm needs ({self.spec.replicates} replicates)")
        return (f"the remaining budget ${remaining:.4f} {what} (worst case ${context.run_worst_case:.4f} a run:"
                f" ${context.price_per_hour:g}/h × {context.train_timeout_s:g} s); raise max_dollars to go on")

    # -- knobs -------------------------------------------------------------------------------

    def _unknown_knobs(self, context: PlanningContext, search: Search) -> Decision | None:
        """Stop before proposing values for a knob the runner never reads (every arm would be one config)."""
        space = search.space
        known = set(context.knobs.env_names()) | {k for k in self.spec.extra_knobs if not k.startswith("-")}
        unknown = [k for k in space if k not in known]
        if not unknown:
            return None
        where = "; ".join(f"{k} at {self.loaded.where('search', 'space', k)}" for k in unknown)
        reads = ", ".join(sorted(context.knobs.env_names())) or "none found"
        reason = (f"search.space names {', '.join(unknown)}, which {self.spec.runner_script} never reads ({where});"
                  f" proposals would all run one configuration. Knobs it reads: {reads}. Fix the knob name, or,"
                  " if the runner reads it in a way static analysis cannot see, declare it under extra_knobs")
        return Decision(None, reason, {"planner": self.name, "unknown_knobs": unknown})

    # -- words -------------------------------------------------------------------------------

    def _reason(self, record: dict[str, Any], proposals: list[PlannedArm], confirmations: list[_Confirmation]) -> str:
        parts = []
        if proposals:
            how = "sampled at random (TPE startup)" if record["mode"] == "random startup" else "proposed by TPE"
            parts.append(f"{len(proposals)} new configuration(s) {how} from {len(record['warm_start'])} ledger trial(s)"
                         f" over {', '.join(record['space'])}")
        for c in confirmations:
            parts.append(f"{c.target - c.current} confirmation replicate(s) of {c.arm.name}"
                         f" (best mean {self.spec.goal_metric} {c.mean:.4g}, n={c.n})")
        if record["budget"]["dropped"]:
            parts.append(f"cut to fit the budget: {', '.join(record['budget']['dropped'])}")
        return "search: " + "; ".join(parts)


# -- helpers -------------------------------------------------------------------------------


def _goal_values(ledger: Ledger, exp_id: str, goal: str) -> dict[str, list[float]]:
    """Per arm, the goal values of its succeeded runs that ended finite."""
    metrics = ledger.run_metrics(exp_id)
    out: dict[str, list[float]] = {}
    for run in ledger.runs(exp_id, status="succeeded"):
        value, finite = metrics.get(run.id, {}).get(goal, (None, False))
        if finite and value is not None:
            out.setdefault(run.arm, []).append(float(value))
    return out


def _defaults(context: PlanningContext, search: Search) -> dict[str, str]:
    """The runner's default of each space knob, where its code shows a literal one."""
    knobs = context.knobs.knobs
    return {k: default for k in search.space
            if k in knobs and knobs[k].kind == "env" and (default := knobs[k].default) is not None}


def _params(env: dict[str, str], space: dict[str, SearchDimension]) -> tuple[dict[str, Scalar] | None, str]:
    """The trial parameters of an arm's (default-filled) environment, or why it has none."""
    params: dict[str, Scalar] = {}
    for knob, dim in space.items():
        if knob not in env:
            return None, f"does not set {knob}, and the runner shows no default for it"
        value = dim.value_of(env[knob])
        if value is None:
            return None, f"{knob}={env[knob]} is outside the space ({dim.describe()})"
        params[knob] = value
    return params, ""


def _context(arm: ArmRow | None,
             space: dict[str, SearchDimension]) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """What an arm sets outside the space: trials are comparable only when this is the baseline's."""
    if arm is None:
        return (), ()
    return tuple(sorted((k, v) for k, v in arm.env.items() if k not in space)), tuple(arm.args)


def _config_key(env: dict[str, str], args: Any, space: dict[str, SearchDimension]) -> tuple:
    """A configuration by value, so 1e-2 and 0.01 are one learning rate."""
    items = []
    for k, v in sorted(env.items()):
        dim = space.get(k)
        value = None if dim is None else dim.value_of(v)
        if value is not None:
            v = repr(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else scalar_to_env(value)
        items.append((k, v))
    return tuple(items), tuple(args)


def _planned(arm: ArmRow) -> PlannedArm:
    return PlannedArm(arm.name, dict(arm.env), tuple(arm.args), arm.description, dict(arm.factors))


def _iteration_seed(seed: int, iteration: int) -> int:
    """One sampler seed per (spec seed, iteration): a later iteration does not replay the first's random draws."""
    return int(np.random.SeedSequence([seed, iteration]).generate_state(1)[0])


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna logs every trial and warns about experimental options; the ledger record says what matters."""
    optuna = _optuna()
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)
