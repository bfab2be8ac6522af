"""ratiocinator.execeval on real subprocesses: every label, hostile samples, the loader.

No mocks: each sample really runs in its own sandbox. Most samples run in one batch
(a module fixture) so the file stays fast; the timeouts in it are 1 s.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import suppress
from pathlib import Path

import pytest

from ratiocinator.errors import UsageError
from ratiocinator.execeval.engine import evaluate, format_results, results_json, summarize
from ratiocinator.execeval.samples import LABELS, Limits, Sample, SampleResult, load_samples

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")

DATA = Path(__file__).parent / "data" / "exec_eval_samples.jsonl"
BATCH_LIMITS = Limits(timeout_s=5.0, memory_mb=512, file_size_mb=1)
SECRET = "RATIOCINATOR_TEST_SECRET"
# A name the hostile samples give their processes (via /proc/self/comm), unique to this run.
TAG = "rc" + secrets.token_hex(6)

ADD_PROMPT = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n'
ADD_TEST = textwrap.dedent("""
    METADATA = {"author": "test"}


    def check(candidate):
        assert candidate(1, 2) == 3
        assert candidate(-1, 1) == 0
""")


def humaneval(sample_id: str, completion: str, test: str = ADD_TEST, **extra: object) -> Sample:
    return Sample(id=sample_id, program=ADD_PROMPT + completion, test=test, entry_point="add", **extra)


def plain(sample_id: str, code: str, test: str = "assert True\n", **extra: object) -> Sample:
    return Sample(id=sample_id, program=textwrap.dedent(code), test=textwrap.dedent(test), **extra)


BATCH = [
    humaneval("he-pass", "    return a + b\n"),
    humaneval("he-return-none", "    return None\n"),
    humaneval("he-syntax", "    return a +\n"),
    plain("test-syntax", "x = 1\n", "assert x ==\n"),
    plain("zero-division", "def f(x):\n    return x / 0\n", "assert f(1) == 1\n"),
    plain("wrong-output", "def f(x):\n    return x + 2\n", "assert f(1) == 2, 'f(1) should be 2'\n"),
    plain("program-assert", "def f(x):\n    assert x > 5, 'x too small'\n    return x\n", "assert f(1) == 1\n"),
    plain("swallowed-assert", "def f(x):\n    return 0\n", """
        try:
            assert f(1) == 1
        except AssertionError:
            pass
    """),
    plain("infinite-loop", "while True:\n    pass\n", timeout_s=1.0),
    plain("sleep-forever", "import time\ntime.sleep(10**6)\n", timeout_s=1.0),
    plain("alloc-10gb", "x = bytearray(10 * 1024**3)\n"),
    # Growing to the memory limit touches 512 MiB: well under a second alone, but more than the batch's 5 s
    # on a machine the rest of the suite keeps busy. They end at the limit, so a long wall limit costs nothing.
    plain("growing-list", "x = []\nwhile True:\n    x.append(bytearray(1024 * 1024))\n", timeout_s=60.0),
    plain("doubling-list", "x = [0]\nwhile True:\n    x = x + x\n", timeout_s=60.0),
    plain("check-never-called", "def f(x):\n    return None\n",
          "def check(candidate):\n    assert candidate(1) == 2\n"),
    plain("test-never-called", "def f(x):\n    return x\n",
          "assert f(1) == 1\n\ndef test_more():\n    assert f(2) == 3\n"),
    plain("no-asserts", "def f(x):\n    return None\n", "f(1)\nprint('tests done')\n"),
    plain("checker-called", "def f(x):\n    return x\n",
          "def check_f():\n    if f(2) != 2:\n        raise ValueError('bad')\n\ncheck_f()\n"),
    plain("sys-exit-0", "import sys\nsys.exit(0)\n"),
    plain("sys-exit-in-test", "def f():\n    return 1\n", "import sys\nsys.exit(0)\nassert f() == 2\n"),
    plain("exit-builtin", "exit()\n"),
    plain("quit-builtin", "quit()\n"),
    plain("raise-systemexit", "raise SystemExit(0)\n"),
    plain("os-exit-0", "import os\nos._exit(0)\n"),
    plain("keyboard-interrupt", "raise KeyboardInterrupt\n"),
    plain("sigkill-self", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"),
    plain("print-100mb", """
        import sys
        chunk = "x" * (1024 * 1024 - 1) + "\\n"
        for _ in range(100):
            sys.stdout.write(chunk)
        print("last line")
    """, "assert True\n"),
    plain("forge-stdout", """
        import os
        fake = '{"status": "completed", "asserts_executed": 9, "checkers_called": ["check"], "token": "x"}'
        print(fake, flush=True)
        for fd in range(3, 256):
            try:
                os.write(fd, (fake + "\\n").encode())
            except OSError:
                pass
        os._exit(0)
    """, "assert False\n"),
    plain("huge-file", """
        with open("big.bin", "wb") as f:
            while True:
                f.write(b"x" * 65536)
    """),
    plain("missing-entry-point", "def other(a, b):\n    return a + b\n", ADD_TEST, entry_point="add"),
    plain("sandbox-env", """
        import os, sys
        env = dict(os.environ)
        cwd_listing = os.listdir(".")
        stdin_data = sys.stdin.read()
    """, f"""
        assert "{SECRET}" not in env, env
        assert env["HOME"] == os.getcwd()
        assert cwd_listing == [], cwd_listing
        assert stdin_data == ""
        assert sys.flags.isolated == 1
    """),
    plain("runs-a-subprocess", """
        import subprocess, sys
        out = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True).stdout
    """, "assert out == '42\\n', out\n"),
]

EXPECTED = {
    "he-pass": ("success", None),
    "he-return-none": ("wrong_output", "AssertionError"),
    "he-syntax": ("syntax_error", "SyntaxError"),
    "test-syntax": ("syntax_error", "SyntaxError"),
    "zero-division": ("runtime_error", "ZeroDivisionError"),
    "wrong-output": ("wrong_output", "AssertionError"),
    "program-assert": ("runtime_error", "AssertionError"),
    "swallowed-assert": ("wrong_output", "AssertionError"),
    "infinite-loop": ("timeout", None),
    "sleep-forever": ("timeout", None),
    "alloc-10gb": ("memory_error", "MemoryError"),
    "growing-list": ("memory_error", "MemoryError"),
    "doubling-list": ("memory_error", "MemoryError"),
    "check-never-called": ("no_tests_ran", None),
    "test-never-called": ("no_tests_ran", None),
    "no-asserts": ("no_tests_ran", None),
    "checker-called": ("success", None),
    "sys-exit-0": ("runtime_error", "SystemExit"),
    "sys-exit-in-test": ("runtime_error", "SystemExit"),
    "exit-builtin": ("runtime_error", "SystemExit"),
    "quit-builtin": ("runtime_error", "SystemExit"),
    "raise-systemexit": ("runtime_error", "SystemExit"),
    "os-exit-0": ("runtime_error", "SystemExit"),
    "keyboard-interrupt": ("runtime_error", "KeyboardInterrupt"),
    "sigkill-self": ("runtime_error", "SIGKILL"),
    "print-100mb": ("success", None),
    "forge-stdout": ("runtime_error", "SystemExit"),
    "huge-file": ("runtime_error", "OSError"),
    "missing-entry-point": ("runtime_error", "NameError"),
    "sandbox-env": ("success", None),
    "runs-a-subprocess": ("success", None),
}


@pytest.fixture(scope="module")
def batch() -> dict[str, SampleResult]:
    os.environ[SECRET] = "hunter2"
    try:
        results = evaluate(BATCH, limits=BATCH_LIMITS)
    finally:
        del os.environ[SECRET]
    assert [r.id for r in results] == [s.id for s in BATCH]
    return {r.id: r for r in results}


@pytest.mark.subprocess
@pytest.mark.parametrize("sample_id", list(EXPECTED))
def test_label(batch: dict[str, SampleResult], sample_id: str) -> None:
    result = batch[sample_id]
    label, error_type = EXPECTED[sample_id]
    assert (result.label, result.error_type) == (label, error_type), result.to_json()


def test_every_label_is_covered() -> None:
    assert {label for label, _ in EXPECTED.values()} == set(LABELS)


@pytest.mark.subprocess
def test_return_none_is_wrong_output_with_the_failing_line(batch: dict[str, SampleResult]) -> None:
    result = batch["he-return-none"]
    assert result.evidence["raised_in"] == "test"
    assert result.evidence["phase"] == "check"
    assert result.evidence["source_line"] == "assert candidate(1, 2) == 3"
    assert result.evidence["user_frame"] == {"file": "<test>", "line": 6, "function": "check"}
    assert result.evidence["checkers_called"] == ["check"]


@pytest.mark.subprocess
def test_success_evidence(batch: dict[str, SampleResult]) -> None:
    result = batch["he-pass"]
    assert result.evidence["asserts_executed"] == 2
    assert result.evidence["asserts_failed"] == 0
    assert result.evidence["checkers_defined"] == ["check"] == result.evidence["checkers_called"]
    assert result.evidence["reported"] is True
    assert result.exit_code == 0 and result.signal is None
    assert result.message == ""


@pytest.mark.subprocess
def test_runtime_error_evidence(batch: dict[str, SampleResult]) -> None:
    result = batch["zero-division"]
    assert result.message == "division by zero"
    assert result.evidence["raised_in"] == "program"
    assert result.evidence["frame"] == {"file": "<program>", "line": 2, "function": "f"}
    assert result.evidence["source_line"] == "return x / 0"
    assert "ZeroDivisionError: division by zero" in result.evidence["traceback"]
    assert "ZeroDivisionError" in result.stderr_tail


@pytest.mark.subprocess
def test_syntax_error_names_the_part_and_line(batch: dict[str, SampleResult]) -> None:
    program, test = batch["he-syntax"], batch["test-syntax"]
    assert program.evidence["raised_in"] == "program" and program.evidence["frame"]["line"] == 3
    assert test.evidence["raised_in"] == "test" and test.evidence["frame"]["file"] == "<test>"


@pytest.mark.subprocess
def test_no_tests_ran_says_why(batch: dict[str, SampleResult]) -> None:
    assert "check()" in batch["check-never-called"].message
    assert batch["check-never-called"].evidence["checkers_called"] == []
    assert "test_more()" in batch["test-never-called"].message
    assert batch["test-never-called"].evidence["asserts_executed"] == 1
    assert batch["no-asserts"].evidence["asserts_executed"] == 0
    assert batch["no-asserts"].stdout_tail == "tests done\n"
    assert batch["checker-called"].evidence["checkers_called"] == ["check_f"]


@pytest.mark.subprocess
def test_swallowed_assertion_is_counted(batch: dict[str, SampleResult]) -> None:
    result = batch["swallowed-assert"]
    assert result.evidence["asserts_failed"] == 1
    assert "caught" in result.message


@pytest.mark.subprocess
def test_timeouts_kill_at_the_wall_clock_limit(batch: dict[str, SampleResult]) -> None:
    for sample_id in ("infinite-loop", "sleep-forever"):
        result = batch[sample_id]
        assert result.evidence["limit_hit"] == "wall_time"
        assert result.signal == "SIGKILL"
        assert 0.9 <= result.duration_s < 3.0


@pytest.mark.subprocess
def test_memory_errors_hit_the_memory_limit(batch: dict[str, SampleResult]) -> None:
    for sample_id in ("alloc-10gb", "growing-list", "doubling-list"):
        assert batch[sample_id].evidence["limit_hit"] == "memory"
    assert batch["alloc-10gb"].evidence["max_rss_mb"] < 512


@pytest.mark.subprocess
def test_exits_before_the_tests_are_not_success(batch: dict[str, SampleResult]) -> None:
    assert batch["sys-exit-0"].evidence["phase"] == "program"
    assert batch["sys-exit-in-test"].evidence["phase"] == "test"
    assert "SystemExit(0)" in batch["sys-exit-0"].message
    os_exit = batch["os-exit-0"]
    assert os_exit.exit_code == 0 and os_exit.evidence["reported"] is False
    assert "os._exit" in os_exit.message
    assert batch["sigkill-self"].signal == "SIGKILL" and batch["sigkill-self"].evidence["limit_hit"] is None


@pytest.mark.subprocess
def test_output_capture_is_bounded(batch: dict[str, SampleResult]) -> None:
    result = batch["print-100mb"]
    assert result.evidence["stdout_bytes"] >= 100 * 1024 * 1024
    assert len(result.stdout_tail.encode()) <= 64 * 1024
    assert result.stdout_tail.endswith("last line\n")


@pytest.mark.subprocess
def test_forged_records_are_ignored(batch: dict[str, SampleResult]) -> None:
    result = batch["forge-stdout"]
    assert result.evidence["reported"] is False
    assert '"status": "completed"' in result.stdout_tail


@pytest.mark.subprocess
def test_file_size_limit(batch: dict[str, SampleResult]) -> None:
    result = batch["huge-file"]
    assert result.evidence["limit_hit"] == "file_size"
    assert "File too large" in result.message


@pytest.mark.subprocess
def test_cpu_limit_is_a_timeout() -> None:
    [result] = evaluate([plain("spin", "while True:\n    pass\n")], limits=Limits(timeout_s=20.0, cpu_s=1))
    assert (result.label, result.evidence["limit_hit"]) == ("timeout", "cpu_time"), result.to_json()
    assert result.signal == "SIGXCPU"
    assert result.duration_s < 10.0


def sandbox_processes(zombies: bool = False) -> list[str]:
    """Processes named TAG (live ones only unless `zombies`): the hostile samples below rename themselves so."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        comm = stat[stat.find(b"(") + 1:stat.rfind(b")")].decode(errors="replace")
        state = stat[stat.rfind(b")") + 2:].split()[0]
        if comm == TAG and (zombies or state not in (b"Z", b"X")):
            found.append(name)
    return found


