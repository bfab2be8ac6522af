"""From a spec to arms and runs: pure functions, no I/O.

An arm is one configuration of knobs; a run is one replicate of an arm with its own
seed. Seeds are shared across arms (replicate r gets seed r in every arm) so arms are
compared on the same random draws.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from ratiocinator.errors import PlanError
from ratiocinator.execution import contract
from ratiocinator.repo.knobs import KnobReport
from ratiocinator.spec.models import LoadedSpec, Scalar, Spec, scalar_to_env


@dataclass(frozen=True)
class PlannedArm:
    name: str
    env: dict[str, str]
    args: tuple[str, ...] = ()
    description: str = ""
    factors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PlannedRun:
    arm: str
    replicate: int
    seed: int


@dataclass(frozen=True)
class Plan:
    """The arms of one iteration and the runs they expand to.

    ``replicates`` is every arm's target number of replicates; ``arm_replicates`` raises
    it for some arms (confirmation replicates of a promising arm in a later iteration).
    Replicates an arm already has in the ledger are not run again.
    """

    arms: tuple[PlannedArm, ...]
    baseline: str
    replicates: int
    arm_replicates: dict[str, int] = field(default_factory=dict)

    def replicates_of(self, arm: str) -> int:
        return self.arm_replicates.get(arm, self.replicates)

    @property
    def n_runs(self) -> int:
        return sum(self.replicates_of(a.name) for a in self.arms)

    def runs(self) -> list[PlannedRun]:
        """Replicate-major order, so a budget cut leaves every arm with similar n."""
        most = max((self.replicates_of(a.name) for a in self.arms), default=0)
        return [
            PlannedRun(arm=arm.name, replicate=r, seed=r)
            for r in range(most)
            for arm in self.arms
            if r < self.replicates_of(arm.name)
        ]

    def arm(self, name: str) -> PlannedArm:
        return next(a for a in self.arms if a.name == name)

    def to_json(self) -> dict[str, object]:
        return {
            "arms": [{"name": a.name, "env": a.env, "args": list(a.args), "description": a.description,
                      "factors": a.factors}
                     for a in self.arms],
            "baseline": self.baseline, "replicates": self.replicates, "arm_replicates": self.arm_replicates,
        }

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        arms = tuple(PlannedArm(a["name"], dict(a["env"]), tuple(a["args"]), a["description"], dict(a["factors"]))
                     for a in data["arms"])
        return cls(arms, data["baseline"], int(data["replicates"]),
                   {k: int(v) for k, v in data["arm_replicates"].items()})


def factor_arm_name(levels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in levels.items())


def _factor_arms(spec: Spec) -> list[PlannedArm]:
    if not spec.factors:
        return []
    names = list(spec.factors)
    levels = {n: [scalar_to_env(v) for v in spec.factors[n]] for n in names}
    if spec.design == "grid":
        combos = [dict(zip(names, values, strict=True)) for values in itertools.product(*(levels[n] for n in names))]
    else:
        assert isinstance(spec.baseline, dict)  # enforced by the spec validator
        base = {n: scalar_to_env(spec.baseline[n]) for n in names}
        combos = [base]
        for n in names:
            combos.extend({**base, n: v} for v in levels[n] if v != base[n])
    return [
        PlannedArm(name=factor_arm_name(c), env=dict(c), factors=dict(c), description=_describe(c))
        for c in combos
    ]


def first_arm_count(spec: Spec) -> int:
    """How many arms the first iteration runs: the explicit ones plus the factor design's."""
    return len(spec.arms) + len(_factor_arms(spec))


def _describe(levels: dict[str, str]) -> str:
    return ", ".join(f"{k} = {v}" for k, v in levels.items())


def _args(args: dict[str, Scalar | None]) -> tuple[str, ...]:
    argv: list[str] = []
    for flag, value in args.items():
        argv.append(flag)
        if value is not None:
            argv.append(scalar_to_env(value))
    return tuple(argv)


