"""Spec loading, error messages with lines and suggestions, and planning from specs."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import CLI, Study
from ratiocinator.errors import PlanError, SpecError
from ratiocinator.planning.plan import plan_iteration
from ratiocinator.spec.models import load_spec

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "specs" / "gnn_generation.yaml"

MINIMAL = """\
topic: t
goal_metric: acc
maximize: true
repo_url: .
runner_script: run.sh
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_seed_spec_loads_unchanged_with_every_field() -> None:
    loaded = load_spec(SEED)
    s = loaded.spec
    assert s.goal_metric == "syntactic_validity_pct" and s.maximize is True
    assert s.hardware.gpu == "RTX 4090" and s.hardware.min_cuda_version == "12.0" and s.hardware.max_dph == 0.40
    assert s.deps.exclude_from_requirements == ["torch", "torchvision", "torch_geometric"]
    assert s.metrics.json_prefix == "METRICS:" and s.max_iterations == 2 and s.max_dollars == 15.0
    assert s.paper_title.startswith("What Graph Neural Networks")
    assert loaded.name == "gnn_generation"


@pytest.mark.subprocess
def test_validate_seed_spec_exits_0_and_reports_every_hardware_field() -> None:
    done = subprocess.run([*CLI, "validate", str(SEED)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "valid spec 'gnn_generation'" in done.stdout
    assert "maximize syntactic_validity_pct" in done.stdout
    for field in ("gpu", "num_gpus", "min_cuda_version", "min_cpu_ram_gb", "disk_gb", "min_inet_down", "image",
                  "max_dph"):
        assert field in done.stdout, field
    assert "not applicable" in done.stdout
    assert "no arms or factors yet" in done.stdout


@pytest.mark.subprocess
def test_typo_key_names_file_line_and_nearest_key(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + "hardware:\n  num_gpu: 1\nmax_dolars: 3\n")
    done = subprocess.run([*CLI, "validate", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"{path}:7: unknown key 'hardware.num_gpu' — did you mean 'num_gpus'?" in done.stderr
    assert f"{path}:8: unknown key 'max_dolars' — did you mean 'max_dollars'?" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("extra", "line", "expected"),
    [
        ("max_dollars: lots\n", 6, "'max_dollars': input should be a valid number"),
        ("replicates: 0\n", 6, "'replicates': input should be greater than or equal to 1"),
        ("metrics:\n  protocol: csv\n", 7, "'metrics.protocol': input should be 'json_line', 'key_value' or 'regex'"),
        ("hardware:\n  min_cuda_version: twelve\n", 7, "expected a version like 12.0"),
        ("factors:\n  LR: []\n", 6, "factor 'LR' has no values"),
        ("arms:\n  - name: a\n    env: {RATIOCINATOR_SEED: 1}\n", 8, "set by Ratiocinator itself"),
        ("metrics:\n  protocol: regex\n  patterns: {acc: 'no group'}\n", 6, "exactly one (group)"),
    ],
)
def test_bad_values_name_the_line_and_expected_form(tmp_path: Path, extra: str, line: int, expected: str) -> None:
    path = _write(tmp_path, MINIMAL + extra)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert expected in message
    assert f"{path}:{line}" in message


def test_missing_required_key_and_duplicate_key(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="missing required key 'maximize'"):
        load_spec(_write(tmp_path, MINIMAL.replace("maximize: true\n", "")))
    with pytest.raises(SpecError, match=r"spec.yaml:6: duplicate key 'topic' \(first defined on line 1\)"):
        load_spec(_write(tmp_path, MINIMAL + "topic: again\n"))


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="spec.yaml:2: not valid YAML"):
        load_spec(_write(tmp_path, "topic: [unclosed\nx: 1\n"))
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_grid_and_ablation_expansion(tmp_path: Path) -> None:
    grid = load_spec(_write(tmp_path, MINIMAL + "factors:\n  A: [1, 2]\n  B: [x, y, z]\nbaseline: {A: 2, B: y}\n"))
    plan = plan_iteration(grid)
    assert [a.name for a in plan.arms] == ["A=1,B=x", "A=1,B=y", "A=1,B=z", "A=2,B=x", "A=2,B=y", "A=2,B=z"]
    assert plan.baseline == "A=2,B=y" and plan.arm("A=1,B=z").env == {"A": "1", "B": "z"}
    assert len(plan.runs()) == 18 and {r.seed for r in plan.runs()} == {0, 1, 2}
    ablation = load_spec(_write(tmp_path,
                                MINIMAL + "factors:\n  A: [1, 2, 3]\n  B: [x, y]\ndesign: ablation\nbaseline: {A: 1, B:"
                                          " x}\nreplicates: 2\n"))
    plan = plan_iteration(ablation)
    assert [a.name for a in plan.arms] == ["A=1,B=x", "A=2,B=x", "A=3,B=x", "A=1,B=y"]
    assert plan.baseline == "A=1,B=x" and len(plan.runs()) == 8


def test_plan_errors_for_no_arms_duplicates_and_bad_baseline(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="defines no arms") as info:
        plan_iteration(load_spec(_write(tmp_path, MINIMAL)))
    assert "factors:" in str(info.value)  # says how to add them
    with pytest.raises(PlanError, match="set exactly the same knobs"):
        plan_iteration(load_spec(_write(tmp_path,
                                        MINIMAL + "arms:\n  - {name: a, env: {X: 1}}\n  - {name: b, env: {X: '1'}}\n")))
    with pytest.raises(PlanError, match="used twice"):
        plan_iteration(load_spec(_write(tmp_path,
                                        MINIMAL + "arms:\n  - {name: a, env: {X: 1}}\n  - {name: a, env: {X: 2}}\n")))
    with pytest.raises(PlanError, match="baseline 'zzz' is not an arm name"):
        plan_iteration(load_spec(_write(tmp_path, MINIMAL + "arms:\n  - {name: a}\nbaseline: zzz\n")))
    with pytest.raises(SpecError, match="not one of the factor's values"):
        load_spec(_write(tmp_path, MINIMAL + "factors: {A: [1, 2]}\nbaseline: {A: 3}\n"))


@pytest.mark.subprocess
def test_seed_spec_plan_says_how_to_add_arms(tmp_path: Path) -> None:
    done = subprocess.run([*CLI, "--home", str(tmp_path), "plan", str(SEED)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "defines no arms" in done.stderr and "factors:" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.subprocess
def test_plan_json_lists_runs_knobs_commit_and_worst_case(study: Study) -> None:
    study.commit({"run.sh": "#!/usr/bin/env bash\necho \"METRICS: {\\\"score\\\": ${LR:-1}}\"\n"})
    spec = study.spec(factors={"LR": [0.1, 0.2]}, replicates=3, train_timeout_s=600,
                      hardware={"price_per_hour": 0.5}, max_dollars=1)
    done = study.cli("plan", str(spec), "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["commit"] == study.repo.head() and plan["runs"] == 6 and plan["arms"][0]["env"] == {"LR": "0.1"}
    assert plan["worst_case_dollars"] == pytest.approx(6 * 0.5 * 600 / 3600)
    assert plan["ignored_knobs"] == []
    assert not (study.home / "ledger.db").exists()  # planning runs nothing and records nothing
    human = study.cli("plan", str(spec))
    assert "2 arms × 3 replicates = 6 runs" in human.stdout and "worst case $0.5000" in human.stdout


@pytest.mark.subprocess
def test_knobs_command_lists_defaults_and_sources(study: Study) -> None:
    study.commit({
        "run.sh": "#!/usr/bin/env bash\nLR=\"${LR:-0.01}\"\npython3 train.py --epochs 3\n",
        "train.py": "import os, argparse\np = argparse.ArgumentParser()\np.add_argument('--epochs', type=int,"
                    " default=5)\n"
                    "depth = int(os.environ.get('DEPTH', '2'))\n",
    })
    done = study.cli("knobs", str(study.spec()))
    assert done.returncode == 0, done.stderr
    for text in ("LR", "0.01", "run.sh:2", "DEPTH", "train.py:4", "--epochs", "5"):
        assert text in done.stdout, text