RENAME = f"open('/proc/self/comm', 'w').write('{TAG}')\n"


@pytest.mark.subprocess
def test_fork_bombs_leave_nothing_behind_and_the_evaluator_carries_on() -> None:
    hostile = [
        plain("fork-bomb", "import os\n" + RENAME + "while True:\n    os.fork()\n", timeout_s=2.0),
        plain("patient-fork-bomb", "import os, time\n" + RENAME + textwrap.dedent("""
            while True:
                try:
                    os.fork()
                except OSError:
                    time.sleep(1000)
        """), timeout_s=1.5),
        plain("escaping-daemon", "import os, time\n" + RENAME + textwrap.dedent("""
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    time.sleep(1000)
                os._exit(0)
            os.wait()
        """), "assert True\n", timeout_s=2.0),
    ]
    started = time.monotonic()
    # One at a time, so the result does not depend on the user's shared process pool when not root.
    results = {r.id: r for r in evaluate(hostile, limits=Limits(max_processes=16), workers=1)}
    assert time.monotonic() - started < 20
    assert results["fork-bomb"].label == "runtime_error"
    assert results["fork-bomb"].evidence["limit_hit"] == "processes"
    assert results["patient-fork-bomb"].label == "timeout"
    assert results["patient-fork-bomb"].evidence["killed_processes"] >= 1
    assert results["escaping-daemon"].label == "success"
    assert results["escaping-daemon"].evidence["killed_processes"] == 1
    # Not even zombies: the zygote is their subreaper and reaps every one before reporting.
    assert sandbox_processes(zombies=True) == []
    [after] = evaluate([humaneval("after", "    return a + b\n")])
    assert after.label == "success"