def plan_iteration(loaded: LoadedSpec) -> Plan:
    """The first iteration's arms from the spec's ``arms`` and ``factors``."""
    spec = loaded.spec
    arms = [
        PlannedArm(
            name=a.name,
            env={k: scalar_to_env(v) for k, v in a.env.items()},
            args=_args(a.args),
            description=a.description,
        )
        for a in spec.arms
    ]
    arms.extend(_factor_arms(spec))
    arms = list(with_constants(arms, spec))
    if not arms:
        raise PlanError(
            f"{loaded.path}: the spec defines no arms to run (it has a topic, but no 'arms' and no 'factors')",
            hint=(
                "add explicit arms, e.g.\n"
                "    arms:\n"
                "      - {name: baseline, env: {LOSS: mse}}\n"
                "      - {name: ce-loss, env: {LOSS: ce}}\n"
                "  or a factor grid, e.g.\n"
                "    factors: {LOSS: [mse, ce], DIM: [64, 128]}\n"
                "  or let an LLM design the arms from the topic: add an `llm:` section, e.g.\n"
                "    llm: {provider: openai, model: gpt-4o-mini}   # key in OPENAI_API_KEY\n"
                "  (or set RATIOCINATOR_LLM_PROVIDER and RATIOCINATOR_LLM_MODEL)"
            ),
        )
    seen: dict[str, int] = {}
    for i, arm in enumerate(arms):
        if arm.name in seen:
            raise PlanError(f"{loaded.where('arms', i)}: arm name '{arm.name}' is used twice",
                            hint="give every arm a unique name")
        seen[arm.name] = i
    _refuse_duplicate_configs(loaded, arms)
    return Plan(arms=tuple(arms), baseline=_baseline(loaded, arms), replicates=spec.replicates)


def constants(spec: Spec) -> dict[str, str]:
    """The spec's top-level ``env``: knobs every arm gets, as environment strings."""
    return {k: scalar_to_env(v) for k, v in spec.env.items()}


def with_constants(arms: Iterable[PlannedArm], spec: Spec) -> tuple[PlannedArm, ...]:
    """Every arm with the spec's constant knobs added under its own (an arm's own setting wins).

    Applied to whatever a planner proposes (the spec's arms, a search, an LLM), and idempotent, so a
    recorded plan read back on resume stays the plan that ran. Names and factors never include
    constants: two studies that differ only in a constant have arms of the same names.
    """
    fixed = constants(spec)
    return tuple(dataclasses.replace(a, env={**fixed, **a.env}) if fixed else a for a in arms)


def own_knobs(arm: PlannedArm, spec: Spec) -> dict[str, str]:
    """The knobs an arm sets beyond the spec's constants (what tells it apart), for display."""
    fixed = constants(spec)
    return {k: v for k, v in arm.env.items() if fixed.get(k) != v}


def _refuse_duplicate_configs(loaded: LoadedSpec, arms: list[PlannedArm]) -> None:
    """Two arms with the same knobs are one config run twice under two names."""
    by_config: dict[tuple, str] = {}
    for arm in arms:
        key = (tuple(sorted(arm.env.items())), arm.args)
        if key in by_config:
            raise PlanError(
                f"{loaded.path}: arms '{by_config[key]}' and '{arm.name}' set exactly the same knobs",
                hint="they would be one configuration under two names; remove one or make them differ",
            )
        by_config[key] = arm.name


def _baseline(loaded: LoadedSpec, arms: list[PlannedArm]) -> str:
    base = loaded.spec.baseline
    if base is None:
        return arms[0].name
    if isinstance(base, dict):
        name = factor_arm_name({n: scalar_to_env(base[n]) for n in loaded.spec.factors})
        if any(a.name == name for a in arms):
            return name
        raise PlanError(f"{loaded.where('baseline')}: the baseline {name} is not among the planned arms")
    if any(a.name == base for a in arms):
        return base
    raise PlanError(
        f"{loaded.where('baseline')}: baseline '{base}' is not an arm name",
        hint=f"arms: {', '.join(a.name for a in arms[:12])}",
    )


