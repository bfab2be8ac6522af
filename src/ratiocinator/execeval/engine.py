"""Execution-aware evaluation of generated code: run each sample's tests in a sandbox, say why it fails.

Why: an evaluator that trusts an exit status can be fooled. One published harness
scored 164 of 164 `return None` HumanEval completions as passing because the test file
defined `check(candidate)` and never called it. Here every sample runs in its own
confined subprocess (the harness in `sandbox_child.py`), its tests are instrumented so
we know whether any assertion or checker actually ran, and only a record written on a
private pipe after the tests ran to the end can make a sample pass.

Input (`load_samples`): JSONL, one object per line, blank lines skipped.
  HumanEval style: `prompt`, `completion`, `test`, optional `entry_point`, `task_id`.
      The program is `prompt + completion`; after `test` ran, the harness calls
      `check(<entry_point>)` when the test code defines `check`, as HumanEval does.
  Plain style: `code` (the whole program), `test` (run after it), optional `id`.
  Either style: optional `timeout_s` (seconds, overrides `Limits.timeout_s`).
  Other fields are ignored. `id` defaults to `task_id`, else `line N`.

Labels. The program and the tests are compiled in the parent first:
  syntax_error   either does not compile (`evidence.raised_in` says which); nothing runs.
Then, when the harness delivered its final record (the tests completed or raised):
  memory_error   MemoryError.
  wrong_output   AssertionError whose innermost program/test frame is in the test code; or
                 the tests completed but one of their assertions failed and its
                 AssertionError was caught (e.g. by a try/except in the tests).
  runtime_error  any other exception, `error_type` naming it; an AssertionError raised in the
                 program's own code is one too. Leaving early is one: sys.exit(), exit(),
                 quit(), raise SystemExit -> `SystemExit` (whatever the status, 0 included);
                 KeyboardInterrupt -> `KeyboardInterrupt`.
  no_tests_ran   the tests completed, but a top-level `check*`/`test*` function of the test
                 code was never called, or no assertion of the test code executed and no
                 such checker was called.
  success        the tests completed, at least one assertion executed or checker was called,
                 every checker the test code defines was called, and no assertion failed.
Without a final record (the process ended or was killed before the tests finished):
  timeout        the wall-clock limit passed (the parent kills the whole sandbox), or the CPU
                 limit killed it (SIGXCPU, or SIGKILL at the hard limit).
  memory_error   its stderr shows MemoryError, or it was SIGKILLed near the memory limit.
  runtime_error  otherwise: `SystemExit` when it exited with a status (os._exit(0) included:
                 exiting is never success), else the signal's name (`SIGSEGV`, ...).
                 `SandboxLost` whatever the records say, when the zygote that forked the
                 sandbox died mid-sample (as a normal user, a sample can kill it).
An executed assertion is one whose condition was evaluated: `assert c, m` in the test code
is rewritten to `assert (<held>() if c else (<failed>() and False)), m`, and each top-level
`check*`/`test*` function of the test code starts with a call to a checker hook; the hooks
are placeholder constants the harness replaces in the code objects, not names. Asserts in
the program never count. Checks that are not `assert` statements (unittest's
`self.assertEqual`, `if ...: raise`) only count through the checker they run in.

JSON shape (`SampleResult.to_json`, `results_json`), keys always present:
  {"id": str, "label": one of LABELS, "error_type": str | null, "message": str,
   "duration_s": float, "exit_code": int | null, "signal": str | null ("SIGKILL", ...),
   "stdout_tail": str, "stderr_tail": str  (the last `Limits.capture_kb` KiB of each),
   "evidence": {
     "phase": "compile" | "program" | "test" | "check" | null   (where the harness was),
     "raised_in": "program" | "test" | null   (innermost frame of the sample's own code),
     "frame": {"file", "line", "function"} | null   (last traceback frame),
     "user_frame": {"file", "line", "function"} | null   (innermost program/test frame),
     "source_line": str | null, "traceback": str | null, "errno": int | null,
     "asserts_executed": int | null, "asserts_failed": int | null,
     "checkers_defined": [str] | null, "checkers_called": [str] | null,
     "limit_hit": "wall_time" | "cpu_time" | "memory" | "file_size" | "processes" | null,
     "reported": bool   (a sandbox ran and its harness delivered the final record),
     "cpu_s": float, "max_rss_mb": float, "stdout_bytes": int, "stderr_bytes": int,
     "killed_processes": int   (sandbox processes still alive at the end, then killed),
     "network": "isolated" | "open" | null   (see Network below; null when nothing ran),
     "tmp": "private" | "shared" | null   (see /tmp below)}}
`isolation(results)` gives the weakest of each over all results, as the CLI's document does.
`summarize` gives {"total", "passed", "pass_rate", "counts": {label: n for every label},
"runtime_error_types": {error_type: n}}.

Sandbox, per sample: a fresh fork of a zygote (below) in a new session, its worker's temp
dir, emptied after every sample, as cwd, HOME, TMPDIR, TEMP and TMP (as root also mounted
over /tmp), a minimal environment (PATH, a UTF-8 locale, a marker; nothing
else of ours), its own /dev/null as stdin, stdout/stderr read continuously and kept to a
bounded tail, no fd but those and its result pipe, RLIMIT_CPU/AS/FSIZE/NPROC/CORE set in
the child before any sample code runs, a wall-clock limit enforced by the parent, and at
the end every process of the sandbox is SIGKILLed and reaped, whatever the sample did.
  Zygotes (`sandbox_child.serve`): one per worker, started once per `evaluate` call as
`python -I` (as root when we are root, in its own session, with the minimal environment),
which imports the harness and a few stdlib modules once and then forks one child per
sample; the child confines itself exactly as a fresh interpreter did. This replaced a
`python -I` start per sample (~25 ms of CPU, more than most samples take). A zygote
never runs or reads sample code, so every sample starts from the same pristine
interpreter state, never from a used process; samples of one worker share only its str
hash seed. The zygote is a child subreaper, so every process a sample starts stays its
descendant (setsid daemons whose parent exited included): it kills and reaps exactly that
tree and reports the wait status and rusage. Should a zygote die, the sandbox is swept
the old way: its session and process group, and processes carrying the zygote's
environment marker or, as root, the sample's uid.
  As root, each concurrent sample runs as its own unprivileged uid (from SANDBOX_UID_BASE,
claimed with lock files so concurrent evaluations do not share one) with no capabilities
and no_new_privs, so RLIMIT_NPROC caps exactly that sample and it can signal nothing but
itself, nor read any file its uid may not (another sample's dir, a mode-600 file of root's).
When the interpreter lives in a directory other users cannot enter (e.g. /root/.pyenv with
/root mode 700), the zygote mounts an empty tmpfs over that directory in its own mount
namespace and binds the interpreter's directories (prefixes, sys.path) back at their own
paths, read-only; so samples start and import without any capability, and see nothing
else of it. Where that cannot be done (the mount namespace is refused) and the interpreter
is not world-readable, the evaluation stops with a SandboxError saying so.
  As a normal user, RLIMIT_NPROC counts all of that user's tasks, so each sample's cap is
the user's tasks at its start plus `max_processes`: concurrent samples share what is left,
and a fork bomb can briefly make another sample's fork() fail. A deliberately hostile
sample could also signal the evaluator or its zygote (same uid; the zygote is undumpable,
so not ptrace, /proc/PID/mem or fds): a killed zygote labels its sample `SandboxLost` and
is replaced, and one whose limits, priority, CPU affinity or scheduling policy were
changed retires before its next fork. Run as root, in a container or as a dedicated user
for hostile samples. As root, samples can do none of that to a zygote.
  Network: as root, each zygote unshares a network namespace of its own before it forks
any sample, so its samples see only a loopback interface that is down: no TCP or UDP to
anywhere, the machine's 127.0.0.1 included, and no abstract Unix socket outside it (Unix
sockets that are files stay reachable where their permissions allow). Not root, or where
the namespace is refused, samples share the evaluator's network: `network` says "open".
  /tmp: as root, each zygote also unshares a mount namespace (every mount in it private,
so nothing propagates back) in which its sandbox dir is bind-mounted over /tmp, /var/tmp
and /dev/shm, and is each sample's cwd as "/tmp": the evaluator empties it after every
sample (through an fd, whatever modes the sample left), so nothing a sample writes there
outlives it, and it sees neither other workers' samples' files nor the machine's. Not
root, where the namespace is refused, or where the interpreter or a sys.path entry lies in
one of those dirs (it would be hidden), /tmp is the machine's (`tmp` says "shared");
TMPDIR, TEMP and TMP still point at the sandbox dir.
  Forged success: the sample runs in the harness's own process, so the harness keeps what
decides a success out of reach of plain Python (its modules out of sys.modules, private
references bound before the sample runs, the reporter and its token in no frame's locals
or globals, the hooks as code constants, the object graph and tracing refused by an audit
hook); native code (ctypes, /proc/self/mem) can still forge a record, and tests that rely
on what the sample can patch (builtins, modules, their own globals, returned objects) can
still be fooled. `sandbox_child._records` and docs/exec-eval.md list both sides.
"""

