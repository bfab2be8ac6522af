"""Failure classes from real misbehaving runners, retries of transient failures only, and early stops."""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest

from conftest import Study
from ratiocinator.backends.base import Host, LaunchFailure, LaunchRequest, RunHandle
from ratiocinator.backends.local import LocalBackend
from ratiocinator.execution.failures import (
    LOG_HEAD_BYTES,
    LOG_TAIL_BYTES,
    ArmOutcome,
    Failure,
    Frame,
    LogExcerpt,
    RunEvidence,
    constant_across_arms,
    diagnose,
    last_exception,
    read_log,
    user_frame,
)
from ratiocinator.pipeline import Research
from ratiocinator.spec.models import load_spec

TRAIN_PY = '''
import os
import pickle
import sys


def step(batch, n):
    return sum(batch) / n


def main(mode):
    if mode == "cuda":
        raise RuntimeError("CUDA error: device-side assert triggered\\n"
                           "Compile with TORCH_USE_CUDA_DSA to enable device-side assertions.")
    if mode == "runtime":
        print('METRICS: {"loss": 2.0}')
        step([1, 2], 0)
    if mode == "zero":
        print("loaded 0 samples from data/train")
        print('METRICS: {"score": 0.0, "n_samples": 0}')
    if mode == "lfs":
        path = os.path.join(os.environ["RATIOCINATOR_OUT_DIR"], "weights.pkl")
        with open(path, "w") as fh:
            fh.write("version https://git-lfs.github.com/spec/v1\\noid sha256:" + "0" * 64 + "\\nsize 1234\\n")
        with open(path, "rb") as fh:
            pickle.load(fh)


main(sys.argv[1])
'''

BROKEN_PY = '''
def model(x):
    return x +
'''

RUNNER = '''
#!/usr/bin/env bash
MODE="${MODE:-ok}"
case "$MODE" in
  ok)        echo 'METRICS: {"score": 1.0}' ;;
  oom)       limit='import resource; resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))'
             exec python3 -c "$limit; x = bytearray(4 << 30)" ;;
  cuda)      exec python3 train.py cuda ;;
  missing)   exec python3 -c 'import definitely_not_installed_xyz' ;;
  syntax)    exec python3 broken.py ;;
  runtime)   exec python3 train.py runtime ;;
  timeout)   sleep 60 ;;
  nan)       echo 'METRICS: {"score": NaN}' ;;
  nometrics) echo "finished" ;;
  zero)      exec python3 train.py zero ;;
  lfs)       exec python3 train.py lfs ;;
  killed)    kill -TERM $$ ;;
  disk)      exec python3 -c 'fh = open("/dev/full", "w"); fh.write("x" * 10); fh.close()' ;;
  unknown)   echo "something odd happened" >&2; exit 3 ;;
esac
'''

MODES = ["ok", "oom", "cuda", "missing", "syntax", "runtime", "timeout", "nan", "nometrics", "zero", "lfs", "killed",
         "disk", "unknown"]


def _by_arm(study: Study) -> dict:
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    return {r.arm: r for r in ledger.runs(exp.id)}


