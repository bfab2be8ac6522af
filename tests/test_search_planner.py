"""The offline planner: the ``search`` spec section, and TPE warm-started from a real ledger."""

from __future__ import annotations

import math
import statistics
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml

from planted import PlantedStudy
from ratiocinator.errors import PlanError, SpecError
from ratiocinator.planning.plan import PlannedArm, factor_arm_name, plan_iteration
from ratiocinator.planning.planner import PlanningContext
from ratiocinator.planning.search import NO_SPACE, SearchPlanner, distribution, format_value
from ratiocinator.repo.knobs import Knob, KnobReport, discover_knobs
from ratiocinator.spec.models import LoadedSpec, SearchDimension, load_spec
from ratiocinator.store.budget import Budget

MINIMAL = """\
topic: t
goal_metric: acc
maximize: true
repo_url: .
runner_script: train.py
"""

SPACE = {
    "LR": {"low": 1.0e-4, "high": 1.0e-1, "log": True},
    "LAYERS": {"low": 1, "high": 8},
    "ARCH": {"choices": ["gcn", "gat", "gin", "sage"]},
}


def _loaded(tmp_path: Path, **fields: object) -> LoadedSpec:
    data: dict[str, object] = {**yaml.safe_load(MINIMAL), "replicates": 3}
    data.update(fields)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}, sort_keys=False))
    return load_spec(path)


def _knobs(*names: str, defaults: dict[str, str] | None = None) -> KnobReport:
    defaults = defaults or {}
    return KnobReport(knobs={n: Knob(n, "env", defaults.get(n), ("train.py:1",)) for n in names},
                      files=("train.py",), dynamic=(), unreadable=())


def _context(study: PlantedStudy, iteration: int, knobs: KnobReport, *, limit: float = 100.0,
             price: float = 0.0, timeout_s: float = 3600.0) -> PlanningContext:
    return PlanningContext(iteration, study.ledger, study.id, knobs, Budget(study.ledger, study.id, limit), price,
                           timeout_s)


def _study(tmp_path: Path, arms: list[PlannedArm], baseline: str) -> PlantedStudy:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return PlantedStudy(home, arms, baseline_arm=baseline)


def _add_arms(study: PlantedStudy, iteration: int, arms: list[PlannedArm]) -> None:
    """Arms of a later iteration, recorded as the pipeline records them."""
    study.ledger.record_arms(study.id, iteration, arms, baseline="(none)")
    study.arm_ids = {a.name: a.id for a in study.ledger.arms(study.id)}