from __future__ import annotations

import ast
import errno
import fcntl
import functools
import json
import marshal
import math
import os
import secrets
import selectors
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType
from typing import Any

from ratiocinator.errors import RatiocinatorError, UsageError

# The harness: its protocol constants, and imported here so that the zygotes find its bytecode cached.
from ratiocinator.execeval import sandbox_child

LABELS = ("success", "wrong_output", "runtime_error", "syntax_error", "timeout", "memory_error", "no_tests_ran")
SANDBOX_UID_BASE = 2_000_000_000
SANDBOX_UID_SPAN = 4096
MARKER_VARIABLE = "RATIOCINATOR_SANDBOX"
# The zygote imports the harness (from its cached bytecode) from the directory holding
# this package, which it then takes off sys.path again; `-I` keeps the environment and
# the cwd out of it. It then serves on the socket whose fd is its second argument, with the
# third as its sandbox dir.
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
ZYGOTE_BOOTSTRAP = ("import sys; sys.path.insert(0, sys.argv[1]); import ratiocinator.execeval.sandbox_child as"
                    " harness; del sys.path[0]; harness.serve(int(sys.argv[2]), sys.argv[3])")
ZYGOTE_START_S = 60.0
RECORD_BYTES = 1024 * 1024
PROGRAM_FILE = "<program>"
TEST_FILE = "<test>"
# What the instrumented tests call: placeholder constants (no name in any namespace), which
# the harness replaces by its hooks in the test's code objects (`sandbox_child._with_hooks`).
ASSERT_HELD = "\0ratiocinator: an assertion held"
ASSERT_FAILED = "\0ratiocinator: an assertion failed"
CHECKER_CALLED = "\0ratiocinator: a checker was called"
CHECKER_PREFIXES = ("check", "test")
DRAIN_S = 2.0
KILL_S = 5.0
# How long a zygote may take to kill and reap a sample's processes once asked, before it
# is itself killed and the sample swept the slow way.
ZYGOTE_KILL_S = KILL_S + 5.0


class SandboxError(RatiocinatorError):
    """The sandbox itself could not be set up; no sample was judged."""

    exit_code = 1


@dataclass(frozen=True)
class Limits:
    """What one sample may use.

    `cpu_s=None` means the sample's wall-clock timeout plus one second: the wall clock then
    decides for single-threaded code, and threads burning several cores are still cut off.
    `max_processes` counts the processes and threads a sample may add to its own.
    """

    timeout_s: float = 10.0
    cpu_s: float | None = None
    memory_mb: int = 1024
    file_size_mb: int = 16
    max_processes: int = 32
    capture_kb: int = 64

    def __post_init__(self) -> None:
        rules = (("timeout_s", 0, True), ("cpu_s", 0, True), ("memory_mb", 64, False), ("file_size_mb", 0, False),
                 ("max_processes", 0, False), ("capture_kb", 0, False))
        for name, bound, exclusive in rules:
            value = getattr(self, name)
            if name == "cpu_s" and value is None:
                continue
            valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and (value > bound if exclusive else value >= bound)
            if not valid:
                raise UsageError(f"invalid limit {name}={value!r}",
                                 hint=f"{name} must be a finite number {'>' if exclusive else '>='} {bound}")

    def cpu_seconds(self, timeout_s: float) -> int:
        return max(1, math.ceil(self.cpu_s)) if self.cpu_s is not None else math.ceil(timeout_s) + 1


@dataclass(frozen=True)
class Sample:
    """One program and the tests to run after it."""

    id: str
    program: str
    test: str
    entry_point: str | None = None
    timeout_s: float | None = None
    line: int | None = None


@dataclass(frozen=True)
class SampleResult:
    """The label of one sample and the evidence for it."""

    id: str
    label: str
    error_type: str | None
    message: str
    evidence: dict[str, Any]
    duration_s: float
    exit_code: int | None
    signal: str | None
    stdout_tail: str
    stderr_tail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "label": self.label,
            "error_type": self.error_type,
            "message": self.message,
            "duration_s": round(self.duration_s, 4),
            "exit_code": self.exit_code,
            "signal": self.signal,
            "stdout_tail": self.stdout_tail,
            "stderr_tail": self.stderr_tail,
            "evidence": self.evidence,
        }


