"""The parts behind a friction-free first study, in process: constants in plans, knob-name
abbreviations, the order of metrics, advice on deps paths, and what differs from the commit."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from rich.console import Console

from gitrepo import GitRepo
from ratiocinator.cli import metric_order
from ratiocinator.errors import SpecError
from ratiocinator.planning.plan import Plan, PlannedArm, did_you_mean, own_knobs, plan_iteration, with_constants
from ratiocinator.repo.workspace import uncommitted_changes
from ratiocinator.spec.advice import absolute_deps_paths
from ratiocinator.spec.models import load_spec
from ratiocinator.text_tables import KnobAbbreviations, fitted_table


def _spec(tmp_path: Path, **fields: object) -> Path:
    data: dict[str, object] = {"topic": "t", "goal_metric": "loss", "maximize": False, "repo_url": ".",
                               "runner_script": "run.sh", **fields}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_constants_join_every_arm_under_its_own_knobs_and_stay_out_of_names(tmp_path: Path) -> None:
    loaded = load_spec(_spec(tmp_path, env={"EPOCHS": 5, "SLEEP_S": "0.1"}, factors={"X": [1, 2]},
                             arms=[{"name": "long", "env": {"EPOCHS": 50}}]))
    plan = plan_iteration(loaded)
    assert [a.name for a in plan.arms] == ["long", "X=1", "X=2"]
    assert plan.arm("long").env == {"EPOCHS": "50", "SLEEP_S": "0.1"}  # the arm's own value wins
    assert plan.arm("X=2").env == {"EPOCHS": "5", "SLEEP_S": "0.1", "X": "2"}
    assert plan.arm("X=2").factors == {"X": "2"}
    assert own_knobs(plan.arm("X=2"), loaded.spec) == {"X": "2"}
    assert own_knobs(plan.arm("long"), loaded.spec) == {"EPOCHS": "50"}
    assert with_constants(plan.arms, loaded.spec) == plan.arms  # idempotent: a recorded plan reads back the same


def test_a_planner_arm_gets_the_constants_too(tmp_path: Path) -> None:
    loaded = load_spec(_spec(tmp_path, env={"EPOCHS": 5}, factors={"X": [1]}))
    proposed = Plan((PlannedArm("LR=0.1", {"LR": "0.1"}),), "LR=0.1", 1)
    assert with_constants(proposed.arms, loaded.spec)[0].env == {"EPOCHS": "5", "LR": "0.1"}


@pytest.mark.parametrize(("fields", "message"), [
    ({"env": {"X": 1}, "factors": {"X": [1, 2]}}, "X is both a constant (env) and a factor"),
    ({"env": {"SEED": 1}, "seed_env": "SEED", "factors": {"X": [1]}}, "seed_env 'SEED' is set per replicate"),
    ({"env": {"RATIOCINATOR_TRIAL": 1}, "factors": {"X": [1]}}, "set by Ratiocinator itself"),
    ({"env": {"LR": 0.1}, "factors": {"X": [1]}, "search": {"space": {"LR": {"low": 0.01, "high": 1.0}}}},
     "LR is both a constant (env) and a search knob"),
])
def test_constants_that_would_be_overridden_or_reserved_are_refused(tmp_path: Path, fields: dict,
                                                                    message: str) -> None:
    with pytest.raises(SpecError) as caught:
        load_spec(_spec(tmp_path, **fields))
    assert message in str(caught.value)


def test_knob_names_are_abbreviated_uniquely_and_consistently() -> None:
    names = ["CONV_TYPE=SAGE,HIDDEN_DIM=128,LR=0.1", "CONV_TIME=3,HIDDEN_DIM=256,DROPOUT=0.5", "HD=1"]
    abbreviations = KnobAbbreviations.of(names)
    shorts = abbreviations.short_of
    assert "LR" not in shorts and "HD" not in shorts  # short names stay, and stay unique
    assert shorts["HIDDEN_DIM"] != "HD" and shorts["HIDDEN_DIM"].startswith("HD")
    assert shorts["CONV_TYPE"] != shorts["CONV_TIME"] and shorts["DROPOUT"] == "DRO"
    assert len(set(shorts.values())) == len(shorts)
    assert abbreviations.short("CONV_TYPE=SAGE MY_CONV_TYPE=1") == f"{shorts['CONV_TYPE']}=SAGE MY_CONV_TYPE=1"
    assert "DRO = DROPOUT" in abbreviations.legend()


def test_a_table_is_abbreviated_only_when_it_would_not_fit() -> None:
    from rich.table import Table

    arms = ["CONV_TYPE=SAGE,HIDDEN_DIM=128,LOSS_FUNCTION=cross_entropy",
            "CONV_TYPE=SAGE,HIDDEN_DIM=128,LOSS_FUNCTION=mse"]

    def build(label):  # type: ignore[no-untyped-def]
        table = Table(box=None)
        table.add_column("arm", overflow="fold")
        table.add_column("runs")
        for arm in arms:
            table.add_row(label(arm), "3")
        return table

    narrow = Console(width=40, record=True)
    table, legend = fitted_table(narrow, build, arms)
    narrow.print(table)
    screen = narrow.export_text()
    assert "CT=SAGE,HD=128,LF=mse" in screen.replace("\n", "") and "…" not in screen
    assert legend is not None and "LF = LOSS_FUNCTION" in legend
    roomy = Console(width=200)
    assert fitted_table(roomy, build, arms)[1] is None
    assert fitted_table(narrow, build, arms, wide=True)[1] is None


def test_the_goal_comes_first_then_its_relatives() -> None:
    names = {"aaa", "epoch", "train_loss", "val_loss", "val_r2", "lr"}
    assert metric_order(names, "val_r2") == ["val_r2", "val_loss", "aaa", "epoch", "lr", "train_loss"]
    assert metric_order(names, None) == sorted(names)


def test_did_you_mean_ignores_case_and_stays_quiet_when_nothing_is_near() -> None:
    assert did_you_mean("WIDHT", ["DEPTH", "WIDTH"]) == " — did you mean WIDTH?"
    assert did_you_mean("width", ["WIDTH"]) == " — did you mean WIDTH?"
    assert did_you_mean("OPTIMIZER", ["DEPTH", "WIDTH"]) == ""


def test_deps_lines_naming_paths_outside_the_checkout_are_flagged_with_their_line(tmp_path: Path) -> None:
    loaded = load_spec(_spec(tmp_path, factors={"X": [1]}, deps={
        "pre_install": ["apt-get install -y git-lfs > /dev/null 2>&1 || true",
                        "cd /workspace/experiment && git lfs pull",
                        "pip install torch-scatter -f https://data.pyg.org/whl/torch-2.7.0+cu128.html",
                        "cd \"$RATIOCINATOR_WORKSPACE\" && ls /usr/lib"],
        "verify": "python /root/check.py --data=/data/set"}))
    warnings = absolute_deps_paths(loaded)
    assert len(warnings) == 2
    assert "deps.pre_install[1] names /workspace/experiment" in warnings[0]
    assert f"{loaded.path}:" in warnings[0] and "$RATIOCINATOR_WORKSPACE" in warnings[0]
    assert "deps.verify names /root/check.py, /data/set" in warnings[1]


def test_uncommitted_changes_are_those_of_the_commit_that_will_run(tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "repo")
    head = repo.commit({"train.py": "print(1)\n", "spec.yaml": "x: 1\n", "notes/a.md": "a\n"})
    assert uncommitted_changes(str(repo.path), "HEAD") == (head, [])
    (repo.path / "train.py").write_text("print(2)\n")
    (repo.path / "spec.yaml").write_text("x: 2\n")
    (repo.path / "new.py").write_text("\n")
    (repo.path / ".ratiocinator").mkdir()
    (repo.path / ".ratiocinator" / "ledger.db").write_text("")
    commit, files = uncommitted_changes(str(repo.path), "main",
                                        ignore=(repo.path / "spec.yaml", repo.path / ".ratiocinator"))
    assert commit == head and files == ["new.py", "train.py"]
    repo.git("checkout", "--quiet", "-b", "other")
    repo.commit({"other.py": "\n"})
    assert uncommitted_changes(str(repo.path), "main") == (None, [])  # main is not what is checked out
    assert uncommitted_changes("https://example.com/repo.git", "HEAD") == (None, [])