# Run one after the other by one worker, so by the same zygote: the first changes whatever
# interpreter and process state it can, the second must see none of it.
POLLUTER = plain("polluter", """
    import builtins, fcntl, gc, math, os, sys, threading, time, typing
    print(os.getppid())
    builtins.len = lambda obj: 42
    math.pi = 3
    typing.List = None
    sys.modules["leftover_module"] = sys
    sys.path.insert(0, "/leftover")
    sys.setrecursionlimit(100)
    os.environ["LEFTOVER"] = "1"
    with open("leftover.txt", "w") as handle:
        handle.write("x")
    gc.disable()
    fcntl.fcntl(0, fcntl.F_SETFL, fcntl.fcntl(0, fcntl.F_GETFL) | os.O_NONBLOCK)
    threading.Thread(target=time.sleep, args=(100,)).start()
    leftover = 1
""", "assert leftover == 1\n")
PRISTINE = plain("pristine", """
    import fcntl, gc, math, os, sys, threading, typing
    print(os.getppid())


    def is_open(fd):
        try:
            os.fstat(fd)
        except OSError:
            return False
        return True
""", """
    assert len([1, 2]) == 2
    assert math.pi > 3.14
    assert typing.List is not None
    assert "leftover_module" not in sys.modules
    assert "/leftover" not in sys.path
    assert sys.getrecursionlimit() == 1000
    assert "LEFTOVER" not in os.environ
    assert os.listdir(".") == [] and os.getcwd() == os.environ["HOME"] == os.environ["TMPDIR"]
    assert gc.isenabled()
    assert not fcntl.fcntl(0, fcntl.F_GETFL) & os.O_NONBLOCK
    assert threading.active_count() == 1
    assert "leftover" not in globals()
    assert [fd for fd in range(256) if is_open(fd)] == [0, 1, 2, 3]
""")