# -- the spec section ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        ("  space: {LR: {low: 0.1, high: 0.1}}\n", "low (0.1) must be below high (0.1)"),
        ("  space: {LR: {low: 0, high: 1, log: true}}\n", "log: true needs low > 0"),
        ("  space: {ARCH: {choices: []}}\n", "choices is empty"),
        ("  space: {ARCH: {choices: [gcn, gcn]}}\n", "choices lists a value twice"),
        ("  space: {ARCH: {choices: [[1, 2]]}}\n", "choices must be strings, numbers or booleans; got [1, 2]"),
        ("  space: {LR: {low: 0.1, high: 1, choices: [a]}}\n", "either {choices: [...]} or {low, high}, not both"),
        ("  space: {LR: {low: 0.1}}\n", "needs low and high (a range) or choices"),
        ("  space: {LR: {low: 0.1, high: 1, logg: true}}\n",
         "unknown key 'logg' in a search dimension — did you mean 'log'?"),
        ("  space: {LR: {low: 0, high: 1, step: 0}}\n", "step must be positive"),
        ("  space: {LR: {low: 0.1, high: 1, step: 0.1, log: true}}\n", "log and step cannot be combined"),
        ("  space: {LR: {low: 0, high: 1, step: 0.3}}\n", "must be a multiple of step"),
        ("  space: {2LR: {low: 0, high: 1}}\n", "search knob '2LR' is not a valid environment variable name"),
        ("  space: {RATIOCINATOR_X: {low: 0, high: 1}}\n", "set by Ratiocinator itself"),
        ("  space: {}\n", "search.space names no knobs"),
        ("  space: {LR: {low: 0, high: 1}}\n  arms_per_iteration: 0\n", "greater than or equal to 1"),
        ("  space: {LR: {low: 0, high: 1}}\n  confirm_replicates: -1\n", "greater than or equal to 0"),
        ("  space: {LR: {low: 0, high: 1}}\n  sampler: tpe\n", "unknown key 'search.sampler'"),
    ],
)
def test_search_spec_errors_name_the_line_and_the_fix(tmp_path: Path, search: str, expected: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(MINIMAL + "search:\n" + search)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert expected in str(info.value)
    assert f"{path}:7" in str(info.value) or f"{path}:8" in str(info.value)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("factors: {LR: [0.001, 0.5]}\nsearch:\n  space: {LR: {low: 1.0e-4, high: 0.1, log: true}}\n",
         "factor 'LR' has level 0.5 outside search.space.LR (a number in [0.0001, 0.1] (log scale))"),
        ("factors: {LAYERS: [2, 3.5]}\nsearch:\n  space: {LAYERS: {low: 1, high: 8}}\n",
         "factor 'LAYERS' has level 3.5 outside search.space.LAYERS (an integer in [1, 8])"),
        ("factors: {ARCH: [gcn, mlp]}\nsearch:\n  space: {ARCH: {choices: [gcn, gat]}}\n",
         "factor 'ARCH' has level mlp outside search.space.ARCH (one of ['gcn', 'gat'])"),
        ("seed_env: SEED\nsearch:\n  space: {SEED: {low: 0, high: 9}}\n", "seed_env 'SEED' is set per replicate"),
    ],
)
def test_search_must_agree_with_factors_and_seed_env(tmp_path: Path, extra: str, expected: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(MINIMAL + extra)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert expected in str(info.value)


def test_search_section_defaults_and_value_types(tmp_path: Path) -> None:
    loaded = _loaded(tmp_path, factors={"LR": ["1e-3", 0.01], "ARCH": ["gcn", "gat"]}, search={"space": SPACE})
    search = loaded.spec.search
    assert search is not None
    assert (search.arms_per_iteration, search.confirm_top, search.confirm_replicates, search.seed) == (4, 1, 2, 0)
    assert list(search.space) == ["LR", "LAYERS", "ARCH"]  # declaration order names the arms
    assert search.space["LAYERS"].is_int and not search.space["LR"].is_int
    assert search.space["LAYERS"].value_of("3") == 3 and search.space["LAYERS"].value_of("3.5") is None
    assert search.space["LR"].value_of("1e-3") == 0.001 and search.space["LR"].value_of("0.5") is None
    assert search.space["ARCH"].value_of("gat") == "gat" and search.space["ARCH"].value_of("mlp") is None
    assert _loaded(tmp_path).spec.search is None


def test_format_value_keeps_4_digits_but_stays_inside_range_and_grid() -> None:
    log = SearchDimension(low=1e-4, high=0.12345, log=True)
    assert format_value(log, 0.0031622776) == "0.003162"
    assert format_value(log, 0.1234499) == "0.1234"
    assert format_value(log, 0.12345) == "0.12345"  # 0.1235 would leave the range
    assert log.value_of(format_value(log, 1.00001e-4)) is not None
    grid = SearchDimension(low=1000, high=1001, step=0.25)
    assert format_value(grid, 1000.75) == "1000.75"  # 4 digits would fall off the grid
    assert format_value(SearchDimension(low=1, high=8), 7) == "7"
    assert format_value(SearchDimension(choices=[True, 3, "x"]), True) == "true"


# -- check() and iteration 1 ----------------------------------------------------------------


def test_check_names_every_way_forward_when_iteration_1_has_nothing(tmp_path: Path) -> None:
    with pytest.raises(PlanError) as info:
        SearchPlanner(_loaded(tmp_path)).check()
    text = str(info.value)
    assert "no 'arms', no 'factors' and no 'search.space'" in text
    assert "factors:" in text and "search:" in text and "llm:" in text and "RATIOCINATOR_LLM_" in text
    SearchPlanner(_loaded(tmp_path, search={"space": SPACE})).check()  # the space alone is enough
    SearchPlanner(_loaded(tmp_path, factors={"LR": [0.01]})).check()
    with pytest.raises(PlanError, match="baseline 'base' names an arm, but the spec has no arms"):
        SearchPlanner(_loaded(tmp_path, search={"space": SPACE}, baseline="base")).check()


def test_iteration_1_runs_the_spec_factors(tmp_path: Path) -> None:
    loaded = _loaded(tmp_path, factors={"LR": [0.001, 0.01], "ARCH": ["gcn", "gat"]}, search={"space": SPACE})
    study = _study(tmp_path, [], "none")
    decision = SearchPlanner(loaded).next_iteration(_context(study, 1, _knobs("LR", "LAYERS", "ARCH")))
    assert decision.plan == plan_iteration(loaded)


def test_iteration_1_samples_the_space_when_the_spec_has_no_arms(tmp_path: Path) -> None:
    loaded = _loaded(tmp_path, search={"space": SPACE, "arms_per_iteration": 5})
    study = _study(tmp_path, [], "none")
    decision = SearchPlanner(loaded).next_iteration(_context(study, 1, _knobs("LR", "LAYERS", "ARCH")))
    plan = decision.plan
    assert plan is not None and decision.record["mode"] == "random startup"
    assert len(plan.arms) == 5 and plan.replicates == 3 and plan.n_runs == 15 and not plan.arm_replicates
    assert plan.baseline == plan.arms[0].name
    space = loaded.spec.search.space  # type: ignore[union-attr]
    for arm in plan.arms:
        assert list(arm.env) == ["LR", "LAYERS", "ARCH"] and arm.name == factor_arm_name(arm.env)
        assert all(space[k].value_of(v) is not None for k, v in arm.env.items())
    assert len({tuple(a.env.items()) for a in plan.arms}) == 5


def test_no_search_section_stops_after_iteration_1(tmp_path: Path) -> None:
    loaded = _loaded(tmp_path, factors={"LR": [0.001, 0.01]})
    study = _study(tmp_path, PlantedStudy.grid(LR=["0.001", "0.01"]), "LR=0.001")
    study.plant({"LR=0.001": [0.5], "LR=0.01": [0.6]}, curves=False)
    planner = SearchPlanner(loaded)
    assert planner.next_iteration(_context(study, 1, _knobs("LR"))).plan == plan_iteration(loaded)
    decision = planner.next_iteration(_context(study, 2, _knobs("LR")))
    assert decision.plan is None and decision.reason == NO_SPACE
    assert "add `search.space` or configure an LLM planner" in decision.reason


# -- warm start and proposals ---------------------------------------------------------------


def _grid_study(tmp_path: Path) -> PlantedStudy:
    """A 2 × 2 grid (with OPT=adam outside the space) and its planted results."""
    arms = [PlannedArm(a.name, {**a.env, "OPT": "adam"}, factors=a.factors)
            for a in PlantedStudy.grid(LR=["0.001", "0.01"], ARCH=["gcn", "gat"])]
    study = _study(tmp_path, arms, "LR=0.001,ARCH=gcn")
    study.plant({"LR=0.001,ARCH=gcn": [0.50, 0.52, 0.54], "LR=0.001,ARCH=gat": [0.60, 0.62, 0.64],
                 "LR=0.01,ARCH=gcn": [0.70, 0.72, 0.74], "LR=0.01,ARCH=gat": [0.80, 0.82, 0.84]}, curves=False)
    return study


def test_warm_start_trials_are_the_ledger_arms_and_their_means(tmp_path: Path) -> None:
    space = {"LR": SPACE["LR"], "ARCH": SPACE["ARCH"], "LAYERS": SPACE["LAYERS"]}
    loaded = _loaded(tmp_path, factors={"LR": [0.001, 0.01], "ARCH": ["gcn", "gat"]}, search={"space": space})
    study = _grid_study(tmp_path)
    _add_arms(study, 2, [
        PlannedArm("crashes", {"LR": "0.05", "ARCH": "gin", "OPT": "adam", "LAYERS": "4"}),
        PlannedArm("nan", {"LR": "0.09", "ARCH": "gin", "OPT": "adam", "LAYERS": "4"}),
        PlannedArm("too-fast", {"LR": "0.5", "ARCH": "gin", "OPT": "adam"}),
        PlannedArm("sgd", {"LR": "0.01", "ARCH": "gin", "OPT": "sgd"}),
        PlannedArm("deep", {"LR": "0.02", "ARCH": "sage", "OPT": "adam", "LAYERS": "6"}),
    ])
    study.run("crashes", status="failed", failure="crash", final={})
    study.run("nan", final={"acc": float("nan")})
    study.plant({"deep": [0.9, 0.7], "sgd": [0.1]}, curves=False)
    # The runner's code shows LAYERS' default, so arms that leave it unset still lie in the space.
    (tmp_path / "train.py").write_text(textwrap.dedent("""\
        import os
        lr = float(os.environ["LR"])
        arch = os.environ.get("ARCH", "gcn")
        opt = os.environ.get("OPT", "adam")
        layers = int(os.environ.get("LAYERS", "2"))
    """))
    knobs = discover_knobs(tmp_path, "train.py")
    decision = SearchPlanner(loaded).next_iteration(_context(study, 2, knobs))
    warm = {t["arm"]: t for t in decision.record["warm_start"]}
    assert {name: t["value"] for name, t in warm.items()} == pytest.approx({
        "LR=0.001,ARCH=gcn": 0.52, "LR=0.001,ARCH=gat": 0.62, "LR=0.01,ARCH=gcn": 0.72, "LR=0.01,ARCH=gat": 0.82,
        "crashes": None, "nan": None, "deep": 0.8,
    })
    assert warm["LR=0.01,ARCH=gat"]["params"] == {"LR": 0.01, "ARCH": "gat", "LAYERS": 2}
    assert warm["LR=0.01,ARCH=gat"]["runner_defaults"] == {"LAYERS": "2"} and warm["deep"]["runner_defaults"] == {}
    assert warm["deep"]["n"] == 2 and warm["crashes"]["state"].startswith("fail") and warm["nan"]["n"] == 0
    skipped = {s["arm"]: s["why"] for s in decision.record["skipped"]}
    assert skipped == {"too-fast": "LR=0.5 is outside the space (a number in [0.0001, 0.1] (log scale))",
                       "sgd": "sets knobs or flags outside the space to other values than the baseline"}
    assert decision.record["mode"] == "tpe"  # 6 usable trials ≥ arms_per_iteration


def test_proposals_lie_in_the_space_are_new_and_carry_the_baseline_knobs(tmp_path: Path) -> None:
    loaded = _loaded(tmp_path, factors={"LR": [0.001, 0.01], "ARCH": ["gcn", "gat"]},
                     search={"space": SPACE, "arms_per_iteration": 6, "confirm_replicates": 0})
    study = _grid_study(tmp_path)
    knobs = _knobs("LR", "LAYERS", "ARCH", "OPT", defaults={"LAYERS": "2"})
    decision = SearchPlanner(loaded).next_iteration(_context(study, 2, knobs))
    plan = decision.plan
    assert plan is not None and plan.baseline == "LR=0.001,ARCH=gcn" and not plan.arm_replicates
    assert len(plan.arms) == 6 and plan.n_runs == 18
    existing = {a.name: a.env for a in study.ledger.arms(study.id)}
    space = loaded.spec.search.space  # type: ignore[union-attr]
    for arm in plan.arms:
        levels = {k: arm.env[k] for k in space}
        assert arm.name == factor_arm_name(levels) and arm.env["OPT"] == "adam" and arm.factors == {}
        assert all(space[k].value_of(v) is not None for k, v in levels.items())
        assert arm.name not in existing and arm.env not in existing.values()
    assert len({a.name for a in plan.arms}) == 6
    assert [p["arm"] for p in decision.record["proposed"]] == [a.name for a in plan.arms]


def test_same_ledger_and_seed_give_the_same_proposals(tmp_path: Path) -> None:
    study = _grid_study(tmp_path)
    knobs = _knobs("LR", "LAYERS", "ARCH", "OPT", defaults={"LAYERS": "2"})

    def proposals(seed: int) -> list[tuple[str, dict[str, str]]]:
        loaded = _loaded(tmp_path, factors={"LR": [0.001, 0.01], "ARCH": ["gcn", "gat"]},
                         search={"space": SPACE, "seed": seed})
        plan = SearchPlanner(loaded).next_iteration(_context(study, 2, knobs)).plan
        assert plan is not None
        return [(a.name, a.env) for a in plan.arms]

    first = proposals(7)
    assert proposals(7) == first
    assert proposals(8) != first


def test_duplicates_are_skipped_and_an_exhausted_space_stops(tmp_path: Path) -> None:
    loaded = _loaded(tmp_path, factors={"ARCH": ["gcn", "gat"]},
                     search={"space": {"ARCH": {"choices": ["gcn", "gat", "gin"]}}, "confirm_replicates": 0})
    study = _study(tmp_path, PlantedStudy.grid(ARCH=["gcn", "gat"]), "ARCH=gcn")
    study.plant({"ARCH=gcn": [0.5, 0.5, 0.5], "ARCH=gat": [0.6, 0.6, 0.6]}, curves=False)
    decision = SearchPlanner(loaded).next_iteration(_context(study, 2, _knobs("ARCH")))
    assert decision.plan is not None and [a.name for a in decision.plan.arms] == ["ARCH=gin"]
    assert decision.record["duplicates"] > 0  # the other choices were asked, told pruned, and passed over
    _add_arms(study, 2, list(decision.plan.arms))
    study.plant({"ARCH=gin": [0.4, 0.4, 0.4]}, curves=False)
    decision = SearchPlanner(loaded).next_iteration(_context(study, 3, _knobs("ARCH")))
    assert decision.plan is None
    assert "found no configuration the ledger does not already hold" in decision.reason
    assert "no arm needs confirmation replicates" in decision.reason


def test_tpe_concentrates_where_the_goal_peaks(tmp_path: Path) -> None:
    """24 arms spread over LR in [1e-5, 1] (log), goal peaking at LR = 0.01: TPE proposes near it."""
    lrs = [f"{10 ** (-5 + 5 * i / 23):.4g}" for i in range(24)]
    arms = PlantedStudy.arms(**{f"LR={v}": {"LR": v} for v in lrs})
    study = _study(tmp_path, arms, arms[0].name)
    study.plant({a.name: [1 - (math.log10(float(a.env["LR"])) + 2) ** 2 / 10] for a in arms}, curves=False)
    tpe: list[float] = []
    rnd: list[float] = []
    for seed in range(3):
        loaded = _loaded(tmp_path, search={"space": {"LR": {"low": 1e-5, "high": 1.0, "log": True}},
                                           "arms_per_iteration": 8, "seed": seed, "confirm_replicates": 0})
        decision = SearchPlanner(loaded).next_iteration(_context(study, 2, _knobs("LR")))
        assert decision.plan is not None and decision.record["mode"] == "tpe" and len(decision.plan.arms) == 8
        tpe += [abs(math.log10(float(a.env["LR"])) + 2) for a in decision.plan.arms]
        sampler = optuna.samplers.RandomSampler(seed=decision.record["sampler_seed"])
        random_study = optuna.create_study(sampler=sampler)
        dist = {"LR": distribution(loaded.spec.search.space["LR"])}  # type: ignore[union-attr]
        rnd += [abs(math.log10(random_study.ask(dist).params["LR"]) + 2) for _ in range(8)]
    # Log-uniform sampling puts the median distance near 1.25 decades; TPE well under half a decade.
    assert statistics.median(tpe) < 0.5
    assert statistics.median(tpe) < statistics.median(rnd) / 2


# -- confirmation ---------------------------------------------------------------------------


@pytest.mark.parametrize("maximize", [True, False])
def test_best_arm_gets_confirmation_replicates_once(tmp_path: Path, maximize: bool) -> None:
    loaded = _loaded(tmp_path, maximize=maximize, factors={"LR": [0.001, 0.01, 0.1]}, search={"space": SPACE})
    study = _study(tmp_path, PlantedStudy.grid(LR=["0.001", "0.01", "0.1"]), "LR=0.001")
    study.plant({"LR=0.001": [0.5, 0.5, 0.5], "LR=0.01": [0.9, 0.9, 0.9], "LR=0.1": [0.1, 0.1, 0.1]}, curves=False)
    best = "LR=0.01" if maximize else "LR=0.1"
    knobs = _knobs("LR", "LAYERS", "ARCH", defaults={"LAYERS": "2", "ARCH": "gcn"})
    decision = SearchPlanner(loaded).next_iteration(_context(study, 2, knobs))
    plan = decision.plan
    assert plan is not None and plan.arm_replicates == {best: 5}
    assert plan.arms[0].name == best and plan.arms[0].env == {"LR": best.split("=")[1]}
    assert plan.n_runs == 5 + 4 * 3
    [confirm] = decision.record["confirm"]
    assert confirm["arm"] == best and confirm["from"] == 3 and confirm["to"] == 5
    assert (("highest" if maximize else "lowest") in confirm["why"]
            and f"confirmation replicate(s) of {best}" in decision.reason)
    study.plant({best: [0.9 if maximize else 0.1] * 2}, curves=False)  # replicates 3 and 4 ran
    again = SearchPlanner(loaded).next_iteration(_context(study, 3, knobs))
    assert again.plan is not None and again.plan.arm_replicates == {} and again.record["already_confirmed"] == [best]


def test_arms_without_a_finite_goal_are_never_confirmed(tmp_path: Path) -> None:
    loaded = _loaded(tmp_path, factors={"ARCH": ["gcn", "gat"]},
                     search={"space": {"ARCH": {"choices": ["gcn", "gat"]}}, "confirm_top": 2})
    study = _study(tmp_path, PlantedStudy.grid(ARCH=["gcn", "gat"]), "ARCH=gcn")
    study.plant({"ARCH=gcn": [0.5, 0.6, 0.7]}, curves=False)
    for _ in range(3):
        study.run("ARCH=gat", final={"acc": float("inf")})
    decision = SearchPlanner(loaded).next_iteration(_context(study, 2, _knobs("ARCH")))
    assert decision.plan is not None and decision.plan.arm_replicates == {"ARCH=gcn": 5}
    assert [a.name for a in decision.plan.arms] == ["ARCH=gcn"]  # nothing new left in a 2-choice space


# -- stops ----------------------------------------------------------------------------------


def test_budget_stops_or_cuts_the_proposals(tmp_path: Path) -> None:
    loaded = _loaded(tmp_path, factors={"LR": [0.001, 0.01]}, search={"space": {"LR": SPACE["LR"]}})
    study = _study(tmp_path, PlantedStudy.grid(LR=["0.001", "0.01"]), "LR=0.001")
    study.plant({"LR=0.001": [0.5, 0.5, 0.5], "LR=0.01": [0.6, 0.6, 0.6]}, curves=False)
    planner = SearchPlanner(loaded)
    # $1/h × 1 h timeout: each run may cost $1; $10 budget with $9.50 reserved leaves half a run.
    study.ledger.reserve(study.id, amount=9.5, limit=10.0, kind="compute")
    broke = planner.next_iteration(_context(study, 2, _knobs("LR"), limit=10.0, price=1.0))
    assert broke.plan is None and "cannot cover one more run" in broke.reason and "$0.5000" in broke.reason
    # $9 left: 2 confirmation replicates + 2 new arms × 3 replicates = 8 runs; a third arm is cut.
    cut = planner.next_iteration(_context(study, 2, _knobs("LR"), limit=18.5, price=1.0))
    assert cut.plan is not None and cut.plan.n_runs - 3 == 8 and len(cut.plan.arms) == 3
    assert cut.plan.arm_replicates == {"LR=0.01": 5} and len(cut.record["budget"]["dropped"]) == 2
    assert cut.record["budget"]["affordable_runs"] == 9 and "cut to fit the budget" in cut.reason
    # $1 left: no new arm fits, one confirmation replicate does.
    one = planner.next_iteration(_context(study, 2, _knobs("LR"), limit=10.5, price=1.0))
    assert one.plan is not None and one.plan.arm_replicates == {"LR=0.01": 4} and len(one.plan.arms) == 1
    # Free runs (price 0) are never cut.
    free = planner.next_iteration(_context(study, 2, _knobs("LR"), limit=0.0, price=0.0))
    assert free.plan is not None and len(free.plan.arms) == 5


def test_a_search_knob_the_runner_never_reads_stops_with_its_name(tmp_path: Path) -> None:
    loaded = _loaded(tmp_path, factors={"LR": [0.001, 0.01]}, search={"space": SPACE})
    study = _study(tmp_path, PlantedStudy.grid(LR=["0.001", "0.01"]), "LR=0.001")
    study.plant({"LR=0.001": [0.5], "LR=0.01": [0.6]}, curves=False)
    for iteration in (1, 2):
        decision = SearchPlanner(loaded).next_iteration(_context(study, iteration, _knobs("LR", "LAYERS")))
        assert decision.plan is None and decision.record["unknown_knobs"] == ["ARCH"]
        assert "search.space names ARCH, which train.py never reads" in decision.reason
        assert f"{loaded.path}:" in decision.reason and "extra_knobs" in decision.reason
    declared = _loaded(tmp_path, factors={"LR": [0.001, 0.01]}, search={"space": SPACE}, extra_knobs=["ARCH"])
    assert SearchPlanner(declared).next_iteration(_context(study, 2, _knobs("LR", "LAYERS"))).plan is not None