# ---------------------------------------------------------------- loading samples


def load_samples(path: str | Path) -> list[Sample]:
    """Parse a JSONL file of samples; any problem is a UsageError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"samples file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UsageError(f"cannot read samples file {path}: {exc.strerror}") from None
    samples = []
    # Split on newlines only: str.splitlines() would also split at U+2028 inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{number}: invalid JSON: {exc.msg} (column {exc.colno})",
                             hint="each non-blank line must be one JSON object") from None
        samples.append(sample_from_json(obj, where=f"{path}:{number}", line=number))
    if not samples:
        raise UsageError(f"{path}: no samples (the file is empty or blank)")
    return samples


def sample_from_json(obj: object, *, where: str, line: int | None = None) -> Sample:
    """Build a Sample from one decoded JSONL object; `where` prefixes error messages."""
    hint = ("give either `code` and `test` (plain style) or `prompt`, `completion`, `test` "
            "and optionally `entry_point` (HumanEval style)")
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(obj).__name__}", hint=hint)

    def optional(key: str) -> str | None:
        if key not in obj:
            return None
        value = obj[key]
        if not isinstance(value, str):
            raise UsageError(f"{where}: field {key!r} must be a string, got {type(value).__name__}", hint=hint)
        return value

    def required(key: str) -> str:
        value = optional(key)
        if value is None:
            raise UsageError(f"{where}: missing field {key!r}", hint=hint)
        return value

    if "code" in obj and ("prompt" in obj or "completion" in obj):
        raise UsageError(f"{where}: both `code` and `prompt`/`completion` given; which is the program?", hint=hint)
    if "code" in obj:
        program = required("code")
    elif "prompt" in obj or "completion" in obj:
        program = required("prompt") + required("completion")
    else:
        raise UsageError(f"{where}: no program: missing field 'code' (or 'prompt' and 'completion')", hint=hint)
    test = required("test")
    entry_point = optional("entry_point") or None
    if entry_point is not None and not entry_point.isidentifier():
        raise UsageError(f"{where}: entry_point {entry_point!r} is not a Python identifier", hint=hint)

    timeout_s = obj.get("timeout_s")
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                  or not math.isfinite(timeout_s) or timeout_s <= 0):
        raise UsageError(f"{where}: field 'timeout_s' must be a positive number, got {timeout_s!r}")

    sample_id = None
    for key in ("id", "task_id"):
        value = obj.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise UsageError(f"{where}: field {key!r} must be a string or an integer, got {type(value).__name__}")
        sample_id = str(value)
        break
    if sample_id is None:
        sample_id = f"line {line}" if line is not None else where
    return Sample(id=sample_id, program=program, test=test, entry_point=entry_point,
                  timeout_s=float(timeout_s) if timeout_s is not None else None, line=line)


# ---------------------------------------------------------------- compiling


def _hook(placeholder: str) -> ast.expr:
    """`(None or "<placeholder>")`: compiles to the placeholder constant, without the "not callable" warning."""
    return ast.BoolOp(op=ast.Or(), values=[ast.Constant(None), ast.Constant(placeholder)])


class _CountAsserts(ast.NodeTransformer):
    """`assert cond, msg` -> `assert (<held>() if cond else (<failed>() and False)), msg`.

    The interpreter itself tests `cond` (once, as before), so no hook decides whether an
    assertion holds: each only counts, the `failed` one whenever it does not.
    """

    def visit_Assert(self, node: ast.Assert) -> ast.Assert:
        self.generic_visit(node)
        held = ast.Call(func=_hook(ASSERT_HELD), args=[], keywords=[])
        failed = ast.BoolOp(op=ast.And(), values=[ast.Call(func=_hook(ASSERT_FAILED), args=[], keywords=[]),
                                                  ast.Constant(False)])
        node.test = ast.copy_location(ast.IfExp(test=node.test, body=held, orelse=failed), node.test)
        return node


def instrument_test(source: str) -> tuple[CodeType, list[str]]:
    """Compile test code with counted asserts and announced checkers; returns the code and checker names.

    Checkers are the top-level `def`s whose names start with `check` or `test`; each gets
    a call to the checker hook as its first statement (after any docstring).
    """
    tree = ast.parse(source, TEST_FILE)
    checkers = []
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name.startswith(CHECKER_PREFIXES):
            checkers.append(stmt.name)
            call = ast.Call(func=_hook(CHECKER_CALLED), args=[ast.Constant(stmt.name)], keywords=[])
            first = stmt.body[0]
            has_docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                and isinstance(first.value.value, str)
            stmt.body.insert(1 if has_docstring else 0, ast.copy_location(ast.Expr(call), first))
    tree = ast.fix_missing_locations(_CountAsserts().visit(tree))
    return compile(tree, TEST_FILE, "exec", dont_inherit=True, optimize=0), checkers


@dataclass(frozen=True)
class _Compiled:
    program: CodeType
    test: CodeType
    checkers: list[str]


@functools.lru_cache(maxsize=512)
def _instrumented(source: str) -> tuple[CodeType, tuple[str, ...]]:
    """`instrument_test`, once per distinct test: many samples (n completions per task) share their tests.

    Code objects are immutable, so sharing one between samples shares nothing they can change.
    """
    code, checkers = instrument_test(source)
    return code, tuple(checkers)


def _compile(sample: Sample) -> _Compiled | tuple[BaseException, str]:
    """Compile in the parent: the child then needs no parser, and a syntax error needs no child."""
    try:
        program = compile(sample.program, PROGRAM_FILE, "exec", dont_inherit=True, optimize=0)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        return exc, "program"
    try:
        test, checkers = _instrumented(sample.test)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        return exc, "test"
    return _Compiled(program, test, list(checkers))


# ---------------------------------------------------------------- /proc


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


@dataclass(frozen=True)
class _Proc:
    """One process, from /proc/PID/stat and the owner of /proc/PID (its euid while dumpable)."""

    pid: int
    state: bytes
    pgrp: int
    session: int
    threads: int
    owner: int

    @property
    def dead(self) -> bool:
        return self.state in (b"Z", b"X", b"x")


def _processes() -> Iterator[_Proc]:
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        data = _read_bytes(f"/proc/{name}/stat")
        if data is None:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        try:
            owner = os.stat(f"/proc/{name}").st_uid
            yield _Proc(int(name), fields[0], int(fields[2]), int(fields[3]), int(fields[17]), owner)
        except (OSError, IndexError, ValueError):
            continue


def _real_uid(pid: int) -> int | None:
    """The real uid from /proc/PID/status: slower than `_Proc.owner`, but right for undumpable processes."""
    data = _read_bytes(f"/proc/{pid}/status")
    for line in (data or b"").splitlines():
        if line.startswith(b"Uid:"):
            return int(line.split()[1])
    return None


def _tasks_of_user(uid: int) -> int:
    """Tasks (processes and threads, zombies included) owned by `uid`: what RLIMIT_NPROC counts.

    Only the user's own processes have their stat read: this runs once per sample as a normal user.
    """
    tasks = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
        except OSError:
            continue
        data = _read_bytes(f"/proc/{name}/stat")
        if data is None:
            continue
        with suppress(IndexError, ValueError):
            tasks += int(data[data.rfind(b")") + 2:].split()[17])
    return tasks


def _sweep(session: int | None, uid: int | None, marker: bytes) -> tuple[list[int], int]:
    """Live processes of one sandbox, and the zombies its uid still holds (root mode).

    A process belongs to the sandbox if it is in the sandbox's session or process group,
    or (as root) runs as the sandbox's uid, or (as a normal user) carries its marker in
    its environment, which is how daemons that called setsid() are still found.
    """
    alive, zombies = [], 0
    me, own_uid = os.getpid(), os.getuid()
    for proc in _processes():
        if proc.pid in (me, session):
            continue
        if proc.dead:
            zombies += uid is not None and proc.owner == uid
        elif session is not None and session in (proc.pgrp, proc.session):
            alive.append(proc.pid)
        elif uid is not None:
            if proc.owner == uid:
                alive.append(proc.pid)
        elif proc.owner == own_uid and marker:
            environ = _read_bytes(f"/proc/{proc.pid}/environ")
            if environ is not None and marker in environ.split(b"\0"):
                alive.append(proc.pid)
    return alive, zombies


def _kill_sandbox(session: int | None, uid: int | None, marker: bytes) -> tuple[int, int]:
    """SIGKILL every process of the sandbox until none is left; returns (killed, zombies left).

    The main process (`session`) is killed with its process group but not counted.
    """
    killed: set[int] = set()
    deadline = time.monotonic() + KILL_S
    while True:
        alive, zombies = _sweep(session, uid, marker)
        if session is not None:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(session, signal.SIGKILL)
        if not alive or time.monotonic() > deadline:
            return len(killed), zombies
        for pid in alive:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.005)


def _kill_uid(uid: int) -> int:
    """Kill every live process whose real uid is `uid`, undumpable ones included."""
    killed = 0
    for _ in range(100):
        alive = [p.pid for p in _processes() if not p.dead and (p.owner == uid or _real_uid(p.pid) == uid)]
        if not alive:
            break
        for pid in alive:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        killed += len(alive)
        time.sleep(0.01)
    return killed


# ---------------------------------------------------------------- identities


def _uid_range_mapped(start: int, count: int) -> bool:
    data = _read_bytes("/proc/self/uid_map")
    if data is None:
        return True
    for line in data.decode().splitlines():
        inside, _, length = (int(x) for x in line.split())
        if inside <= start and start + count <= inside + length:
            return True
    return False


@dataclass
class _Identity:
    """Who one sample runs as (`uid` None is the caller's own uid, not root), and the zygote that forks it."""

    uid: int | None = None
    # Tasks the uid still holds (killed, not yet reaped by init) from before it was claimed,
    # or from a sample whose zygote was lost: RLIMIT_NPROC counts them, so the next sample's
    # cap is raised by as many. A zygote itself reaps every process of its samples.
    zombies: int = 0
    zygote: _Zygote | None = None


class _Identities:
    """The identities of one evaluation: the caller's own, or (as root) one claimed unprivileged uid per slot."""

    def __init__(self, slots: int) -> None:
        self._locks: list[int] = []
        self._free: list[_Identity] = []
        self._all: list[_Identity] = []
        self._claimed: list[int] = []
        self._lock = threading.Lock()
        if os.geteuid() != 0:
            self._free = [_Identity() for _ in range(slots)]
            self._all = list(self._free)
            return
        if not _uid_range_mapped(SANDBOX_UID_BASE, SANDBOX_UID_SPAN):
            raise SandboxError(
                f"running as root, but uids {SANDBOX_UID_BASE}..{SANDBOX_UID_BASE + SANDBOX_UID_SPAN - 1} "
                "are not mapped in this user namespace, so samples cannot be confined",
                hint="run the evaluation as a non-root user")
        lock_dir = Path(tempfile.gettempdir()) / "ratiocinator-sandbox-uids"
        lock_dir.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(lock_dir)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0:
            raise SandboxError(f"{lock_dir} is not a directory owned by root", hint="remove it and retry")
        for uid in range(SANDBOX_UID_BASE, SANDBOX_UID_BASE + SANDBOX_UID_SPAN):
            fd = os.open(lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._locks.append(fd)
            self._claimed.append(uid)
            if len(self._claimed) == slots:
                break
        if not self._claimed:
            raise SandboxError(f"all {SANDBOX_UID_SPAN} sandbox uids are claimed by other evaluations",
                               hint=f"wait for them, or remove stale locks in {lock_dir}")
        for uid in self._claimed:
            _kill_uid(uid)  # whatever an evaluator that died mid-sample left behind
            self._free.append(_Identity(uid, _tasks_of_user(uid)))
        self._all = list(self._free)

    @property
    def slots(self) -> int:
        return len(self._free)

    @contextmanager
    def lease(self) -> Iterator[_Identity]:
        with self._lock:
            identity = self._free.pop()
        try:
            yield identity
        finally:
            with self._lock:
                self._free.append(identity)

    def close(self) -> None:
        """Stop the zygotes, sweep each uid once more (undumpable processes included), and unlock it."""
        zygotes = [identity.zygote for identity in self._all if identity.zygote is not None]
        for zygote in zygotes:
            zygote.sock.close()  # all of them told first: each then ends in parallel
        for identity in self._all:
            identity.zygote = None
        for zygote in zygotes:
            zygote.close()
        for uid in self._claimed:
            _kill_uid(uid)
        for zygote in zygotes:
            zygote.remove_dir()
        for fd in self._locks:
            os.close(fd)
        self._locks.clear()
        self._claimed.clear()


# ---------------------------------------------------------------- one sample


class _Tail:
    """The last `limit` bytes of a stream, and how many bytes it had in all."""

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self.total = 0
        self._data = bytearray()

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self._data += chunk
        if len(self._data) > 2 * self.limit + 65536:
            del self._data[:-self.limit]

    def text(self) -> str:
        return bytes(self._data[-self.limit:] if self.limit else b"").decode("utf-8", errors="replace")


class _Cancelled(Exception):
    """The evaluation was interrupted; the sample's sandbox has been killed."""


def _minimal_env(marker_value: str) -> dict[str, str]:
    """PATH, a UTF-8 locale, the marker; nothing from our environment. The sandbox adds HOME and TMPDIR."""
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        # One BLAS/OpenMP thread: reproducible, and threads count against max_processes.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        MARKER_VARIABLE: marker_value,
    }


def _empty_dir(dir_fd: int) -> None:
    """Remove everything in the dir open as `dir_fd`, whatever modes a sample left; only through fds, never a path.

    Runs once the sample's processes are all gone. Raises OSError (RecursionError for an
    absurdly deep tree) when something cannot be removed.
    """
    for _ in range(3):
        names = os.listdir(dir_fd)
        if not names:
            return
        for name in names:
            if not stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                os.unlink(name, dir_fd=dir_fd)
                continue
            os.chmod(name, 0o700, dir_fd=dir_fd)  # a dir, not a link (the sample is gone: no race)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                _empty_dir(sub)
            finally:
                os.close(sub)
            os.rmdir(name, dir_fd=dir_fd)
    if os.listdir(dir_fd):
        raise OSError(errno.ENOTEMPTY, "a sandbox dir cannot be emptied")


@dataclass(frozen=True)
class _Reply:
    """One message of a zygote (`sandbox_child.REPLY`)."""

    kind: bytes
    pid: int
    status: int
    utime: float
    stime: float
    maxrss_kb: int
    killed: int
    ended_first: bool


class _ZygoteLost(Exception):
    """The zygote died or stopped answering."""


class _Zygote:
    """One fork server (`sandbox_child.serve`): a started harness that forks a fresh sandbox per sample.

    Why: `python -I` plus the harness import cost ~25 ms of CPU per sample; a fork of a
    process that has done both costs ~1 ms. Its environment is the sandbox's minimal one
    with a marker unique to this zygote, which every process it forks carries in
    /proc/PID/environ: that is how a sample's processes are still found, as a normal user,
    should the zygote itself be killed.
      Its sandbox dir (`workdir`, owned by its samples' uid) is the cwd, HOME and TMPDIR of
    each sample it forks, one after the other, and with a private mount namespace also
    their /tmp: `clean` empties it after every sample. One dir per worker rather than per
    sample, so that no sample costs a mount (unmounting waits for an RCU grace period)
    nor a mkdir and rmdir.
    """

    def __init__(self, uid: int | None) -> None:
        marker_value = secrets.token_hex(12)
        self.marker = f"{MARKER_VARIABLE}={marker_value}".encode()
        self.uid = uid
        self.workdir = tempfile.mkdtemp(prefix="ratiocinator-exec-")
        # Held for its lifetime: the samples share the dir's owner, and as a normal user also
        # the evaluator's uid, so it is emptied through this fd, never by its path.
        self.dir_fd = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if uid is not None:
                os.fchown(self.dir_fd, uid, uid)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except BaseException:
            self.remove_dir()
            raise
        argv = [sys.executable, "-I", "-c", ZYGOTE_BOOTSTRAP, PACKAGE_ROOT, str(theirs.fileno()), self.workdir]
        try:
            self.proc = _start_process(argv, _minimal_env(marker_value), theirs.fileno())
        except BaseException:
            ours.close()
            self.remove_dir()
            raise
        finally:
            theirs.close()
        self.sock = ours
        reply = self.receive(ZYGOTE_START_S)
        if reply is None or reply.kind != sandbox_child.READY:
            hint = self.discard()
            self.remove_dir()
            raise SandboxError("the sandbox's fork server (zygote) failed to start", hint=hint)
        # What its samples are isolated from (`sandbox_child._isolate`), for each result's evidence.
        self.isolation = {"network": "isolated" if reply.status & sandbox_child.NETWORK_ISOLATED else "open",
                          "tmp": "private" if reply.status & sandbox_child.TMP_PRIVATE else "shared"}

    def receive(self, timeout: float) -> _Reply | None:
        """Its next reply; None when it is gone, said nothing for `timeout` seconds, or said nonsense."""
        try:
            self.sock.settimeout(timeout)
            data = self.sock.recv(256)
        except OSError:
            return None
        if len(data) != sandbox_child.REPLY.size:
            return None
        return _Reply(*sandbox_child.REPLY.unpack(data))

    def start(self, fds: Sequence[int]) -> int:
        """Fork a sandbox with `fds` (its stdout, stderr, result pipe and job) and the dir; returns its pid."""
        for attempt in range(6):
            try:
                socket.send_fds(self.sock, [sandbox_child.REQUEST_RUN], [*fds, self.dir_fd])
            except OSError:
                raise _ZygoteLost() from None
            reply = self.receive(ZYGOTE_START_S)
            if reply is None or reply.kind not in (sandbox_child.STARTED, sandbox_child.FAILED):
                raise _ZygoteLost()
            if reply.kind == sandbox_child.STARTED:
                return reply.pid
            if reply.status != errno.EAGAIN or attempt == 5:
                raise SandboxError(f"cannot start a sandbox process: {os.strerror(reply.status)}")
            # The machine is briefly out of processes (another sandbox's fork bomb being killed).
            time.sleep(0.05 * 2 ** attempt)
        raise AssertionError("unreachable")

    def clean(self) -> bool:
        """Empty the sandbox dir once a sample's processes are all gone, for the next; False if the dir was replaced.

        Through the fd held since it was made: the dir itself cannot be swapped for a
        link to elsewhere. Its owner and mode are set again (the sample owned it).
        """
        try:
            os.fchmod(self.dir_fd, 0o700)
            _empty_dir(self.dir_fd)
            if self.uid is not None:
                os.fchown(self.dir_fd, self.uid, self.uid)
            return os.path.samestat(os.stat(self.workdir, follow_symlinks=False), os.fstat(self.dir_fd))
        except (OSError, RecursionError):
            return False

    def remove_dir(self) -> None:
        """Empty and remove the sandbox dir, once every process that could use it is gone."""
        if self.dir_fd < 0:
            return
        if self.clean():
            with suppress(OSError):
                os.rmdir(self.workdir)
        os.close(self.dir_fd)
        self.dir_fd = -1

    def kill(self) -> None:
        """Ask it to end the running sample now; its DONE reply follows once every process is reaped."""
        with suppress(OSError):
            self.sock.settimeout(1.0)
            self.sock.send(sandbox_child.REQUEST_KILL)

    def close(self) -> None:
        """Let it go: a closed socket ends its loop (killing a running sample first); SIGKILL if it lingers."""
        self.sock.close()
        try:
            self.proc.wait(timeout=ZYGOTE_KILL_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def discard(self) -> str | None:
        """SIGKILL it (it is lost or failed); returns the last of what it wrote to stderr."""
        with suppress(OSError):
            self.proc.kill()
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=ZYGOTE_KILL_S)
        text = None
        stderr = self.proc.stderr  # a pipe: the zygote starts with stderr=PIPE
        with suppress(OSError, ValueError, TypeError):
            if stderr is not None:
                os.set_blocking(stderr.fileno(), False)
                text = (stderr.read(65536) or b"").decode("utf-8", errors="replace").strip()[-2000:] or None
        self.close()
        return text


def _anonymous_file() -> int:
    """A read-write fd on a file with no name (its own open file, never shared)."""
    try:
        return os.memfd_create("ratiocinator-job", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        return os.dup(tempfile.TemporaryFile().fileno())


def _start_process(argv: list[str], env: dict[str, str], keep_fd: int) -> subprocess.Popen:
    for attempt in range(6):
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    cwd="/", env=env, start_new_session=True, pass_fds=(keep_fd,))
        except BlockingIOError:
            # The machine is briefly out of processes (another sandbox's fork bomb being killed).
            if attempt == 5:
                raise SandboxError("cannot start a sandbox process: the system is out of processes") from None
            time.sleep(0.05 * 2 ** attempt)
    raise AssertionError("unreachable")


def _fork_sandbox(identity: _Identity, fds: Sequence[int]) -> tuple[_Zygote, int]:
    """Fork the sample's sandbox from its worker's zygote, starting a fresh zygote when there is none or it is gone."""
    hint = None
    for _ in range(2):
        if identity.zygote is None:
            identity.zygote = _Zygote(identity.uid)
        zygote = identity.zygote
        try:
            return zygote, zygote.start(fds)
        except _ZygoteLost:
            # Killed, or it retired because its limits were changed from outside (see sandbox_child).
            identity.zygote = None
            hint = zygote.discard()
            # Had it forked before it died, that fork must not live on beside the next one.
            _kill_sandbox(None, identity.uid, zygote.marker)
            zygote.remove_dir()
    raise SandboxError("the sandbox's fork server (zygote) died twice in a row", hint=hint)


def _run_sample(sample: Sample, limits: Limits, identity: _Identity, cancel: threading.Event) -> SampleResult:
    """Compile one sample, run it in a fresh fork of its worker's zygote as `identity`, and label it."""
    compiled = _compile(sample)
    if not isinstance(compiled, _Compiled):
        return _syntax_result(sample, *compiled)
    timeout_s = sample.timeout_s if sample.timeout_s is not None else limits.timeout_s
    cpu_s = limits.cpu_seconds(timeout_s)
    token = secrets.token_hex(16)
    fds: list[int] = []
    run: _Run | None = None
    zygote: _Zygote | None = None
    uid = identity.uid
    try:
        tasks = _tasks_of_user(os.getuid()) if uid is None else identity.zombies
        job = {
            "token": token,
            "program": compiled.program,
            "test": compiled.test,
            "program_source": sample.program,
            "test_source": sample.test,
            "entry_point": sample.entry_point,
            "hooks": {"held": ASSERT_HELD, "failed": ASSERT_FAILED, "checker": CHECKER_CALLED},
            "sandbox_uid": uid,
            "limits": {
                "cpu_s": cpu_s,
                "memory_bytes": int(limits.memory_mb * 1024 * 1024),
                "file_size_bytes": int(limits.file_size_mb * 1024 * 1024),
                # RLIMIT_NPROC counts every task of the uid: those there now, the harness, then the allowance.
                "nproc": tasks + 1 + limits.max_processes,
            },
        }
        # The job goes in a memfd rather than a file in the sandbox dir: nothing on disk (on
        # ext4 mounted with `discard`, removing a dir that held a file took ~3.5 ms).
        job_fd = _anonymous_file()
        fds.append(job_fd)
        data = memoryview(marshal.dumps(job))
        while data:
            data = data[os.write(job_fd, data):]
        for _ in range(3):
            fds.extend(os.pipe())
        _, out_r, out_w, err_r, err_w, result_r, result_w = fds
        started = time.monotonic()
        zygote, pid = _fork_sandbox(identity, (out_w, err_w, result_w, job_fd))
        for fd in (out_w, err_w, result_w, job_fd):
            os.close(fd)
            fds.remove(fd)
        capture = limits.capture_kb * 1024
        run = _Run(selector=selectors.DefaultSelector(), stdout=_Tail(capture), stderr=_Tail(capture))
        for fd, name in ((out_r, "stdout"), (err_r, "stderr"), (result_r, "records")):
            run.selector.register(fd, selectors.EVENT_READ, name)
        done = _watch(run, zygote, started + timeout_s, cancel)
        duration = time.monotonic() - started
        if done is None:
            # The zygote died (as a normal user a sample can kill it) or stopped answering:
            # find and kill the sandbox's processes the slow way, by session, uid or marker.
            identity.zygote = None
            zygote.discard()
            killed, identity.zombies = _kill_sandbox(pid, uid, zygote.marker)
            zygote.remove_dir()
            run.drain(time.monotonic() + DRAIN_S)
            if run.cancelled:
                raise _Cancelled()
            return _lost_result(sample, compiled, run, duration, killed, zygote.isolation)
        run.drain(time.monotonic() + DRAIN_S)
        if run.cancelled:
            raise _Cancelled()
        # Past the deadline, but it may have ended on its own just before: then that is the outcome.
        run.timed_out = run.timed_out and not done.ended_first
        ended = _Ended(returncode=os.waitstatus_to_exitcode(done.status), duration_s=duration,
                       cpu_s=done.utime + done.stime, max_rss_mb=done.maxrss_kb / 1024, killed=done.killed,
                       timeout_s=timeout_s, cpu_limit_s=cpu_s)
        return _judge(sample, compiled, limits, run, token, ended, zygote.isolation)
    finally:
        if run is not None:
            run.selector.close()
        for fd in fds:
            with suppress(OSError):
                os.close(fd)
        # Every process of the sample is gone (the zygote reaped them, or they were swept).
        if zygote is not None and identity.zygote is zygote and not zygote.clean():
            identity.zygote = None
            zygote.discard()
            zygote.remove_dir()


@dataclass
class _Run:
    """What the parent saw of one sandbox: its output, its records, and how it ended."""

    selector: selectors.BaseSelector
    stdout: _Tail
    stderr: _Tail
    records: bytearray = field(default_factory=bytearray)
    timed_out: bool = False
    cancelled: bool = False

    def read(self, key: selectors.SelectorKey) -> None:
        chunk = os.read(key.fd, 65536)
        if not chunk:
            self.selector.unregister(key.fileobj)
        elif key.data == "records":
            if len(self.records) < RECORD_BYTES:
                self.records += chunk
        else:
            getattr(self, key.data).add(chunk)

    def drain(self, deadline: float) -> None:
        """Read what is left once no writer remains; give up at `deadline` on a leaked writer."""
        while self.selector.get_map() and (remaining := deadline - time.monotonic()) > 0:
            for key, _ in self.selector.select(remaining):
                self.read(key)
        self.selector.close()


def _watch(run: _Run, zygote: _Zygote, deadline: float, cancel: threading.Event | None) -> _Reply | None:
    """Read the sandbox's streams until its zygote reports the end; at the deadline or on cancel, ask it to kill.

    Returns the zygote's DONE reply (sent once every process of the sample is dead and
    reaped), or None when the zygote died or did not answer in time.
    """
    selector = run.selector
    selector.register(zygote.sock, selectors.EVENT_READ, "zygote")
    give_up: float | None = None
    try:
        while True:
            now = time.monotonic()
            if give_up is None:
                run.timed_out = now >= deadline
                run.cancelled = not run.timed_out and cancel is not None and cancel.is_set()
                if run.timed_out or run.cancelled:
                    zygote.kill()
                    give_up = now + ZYGOTE_KILL_S
            elif now >= give_up:
                return None
            wait = (give_up if give_up is not None else deadline) - now
            for key, _ in selector.select(max(0.0, min(wait, 0.25))):
                if key.data == "zygote":
                    reply = zygote.receive(1.0)
                    return reply if reply is not None and reply.kind == sandbox_child.DONE else None
                run.read(key)
    finally:
        selector.unregister(zygote.sock)


# ---------------------------------------------------------------- judging


def _records(run: _Run, token: str) -> list[dict]:
    found = []
    for line in bytes(run.records).splitlines():
        with suppress(ValueError, RecursionError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("token") == token:
                found.append(record)
    return found


@dataclass(frozen=True)
class _Ended:
    """How the sandbox's main process ended, and what it used."""

    returncode: int
    duration_s: float
    cpu_s: float
    max_rss_mb: float
    killed: int
    timeout_s: float
    cpu_limit_s: int


def _evidence(**known: Any) -> dict[str, Any]:
    evidence: dict[str, Any] = {
        "phase": None, "raised_in": None, "frame": None, "user_frame": None, "source_line": None,
        "traceback": None, "errno": None, "asserts_executed": None, "asserts_failed": None,
        "checkers_defined": None, "checkers_called": None, "limit_hit": None, "reported": False,
        "cpu_s": 0.0, "max_rss_mb": 0.0, "stdout_bytes": 0, "stderr_bytes": 0, "killed_processes": 0,
        "network": None, "tmp": None,
    }
    evidence.update(known)
    return evidence


def _syntax_result(sample: Sample, exc: BaseException, where: str) -> SampleResult:
    line = getattr(exc, "lineno", None)
    text = getattr(exc, "text", None)
    message = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
    evidence = _evidence(
        phase="compile", raised_in=where,
        frame={"file": PROGRAM_FILE if where == "program" else TEST_FILE, "line": line, "function": None},
        source_line=text.strip()[:500] if isinstance(text, str) else None,
    )
    return SampleResult(id=sample.id, label="syntax_error", error_type=type(exc).__name__,
                        message=f"{message} ({where} line {line})" if line else f"{message} ({where})",
                        evidence=evidence, duration_s=0.0, exit_code=None, signal=None, stdout_tail="", stderr_tail="")


def _judge(sample: Sample, compiled: _Compiled, limits: Limits, run: _Run, token: str, ended: _Ended,
           isolation: dict[str, str]) -> SampleResult:
    records = _records(run, token)
    started = any(r.get("status") == "started" for r in records)
    finals = [r for r in records if r.get("status") in ("completed", "exception", "sandbox_error")]
    final = finals[-1] if finals else None
    stderr_tail = run.stderr.text()
    if final is not None and final["status"] == "sandbox_error":
        raise SandboxError(f"the sandbox for sample {sample.id!r} could not confine it: {final.get('message')}")
    if final is None and not started and not run.timed_out:
        raise SandboxError(f"the sandbox for sample {sample.id!r} failed to start (exit status {ended.returncode})",
                           hint=stderr_tail.strip()[-2000:] or None)

    returncode = ended.returncode
    signal_name = _signal_name(-returncode) if returncode < 0 else None
    evidence = _evidence(
        checkers_defined=compiled.checkers, reported=final is not None, cpu_s=round(ended.cpu_s, 3),
        max_rss_mb=round(ended.max_rss_mb, 1), stdout_bytes=run.stdout.total, stderr_bytes=run.stderr.total,
        killed_processes=ended.killed, **isolation,
    )
    if final is not None:
        for key in ("phase", "raised_in", "frame", "user_frame", "source_line", "traceback", "errno",
                    "asserts_executed", "asserts_failed", "checkers_called"):
            evidence[key] = final.get(key)
        label, error_type, message = _label_from_record(final, evidence, limits)
    else:
        label, error_type, message = _label_without_record(run, ended, signal_name, stderr_tail, evidence, limits)
    return SampleResult(id=sample.id, label=label, error_type=error_type, message=message, evidence=evidence,
                        duration_s=ended.duration_s, exit_code=returncode if returncode >= 0 else None,
                        signal=signal_name, stdout_tail=run.stdout.text(), stderr_tail=stderr_tail)


def _lost_result(sample: Sample, compiled: _Compiled, run: _Run, duration: float, killed: int,
                 isolation: dict[str, str]) -> SampleResult:
    """Its zygote died mid-sample, so its exit status and rusage are unknown: never a success."""
    evidence = _evidence(checkers_defined=compiled.checkers, stdout_bytes=run.stdout.total,
                         stderr_bytes=run.stderr.total, killed_processes=killed, **isolation)
    return SampleResult(id=sample.id, label="runtime_error", error_type="SandboxLost",
                        message=("the zygote that forked the sandbox died or stopped answering while the sample ran "
                                 "(as a normal user, a sample can kill it), so how the sample ended is unknown"),
                        evidence=evidence, duration_s=duration, exit_code=None, signal=None,
                        stdout_tail=run.stdout.text(), stderr_tail=run.stderr.text())


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _label_from_record(record: dict, evidence: dict[str, Any], limits: Limits) -> tuple[str, str | None, str]:
    error_type = record.get("error_type")
    message = record.get("message") or ""
    if record["status"] == "exception":
        if error_type == "MemoryError":
            evidence["limit_hit"] = "memory"
            return "memory_error", error_type, message or f"MemoryError under the {limits.memory_mb:g} MiB memory limit"
        if error_type == "AssertionError" and record.get("raised_in") == "test":
            return "wrong_output", error_type, message or f"assertion failed: {record.get('source_line') or '?'}"
        errno = record.get("errno")
        if errno == 27:  # EFBIG: RLIMIT_FSIZE
            evidence["limit_hit"] = "file_size"
        elif errno == 11 and "fork" in (record.get("traceback") or ""):  # EAGAIN from fork(): RLIMIT_NPROC
            evidence["limit_hit"] = "processes"
        return "runtime_error", error_type, message
    defined, called = evidence["checkers_defined"], record.get("checkers_called") or []
    if record.get("asserts_failed"):
        return "wrong_output", "AssertionError", (
            f"{record['asserts_failed']} assertion(s) of the tests failed, but their AssertionError was caught")
    never_called = [name for name in defined if name not in called]
    if never_called:
        names = ", ".join(f"{name}()" for name in never_called)
        pronoun = "it" if len(never_called) == 1 else "them"
        return "no_tests_ran", None, f"the tests define {names} but never call {pronoun}"
    if not record.get("asserts_executed") and not called:
        return "no_tests_ran", None, "the tests executed no assertion and called no check*/test* function"
    return "success", None, ""


def _label_without_record(run: _Run, ended: _Ended, signal_name: str | None, stderr_tail: str,
                          evidence: dict[str, Any], limits: Limits) -> tuple[str, str | None, str]:
    """No final record: the sample left before its tests finished; find out why from how it ended."""
    if run.timed_out:
        evidence["limit_hit"] = "wall_time"
        return "timeout", None, f"still running after the {ended.timeout_s:g} s wall-clock limit; killed"
    if signal_name == "SIGXCPU" or (signal_name == "SIGKILL" and ended.cpu_s >= ended.cpu_limit_s - 0.05):
        evidence["limit_hit"] = "cpu_time"
        return "timeout", None, f"used up the {ended.cpu_limit_s} s CPU limit; killed by {signal_name}"
    out_of_memory = any(sign in stderr_tail for sign in ("MemoryError", "Cannot allocate memory", "out of memory"))
    if out_of_memory or (signal_name == "SIGKILL" and ended.max_rss_mb >= 0.9 * limits.memory_mb):
        evidence["limit_hit"] = "memory"
        return "memory_error", "MemoryError", f"died out of memory (limit {limits.memory_mb:g} MiB) before reporting"
    if signal_name == "SIGXFSZ":
        evidence["limit_hit"] = "file_size"
    if signal_name is not None:
        return "runtime_error", signal_name, f"killed by {signal_name} before the tests completed"
    return "runtime_error", "SystemExit", (
        f"the process exited with status {ended.returncode} before the tests completed (os._exit() or a crash)")


# ---------------------------------------------------------------- many samples


def evaluate(samples: Iterable[Sample], *, limits: Limits = Limits(), workers: int | None = None,
             on_result: Callable[[SampleResult], None] | None = None) -> list[SampleResult]:
    """Run every sample in its own sandbox, `workers` at a time; results in input order.

    `on_result` is called in the calling thread as each sample finishes (completion order).
    On KeyboardInterrupt every running sandbox is killed before it propagates.
    """
    samples = list(samples)
    if workers is None:
        workers = os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UsageError(f"invalid number of workers: {workers!r}", hint="workers must be an integer >= 1")
    if not samples:
        return []
    identities = _Identities(min(workers, len(samples)))
    cancel = threading.Event()
    results: list[SampleResult | None] = [None] * len(samples)

    def one(sample: Sample) -> SampleResult:
        with identities.lease() as identity:
            return _run_sample(sample, limits, identity, cancel)

    try:
        with ThreadPoolExecutor(max_workers=identities.slots, thread_name_prefix="exec-eval") as pool:
            futures = {pool.submit(one, sample): index for index, sample in enumerate(samples)}
            try:
                for future in as_completed(futures):
                    result = future.result()
                    results[futures[future]] = result
                    if on_result is not None:
                        on_result(result)
            except BaseException:
                cancel.set()
                for future in futures:
                    future.cancel()
                raise
    finally:
        identities.close()
    return [r for r in results if r is not None]  # all set: every future completed


def summarize(results: Sequence[SampleResult]) -> dict[str, Any]:
    """Counts per label (every label present), pass rate, and which runtime errors occurred."""
    counts = {label: 0 for label in LABELS}
    for result in results:
        counts[result.label] += 1
    total = len(results)
    errors = Counter(r.error_type or "?" for r in results if r.label == "runtime_error")
    return {
        "total": total,
        "passed": counts["success"],
        "pass_rate": round(counts["success"] / total, 6) if total else 0.0,
        "counts": counts,
        "runtime_error_types": dict(sorted(errors.items())),
    }


# What each isolation key says when a sample was not isolated: the weakest value wins.
EXPOSED = {"network": "open", "tmp": "shared"}


def isolation(results: Sequence[SampleResult]) -> dict[str, str | None]:
    """What the samples that ran were isolated from: for each key of EXPOSED, the weakest value any had.

    `network`: "isolated" (no network at all) or "open" (not root, or namespaces refused:
    samples could connect anywhere the evaluator can). `tmp`: "private" (each sample's /tmp,
    /var/tmp and /dev/shm are its own sandbox dir) or "shared" (the machine's; TMPDIR, TEMP
    and TMP point at the sandbox dir). None when no sample ran (all syntax errors).
    """
    summary: dict[str, str | None] = {}
    for key, exposed in EXPOSED.items():
        seen = {r.evidence.get(key) for r in results} - {None}
        summary[key] = exposed if exposed in seen else next(iter(seen), None)
    return summary


def _isolation_text(results: Sequence[SampleResult]) -> str:
    words = {("network", "isolated"): "network isolated", ("network", "open"): "network open",
             ("tmp", "private"): "/tmp private", ("tmp", "shared"): "/tmp shared"}
    parts = [words[key, value] for key, value in isolation(results).items() if value is not None]
    return "; " + ", ".join(parts) if parts else ""


def results_json(results: Sequence[SampleResult]) -> list[dict[str, Any]]:
    return [result.to_json() for result in results]


def format_results(results: Sequence[SampleResult]) -> str:
    """One line per sample, then the summary: for terminals, where JSON is not asked for."""
    width = max((len(r.id) for r in results), default=2)
    lines = []
    for r in results:
        detail = " ".join(part for part in (r.error_type, r.message.splitlines()[0] if r.message else "") if part)
        lines.append(f"{r.id:<{width}}  {r.label:<13}  {r.duration_s:6.2f}s  {detail[:120]}".rstrip())
    summary = summarize(results)
    counts = ", ".join(f"{label} {n}" for label, n in summary["counts"].items() if n)
    lines.append(f"{summary['passed']}/{summary['total']} passed ({summary['pass_rate']:.1%}); "
                 f"{counts or 'no samples'}{_isolation_text(results)}")
    return "\n".join(lines)