@pytest.mark.subprocess
def test_a_zygote_forks_each_sample_from_a_pristine_state() -> None:
    polluter, pristine = evaluate([POLLUTER, PRISTINE], workers=1)
    assert polluter.label == "success", polluter.to_json()
    assert pristine.label == "success", pristine.to_json()
    # The same zygote forked both (their parent), so the second really came after the first.
    assert polluter.stdout_tail == pristine.stdout_tail != ""


ZYGOTE_PROBE = """
    import os, resource
    zygote = os.getppid()


    def refused(action):
        try:
            action()
        except PermissionError:
            return True
        return False
"""


@pytest.mark.subprocess
@pytest.mark.skipif(os.geteuid() != 0, reason="as a normal user, samples share the zygote's uid")
def test_as_root_a_sample_cannot_touch_its_zygote() -> None:
    probe = plain("probe", ZYGOTE_PROBE, """
        assert refused(lambda: os.kill(zygote, 0))
        assert refused(lambda: open(f"/proc/{zygote}/environ", "rb").read())
        assert refused(lambda: open(f"/proc/{zygote}/mem", "rb"))
        assert refused(lambda: open(f"/proc/{zygote}/fd/0", "rb"))
        assert refused(lambda: resource.prlimit(zygote, resource.RLIMIT_NOFILE))
        assert refused(lambda: os.setpriority(os.PRIO_PROCESS, zygote, 19))
        assert refused(lambda: os.sched_setaffinity(zygote, {0}))
    """)
    results = evaluate([probe, humaneval("after", "    return a + b\n")], workers=1)
    assert [r.label for r in results] == ["success", "success"], results[0].to_json()


