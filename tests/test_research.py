"""`ratiocinator research` end to end with real runner processes, including misbehaving ones."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CLI, Study, process_alive
from ratiocinator.store.ledger import Ledger

pytestmark = pytest.mark.subprocess

GOOD_RUNNER = """
#!/usr/bin/env bash
set -euo pipefail
LR="${LR:-0.1}"
DEPTH="${DEPTH:-1}"
env | grep -E '^(RATIOCINATOR_|SEED=|LR=|DEPTH=|CUDA_VISIBLE_DEVICES=)' | sort > "$RATIOCINATOR_OUT_DIR/env.txt"
for step in 1 2 3; do
  echo "METRICS: {\\"step\\": $step, \\"loss\\": $(( 10 / step ))}"
done
echo "some stderr chatter" >&2
echo "METRICS: {\\"score\\": $(( DEPTH * 10 + ${SEED:-0} )), \\"lr_seen\\": $LR}"
"""


def _runs(study: Study, exp: str | None = None) -> list:
    ledger = study.ledger()
    exp_id = exp or ledger.experiments()[-1].id
    return ledger.runs(exp_id)


def test_full_study_records_every_run_metric_and_env(study: Study) -> None:
    study.commit({"run.sh": GOOD_RUNNER})
    spec = study.spec(factors={"DEPTH": [1, 2]}, arms=[{"name": "fast", "env": {"LR": 0.5, "DEPTH": 3}}],
                      replicates=2, seed_env="SEED", concurrency=2)
    done = study.cli("research", str(spec))
    assert done.returncode == 0, done.stderr + done.stdout
    assert "paper:" in done.stdout
    runs = _runs(study)
    assert len(runs) == 6 and all(r.status == "succeeded" for r in runs)
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    assert exp.status == "completed" and exp.commit_sha == study.repo.head()
    finals = ledger.run_metrics(exp.id)
    by_arm = {(r.arm, r.replicate): finals[r.id]["score"][0] for r in runs}
    # score = DEPTH*10 + seed: the knobs and the seed really reached the runner
    assert by_arm == {("fast", 0): 30, ("fast", 1): 31, ("DEPTH=1", 0): 10, ("DEPTH=1", 1): 11,
                      ("DEPTH=2", 0): 20, ("DEPTH=2", 1): 21}
    fast = next(r for r in runs if r.arm == "fast" and r.replicate == 1)
    env = dict(line.split("=", 1) for line in Path(fast.out_dir, "env.txt").read_text().splitlines())
    assert env["RATIOCINATOR_ARM"] == "fast" and env["RATIOCINATOR_SEED"] == "1" and env["SEED"] == "1"
    assert env["RATIOCINATOR_RUN_ID"] == str(fast.id) and env["RATIOCINATOR_TRIAL"] == "0"
    assert env["RATIOCINATOR_OUT_DIR"] == fast.out_dir and env["LR"] == "0.5"
    assert "CUDA_VISIBLE_DEVICES" not in env  # CPU runs are not pinned
    points = ledger.points(fast.id, "loss")
    assert [(step, value) for _, step, value in points] == [(1, 10.0), (2, 5.0), (3, 3.0)]
    assert "some stderr chatter" in Path(fast.log_dir, "stderr.log").read_text()
    assert fast.commit_sha == study.repo.head() and fast.env == {"LR": "0.5", "DEPTH": "3"}
    report_dir = study.home / "reports" / exp.id
    assert all((report_dir / name).exists()
               for name in ("paper.md", "paper.html", "paper.tex", "facts.json", "runs.csv"))


def test_misbehaving_runners_are_recorded_truthfully(study: Study) -> None:
    study.commit({"run.sh": """
        #!/usr/bin/env bash
        MODE="${MODE:-ok}"
        case "$MODE" in
          crash) echo "Traceback: boom" >&2; exit 3 ;;
          nan)   echo 'METRICS: {"score": NaN, "loss": 1.0}' ;;
          nanside) echo 'METRICS: {"score": 1.5, "loss": Infinity}' ;;
          none)  echo "done" ;;
          empty) echo "trained on 0 samples"; echo 'METRICS: {"score": 0.0}' ;;
          bigline) head -c 10000000 /dev/zero | tr '\\0' 'x'; echo; echo 'METRICS: {"score": 2}' ;;
          garbage) head -c 200000 /dev/urandom; echo; echo 'METRICS: {"score": 3}' ;;
          signal) kill -KILL $$ ;;
          badjson) echo 'METRICS: {"score": oops'; echo 'METRICS: {"score": 4}' ;;
        esac
    """})
    modes = ["crash", "nan", "nanside", "none", "empty", "bigline", "garbage", "signal", "badjson"]
    spec = study.spec(arms=[{"name": m, "env": {"MODE": m}} for m in modes], concurrency=2)
    done = study.cli("research", str(spec), "--skip-check", timeout=180)  # these runs are meant to fail
    assert done.returncode == 0, done.stderr + done.stdout  # some runs succeeded
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    runs = {r.arm: r for r in ledger.runs(exp.id)}
    finals = ledger.run_metrics(exp.id)
    # "Traceback: boom" is no Python traceback: without recognisable evidence the class is unknown
    assert runs["crash"].status == "failed" and runs["crash"].failure == "unknown" and runs["crash"].exit_code == 3
    assert "Traceback: boom" in runs["crash"].reason and "exit code 3" in runs["crash"].evidence["evidence"]
    assert runs["nan"].failure == "nan_divergence" and finals[runs["nan"].id]["score"] == (None, False)
    # a finite goal with a diverged loss is a suspicious success, not a result
    assert runs["nanside"].failure == "nan_divergence" and finals[runs["nanside"].id]["loss"] == (None, False)
    assert "final loss = inf" in runs["nanside"].evidence["evidence"]
    assert runs["none"].failure == "no_metrics" and "score" in runs["none"].reason
    assert runs["empty"].failure == "degenerate_data" and "trained on 0 samples" in runs["empty"].evidence["evidence"]
    assert runs["bigline"].status == "succeeded" and finals[runs["bigline"].id]["score"] == (2.0, True)
    assert Path(runs["bigline"].log_dir, "stdout.log").stat().st_size > 10_000_000
    assert runs["garbage"].status == "succeeded" and finals[runs["garbage"].id]["score"] == (3.0, True)
    assert runs["signal"].failure == "killed" and runs["signal"].signal == 9
    assert runs["badjson"].status == "succeeded" and finals[runs["badjson"].id]["score"] == (4.0, True)
    status = study.cli("status", exp.id)
    assert status.returncode == 0 and "unknown" in status.stdout and "no_metrics" in status.stdout


def test_timeout_kills_the_whole_process_group(study: Study) -> None:
    study.commit({"run.sh": """
        #!/usr/bin/env bash
        sleep 300 &
        echo $! > "$RATIOCINATOR_OUT_DIR/child.pid"
        python3 -c 'import time; time.sleep(300)' &
        echo $! >> "$RATIOCINATOR_OUT_DIR/child.pid"
        echo 'METRICS: {"score": 1}'
        wait
    """})
    spec = study.spec(train_timeout_s=2)
    started = time.monotonic()
    done = study.cli("research", str(spec), "--skip-check")
    assert time.monotonic() - started < 60
    assert done.returncode == 1  # the only run failed
    (run,) = _runs(study)
    assert run.status == "failed" and run.failure == "timeout"
    for pid in Path(run.out_dir, "child.pid").read_text().split():
        assert not process_alive(int(pid)), f"child {pid} survived the timeout"


def test_children_left_behind_by_a_finished_run_are_reaped(study: Study) -> None:
    study.commit({"run.sh": """
        #!/usr/bin/env bash
        sleep 300 &
        echo $! > "$RATIOCINATOR_OUT_DIR/child.pid"
        echo 'METRICS: {"score": 1}'
    """})
    done = study.cli("research", str(study.spec()))
    assert done.returncode == 0, done.stderr
    (run,) = _runs(study)
    assert run.status == "succeeded"
    assert not process_alive(int(Path(run.out_dir, "child.pid").read_text()))


def test_arm_setting_an_ignored_knob_is_refused_before_anything_runs(study: Study) -> None:
    study.commit({"run.sh": GOOD_RUNNER})
    spec = study.spec(arms=[{"name": "a", "env": {"LR": 0.1}}, {"name": "b", "env": {"LEARNING_RATE": 0.2}}])
    for command in ("plan", "research"):
        done = study.cli(command, str(spec))
        assert done.returncode == 2, done.stdout + done.stderr
        assert "LEARNING_RATE" in done.stderr and "never reads" in done.stderr
        assert "DEPTH, LR" in done.stderr  # the knobs it does read
        assert "Traceback" not in done.stderr
    if (study.home / "ledger.db").exists():
        ledger = study.ledger()
        assert all(not ledger.runs(e.id) for e in ledger.experiments())


def test_ignored_seed_env_is_refused(study: Study) -> None:
    study.commit({"run.sh": "#!/usr/bin/env bash\necho 'METRICS: {\"score\": 1}'\n"})
    done = study.cli("research", str(study.spec(arms=[{"name": "a"}], seed_env="MY_SEED")))
    assert done.returncode == 2 and "MY_SEED" in done.stderr


def test_lfs_pointer_files_are_a_clear_error(study: Study) -> None:
    study.commit({
        ".gitattributes": "*.pt filter=lfs diff=lfs merge=lfs -text\n",
        "data/train.pt": "version https://git-lfs.github.com/spec/v1\noid sha256:" + "a" * 64 + "\nsize 123456\n",
        "run.sh": GOOD_RUNNER,
    })
    done = study.cli("research", str(study.spec(arms=[{"name": "a"}])))
    assert done.returncode == 1
    assert "data/train.pt" in done.stderr and "LFS" in done.stderr and "Traceback" not in done.stderr
    exp = study.ledger().experiments()[-1]
    assert not study.ledger().runs(exp.id)


def test_budget_is_enforced_not_displayed(study: Study) -> None:
    study.commit({"run.sh": GOOD_RUNNER})
    # each run reserves $1/h × 36s = $0.01; $0.025 allows two runs at a time, never a third reservation
    spec = study.spec(factors={"DEPTH": [1, 2, 3, 4, 5]}, train_timeout_s=36, max_dollars=0.025,
                      hardware={"price_per_hour": 1.0}, concurrency=1)
    done = study.cli("research", str(spec))
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    spent, reserved = ledger.money(exp.id)
    runs = ledger.runs(exp.id)
    assert exp.status in ("completed", "budget_exhausted")
    assert reserved == 0 and spent <= 0.025 + 1e-12
    assert sum(r.cost for r in runs) == spent
    assert all(r.status == "succeeded" for r in runs) and done.returncode == 0
    # runs are short, so real cost is tiny and all five fit once earlier reservations settle
    assert len(runs) == 5
    tight = study.spec(name="tight", factors={"DEPTH": [1, 2]}, train_timeout_s=36, max_dollars=0.005,
                       hardware={"price_per_hour": 1.0})
    done = study.cli("research", str(tight))
    ledger = study.ledger()
    exp = ledger.find_experiment("tight")
    assert exp.status == "budget_exhausted" and not ledger.runs(exp.id)
    assert "budget" in done.stdout and done.returncode == 1


def test_runner_whose_interpreter_is_missing_fails_once_and_is_not_retried(study: Study) -> None:
    study.commit({"run.sh": "#!/nonexistent/interpreter\necho hi\n"})
    done = study.cli("research", str(study.spec(arms=[{"name": "a"}], extra_knobs=[])), "--skip-check")
    assert done.returncode == 1, done.stdout + done.stderr
    (run,) = _runs(study)
    assert run.status == "failed" and run.failure == "missing_dependency" and not run.transient
    assert "interpreter named in its #! line" in run.reason


def test_key_value_and_regex_protocols(study: Study) -> None:
    study.commit({"run.sh": """
        #!/usr/bin/env bash
        echo "step 1 loss 3.0"
        echo "val_bpb: 0.997900"
        echo "peak_vram_mb: 45060.2"
        echo "Best validation loss: 0.4321 at epoch 7"
    """})
    kv = study.spec(name="kv", goal_metric="val_bpb", maximize=False, arms=[{"name": "a"}],
                    metrics={"protocol": "key_value"})
    assert study.cli("research", str(kv)).returncode == 0
    ledger = study.ledger()
    exp = ledger.find_experiment("kv")
    (run,) = ledger.runs(exp.id)
    assert ledger.run_metrics(exp.id)[run.id] == {"val_bpb": (0.9979, True), "peak_vram_mb": (45060.2, True)}
    rx = study.spec(name="rx", goal_metric="best", maximize=False, arms=[{"name": "a"}],
                    metrics={"protocol": "regex", "patterns": {"best": r"Best validation loss: ([\d.]+)"}})
    assert study.cli("research", str(rx)).returncode == 0
    exp = ledger.find_experiment("rx")
    (run,) = ledger.runs(exp.id)
    assert ledger.run_metrics(exp.id)[run.id] == {"best": (0.4321, True)}


def test_runs_in_parallel_up_to_concurrency(study: Study) -> None:
    study.commit({"run.sh": """
        #!/usr/bin/env bash
        date +%s.%N > "$RATIOCINATOR_OUT_DIR/start"
        sleep 1
        date +%s.%N > "$RATIOCINATOR_OUT_DIR/end"
        echo "METRICS: {\\"score\\": ${K:-0}}"
    """})
    spec = study.spec(factors={"K": [1, 2, 3, 4]}, concurrency=2)
    assert study.cli("research", str(spec)).returncode == 0
    spans = [(float(Path(r.out_dir, "start").read_text()), float(Path(r.out_dir, "end").read_text()))
             for r in _runs(study)]
    overlap = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert overlap == 2


def test_rerun_of_a_finished_experiment_runs_nothing_new(study: Study) -> None:
    study.commit({"run.sh": GOOD_RUNNER})
    spec = study.spec(factors={"DEPTH": [1, 2]})
    assert study.cli("research", str(spec)).returncode == 0
    again = study.cli("research", str(spec))
    assert again.returncode == 0 and "already finished" in again.stdout
    assert len(_runs(study)) == 2
    fresh = study.cli("research", str(spec), "--new")
    assert fresh.returncode == 0
    ledger = study.ledger()
    assert len(ledger.experiments()) == 2 and len(ledger.runs(ledger.experiments()[-1].id)) == 2


def test_runs_json_and_status_tables(study: Study) -> None:
    study.commit({"run.sh": GOOD_RUNNER})
    spec = study.spec(factors={"DEPTH": [1, 2]})
    assert study.cli("research", str(spec)).returncode == 0
    exp = study.ledger().experiments()[-1]
    listed = json.loads(study.cli("runs", exp.id, "--json").stdout)
    assert [(r["arm"], r["status"], r["metrics"]["score"]) for r in listed] == [
        ("DEPTH=1", "succeeded", 10.0), ("DEPTH=2", "succeeded", 20.0)]
    assert listed[0]["commit"] == study.repo.head() and listed[0]["env"] == {"DEPTH": "1"}
    overview = study.cli("status")
    assert exp.id in overview.stdout and "completed" in overview.stdout
    missing = study.cli("runs", "nope")
    assert missing.returncode == 2 and "no experiment 'nope'" in missing.stderr


def test_deps_pre_install_failure_stops_the_experiment(study: Study) -> None:
    study.commit({"run.sh": GOOD_RUNNER})
    spec = study.spec(arms=[{"name": "a"}],
                      deps={"pre_install": ["echo preparing", "echo 'no such mirror' >&2; exit 7"]})
    done = study.cli("research", str(spec))
    assert done.returncode == 1
    assert "exit 7" in done.stderr or "exit code 7" in done.stderr
    assert "no such mirror" in done.stderr and "Traceback" not in done.stderr
    exp = study.ledger().experiments()[-1]
    assert exp.status == "failed" and not study.ledger().runs(exp.id)


def test_deps_verify_failure_shows_its_output(study: Study) -> None:
    study.commit({"run.sh": GOOD_RUNNER})
    spec = study.spec(arms=[{"name": "a"}], deps={"verify": "python3 -c 'import not_a_module_xyz'"})
    done = study.cli("research", str(spec))
    assert (done.returncode == 1 and "not_a_module_xyz" in done.stderr
            and "Traceback" in done.stderr.split("error:", 1)[1])


def test_relative_home_gives_runners_absolute_paths(study: Study) -> None:
    study.commit({"run.sh": GOOD_RUNNER})
    spec = study.spec(arms=[{"name": "a"}])
    done = subprocess.run([*CLI, "--home", "rel-home", "research", str(spec)], cwd=study.root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ledger = Ledger(study.root / "rel-home" / "ledger.db")
    (run,) = ledger.runs(ledger.experiments()[-1].id)
    assert Path(run.out_dir).is_absolute() and Path(run.out_dir, "env.txt").exists()
    assert Path(run.out_dir).is_relative_to(study.root / "rel-home")


def test_setup_failure_fixed_upstream_is_picked_up_by_the_rerun(study: Study) -> None:
    study.commit({"run.sh": "#!/usr/bin/env bash\necho \"METRICS: {\\\"score\\\": 1}\"\n"})
    spec = study.spec(arms=[{"name": "a", "env": {"LR": 0.1}}])
    first = study.cli("research", str(spec))
    assert first.returncode == 2 and "LR" in first.stderr
    fixed = study.commit({"run.sh": GOOD_RUNNER})
    second = study.cli("research", str(spec))
    assert second.returncode == 0, second.stdout + second.stderr
    ledger = study.ledger()
    (exp,) = ledger.experiments()
    assert exp.commit_sha == fixed and ledger.runs(exp.id)[0].commit_sha == fixed


def test_points_of_a_run_gone_quiet_reach_the_ledger_while_it_runs(study: Study) -> None:
    """One metric line, then silence: the point must not wait for the next line (or the end)."""
    marks = study.root / "marks"
    marks.mkdir()
    study.commit({"run.sh": f"""
        #!/usr/bin/env bash
        echo 'METRICS: {{"step": 1, "loss": 2.5}}'
        touch {marks}/printed
        for i in $(seq 1 600); do [ -e {marks}/go ] && break; sleep 0.1; done
        echo 'METRICS: {{"score": 1}}'
    """})
    spec = study.spec(train_timeout_s=120)
    proc = subprocess.Popen([*CLI, "--home", str(study.home), "research", str(spec), "--skip-check"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=study.root)
    try:
        deadline = time.time() + 60
        points: list = []
        while time.time() < deadline and not points:
            if (marks / "printed").exists():
                ledger = study.ledger()
                runs = ledger.runs(ledger.experiments()[-1].id)
                points = ledger.points(runs[0].id, "loss") if runs else []
            time.sleep(0.2)
        running = _runs(study)[0].status
    finally:
        (marks / "go").touch()
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert points and running == "running"
    assert [(step, value) for _, step, value in points] == [(1, 2.5)]
