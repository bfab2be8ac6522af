"""The research loop without an LLM: iteration 1 from the spec, later iterations from TPE over search.space."""

from __future__ import annotations

import json
import math

import pytest

from conftest import Study

pytestmark = pytest.mark.subprocess

RUNNER = '''
import json
import math
import os

lr = float(os.environ.get("LR", "0.001"))
seed = int(os.environ["RATIOCINATOR_SEED"])
print("METRICS: " + json.dumps({"score": 1.0 - (math.log10(lr) + 2.0) ** 2 / 10 + seed * 1e-3}))
'''


def test_a_search_space_drives_later_iterations_and_the_paper_says_how(study: Study) -> None:
    study.commit({"run.py": RUNNER}, executable=())
    spec = study.spec(runner_script="run.py", factors={"LR": [0.0001, 0.1]}, replicates=2, max_iterations=2,
                      search={"space": {"LR": {"low": 0.0001, "high": 1.0, "log": True}}, "arms_per_iteration": 2,
                              "confirm_top": 1, "confirm_replicates": 1, "seed": 3})
    plan = study.cli("plan", str(spec), "--json")
    assert plan.returncode == 0 and [a["name"] for a in json.loads(plan.stdout)["arms"]] == ["LR=0.0001", "LR=0.1"]
    done = study.cli("research", str(spec), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    arms = ledger.arms(exp.id)
    assert [a.iteration for a in arms] == [1, 1, 2, 2]
    new = [a for a in arms if a.iteration == 2]
    assert all(1e-4 <= float(a.env["LR"]) <= 1.0 for a in new) and all(a.name == f"LR={a.env['LR']}" for a in new)
    decisions = [e for e in ledger.events(exp.id) if e["kind"] == "decision"]
    assert [d["data"]["planner"] for d in decisions] == ["search", "search"]
    record = decisions[1]["data"]["record"]
    assert sorted(t["arm"] for t in record["warm_start"]) == ["LR=0.0001", "LR=0.1"]
    # the better of the two first arms (the one nearer 0.01 in log space) got one confirmation replicate
    best = min(("LR=0.0001", "LR=0.1"), key=lambda name: abs(math.log10(float(name[3:])) + 2))
    assert sorted(r.replicate for r in ledger.runs(exp.id) if r.arm == best) == [0, 1, 2]
    paper = (study.home / "reports" / exp.id / "paper.md").read_text()
    assert "How the arms were chosen" in paper and "Iteration 2 (search)" in paper