def zygotes_of_this_process() -> list[int]:
    """Children of this test process still running a zygote's loop."""
    found = []
    for tid in os.listdir(f"/proc/{os.getpid()}/task"):
        for child in Path(f"/proc/{os.getpid()}/task/{tid}/children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"harness.serve" in cmdline:
                found.append(int(child))
    return found


@pytest.mark.subprocess
def test_an_interrupted_evaluation_kills_its_sandboxes_and_zygotes() -> None:
    class Stop(Exception):
        pass

    def stop(result: SampleResult) -> None:
        raise Stop(result.id)

    sleeper = plain("sleeper", "import time\n" + RENAME + "time.sleep(1000)\n", timeout_s=60.0)
    started = time.monotonic()
    with pytest.raises(Stop):
        evaluate([humaneval("quick", "    return a + b\n"), sleeper], workers=2, on_result=stop)
    assert time.monotonic() - started < 15
    assert sandbox_processes() == []
    assert zygotes_of_this_process() == []


@pytest.mark.subprocess
def test_results_in_input_order_and_on_result_sees_each() -> None:
    samples = [humaneval(f"s{i}", "    return a + b\n" if i % 2 else "    return a - b\n") for i in range(6)]
    seen: list[str] = []
    results = evaluate(samples, workers=3, on_result=lambda r: seen.append(r.id))
    assert [r.id for r in results] == [s.id for s in samples]
    assert sorted(seen) == sorted(s.id for s in samples)
    assert [r.label for r in results] == ["wrong_output", "success"] * 3


@pytest.mark.subprocess
def test_summary_and_json_shape(batch: dict[str, SampleResult]) -> None:
    results = list(batch.values())
    summary = summarize(results)
    assert list(summary["counts"]) == list(LABELS)
    assert summary["total"] == len(results) == sum(summary["counts"].values())
    assert summary["passed"] == summary["counts"]["success"] == 5
    assert summary["pass_rate"] == pytest.approx(5 / len(results), abs=1e-6)
    assert summary["runtime_error_types"]["SystemExit"] == 7
    rows = json.loads(json.dumps(results_json(results)))
    assert set(rows[0]) == {"id", "label", "error_type", "message", "duration_s", "exit_code", "signal",
                            "stdout_tail", "stderr_tail", "evidence"}
    assert all(set(row["evidence"]) == set(rows[0]["evidence"]) for row in rows)
    assert "passed" in format_results(results).splitlines()[-1]
    assert summarize([]) == {"total": 0, "passed": 0, "pass_rate": 0.0, "counts": dict.fromkeys(LABELS, 0),
                             "runtime_error_types": {}}


# ---------------------------------------------------------------- loading


@pytest.mark.subprocess
def test_fixture_file_round_trip() -> None:
    samples = load_samples(DATA)
    expected = [json.loads(line)["expect"] for line in DATA.read_text().splitlines() if line.strip()]
    assert [s.line for s in samples] == [1, 2, 3, 5, 6, 7]
    assert samples[0].id == "HumanEval/0" and samples[0].entry_point == "has_close_elements"
    assert samples[3].id == "line 5"
    assert [r.label for r in evaluate(samples, limits=Limits(timeout_s=5))] == expected


def write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "samples.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"code": "x = 1", "test": "assert x == 1"})


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "invalid JSON: Expecting property name enclosed in double quotes (column 2)"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({"code": "x = 1"}), "missing field 'test'"),
    (json.dumps({"test": "assert 1"}), "no program"),
    (json.dumps({"prompt": "def f():\n", "test": "assert 1"}), "missing field 'completion'"),
    (json.dumps({"code": 1, "test": "assert 1"}), "field 'code' must be a string, got int"),
    (json.dumps({"code": "", "prompt": "", "completion": "", "test": ""}), "both `code` and"),
    (json.dumps({"code": "", "test": "", "timeout_s": -1}), "field 'timeout_s' must be a positive number"),
    (json.dumps({"code": "", "test": "", "entry_point": "not valid"}), "is not a Python identifier"),
    (json.dumps({"code": "", "test": "", "id": [1]}), "field 'id' must be a string or an integer"),
])
def test_loader_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, GOOD, line)
    with pytest.raises(UsageError) as info:
        load_samples(path)
    assert info.value.message.startswith(f"{path}:2: ")
    assert message in info.value.message


def test_loader_defaults_and_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD, "", "   ", json.dumps({"code": "", "test": "", "id": 7, "timeout_s": 2}),
                 json.dumps({"prompt": "a", "completion": "b", "test": "", "task_id": "T/1", "extra": [1]}))
    samples = load_samples(path)
    assert [(s.id, s.line) for s in samples] == [("line 1", 1), ("7", 4), ("T/1", 5)]
    assert samples[1].timeout_s == 2.0
    assert samples[2].program == "ab" and samples[2].entry_point is None


def test_loader_rejects_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        load_samples(tmp_path / "nope.jsonl")
    with pytest.raises(UsageError, match="no samples"):
        load_samples(write(tmp_path, "", " "))


