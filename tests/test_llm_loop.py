"""The research loop with an LLM: design, iterate, write, pay, record, replay, pause — over real HTTP.

The model is a loopback server speaking the chat-completions wire format through the
official SDK, scripted per test; the runner is a real process in a real git repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import Study
from llmserver import Fail, LlmServer, Reply

pytestmark = pytest.mark.subprocess

SEED_TOPIC = yaml.safe_load((Path(__file__).parents[1] / "specs" / "gnn_generation.yaml").read_text())["topic"]

RUNNER = '''
import json
import os

loss = os.environ.get("LOSS", "mse")
arch = os.environ.get("ARCH", "gat")
dim = int(os.environ.get("DIM", "64"))
seed = int(os.environ.get("RATIOCINATOR_SEED", "0"))
with open(os.path.join(os.environ["RATIOCINATOR_OUT_DIR"], "env.json"), "w") as fh:
    json.dump(dict(os.environ), fh)
validity = 10.0 + {"mse": 0.0, "ce": 30.0}[loss] + {"gat": 0.0, "gcn": -2.0, "gin": 3.0, "sage": 1.0}[arch]
validity += (dim / 64 - 1) * 2.0 + seed * 0.25
print("METRICS: " + json.dumps({"syntactic_validity_pct": validity}))
'''

DESIGN = {
    "hypotheses": [
        {"id": "H1", "statement": "cross-entropy on node types beats MSE", "arms": ["ce"],
         "expect": {"arm": "ce", "beats": "baseline"}},
        {"id": "H2", "statement": "a GIN decoder beats a GCN decoder", "arms": ["gcn", "gin"],
         "expect": {"arm": "gin", "beats": "gcn"}},
        {"id": "H3", "statement": "a larger embedding helps", "arms": ["dim128", "dim256"],
         "expect": {"arm": "dim256", "beats": "dim128"}},
    ],
    "arms": [
        {"name": "gat-mse-64", "knobs": {"LOSS": "mse", "ARCH": "gat", "DIM": 64},
         "description": "the seed's baseline"},
        {"name": "ce", "knobs": {"LOSS": "ce", "ARCH": "gat", "DIM": 64}, "description": "cross-entropy loss"},
        {"name": "gcn", "knobs": {"LOSS": "mse", "ARCH": "gcn", "DIM": 64}},
        {"name": "gin", "knobs": {"LOSS": "mse", "ARCH": "gin", "DIM": 64}},
        {"name": "sage", "knobs": {"LOSS": "mse", "ARCH": "sage", "DIM": 64}},
        {"name": "dim128", "knobs": {"LOSS": "mse", "ARCH": "gat", "DIM": 128}},
        {"name": "dim256", "knobs": {"LOSS": "mse", "ARCH": "gat", "DIM": 256}},
    ],
    "baseline": "gat-mse-64",
    "replicates": 2,
    "rationale": "one factor at a time from the seed's baseline",
}
READY = {"is_code_ready": True, "code_issue": "", "claims": []}


def _design_with(arms: int) -> dict:
    """The design cut to its first `arms` arms, hypotheses pointing at those only."""
    kept = DESIGN["arms"][:arms]
    names = [a["name"] for a in kept[1:]]
    return dict(DESIGN, arms=kept, hypotheses=[{"id": "H1", "statement": "the first variant beats the baseline",
                                                "arms": names, "expect": {"arm": names[0], "beats": "baseline"}}])


def _spec(study: Study, **fields: object) -> Path:
    data = dict(topic=SEED_TOPIC, goal_metric="syntactic_validity_pct", maximize=True, runner_script="run.py",
                replicates=2, max_iterations=1, max_dollars=1, arms=[])
    data.update(fields)
    path = study.spec(**data)
    spec = yaml.safe_load(path.read_text())
    spec.pop("arms") if not spec["arms"] else None
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _env(server: LlmServer, **extra: str) -> dict[str, str]:
    return {"RATIOCINATOR_LLM_PROVIDER": "openai", "RATIOCINATOR_LLM_MODEL": "planner-1",
            "RATIOCINATOR_LLM_BASE_URL": server.base_url("openai"), "RATIOCINATOR_LLM_BACKOFF_S": "0.01",
            "RATIOCINATOR_LLM_PRICE_IN_PER_MTOK": "1", "RATIOCINATOR_LLM_PRICE_OUT_PER_MTOK": "2", **extra}


def _arms(study: Study, exp_id: str) -> list[tuple]:
    return [(a.name, a.env, a.args, a.description, a.is_baseline) for a in study.ledger().arms(exp_id)]


def test_the_seed_spec_is_designed_run_written_up_and_replayed_offline(study: Study) -> None:
    study.commit({"run.py": RUNNER}, executable=())
    spec = _spec(study)
    key = "sk-leakcheck-4f9a1c0e7b2d46e1a9c3"
    narrative = {"paragraphs": [
        "Cross-entropy lifted syntactic validity well above the baseline, the largest effect in this study.",
        "The ce arm reached a mean of 40.12 against the baseline's 10.12, and the decoder choice mattered less.",
        "A validity of 99.5 was observed in an unpublished run.",
    ]}
    with LlmServer() as server:
        server.script(Reply(json.dumps(DESIGN), input_tokens=1200, output_tokens=400), json.dumps(READY),
                      json.dumps(narrative))
        env = _env(server, RATIOCINATOR_LLM_API_KEY_ENV="MY_LLM_KEY", MY_LLM_KEY=key)
        done = study.cli("research", str(spec), env=env, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        sent_key = server.requests[0].headers.get("authorization", "")
        design_request = server.requests[0].body
    assert key in sent_key  # the key went to the model, and nowhere else:
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    arms = _arms(study, exp.id)
    assert [a[0] for a in arms] == [a["name"] for a in DESIGN["arms"]]
    # GAT/MSE/64 is the baseline.
    assert arms[0][1] == {"LOSS": "mse", "ARCH": "gat", "DIM": "64"} and arms[0][4] is True
    assert len(ledger.runs(exp.id)) == 7 * 2
    prompt = design_request["messages"][-1]["content"]
    assert "MAXIMIZE" in prompt and "syntactic_validity_pct" in prompt and "LOSS" in prompt and "ARCH" in prompt
    calls = ledger.llm_calls(exp.id)
    assert [c.stage for c in calls] == ["design", "review", "write"]
    assert calls[0].input_tokens == 1200 and calls[0].cost == (1200 * 1 + 400 * 2) / 1e6
    decision = next(e for e in ledger.events(exp.id) if e["kind"] == "decision")
    hypotheses = decision["data"]["record"]["hypotheses"]
    assert [h["statement"] for h in hypotheses][0] == "cross-entropy on node types beats MSE"
    assert hypotheses[0]["expect"] == {"arm": "ce", "beats": "baseline", "metric": None, "maximize": None}
    llm_charges = [c for c in ledger.db.execute("SELECT kind, settled FROM charges WHERE experiment_id = ?", (exp.id,))
                   if c["kind"] == "llm"]
    assert len(llm_charges) == 3 and abs(sum(c["settled"] for c in llm_charges) - sum(c.cost for c in calls)) < 1e-12

    paper = (study.home / "reports" / exp.id / "paper.md").read_text()
    discussion = paper.split("# Discussion", 1)[1].split("\n# ", 1)[0]
    # The design stage's hypotheses are testable, so the paper answers them.
    assert "H1 (cross-entropy on node types beats MSE) is supported" in paper.split("## Hypotheses", 1)[0]
    assert "Cross-entropy lifted syntactic validity" in discussion
    assert "“A validity of 99.5 was observed in an unpublished run.” (unsupported: 99.5)" in discussion
    # a stated number is a linked fact, or gone
    assert "[40.12](appendix.md#f" in discussion or "40.12" not in discussion
    verify = study.cli("verify", str(study.home / "reports" / exp.id))
    assert verify.returncode == 0, verify.stdout + verify.stderr

    run_env = json.loads(Path(ledger.runs(exp.id)[0].out_dir, "env.json").read_text())
    assert "MY_LLM_KEY" not in run_env and not any(k.startswith("RATIOCINATOR_LLM_") for k in run_env)
    for path in study.home.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), f"the API key leaked into {path}"

    replay = study.cli("research", str(spec), "--replay", exp.id, timeout=300)  # no server, no LLM settings
    assert replay.returncode == 0, replay.stdout + replay.stderr
    second = study.ledger().experiments()[-1]
    assert second.id != exp.id and _arms(study, second.id) == arms
    replayed = study.ledger().llm_calls(second.id)
    assert [(c.stage, c.replayed_from, c.cost, c.text) for c in replayed] == [
        (c.stage, c.id, 0.0, c.text) for c in calls]


def test_design_replies_with_unknown_knobs_duplicates_or_over_budget_are_sent_back(study: Study) -> None:
    study.commit({"run.py": RUNNER}, executable=())
    # A run may cost $1 (3600 $/h × 1 s); $9 minus the LLM's cost pays for at most 8 runs.
    spec = _spec(study, hardware={"price_per_hour": 3600}, train_timeout_s=1, max_dollars=9, check={"smoke": False})
    bad_knob = dict(DESIGN, arms=DESIGN["arms"][:2] + [{"name": "adam", "knobs": {"OPTIMIZER": "adam"}}])
    duplicate = dict(DESIGN, arms=DESIGN["arms"][:2] + [{"name": "again", "knobs": DESIGN["arms"][1]["knobs"]}])
    too_big = dict(DESIGN, replicates=2)  # 7 arms × 2 = 14 runs > 9
    fits = _design_with(4)  # 4 arms × 2 = 8 runs
    with LlmServer() as server:
        server.script("Sure! Here is the plan: {not json", json.dumps(bad_knob), json.dumps(duplicate))
        failed = study.cli("research", str(spec), "--no-llm-review", env=_env(server), timeout=300)
        complaints = [r.body["messages"][-1]["content"] for r in server.requests[1:]]
    assert failed.returncode == 1
    assert "JSON" in complaints[0] and "OPTIMIZER, which the runner never reads" in complaints[1]
    assert "has the same knobs as arm 'ce'" in failed.stderr + failed.stdout
    exp = study.ledger().experiments()[-1]
    assert exp.status == "failed" and study.ledger().runs(exp.id) == []
    assert len(study.ledger().llm_calls(exp.id)) == 3  # every reply paid for is recorded

    with LlmServer() as server:
        server.script(json.dumps(too_big), json.dumps(fits), json.dumps({"paragraphs": ["Short."]}))
        done = study.cli("research", str(spec), "--no-llm-review", env=_env(server), timeout=300)
        budget_complaint = server.requests[1].body["messages"][-1]["content"]
    assert done.returncode == 0, done.stdout + done.stderr
    # the LLM calls so far (and this one's reservation) took a little of the $9: 8 runs fit, not 9
    assert "14 runs, but the budget pays for at most 8 runs" in budget_complaint
    assert len(study.ledger().runs(exp.id)) == 8


def test_later_iterations_see_statistics_and_must_confirm_a_winner_before_stopping(study: Study) -> None:
    study.commit({"run.py": RUNNER}, executable=())
    spec = _spec(study, max_iterations=3, replicates=3, arms=[
        {"name": "base", "env": {"LOSS": "mse"}}, {"name": "ce", "env": {"LOSS": "ce"}}])
    stop_early = {"action": "stop", "reason": "ce is clearly better"}
    confirm = {"action": "run", "reason": "confirm ce before calling it",
               "confirm": [{"arm": "ce", "extra_replicates": 2}]}
    stop = {"action": "stop", "reason": "ce confirmed on five runs"}
    with LlmServer() as server:
        server.script(json.dumps(stop_early), json.dumps(confirm), json.dumps(stop),
                      json.dumps({"paragraphs": ["Done."]}))
        done = study.cli("research", str(spec), "--no-llm-review", env=_env(server), timeout=300)
        first_prompt = server.requests[0].body["messages"][-1]["content"]
        pushback = server.requests[1].body["messages"][-1]["content"]
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verdict: improvement" in first_prompt and "p_holm" in first_prompt and "noise floor" in first_prompt
    assert "run confirmation replicates" in pushback
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    ce = sorted((r.replicate, r.seed) for r in ledger.runs(exp.id) if r.arm == "ce")
    assert ce == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]  # two new seeds, nothing re-run
    decisions = [e for e in ledger.events(exp.id) if e["kind"] == "decision"]
    assert [d["data"]["iteration"] for d in decisions] == [1, 2, 3]
    assert decisions[2]["message"] == "LLM: stop — ce confirmed on five runs" and exp.status == "completed"


def test_an_unavailable_provider_pauses_the_experiment_and_the_same_command_resumes_it(study: Study) -> None:
    study.commit({"run.py": RUNNER}, executable=())
    spec = _spec(study, check={"smoke": False})
    with LlmServer() as server:
        server.script(Fail(500), Fail(503), Fail(429))
        paused = study.cli("research", str(spec), "--no-llm-review", env=_env(server, RATIOCINATOR_LLM_MAX_RETRIES="2"))
    assert paused.returncode == 1 and "paused" in paused.stdout
    exp = study.ledger().experiments()[-1]
    assert exp.status == "paused" and "run the same command to resume" in exp.note
    with LlmServer() as server:
        server.script(json.dumps(_design_with(2)), json.dumps({"paragraphs": ["Resumed."]}))
        resumed = study.cli("research", str(spec), "--no-llm-review", env=_env(server))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert study.ledger().experiments()[-1].id == exp.id and study.ledger().experiment(exp.id).status == "completed"


def test_plan_shows_the_llm_design_and_its_cost_and_research_runs_exactly_that(study: Study) -> None:
    study.commit({"run.py": RUNNER}, executable=())
    spec = _spec(study, hardware={"price_per_hour": 36}, train_timeout_s=10, max_dollars=5)  # $0.10 per run at worst
    with LlmServer() as server:
        server.script(json.dumps(_design_with(3)))
        shown = study.cli("plan", str(spec), "--json", env=_env(server, RATIOCINATOR_LLM_MAX_TOKENS="1000"))
    assert shown.returncode == 0, shown.stdout + shown.stderr
    data = json.loads(shown.stdout)
    assert [a["name"] for a in data["arms"]] == ["gat-mse-64", "ce", "gcn"] and data["baseline"] == "gat-mse-64"
    assert data["runs"] == 6 and abs(data["worst_case_dollars"] - 0.6) < 1e-9
    assert data["designed_by"]["model"] == "planner-1" and data["designed_by"]["hypotheses"]
    # design + review + discussion (one iteration): 3 calls of ~3,000 prompt tokens and 1,000 reply tokens
    assert data["llm"]["calls"] == 3 and abs(data["llm"]["per_call_dollars"] - (3000 * 1 + 1000 * 2) / 1e6) < 1e-9

    with LlmServer() as server:
        server.script(json.dumps(READY), json.dumps({"paragraphs": ["As planned."]}))  # no second design call
        done = study.cli("research", str(spec), env=_env(server), timeout=300)
        asked = len(server.requests)
    assert done.returncode == 0, done.stdout + done.stderr
    assert asked == 2
    exp = study.ledger().experiments()[-1]
    assert (exp.id == data["designed_by"]["experiment"]
            and [a[0] for a in _arms(study, exp.id)] == ["gat-mse-64", "ce", "gcn"])
    assert [c.stage for c in study.ledger().llm_calls(exp.id)] == ["design", "review", "write"]