def runner_knobs(report: KnobReport) -> list[str]:
    """The knobs a study can set: what the runner reads, less the run contract's ``RATIOCINATOR_*``
    variables and the platform settings every runner inherits anyway (``OMP_NUM_THREADS``, ``CUDA_*``)."""
    return sorted(name for name in report.knobs if not contract.is_contract_variable(name)
                  and not contract.is_inherited_name(name))


def did_you_mean(knob: str, candidates: list[str]) -> str:
    """``did you mean WIDTH?`` for a typo (``WIDHT``), matched without regard to case."""
    by_upper = {c.upper(): c for c in candidates}
    near = difflib.get_close_matches(knob.upper(), list(by_upper), n=1, cutoff=0.6)
    return f" — did you mean {by_upper[near[0]]}?" if near else ""


@dataclass(frozen=True)
class IgnoredKnob:
    arm: str
    knob: str
    where: str


def find_ignored_knobs(loaded: LoadedSpec, plan: Plan, report: KnobReport) -> list[IgnoredKnob]:
    """Knobs an arm sets (and the seed variable) that the runner never reads."""
    spec = loaded.spec
    declared = set(spec.extra_knobs)
    env_read = set(report.env_names()) | declared
    flags_read = set(report.arg_flags()) | declared
    ignored: list[IgnoredKnob] = []
    if spec.seed_env and spec.seed_env not in env_read:
        ignored.append(IgnoredKnob(arm="(every arm)", knob=spec.seed_env, where=loaded.where("seed_env")))
    explicit = {a.name: i for i, a in enumerate(spec.arms)}
    for arm in plan.arms:
        for knob in arm.env:
            if knob not in env_read:
                own = arm.name in explicit and knob in spec.arms[explicit[arm.name]].env
                if own:
                    where = loaded.where("arms", explicit[arm.name], "env", knob)
                elif knob in spec.env and knob not in spec.factors:
                    ignored.append(IgnoredKnob(arm="(every arm)", knob=knob, where=loaded.where("env", knob)))
                    continue
                else:
                    where = loaded.where("factors", knob)
                ignored.append(IgnoredKnob(arm=arm.name, knob=knob, where=where))
        if arm.name in explicit:
            for flag in spec.arms[explicit[arm.name]].args:
                if flag not in flags_read:
                    ignored.append(IgnoredKnob(arm=arm.name, knob=flag,
                                               where=loaded.where("arms", explicit[arm.name], "args", flag)))
    return _dedupe(ignored)


def _dedupe(items: list[IgnoredKnob]) -> list[IgnoredKnob]:
    seen: set[tuple[str, str]] = set()
    out = []
    for item in items:
        key = (item.where, item.knob)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def refuse_ignored_knobs(loaded: LoadedSpec, plan: Plan, report: KnobReport) -> None:
    """Raise before anything runs if an arm sets a knob the runner never reads."""
    ignored = find_ignored_knobs(loaded, plan, report)
    if not ignored:
        return
    knobs = runner_knobs(report)
    read = ", ".join(knobs) or "(none found)"
    lines = [f"{i.where}: arm '{i.arm}' sets {i.knob}, which {loaded.spec.runner_script} never reads"
             + did_you_mean(i.knob, knobs) for i in ignored[:20]]
    if len(ignored) > 20:
        lines.append(f"... and {len(ignored) - 20} more")
    hint = f"knobs the runner reads: {read}"
    if report.dynamic:
        hint += (
            f"\n  the code also reads the environment with computed names at {', '.join(report.dynamic[:5])};"
            " if such a read uses these knobs, declare them under extra_knobs"
        )
    else:
        hint += "\n  if the runner reads a knob in a way that cannot be seen in its code, declare it under extra_knobs"
    raise PlanError("arms set knobs the runner never reads (they would all run the same config):\n  "
                    + "\n  ".join(lines), hint=hint)