@pytest.mark.parametrize("bad", [{"timeout_s": 0}, {"memory_mb": 8}, {"cpu_s": float("nan")}, {"max_processes": -1},
                                 {"timeout_s": True}])
def test_invalid_limits_are_usage_errors(bad: dict) -> None:
    with pytest.raises(UsageError, match="invalid limit"):
        Limits(**bad)


def test_invalid_workers_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="workers"):
        evaluate([plain("x", "x = 1")], workers=0)


# ---------------------------------------------------------------- as a normal user

SYSTEM_PYTHON = "/usr/bin/python3.11"
NON_ROOT_SCRIPT = f"""
import json, os, sys, textwrap
from ratiocinator.execeval import Limits, Sample, evaluate
rename = "open('/proc/self/comm', 'w').write('{TAG}')\\n"
samples = [
    Sample(id="ok", program="def f():\\n    return 1\\n", test="assert f() == 1\\n"),
    Sample(id="bomb", program="import os\\n" + rename + "while True:\\n    os.fork()\\n", test="assert True\\n"),
    Sample(id="daemon", program="import os, time\\n" + rename + textwrap.dedent('''
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(1000)
            os._exit(0)
        os.wait()
    '''), test="assert True\\n"),
]
# One at a time: as an ordinary user all samples share the user's RLIMIT_NPROC pool.
results = evaluate(samples, limits=Limits(timeout_s=5, max_processes=8), workers=1)
# Same uid as its zygote: it cannot read or trace it (undumpable), but it can kill it or
# change its limits; the zygote is then replaced, and the next sample sees none of it.
probe = textwrap.dedent('''
    import os, resource
    zygote = os.getppid()
    def refused(action):
        try:
            action()
        except PermissionError:
            return True
        return False
''')
hostile = [
    Sample(id="private", program=probe, test=textwrap.dedent('''
        assert refused(lambda: open(f"/proc/{{zygote}}/environ", "rb").read())
        assert refused(lambda: open(f"/proc/{{zygote}}/mem", "rb"))
        assert refused(lambda: open(f"/proc/{{zygote}}/fd/0", "rb"))
    ''')),
    Sample(id="lower-limit", program="import os, resource\\n"
           "resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (100, 100))\\n", test="assert True\\n"),
    Sample(id="limit-untouched", program="import resource\\n",
           test="assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] != 100\\n"),
    Sample(id="kill-zygote", program="import os, time\\n" + rename + "os.kill(os.getppid(), 9)\\ntime.sleep(100)\\n",
           test="assert True\\n"),
    Sample(id="after", program="def f():\\n    return 1\\n", test="assert f() == 1\\n"),
]
more = evaluate(hostile, limits=Limits(timeout_s=5), workers=1)
print(json.dumps({{"uid": os.getuid(), "labels": [r.label for r in results],
                  "limit": results[1].evidence["limit_hit"], "killed": results[2].evidence["killed_processes"],
                  "hostile": [[r.id, r.label, r.error_type] for r in more]}}))
"""


@pytest.mark.subprocess
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None or not os.access(SYSTEM_PYTHON, os.X_OK),
                    reason="needs root, setpriv and a system python3.11 to become an ordinary user")
def test_as_an_ordinary_user_the_process_cap_and_sweep_still_hold() -> None:
    src = Path(__file__).resolve().parents[1] / "src"
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON, "-c",
                            "import ratiocinator.execeval"], env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, cwd="/", check=False)
    if probe.returncode != 0:
        pytest.skip(f"the package is not importable as nobody: {probe.stderr.strip()[-200:]}")
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON, "-c",
                           NON_ROOT_SCRIPT], env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, cwd="/", timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report == {"uid": 65534, "labels": ["success", "runtime_error", "success"], "limit": "processes",
                      "killed": 1, "hostile": [["private", "success", None], ["lower-limit", "success", None],
                                               ["limit-untouched", "success", None],
                                               ["kill-zygote", "runtime_error", "SandboxLost"],
                                               ["after", "success", None]]}
    assert sandbox_processes() == []


# ---------------------------------------------------------------- escapes: network, /tmp, reading, forged success

AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="network, /tmp and file isolation need root (namespaces, uids)")


@AS_ROOT
@pytest.mark.subprocess
def test_samples_have_no_network() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.5)
        sample = plain("connect", f"""
            import socket
            with socket.create_connection(("127.0.0.1", {listener.getsockname()[1]}), timeout=2) as conn:
                conn.sendall(b"escaped")
        """)
        [result] = evaluate([sample], limits=Limits(timeout_s=5))
        received = b""
        with suppress(TimeoutError):
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(1)
                received = conn.recv(100)
    assert received == b""
    assert result.label == "runtime_error", result.to_json()
    assert result.evidence["network"] == "isolated"


