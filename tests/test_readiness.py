"""`ratiocinator check` and the review at the start of `research`: every finding with its evidence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import Study
from llmserver import LlmServer, Reply

pytestmark = pytest.mark.subprocess

CLEAN_RUNNER = "#!/usr/bin/env bash\nexec python3 train.py\n"

CLEAN_TRAIN = '''
import os


def main():
    lr = float(os.environ.get("LR", "0.1"))  # TODO: a schedule
    with open(os.path.join(os.environ["RATIOCINATOR_OUT_DIR"], "trial.txt"), "w") as fh:
        fh.write(os.environ["RATIOCINATOR_TRIAL"])
    print(f'METRICS: {{"loss": {1.0 / lr}}}')


main()
'''

# WD is read (so knob discovery accepts it) but never reaches the computation.
UNUSED_KNOB_TRAIN = '''
import os


def main():
    lr = float(os.environ.get("LR", "0.1"))
    weight_decay = float(os.environ.get("WD", "0.0"))
    print("config", lr, weight_decay)
    for step in range(3):
        print(f'METRICS: {{"step": {step}, "loss": {1.0 / lr + step}}}')


main()
'''


def _check(study: Study, spec: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict]:
    done = study.cli("check", str(spec), "--json", *args, env=env, timeout=240)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    return done.returncode, json.loads(done.stdout)


def _checks(result: dict) -> dict[str, dict]:
    return {c["name"]: c for c in result["checks"]}


def test_static_problems_are_each_found_with_file_line_and_source(study: Study) -> None:
    study.commit({
        "run.sh": CLEAN_RUNNER,
        "train.py": "import os\nfrom model import build\nfrom utils import augment\n\nLR = os.environ.get('LR',"
                    " '0.1')\nbuild(augment(LR))\n",
        "model.py": "def build(x):\n    layers = [x,\n    return layers\n",
        "utils.py": "def augment(x):\n    pass\n\n\ndef schedule(step):\n    # ... rest of the code omitted for"
                    " brevity\n    return step\n",
    })
    spec = study.spec(arms=[{"name": "a", "env": {"LR": 0.1}}, {"name": "b", "env": {"LR": 0.2, "MOMENTUM": 0.9}}])
    code, result = _check(study, spec)
    assert code == 1 and result["is_code_ready"] is False
    checks = _checks(result)
    (syntax,) = checks["syntax"]["evidence"]
    assert syntax["file"] == "model.py" and syntax["line"] == 2 and syntax["kind"] == "syntax_error"
    assert checks["syntax"]["status"] == "failed" and "model.py:2" in result["code_issue"]
    holes = {(e["file"], e["line"]) for e in checks["placeholders"]["evidence"]}
    assert ("utils.py", 1) in holes and ("utils.py", 6) in holes and checks["placeholders"]["status"] == "failed"
    (ignored,) = checks["knobs"]["evidence"]
    assert ignored["arm"] == "b" and ignored["knob"] == "MOMENTUM" and checks["knobs"]["status"] == "failed"
    assert checks["smoke"]["status"] == "skipped" and "syntax" in checks["smoke"]["summary"]
    assert checks["runner"]["status"] == "passed" and checks["lfs"]["status"] == "passed"
    assert checks["llm_review"]["status"] == "skipped"

    human = study.cli("check", str(spec))
    assert human.returncode == 1 and "not ready" in human.stdout
    assert "model.py:2" in human.stdout and "layers = [x," in human.stdout and "MOMENTUM" in human.stdout


def test_a_knob_that_changes_nothing_is_caught_by_the_smoke_runs(study: Study) -> None:
    study.commit({"run.sh": CLEAN_RUNNER, "train.py": UNUSED_KNOB_TRAIN})
    spec = study.spec(goal_metric="loss", maximize=False, factors={"LR": [0.1, 0.5], "WD": [0.0, 0.01]})
    code, result = _check(study, spec)
    assert code == 1
    checks = _checks(result)
    assert checks["smoke"]["status"] == "passed" and len(checks["smoke"]["evidence"]) == 4
    cross = checks["cross_arm"]
    assert cross["status"] == "failed" and "knob WD changes nothing" in cross["summary"]
    (finding,) = cross["evidence"]
    # 3 loss points ("step" is their step index, not a metric)
    assert finding["knobs"] == ["WD"] and finding["points"] == 3 and len(finding["identical_arms"]) == 2
    assert finding["logs_identical"] is False  # the runner prints the value it ignores

    allowed = study.spec(goal_metric="loss", maximize=False, factors={"LR": [0.1, 0.5], "WD": [0.0, 0.01]},
                         check={"allow_unchanged_knobs": ["WD"]})
    code, result = _check(study, allowed)
    assert code == 0 and _checks(result)["cross_arm"]["status"] == "passed"


def test_clean_code_is_ready_and_smoke_runs_are_in_trial_mode(study: Study) -> None:
    study.commit({"run.sh": CLEAN_RUNNER, "train.py": CLEAN_TRAIN})
    spec = study.spec(goal_metric="loss", maximize=False, factors={"LR": [0.1, 0.5]})
    code, result = _check(study, spec)
    assert code == 0, result
    assert result["is_code_ready"] is True and result["code_issue"] == "" and len(result["commit"]) == 40
    statuses = {c["name"]: c["status"] for c in result["checks"]}
    # a TODO in a body is a note worth showing, not missing code: a warning that does not block
    assert statuses == {"runner": "passed", "syntax": "passed", "placeholders": "warning", "requirements": "skipped",
                        "lfs": "passed", "knobs": "passed", "seed": "warning", "smoke": "passed",
                        "cross_arm": "passed", "trial": "passed", "llm_review": "skipped"}
    # train.py reads neither a seed knob nor RATIOCINATOR_SEED: replicates are not seeded, and the review says so
    assert _checks(result)["seed"]["summary"].startswith("runs are not seeded; replicates measure run-to-run noise;"
                                                         " no run can be reproduced exactly")
    for arm in _checks(result)["smoke"]["evidence"]:
        assert arm["class"] is None and Path(arm["log_dir"], "out", "trial.txt").read_text() == "1"
    assert not (study.home / "ledger.db").exists() or not study.ledger().experiments()  # check records nothing


def test_a_crashing_or_slow_trial_run_fails_the_smoke_check_with_its_class(study: Study) -> None:
    study.commit({"run.sh": "#!/usr/bin/env bash\nif [ \"$MODE\" = slow ]; then sleep 30; fi\nexec python3 -c 'import"
                            " torchvision_missing_xyz'\n"})
    spec = study.spec(arms=[{"name": "crash", "env": {"MODE": "crash"}}, {"name": "slow", "env": {"MODE": "slow"}}],
                      check={"smoke_timeout_s": 1.5}, concurrency=2)
    code, result = _check(study, spec)
    assert code == 1
    arms = {e["arm"]: e for e in _checks(result)["smoke"]["evidence"]}
    assert arms["crash"]["class"] == "missing_dependency"
    assert any("torchvision_missing_xyz" in line for line in arms["crash"]["evidence"])
    assert arms["slow"]["class"] == "timeout" and "smoke_timeout_s" in arms["slow"]["reason"]


def _llm_env(server: LlmServer) -> dict[str, str]:
    return {"RATIOCINATOR_LLM_PROVIDER": "openai", "RATIOCINATOR_LLM_MODEL": "reviewer-1",
            "RATIOCINATOR_LLM_BASE_URL": server.base_url("openai"), "RATIOCINATOR_LLM_BACKOFF_S": "0.01"}


def test_an_llm_claiming_a_syntax_error_in_valid_code_is_refuted(study: Study) -> None:
    study.commit({"run.sh": CLEAN_RUNNER, "train.py": CLEAN_TRAIN})
    spec = study.spec(goal_metric="loss", maximize=False, arms=[{"name": "a", "env": {"LR": 0.1}}])
    review = {"is_code_ready": False, "code_issue": "train.py does not parse", "claims": [
        {"kind": "syntax_error", "file": "train.py", "line": 5, "description": "unbalanced parenthesis on line 5"},
        {"kind": "missing_function", "name": "main", "description": "main() is called but never defined"},
    ]}
    with LlmServer() as server:
        server.script(Reply(json.dumps(review), input_tokens=900, output_tokens=80))
        code, result = _check(study, spec, "--no-smoke", env=_llm_env(server))
        prompt = server.requests[0].body["messages"][-1]["content"]
    assert "=== train.py ===" in prompt and "lr = float(os.environ.get" in prompt  # it saw the numbered code
    assert code == 0 and result["is_code_ready"] is True
    llm = _checks(result)["llm_review"]
    assert llm["status"] == "passed" and "2 claim(s) refuted" in llm["summary"]
    claims = [e for e in llm["evidence"] if "verdict" in e]
    assert [(c["kind"], c["verdict"]) for c in claims] == [("syntax_error", "refuted"), ("missing_function", "refuted")]
    assert claims[0]["evidence"] == "train.py compiles without error"
    assert claims[1]["evidence"].startswith("main is defined at train.py:")
    usage = next(e for e in llm["evidence"] if "model" in e)
    assert usage["input_tokens"] == 900 and usage["output_tokens"] == 80 and usage["model_says_ready"] is False
    # The paid call is in the ledger (no experiment: `check` runs none), as every LLM call is.
    (call_id,) = usage["ledger_call_ids"]
    call = study.ledger().llm_call(call_id)
    assert (call.experiment_id, call.stage, call.model) == (None, "review", "reviewer-1")
    assert call.input_tokens == 900 and call.output_tokens == 80 and "train.py does not parse" in call.text
    assert call.request["messages"][-1]["content"] == prompt


def test_confirmed_llm_claims_fail_the_review_and_opinions_only_warn(study: Study) -> None:
    study.commit({"run.sh": CLEAN_RUNNER, "train.py": CLEAN_TRAIN})
    spec = study.spec(goal_metric="loss", maximize=False, arms=[{"name": "a", "env": {"LR": 0.1}}])
    confirmed = {"is_code_ready": False, "code_issue": "config missing", "claims": [
        {"kind": "missing_file", "file": "configs/base.yaml", "description": "the code needs configs/base.yaml"}]}
    opinion = {"is_code_ready": False, "code_issue": "no validation split", "claims": [
        {"kind": "other", "description": "the loss is reported on training data, not a held-out split"}]}
    with LlmServer() as server:
        server.script(Reply(json.dumps(confirmed)), Reply("Here you go:\n```json\n" + json.dumps(opinion) + "\n```"))
        code, first = _check(study, spec, "--no-smoke", env=_llm_env(server))
        code2, second = _check(study, spec, "--no-smoke", env=_llm_env(server))
    assert code == 1 and _checks(first)["llm_review"]["status"] == "failed"
    assert "configs/base.yaml does not exist in the checkout" in first["code_issue"]
    assert code2 == 0 and _checks(second)["llm_review"]["status"] == "warning"
    assert "unverified opinion" in _checks(second)["llm_review"]["summary"]


def test_research_refuses_code_that_is_not_ready_and_runs_nothing(study: Study) -> None:
    study.commit({"run.sh": CLEAN_RUNNER, "train.py": UNUSED_KNOB_TRAIN})
    spec = study.spec(goal_metric="loss", maximize=False, factors={"LR": [0.1, 0.5], "WD": [0.0, 0.01]})
    done = study.cli("research", str(spec), timeout=240)
    assert done.returncode == 1 and "not ready" in done.stdout and "WD changes nothing" in done.stdout
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    assert exp.status == "not_ready" and ledger.runs(exp.id) == []
    (event,) = [e for e in ledger.events(exp.id) if e["kind"] == "readiness"]
    assert event["data"]["is_code_ready"] is False and event["level"] == "error"

    skipped = study.cli("research", str(spec), "--skip-check", timeout=240)
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    exp = study.ledger().experiments()[-1]
    assert len(study.ledger().runs(exp.id)) == 4
    paper = (study.home / "reports" / exp.id / "paper.md").read_text()
    assert "skipped (--skip-check)" in paper and "Unreviewed code" in paper