@pytest.mark.subprocess
def test_each_misbehaving_runner_gets_its_class_and_evidence_and_none_is_retried(study: Study) -> None:
    study.commit({"run.sh": RUNNER, "train.py": TRAIN_PY, "broken.py": BROKEN_PY})
    spec = study.spec(arms=[{"name": m, "env": {"MODE": m}} for m in MODES], concurrency=1, train_timeout_s=4,
                      failure_policy={"max_attempts": 3, "retry_backoff_s": 0.1, "stop_after": 50})
    done = study.cli("research", str(spec), "--skip-check", timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr  # the "ok" arm succeeded
    runs = _by_arm(study)
    assert len(runs) == len(MODES)  # one attempt each: nothing here is transient
    assert runs["ok"].status == "succeeded" and runs["ok"].failure is None
    classes = {arm: run.failure for arm, run in runs.items() if arm != "ok"}
    assert classes == {
        "oom": "oom", "cuda": "cuda_error", "missing": "missing_dependency", "syntax": "syntax_error",
        "runtime": "runtime_error", "timeout": "timeout", "nan": "nan_divergence", "nometrics": "no_metrics",
        "zero": "degenerate_data", "lfs": "degenerate_data", "killed": "killed", "disk": "disk_full",
        "unknown": "unknown",
    }
    assert not any(r.transient for r in runs.values())

    def evidence(arm: str) -> str:
        return "\n".join(runs[arm].evidence["evidence"])

    oom = runs["oom"]
    assert "MemoryError" in evidence("oom") and oom.evidence["detail"]["memory"] == "host"
    assert oom.evidence["detail"]["shared_host"] is False  # alone on the host: deterministic, not retried
    assert "device-side assert triggered" in evidence("cuda")
    assert runs["missing"].evidence["detail"]["module"] == "definitely_not_installed_xyz"
    assert "ModuleNotFoundError: No module named 'definitely_not_installed_xyz'" in evidence("missing")
    syntax = runs["syntax"]
    assert syntax.evidence["detail"]["frame"].startswith("broken.py:2") and "SyntaxError" in syntax.reason
    runtime = runs["runtime"]
    assert runtime.evidence["detail"]["exception"] == "ZeroDivisionError"
    assert runtime.evidence["detail"]["frame"] == "train.py:7 in step"  # the deepest frame in the user's code
    assert "ZeroDivisionError: division by zero" in runtime.reason
    assert runs["timeout"].evidence["detail"]["timeout_s"] == 4
    assert "final score = nan" in evidence("nan")
    assert "metrics seen: none" in evidence("nometrics") and "finished" in evidence("nometrics")
    assert "loaded 0 samples" in runs["zero"].reason or "n_samples = 0" in evidence("zero")
    assert runs["lfs"].evidence["detail"]["cause"] == "lfs_pointer" and "invalid load key, 'v'" in evidence("lfs")
    killed = runs["killed"]
    assert killed.signal == signal.SIGTERM and killed.evidence["detail"]["signal"] == "SIGTERM"
    assert "No space left on device" in evidence("disk")
    assert "exit code 3" in evidence("unknown") and "something odd happened" in evidence("unknown")

    status = study.cli("status", runs["ok"].experiment_id)
    assert status.returncode == 0
    assert "failures by class:" in status.stdout and "degenerate_data 2" in status.stdout
    as_json = study.cli("runs", runs["ok"].experiment_id, "--json")
    assert '"evidence"' in as_json.stdout and '"transient": false' in as_json.stdout
    paper = (study.home / "reports" / runs["ok"].experiment_id / "paper.md").read_text()
    section = paper.split("# Failure analysis", 1)[1]
    for cls in ("oom", "cuda\\_error", "missing\\_dependency", "syntax\\_error", "runtime\\_error", "disk\\_full"):
        assert f"| {cls} |" in section, cls
    assert "ran out of host or GPU memory" in section
    appendix = (study.home / "reports" / runs["ok"].experiment_id / "appendix.md").read_text()
    assert "Evidence" in appendix.split("# Failed runs", 1)[1]  # each example's evidence and log tail


@pytest.mark.subprocess
def test_an_oom_while_another_run_shares_the_host_is_retried_and_then_succeeds(study: Study, tmp_path: Path) -> None:
    study.commit({"run.sh": '''
        #!/usr/bin/env bash
        if [ "$ROLE" = hog ] && [ ! -e "$MARKER_DIR/hog-ran" ]; then
          touch "$MARKER_DIR/hog-ran"
          sleep 0.5
          limit='import resource; resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))'
          exec python3 -c "$limit; bytearray(4 << 30)"
        fi
        sleep 1.5
        printf 'METRICS: {"score": %d}\\n' "${#ROLE}"
    '''})
    markers = tmp_path / "markers"
    markers.mkdir()
    spec = study.spec(arms=[{"name": "hog", "env": {"ROLE": "hog", "MARKER_DIR": str(markers)}},
                            {"name": "steady", "env": {"ROLE": "steady", "MARKER_DIR": str(markers)}}],
                      concurrency=2, failure_policy={"max_attempts": 3, "retry_backoff_s": 0.2})
    done = study.cli("research", str(spec), "--skip-check", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    hog = [r for r in ledger.runs(exp.id) if r.arm == "hog"]
    assert [(r.attempt, r.status, r.failure, r.transient) for r in hog] == [
        (1, "failed", "oom", True), (2, "succeeded", None, False)]
    assert (hog[0].evidence["detail"]["shared_host"] is True
            and "other runs were live on the host" in hog[0].evidence["evidence"])
    retries = [e for e in ledger.events(exp.id) if e["kind"] == "retry"]
    assert len(retries) == 1 and retries[0]["run_id"] == hog[0].id and retries[0]["data"]["delay_s"] == 0.2
    assert exp.status == "completed"


class FlakyLaunchBackend(LocalBackend):
    """The local backend, except that the first ``failures`` launches lose their host."""

    def __init__(self, home: Path, failures: int) -> None:
        super().__init__(home)
        self.failures = failures
        self.launches = 0

    async def launch(self, host: Host, request: LaunchRequest) -> RunHandle:
        self.launches += 1
        if self.launches <= self.failures:
            raise LaunchFailure("connection to the host was lost", transient=True)
        return await super().launch(host, request)


@pytest.mark.latex
@pytest.mark.subprocess  # the local backend reads the runs' environment with their interpreter
def test_infra_failures_retry_up_to_the_cap_as_new_attempts(study: Study) -> None:
    study.commit({"run.sh": "#!/usr/bin/env bash\necho 'METRICS: {\"score\": 1.0}'\n"})
    loaded = load_spec(study.spec(arms=[{"name": "a"}], extra_knobs=[],
                                  failure_policy={"max_attempts": 2, "retry_backoff_s": 0.05}))
    backend = FlakyLaunchBackend(study.home, failures=5)
    outcome = Research(loaded, study.home, check=False, backend=backend).run()
    assert backend.launches == 2  # the cap: two attempts, both lost, then the replicate is given up
    assert outcome.failed == 2 and outcome.succeeded == 0
    runs = study.ledger().runs(outcome.experiment_id)
    assert [(r.attempt, r.failure, r.transient) for r in runs] == [(1, "infra", True), (2, "infra", True)]

    # A resume does not retry a replicate that used up its attempts.
    again = Research(loaded, study.home, check=False, backend=FlakyLaunchBackend(study.home, failures=0)).run()
    assert "already finished" in again.message or len(study.ledger().runs(outcome.experiment_id)) == 2

    fresh = FlakyLaunchBackend(study.home, failures=1)
    recovered = Research(loaded, study.home, check=False, backend=fresh, new=True).run()
    assert fresh.launches == 2 and recovered.succeeded == 1
    runs = study.ledger().runs(recovered.experiment_id)
    assert [(r.attempt, r.status, r.failure) for r in runs] == [(1, "failed", "infra"), (2, "succeeded", None)]


@pytest.mark.subprocess
def test_first_runs_failing_alike_stop_the_experiment_before_the_rest_are_paid_for(study: Study) -> None:
    study.commit({"run.sh": "#!/usr/bin/env bash\nexec python3 broken.py $K\n", "broken.py": BROKEN_PY})
    spec = study.spec(factors={"K": [1, 2, 3, 4, 5, 6]}, concurrency=1, extra_knobs=["K"],
                      failure_policy={"stop_after": 3})
    done = study.cli("research", str(spec), "--skip-check", timeout=120)
    assert done.returncode == 1
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    runs = ledger.runs(exp.id)
    assert len(runs) == 3 and {r.failure for r in runs} == {"syntax_error"}
    assert exp.status == "stopped" and "the first 3 runs all failed with syntax_error" in exp.note
    assert "stopped early" in done.stdout
    assert any(e["kind"] == "early_stop" for e in ledger.events(exp.id))


@pytest.mark.subprocess
def test_a_goal_identical_across_differing_arms_marks_the_runs_degenerate(study: Study) -> None:
    study.commit({"run.sh": "#!/usr/bin/env bash\n: \"${WIDTH:-1}\"\n"
                            "echo 'METRICS: {\"score\": 0.5, \"loss\": 1.25}'\n"})
    spec = study.spec(factors={"WIDTH": [1, 2, 4]}, replicates=2)
    done = study.cli("research", str(spec), "--skip-check", timeout=120)
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    runs = ledger.runs(exp.id)
    assert len(runs) == 6 and all(r.status == "failed" and r.failure == "degenerate_data" for r in runs)
    assert exp.status == "stopped" and "score is exactly 0.5 in all 6 runs of 3 arms that differ" in exp.note
    assert runs[0].evidence["detail"]["cause"] == "constant_metric"
    assert done.returncode == 1


# -- the classifier on its own -------------------------------------------------------------------


def _evidence(**fields) -> RunEvidence:
    base = dict(exit_code=1, signal=None, timed_out=False, timeout_s=60, goal="score", final={})
    base.update(fields)
    return RunEvidence(**base)


def test_a_shell_reporting_its_childs_death_counts_as_that_signal() -> None:
    got = diagnose(_evidence(exit_code=137, stderr="run.sh: line 3:  4242 Killed                  python3 train.py\n"))
    assert got.failure == Failure.KILLED and got.detail["signal"] == "SIGKILL"
    plain = diagnose(_evidence(exit_code=137, stderr="exiting with my own code\n"))
    assert plain.failure == Failure.UNKNOWN  # 137 alone is just a number


def test_sigkill_while_the_kernel_oom_killer_fired_is_host_oom() -> None:
    got = diagnose(_evidence(exit_code=None, signal=9, oom_kills=1, shared_host=True))
    assert got.failure == Failure.OOM and got.detail["memory"] == "host" and got.transient
    alone = diagnose(_evidence(exit_code=None, signal=9, oom_kills=0))
    assert alone.failure == Failure.KILLED


def test_gpu_oom_is_deterministic_even_on_a_shared_host() -> None:
    stderr = ('Traceback (most recent call last):\n  File "/w/train.py", line 9, in <module>\n    loss.backward()\n'
              "torch.OutOfMemoryError: CUDA out of memory."
              " Tried to allocate 2.00 GiB (GPU 0; 23.65 GiB total capacity)\n")
    got = diagnose(_evidence(stderr=stderr, shared_host=True, checkout=Path("/w")))
    assert got.failure == Failure.OOM and got.detail["memory"] == "gpu" and not got.transient
    assert got.detail["frame"] == "train.py:9 in <module>"


def test_missing_program_in_a_shell_runner() -> None:
    got = diagnose(_evidence(exit_code=127, stderr="run.sh: line 2: torchrun: command not found\n"))
    assert got.failure == Failure.MISSING_DEPENDENCY and got.detail["module"] == "torchrun"


def test_the_last_chained_exception_decides_and_warnings_before_it_do_not() -> None:
    stderr = (
        "UserWarning: CUDA initialization: out of memory fallback\n"
        'Traceback (most recent call last):\n  File "/w/a.py", line 1, in <module>\n    import foo\n'
        "ModuleNotFoundError: No module named 'foo'\n\n"
        "During handling of the above exception, another exception occurred:\n\n"
        'Traceback (most recent call last):\n  File "/w/a.py", line 3, in <module>\n'
        '    raise ValueError("bad config")\n'
        "ValueError: bad config\n"
    )
    got = diagnose(_evidence(stderr=stderr))
    assert got.failure == Failure.RUNTIME_ERROR and got.detail["exception"] == "ValueError"


def test_user_frame_prefers_the_checkout_over_installed_packages() -> None:
    frames = [Frame("/w/train.py", 10, "main"), Frame("/w/model.py", 4, "forward"),
              Frame("/venv/lib/python3.11/site-packages/torch/nn/functional.py", 2000, "linear")]
    assert user_frame(frames, Path("/w")) == frames[1]
    text = 'Traceback (most recent call last):\n  File "x.py", line 2, in f\n    g()\nKeyError: \'lr\'\n'
    exc = last_exception(text)
    assert exc is not None and exc.type == "KeyError" and exc.message == "'lr'" and exc.frames[0].line == 2


@pytest.mark.parametrize("values, flagged", [((0.5, 0.5, 0.5, 0.5), True), ((0.5, 0.5, 0.5, 0.51), False),
                                             ((0.5, 0.5, 0.5), False)])  # three runs alike can be chance
def test_constant_across_arms(values: tuple[float, ...], flagged: bool) -> None:
    arms = [ArmOutcome(f"arm{i}", (("K", str(i)),), ((i, v),)) for i, v in enumerate(values)]
    assert (constant_across_arms(arms, "score") is not None) is flagged
    same_config = [ArmOutcome(f"arm{i}", (("K", "1"),), ((i, 0.5),)) for i in range(4)]
    assert constant_across_arms(same_config, "score") is None


def test_the_excerpt_kept_while_a_log_is_written_is_what_reading_the_log_gives(tmp_path: Path) -> None:
    """The executor diagnoses from the excerpt it keeps; `read_log` reads the file. Both must agree at
    every length around the point where the log is cut, for chunks cut anywhere, in any encoding."""
    rng = random.Random(7)
    whole = LOG_HEAD_BYTES + LOG_TAIL_BYTES
    lengths = [0, 1, 100, LOG_HEAD_BYTES, whole - 1, whole, whole + 1, 3 * whole] + [rng.randint(0, 4 * whole)
                                                                                     for _ in range(20)]
    for length in lengths:
        data = bytes(rng.choice(b"ab\n\xc3\xa9\xff") for _ in range(length))
        excerpt = LogExcerpt()
        i = 0
        while i < length:
            size = rng.choice([1, 7, 4096, LOG_HEAD_BYTES + 3, 1 << 20])
            excerpt.add(data[i:i + size])
            i += size
        log = tmp_path / f"{length}.log"
        log.write_bytes(data)
        assert excerpt.text() == read_log(log), length
        assert excerpt.size == length