@AS_ROOT
@pytest.mark.subprocess
def test_each_sample_has_a_private_tmp() -> None:
    (probe,) = evaluate([plain("probe", "x = 1", "assert x == 1\n")], limits=Limits(timeout_s=10), workers=1)
    if probe.evidence.get("tmp") == "shared":  # by design when the interpreter or the package lives under /tmp
        pytest.skip("/tmp cannot be private here: the interpreter or a sys.path entry lives in a temp dir"
                    "; the output says /tmp shared (docs/exec-eval.md)")
    name = f"escape_test_{secrets.token_hex(6)}"
    writer = plain("writer", f"""
        import time
        with open("/tmp/{name}", "w") as handle:
            handle.write("left behind")
        time.sleep(1.5)
    """, f"assert open('/tmp/{name}').read() == 'left behind'\n")
    # Runs beside the writer (two workers) and looks for its file all the while.
    reader = plain("reader", f"""
        import os, time
        seen = []
        for _ in range(30):
            seen += [entry for entry in os.listdir("/tmp") if entry == "{name}"]
            time.sleep(0.05)
    """, "assert seen == [], seen\n")
    try:
        results = evaluate([writer, reader], limits=Limits(timeout_s=10), workers=2)
        assert [r.label for r in results] == ["success", "success"], [r.to_json() for r in results]
        assert not Path("/tmp", name).exists()
        assert all(r.evidence["tmp"] == "private" for r in results)
    finally:
        with suppress(FileNotFoundError):
            Path("/tmp", name).unlink()


def _world_searchable(path: Path) -> bool:
    return all(os.stat(parent).st_mode & 0o001 for parent in path.resolve().parents)


@AS_ROOT
@pytest.mark.subprocess
def test_samples_cannot_read_root_files_or_each_others() -> None:
    # A mode-600 root file where every user can reach it: only a capability could read it.
    secret = Path(__file__).parent / f".secret-{TAG}"
    if not _world_searchable(secret):
        pytest.skip(f"{secret.parent} is not reachable by other users")
    holder_tag = "rh" + secrets.token_hex(6)
    holder = plain("holder", f"""
        import time
        open('/proc/self/comm', 'w').write('{holder_tag}')
        with open("work-secret.txt", "w") as handle:
            handle.write("mine")
        time.sleep(2)
    """)
    # Beside the holder: every path to its work file must be refused.
    prober = plain("prober", f"""
        import glob, os, time


        def attempt(path):
            try:
                with open(path) as handle:
                    return "read: " + handle.read()
            except OSError as exc:
                return type(exc).__name__


        holder = None
        for _ in range(100):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if open(f"/proc/{{pid}}/comm").read().strip() == "{holder_tag}":
                        holder = pid
                except OSError:
                    pass
            if holder:
                break
            time.sleep(0.02)
        time.sleep(0.2)
        paths = [f"/proc/{{holder}}/cwd/work-secret.txt", f"/proc/{{holder}}/root/tmp/work-secret.txt"]
        paths += glob.glob("/tmp/ratiocinator-exec-*/work-secret.txt") + glob.glob("/tmp/*/work-secret.txt")
        outcomes = {{path: attempt(path) for path in paths}}
        root_file = attempt("{secret}")
        caps = {{line.split(":")[0]: int(line.split()[1], 16) for line in open("/proc/self/status")
                if line.startswith(("CapEff", "CapPrm", "CapInh", "CapAmb"))}}
    """, """
        assert holder is not None
        assert not [o for o in outcomes.values() if o.startswith("read")], outcomes
        assert root_file == "PermissionError", root_file
        assert caps == {"CapEff": 0, "CapPrm": 0, "CapInh": 0, "CapAmb": 0}, caps
    """)
    secret.write_text("root only")
    secret.chmod(0o600)
    try:
        results = evaluate([holder, prober], limits=Limits(timeout_s=10), workers=2)
    finally:
        secret.unlink()
    assert [r.label for r in results] == ["success", "success"], [r.to_json() for r in results]



@AS_ROOT
def test_without_a_mount_namespace_a_private_interpreter_stops_the_evaluation_with_the_reason() -> None:
    from ratiocinator.execeval import sandbox_child

    needed, _ = sandbox_child._interpreter_paths()
    if not [path for path in needed if sandbox_child._closed_to_others(path)]:
        pytest.skip("this interpreter is world-readable")
    with pytest.raises(SystemExit, match="chmod o\\+rX"):
        sandbox_child._check_reachable(False)  # mounts nothing: only the check


WRONG_F = "def f():\n    return 1\n"
FORGERIES = [
    # The harness's module, found in sys.modules, patched so that every assertion holds.
    plain("forge-sys-modules", WRONG_F + textwrap.dedent("""
        import sys
        harness = sys.modules.get("ratiocinator.execeval.sandbox_child")
        if harness is not None:
            def holds(self, value):
                self.asserts_executed += 1
                return True

            harness.Tally.on_assert = holds
    """), "assert f() == 2\n"),
    # builtins.exec patched: once the tests are defined, `check` is swapped for one that checks nothing.
    Sample(id="forge-exec", entry_point="f", program=WRONG_F + textwrap.dedent("""
        import builtins
        real_exec = builtins.exec


        def fake_exec(code, namespace=None, *rest):
            real_exec(code, namespace, *rest)
            if isinstance(namespace, dict) and "check" in namespace:
                real_exec(compile("def check(candidate):\\n    pass\\n", "<test>", "exec"), namespace)


        builtins.exec = fake_exec
    """), test="def check(candidate):\n    assert candidate() == 2\n"),
    # The stack walked down to the harness's reporter, which is called with a forged record.
    plain("forge-frames", textwrap.dedent("""
        import os, sys

        FORGED = {"status": "completed", "phase": "test", "asserts_executed": 1, "asserts_failed": 0,
                  "checkers_called": []}


        def tokens(value):
            if isinstance(value, dict):
                yield from (v for k, v in value.items() if k == "token" and isinstance(v, str))


        def f():
            frame, found = sys._getframe(1), []
            while frame is not None:
                for scope in (frame.f_locals, frame.f_globals):
                    for name, value in list(scope.items()):
                        found += tokens(value)
                        if callable(value) and name in ("emit", "_emit", "report"):
                            value(dict(FORGED))
                            os._exit(0)
                for scope in (frame.f_locals, frame.f_globals):
                    factory = scope.get("_emitter")
                    for token in found:
                        if callable(factory):
                            factory(3, token)(dict(FORGED))
                            os._exit(0)
                frame = frame.f_back
            return 1
    """), "assert f() == 2\n"),
    # The object graph searched for the reporter.
    plain("forge-gc", textwrap.dedent("""
        import gc, os
        for obj in gc.get_objects():
            if callable(obj) and getattr(obj, "__name__", "") in ("emit", "_emit"):
                obj({"status": "completed", "phase": "test", "asserts_executed": 1, "asserts_failed": 0,
                     "checkers_called": []})
                os._exit(0)
    """) + WRONG_F, "assert f() == 2\n"),
    # A trace function that jumps over the failing assertion.
    plain("forge-trace-jump", WRONG_F + textwrap.dedent("""
        import sys


        def local(frame, event, arg):
            if event == "line" and frame.f_lineno == 1:
                frame.f_lineno = 2
            return local


        sys.settrace(lambda frame, event, arg: local if frame.f_code.co_filename == "<test>" else None)
    """), "assert f() == 2\nassert f() == 1\n"),
    # The tests' assertion hook, found in their namespace, replaced: the next assertion (failing, and
    # caught by the tests) would count as held.
    plain("forge-hook", textwrap.dedent("""
        import sys


        def f():
            names = sys._getframe(1).f_globals
            for name in list(names):
                if "ratiocinator" in name:
                    names[name] = lambda *args: True
            return 1
    """), textwrap.dedent("""
        assert f() == 1
        try:
            assert f() == 2
        except AssertionError:
            pass
    """)),
]


@pytest.mark.subprocess
def test_forged_success_is_not_success() -> None:
    results = {r.id: r for r in evaluate(FORGERIES, limits=Limits(timeout_s=5))}
    for sample in FORGERIES:
        result = results[sample.id]
        assert result.label != "success", result.to_json()
        assert result.label in ("wrong_output", "runtime_error"), result.to_json()


NON_ROOT_ISOLATION_SCRIPT = """
import json, os
from ratiocinator.execeval import Sample, evaluate, format_results
probe = Sample(id="env", program="import os\\nenv = {k: os.environ[k] for k in ('HOME', 'TMPDIR', 'TEMP', 'TMP')}\\n",
               test="assert set(env.values()) == {os.getcwd()}, env\\nassert os.getcwd() != '/tmp'\\n")
[result] = evaluate([probe])
print(json.dumps({"label": result.label, "network": result.evidence["network"], "tmp": result.evidence["tmp"],
                  "summary": format_results([result]).splitlines()[-1]}))
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None or not os.access(SYSTEM_PYTHON, os.X_OK),
                    reason="needs root, setpriv and a system python3.11 to become an ordinary user")
@pytest.mark.subprocess
def test_as_an_ordinary_user_the_output_says_network_open_and_tmp_shared() -> None:
    src = Path(__file__).resolve().parents[1] / "src"
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON, "-c",
                           NON_ROOT_ISOLATION_SCRIPT], env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, cwd="/", timeout=60, check=False)
    if "No module named" in done.stderr:
        pytest.skip(f"the package is not importable as nobody: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["label"] == "success", report
    assert (report["network"], report["tmp"]) == ("open", "shared")
    assert report["summary"].endswith("; network open, /tmp shared")
