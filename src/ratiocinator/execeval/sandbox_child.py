"""The harness of `ratiocinator.execeval`: a fork server (zygote), and in each fork: confine, run, report.

Why a zygote: starting `python -I` and importing this harness cost about 25 ms of CPU per
sample, far more than running a typical sample. Instead the parent starts one zygote per
worker: `python -I` in its own session, in `/`, with a minimal environment, as root when
the evaluator is root. It imports this module and the few stdlib modules a sample or a
report commonly needs (PRELOAD) once, then `serve()`s: for each sample it receives, on
a private socketpair, the write ends of its stdout, stderr and result pipes, an fd
holding its job and one of its sandbox dir (the zygote's own, emptied by the evaluator
after each sample), and forks a child that becomes the sandbox. As root, the zygote
first moves into a network namespace and a mount namespace of its own (`_isolate`),
exposes the interpreter to unprivileged users there (`_check_reachable`) and mounts its
sandbox dir over /tmp (`_private_tmp`). The zygote never runs, loads or reads sample
code or sample data (the job comes in a memfd only the child reads), so every sample
starts from the same pristine interpreter: a fork of the clean zygote, never of a used
process. What the zygote learns of a sample is its pids, its wait status and its rusage.

The child (`_become_sandbox`): a new session; a fresh /dev/null as stdin, the pipes as
stdout, stderr and fd 3, every other fd closed (the zygote's socket included); the
sandbox dir as cwd, HOME, TMPDIR, TEMP and TMP (as root, as "/tmp"). Then `main`: read
and close the job (a marshal of the already compiled program and instrumented tests), and
`_records`: drop every privilege when root, lower the resource limits, run the program
and the tests in one fresh `__main__` namespace. It writes JSON records carrying the job's random token to fd 3:
`started` once confined, and one final record only when the tests ran to the end or
raised. A sample that leaves any other way (`os._exit`, a signal, a kill) leaves no final
record, so neither printing nor exiting can pass for success; what sample code inside the
process can and cannot do to the harness is listed in `_records`.

The zygote is a child subreaper (PR_SET_CHILD_SUBREAPER): whatever a sample forks, a
daemon that called setsid() and lost its parent included, stays a descendant of the
zygote. So when the sample's main process ends, or the parent asks (timeout, cancel),
the zygote kills exactly the sample's processes (the tree under it, walked through
/proc/PID/task/TID/children) and reaps every one of them: no scan of all of /proc, no
signal to a pid it does not hold, no zombie left to count against the next sample's
RLIMIT_NPROC. Then it reports the main process's wait status and rusage.

What samples can do to a zygote. It is single-threaded (fork is safe) and undumpable
(no ptrace, no /proc/PID/mem, fd or environ access by processes of the same uid). As
root, samples run as other uids and can neither signal nor otherwise touch it. As a
normal user they share its uid: they can kill it (the parent notices, labels the
sample `SandboxLost`, sweeps its processes the old way and starts a fresh zygote) or
change its resource limits, priority, CPU affinity or scheduling policy, which its
children would inherit; the zygote checks those before every fork and retires when
they changed (the parent then starts a fresh one). They could do as much to the
evaluator itself, which is why hostile samples should be run as root.
  One thing samples of one zygote share that fresh interpreters would not: the hash
seed of str and bytes (PYTHONHASHSEED is drawn once per zygote), so set iteration order
of strings is the same for every sample of a worker.

The parent rewrote the tests so that every `assert` calls a hook once its condition was
tested (one when it held, another when it failed) and every top-level `check*`/`test*`
function calls the checker hook first; the hooks, put here into the test's code objects
as constants, count what actually ran.

Stdlib only, no other ratiocinator module.
"""

from __future__ import annotations

import _json
import builtins
import ctypes
import fcntl
import functools
import gc
import importlib
import itertools
import marshal
import mmap
import operator
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
import types
from collections.abc import Callable, Iterator

# `typing` stays unloaded in the zygote; this name is for the type checker only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import traceback

HARNESS_FILE = sys._getframe().f_code.co_filename
PROGRAM_FILE = "<program>"
TEST_FILE = "<test>"
# Where the sample was when it stopped (compared by identity: `_phase`).
PROGRAM, TEST, CHECK = "program", "test", "check"
# Audit events refused inside a sample (`_auditor`), besides assigning a function's __code__.
REFUSED_EVENTS = frozenset({
    # The object graph, from which the reporter and the harness's state are reachable.
    "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    # Trace and profile functions: one can jump over an assertion (frame.f_lineno) or,
    # on Python 3.11 and 3.12, rewrite a harness frame's locals when it returns.
    "sys.settrace", "sys.setprofile", "sys.monitoring.register_callback",
})
# Address space freed before reporting a MemoryError, so the report itself can be built
# under RLIMIT_AS. An anonymous mapping, never touched: a bytearray would be zero-filled,
# faulting in 256 pages per sample (~1 ms).
RESERVE_BYTES = 1024 * 1024
MESSAGE_CHARS = 2000
TRACEBACK_CHARS = 4000
SOURCE_LINE_CHARS = 500

# The sample's fds in its sandbox: 0, 1, 2, and its private result pipe.
RESULT_FD = 3
# Imported by the zygote so that no sample pays for them: what the harness needs to report
# an exception (traceback imports ast and unicodedata lazily, for its carets), and what
# generated code imports most (HumanEval's `from typing import List`). Stdlib modules
# without per-process state (no RNG, no cached environment).
PRELOAD = ("traceback", "linecache", "ast", "unicodedata", "typing", "math", "re", "collections", "itertools",
           "functools", "heapq", "bisect", "string")

# The zygote's protocol: one datagram per message on a SOCK_SEQPACKET socketpair.
REQUEST_RUN = b"R"  # SCM_RIGHTS: stdout, stderr and result pipe write ends, the job, the sandbox dir
REQUEST_FDS = 5
REQUEST_KILL = b"K"  # end the running sample now (wall-clock limit, cancel); ignored when none runs
# Replies: kind, pid, wait status (errno for FAILED), utime, stime, maxrss KiB, processes killed,
# and whether the main process had ended before a REQUEST_KILL arrived.
REPLY = struct.Struct("=ciiddqi?")
READY, STARTED, FAILED, DONE = b"Y", b"S", b"F", b"D"
# What READY's status field says the zygote's samples are isolated from (bits).
NETWORK_ISOLATED = 1
TMP_PRIVATE = 2
# The world-writable directories the zygote's sandbox dir is mounted over when it has a
# mount namespace of its own.
SHARED_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")

# Linux constants for prctl(2) and capset(2).
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
LINUX_CAPABILITY_VERSION_3 = 0x20080522
# unshare(2) and mount(2).
CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000


LIBC = ctypes.CDLL(None, use_errno=True)


def prctl(*args: int) -> None:
    """prctl(2), which Python does not wrap; raises OSError on failure."""
    # Always five arguments: some options reject nonzero leftovers in the unused ones.
    padded = (args + (0, 0, 0, 0))[:5]
    if LIBC.prctl(*(ctypes.c_ulong(a) for a in padded)) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl{args}: {os.strerror(error)}")


def unshare(flags: int) -> None:
    """unshare(2): os.unshare from Python 3.12 on, libc's before; raises OSError on failure."""
    if hasattr(os, "unshare"):
        os.unshare(flags)
    elif LIBC.unshare(ctypes.c_int(flags)) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"unshare({flags:#x}): {os.strerror(error)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    """mount(2); raises OSError on failure."""
    args = [None if value is None else os.fsencode(value) for value in (source, target, fstype)]
    if LIBC.mount(*args, ctypes.c_ulong(flags), None if data is None else os.fsencode(data)) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mount {source} on {target}: {os.strerror(error)}")


def _isolate() -> int:
    """As root, move the zygote (and so every sample it forks) into namespaces of its own; returns READY's bits.

    Network: a fresh network namespace holds nothing but a loopback interface that is
    down, so a sample can reach no address at all, the machine's own 127.0.0.1 included
    (and no abstract Unix socket outside it; Unix sockets that are files are a matter of
    file permissions). Refused (not root, or a container that
    forbids it): the samples share the machine's network, and the evaluator says so.
      Mounts: a mount namespace of its own, every mount in it made private first (so
    nothing mounted here ever propagates back to the machine), in which its sandbox dir
    becomes /tmp (`_private_tmp`). Refused: samples share /tmp, and the evaluator says so.
    """
    if os.geteuid() != 0:
        return 0
    flags = 0
    try:
        unshare(CLONE_NEWNET)
        flags |= NETWORK_ISOLATED
    except OSError as exc:
        sys.stderr.write(f"zygote: no network namespace ({exc}); samples can use the network\n")
    try:
        unshare(CLONE_NEWNS)
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        flags |= TMP_PRIVATE
    except OSError as exc:
        sys.stderr.write(f"zygote: no private mount namespace ({exc}); samples share /tmp\n")
    return flags


def _interpreter_paths() -> tuple[list[str], list[str]]:
    """The directories a sample's Python uses, as (needed, others), real paths.

    Needed to start and import the standard library and what is installed: the prefixes
    (a venv's pyvenv.cfg included), the executable's directory and the stdlib's, and the
    sys.path entries inside a prefix (lib-dynload, site-packages). Others: the rest of
    sys.path, say a project's source in an editable install.
    """
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)}
    needed = {*prefixes, os.path.realpath(os.path.dirname(sys.executable)),
              os.path.dirname(os.path.realpath(sys.executable)), os.path.dirname(os.path.realpath(os.__file__))}
    others: set[str] = set()
    for entry in sys.path:
        real = os.path.realpath(entry or ".")
        inside = any(real == prefix or real.startswith(prefix.rstrip("/") + "/") for prefix in prefixes)
        (needed if inside else others).add(real)
    return sorted(p for p in needed if os.path.isdir(p)), sorted(p for p in others - needed if os.path.isdir(p))


def _ancestors(path: str) -> list[str]:
    """"/a/b/c" -> ["/", "/a", "/a/b"]."""
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:i]) for i in range(len(parts))] if path != "/" else []


def _closed_to_others(path: str) -> str | None:
    """The first directory on the way to `path` (or `path` itself) that a user with no privileges cannot pass;
    None if none."""
    try:
        for ancestor in _ancestors(path):
            if not os.stat(ancestor).st_mode & 0o001:
                return ancestor
        return None if os.stat(path).st_mode & 0o005 == 0o005 else path
    except OSError:
        return path


def _expose(paths: list[str]) -> None:
    """In the zygote's own, private mount namespace: make each path reachable by any user, read-only, and no more.

    Where a directory on the way to a path is closed to other users (the interpreter in
    /root/.pyenv, with /root mode 700), an empty tmpfs (mode 755) is mounted over the
    topmost such directory, and each path under it is bind-mounted back at its own place,
    read-only. So the paths keep their names (sys.executable and sys.path stay valid, in
    forks and in a `python` a sample starts), nothing else of that directory is visible,
    and samples need no capability to start or import. Permissions inside the paths are
    their own: a path that is itself closed stays closed.
    """
    plan: dict[str, list[str]] = {}
    for path in paths:
        closed = next((a for a in _ancestors(path) if not os.stat(a).st_mode & 0o001), None)
        if closed is not None and closed != "/":
            plan.setdefault(closed, []).append(path)
    for closed, wanted in plan.items():
        targets = [path for path in wanted if not any(path.startswith(other + "/") for other in wanted)]
        sources = [os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for path in targets]
        try:
            mount("tmpfs", closed, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
            for path, source in zip(targets, sources, strict=True):
                for step in [*_ancestors(path)[len(_ancestors(closed)) + 1:], path]:
                    if not os.path.isdir(step):
                        os.mkdir(step)
                        os.chmod(step, 0o755)
                mount(f"/proc/self/fd/{source}", path, None, MS_BIND | MS_REC)
                mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        finally:
            for source in sources:
                os.close(source)


def _check_reachable(private_mounts: bool) -> None:
    """As root: make sure samples, which run with no capability, can reach the interpreter; else say how to
    fix it and stop."""
    needed, others = _interpreter_paths()
    if private_mounts:
        try:
            _expose(needed + others)
        except OSError as exc:
            sys.stderr.write(f"zygote: could not expose the interpreter to the sandbox's users: {exc}\n")
    for path in needed:
        closed = _closed_to_others(path)
        if closed is not None:
            raise SystemExit(
                f"zygote: samples run as unprivileged users with no capability, but {path} (needed by the "
                f"interpreter) is closed to them at {closed}"
                + ("" if private_mounts else " and this system refused the mount namespace that would expose it")
                + "; make the interpreter world-readable (chmod o+rX), or run the evaluation as a normal user")


def _private_tmp(workdir: str) -> bool:
    """Once, in the zygote's private mount namespace: its sandbox dir over /tmp, /var/tmp and /dev/shm; False if not.

    Its samples run one at a time and the evaluator empties the dir after each, so what a
    sample writes there does not outlive it; samples of other workers (other zygotes, other
    dirs) and the machine's own /tmp are out of sight. Once per zygote rather than a mount
    namespace per sample: tearing one down waits for an RCU grace period, ~10% of the
    throughput on two busy cores. Bound from an fd of this namespace, opened before the
    first mount hides the dir's path (it usually lies in /tmp). Not done (/tmp stays
    shared) when the interpreter or a sys.path entry lies in one of those directories:
    the sample could not import from it.
    """
    targets = list(dict.fromkeys(os.path.realpath(p) for p in SHARED_TMP_DIRS if os.path.isdir(p)))
    needed, others = _interpreter_paths()
    inside = [p for p in needed + others if any(p == t or p.startswith(t.rstrip("/") + "/") for t in targets)]
    if inside:
        sys.stderr.write(f"zygote: {inside[0]} (used by the interpreter) lies in a temp dir; samples share /tmp\n")
        return False
    source = os.open(workdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for target in targets:
            mount(f"/proc/self/fd/{source}", target, None, MS_BIND)
    finally:
        os.close(source)
    return True


def _lower_limit(which: int, soft: int, hard: int) -> None:
    _, current_hard = resource.getrlimit(which)
    if current_hard != resource.RLIM_INFINITY:
        hard = min(hard, current_hard)
    resource.setrlimit(which, (min(soft, hard), hard))


def _drop_privileges(uid: int) -> None:
    """Become `uid` with no capabilities at all (effective, permitted, inheritable, ambient); no new ones after.

    Changing every uid away from 0 (without PR_SET_KEEPCAPS) already clears the
    capability sets; capset makes it explicit. The interpreter is readable without any
    capability: `_expose` made it so in the zygote's mount namespace.
    """
    class CapHeader(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class CapData(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if LIBC.capset(ctypes.byref(CapHeader(LINUX_CAPABILITY_VERSION_3, 0)), (CapData * 2)()) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"capset: {os.strerror(error)}")
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    # Changing uid made the process undumpable, which hides its owner in /proc; the parent
    # finds the sandbox's processes by that owner.
    prctl(PR_SET_DUMPABLE, 1)


def confine(job: dict) -> None:
    """Drop privileges if asked to, then lower every resource limit; the address space last."""
    if job["sandbox_uid"] is not None:
        _drop_privileges(job["sandbox_uid"])
    limits = job["limits"]
    _lower_limit(resource.RLIMIT_CORE, 0, 0)
    # SIGXCPU at the soft limit, SIGKILL one second later should the sample catch it.
    _lower_limit(resource.RLIMIT_CPU, limits["cpu_s"], limits["cpu_s"] + 1)
    _lower_limit(resource.RLIMIT_FSIZE, limits["file_size_bytes"], limits["file_size_bytes"])
    _lower_limit(resource.RLIMIT_NPROC, limits["nproc"], limits["nproc"])
    _lower_limit(resource.RLIMIT_AS, limits["memory_bytes"], limits["memory_bytes"])


def _clip(text: str | None, limit: int, keep_end: bool = False) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return "..." + text[-limit:] if keep_end else text[:limit] + "..."


def _describe(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:  # noqa: BLE001 - a hostile __str__ must not break the report
        return f"<{type(exc).__name__} whose str() failed>"


def _frame(summary: traceback.FrameSummary | None) -> dict | None:
    if summary is None:
        return None
    return {"file": summary.filename, "line": summary.lineno, "function": summary.name}


def _exception_record(exc: BaseException, phase: str, job: dict) -> dict:
    """Type, message, frames and traceback of what stopped the sample; also printed to stderr."""
    import linecache
    import traceback

    # Let tracebacks quote the program's and the tests' own lines.
    for filename, source in ((PROGRAM_FILE, job["program_source"]), (TEST_FILE, job["test_source"])):
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == HARNESS_FILE:
        tb = tb.tb_next
    frames = traceback.extract_tb(tb) if tb is not None else []
    user_frames = [f for f in frames if f.filename in (PROGRAM_FILE, TEST_FILE)]
    innermost = user_frames[-1] if user_frames else None
    if isinstance(exc, SystemExit):
        message = f"SystemExit({exc.code!r}) raised during the {phase} before the tests completed"
    elif isinstance(exc, KeyboardInterrupt):
        message = f"KeyboardInterrupt raised during the {phase} before the tests completed"
    else:
        message = _describe(exc)
    try:
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException:  # noqa: BLE001
        text = f"{type(exc).__name__}: {message}\n"
    try:
        sys.stderr.write(text)
    except BaseException:  # noqa: BLE001, S110 - the sample may have closed or replaced stderr
        pass
    return {
        "status": "exception",
        "phase": phase,
        "raised_in": {PROGRAM_FILE: "program", TEST_FILE: "test"}[innermost.filename] if innermost else None,
        "error_type": type(exc).__qualname__,
        "message": _clip(message, MESSAGE_CHARS),
        "errno": exc.errno if isinstance(exc, OSError) and isinstance(exc.errno, int) else None,
        "frame": _frame(frames[-1] if frames else None),
        "user_frame": _frame(innermost),
        "source_line": _clip((innermost.line or None) if innermost else None, SOURCE_LINE_CHARS),
        "traceback": _clip(text, TRACEBACK_CHARS, keep_end=True),
    }


def _phase(phase: list) -> str:
    """The last phase the harness entered; only these three strings count (sample code can reach the list)."""
    for entry in reversed(phase):
        if entry is PROGRAM or entry is TEST or entry is CHECK:
            return entry
    return PROGRAM


def _with_hooks(code: types.CodeType, hooks: dict) -> tuple[types.CodeType, frozenset[int]]:
    """The test code with the engine's placeholder constants replaced by the hooks, in every nested code object.

    The hooks are then constants of the code being run, not names in any namespace: a
    sample can neither replace them nor skip them. It can reach them only through the
    code objects, and calling them only counts up (`_records`). Also returns the ids of
    every code object compiled from the tests, which `_check_step` trusts.
    """
    ids = set()

    def rebuild(old: types.CodeType) -> types.CodeType:
        consts = tuple(rebuild(const) if type(const) is types.CodeType
                       else hooks.get(const, const) if type(const) is str else const for const in old.co_consts)
        new = old.replace(co_consts=consts)
        ids.add(id(new))
        return new

    return rebuild(code), frozenset(ids)


def _check_step(namespace: dict, test_codes: frozenset[int], entry_point: str | None, called: set,
                phase: list) -> Callable[[], None]:
    """What HumanEval's own harness appends, `check(<entry_point>)`, as a step made before the sample runs.

    Only the `check` the tests defined is called: a function whose code object is one
    compiled from the tests (by identity: not one the sample compiled under the same file
    name) and whose globals are the sample's namespace. If the sample swapped it for
    anything else, nothing is called, and the tests' `check` counts as never called.
    """
    function_type, type_, id_, name_error, get = types.FunctionType, type, id, NameError, namespace.get

    def check_step() -> None:
        check = get("check")
        # type() identity narrows `check` to a function; mypy does not follow it, hence the ignores.
        if (not entry_point or type_(check) is not function_type
                or id_(check.__code__) not in test_codes  # type: ignore[union-attr]  # narrowed by type()
                or check.__globals__ is not namespace):  # type: ignore[union-attr]  # narrowed by type()
            return
        phase.append(CHECK)
        if entry_point not in namespace:
            raise name_error(f"entry point {entry_point!r} is not defined by the program")
        called.add(CHECK)
        check(namespace[entry_point])  # type: ignore[misc]  # a function: narrowed by type() identity above

    return check_step


def _concluder(held: Iterator[int], failed: Iterator[int], called: set, phase: list,
               harness_pid: int) -> Callable[[object], dict]:
    """The function that makes the final record of tests that ran to the end; made before the sample runs.

    It uses its closure only, no global or builtin name, and `_records` calls it from its
    value stack: so what a sample does to the harness's module, to builtins, or to a
    harness frame's locals (which code walking the stack can read, and on Python 3.13+
    rebind) cannot change what it reports. The counters only count up.
    """
    getpid, finish, sorted_, type_, str_, check_, test_ = os.getpid, _finisher(), sorted, type, str, CHECK, TEST

    def conclude(_steps_done: object) -> dict:
        if getpid() != harness_pid:
            finish(0)  # a process the sample forked ran on into the harness: never a record
        asserts_failed = failed.__next__() - 1
        checked = False
        for entry in phase:
            checked = checked or entry is check_
        return {"status": "completed", "phase": check_ if checked else test_,
                "asserts_executed": held.__next__() - 1 + asserts_failed, "asserts_failed": asserts_failed,
                "checkers_called": sorted_(name for name in called if type_(name) is str_)}

    return conclude


def _auditor(refused: frozenset[str]) -> Callable[[str, tuple], None]:
    """An audit hook (PEP 578) refusing `refused` events and any assignment to a function's __code__.

    Bound now, in its closure: what it refuses cannot be changed afterwards, and an audit
    hook cannot be removed. __code__: so that the `check` verified by `_check_step` is the
    one that runs, even with a sample thread racing it.
    """
    runtime_error, type_, str_, len_ = RuntimeError, type, str, len

    def audit(event: str, args: tuple) -> None:
        if event in refused or (event == "object.__setattr__" and len_(args) > 1 and type_(args[1]) is str_
                                and args[1] == "__code__"):
            raise runtime_error(f"{event} is not available in the sandbox")

    return audit


def _forget_harness() -> None:
    """Take this package out of sys.modules: a sample that looks it up finds nothing, and an import is a fresh copy."""
    for name in [name for name in sys.modules if name == "ratiocinator" or name.startswith("ratiocinator.")]:
        del sys.modules[name]


def _records(job: dict) -> Iterator[dict]:
    """Confine; yield `started`; run the program, the tests and `check(entry_point)`; yield the final record; leave.

    What the harness defends, and how. In-process code can reach in-process state, so the
    harness keeps what decides a success where plain Python cannot reach or change it:
    - the reporter and its token: never named in any frame (see `main`), and the object
      graph (gc.get_objects, ...) is refused;
    - exec, the steps and the final record: bound before the sample runs, on this frame's
      value stack or in closures (`_concluder`, `_check_step`), never looked up in the
      harness's module, in builtins, or in this frame's locals afterwards;
    - the assertion and checker hooks: constants of the test code (`_with_hooks`); an
      assert's truth is the interpreter's own test, and its hook only counts;
    - the harness's modules are out of sys.modules; tracing and profiling are refused.
    Not defended: native code (ctypes, /proc/self/mem) can do anything the process can,
    write a forged record included; and whatever the tests look up at run time (builtins,
    modules, their own globals, the objects the program returns) is the sample's to patch.
    """
    getpid, finish, leave_fork, describe, phase_of = os.getpid, _finisher(), _leave_fork, _exception_record, _phase
    harness_pid = getpid()
    try:
        confine(job)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        yield {"status": "sandbox_error", "message": f"{type(exc).__name__}: {exc}"}
        finish(3)
    yield {"status": "started"}
    sys.argv = [PROGRAM_FILE]
    module = types.ModuleType("__main__")
    namespace = module.__dict__
    namespace["__builtins__"] = builtins
    sys.modules["__main__"] = module
    called: set[str] = set()
    held, failed, phase = itertools.count(1), itertools.count(1), [PROGRAM]
    names = job["hooks"]
    test, test_codes = _with_hooks(job["test"], {names["held"]: held.__next__, names["failed"]: failed.__next__,
                                                 names["checker"]: called.add})
    reserve = [mmap.mmap(-1, RESERVE_BYTES)]
    _forget_harness()
    sys.addaudithook(_auditor(REFUSED_EVENTS))
    try:
        # One expression: the concluder, exec and every step are evaluated onto the stack
        # before the first step (the program) runs; the hooks go in after the program.
        yield _concluder(held, failed, called, phase, harness_pid)(tuple(map(
            operator.call, (  # type: ignore[arg-type]  # mypy cannot map operator.call's ParamSpec over partials
            functools.partial(exec, job["program"], namespace),
            functools.partial(phase.append, TEST),
            functools.partial(exec, test, namespace),
            _check_step(namespace, test_codes, job["entry_point"], called, phase),
        ))))
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are outcomes too
        reserve.clear()
        if getpid() != harness_pid:
            leave_fork(exc, finish)
        asserts_failed = failed.__next__() - 1
        yield {**describe(exc, phase_of(phase), job), "status": "exception",
               "asserts_executed": held.__next__() - 1 + asserts_failed, "asserts_failed": asserts_failed,
               "checkers_called": sorted(name for name in called if type(name) is str)}
    finish(0)


def _finisher() -> Callable[[int], None]:
    """`finish(status)`: flush what the sample printed and leave at once (no atexit, no joining its threads).

    os._exit is bound now: a sample that replaces it cannot keep the harness running.
    """
    exit_, streams = os._exit, sys

    def finish(status: int) -> None:
        for stream in (streams.stdout, streams.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001, S110 - the sample may have broken its streams
                pass
        exit_(status & 0xFF)

    return finish


def _leave_fork(exc: BaseException, finish: Callable[[int], None]) -> None:
    """A process the sample forked ran on into the harness: one line to stderr, never a record."""
    try:
        sys.stderr.write(f"{type(exc).__name__} in forked process {os.getpid()}: {_describe(exc)[:200]}\n")
    except BaseException:  # noqa: BLE001, S110 - the sample may have broken its streams
        pass
    finish(exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1)


def _unencodable(value: object) -> object:
    raise TypeError(f"cannot encode {type(value).__name__}")


def _emitter(fd: int, token: str) -> Callable[[dict], None]:
    """The reporter: one JSON record with the job's token to the result pipe.

    Everything it uses is bound now, in its closure, before any sample code runs:
    os.write, memoryview and json's C encoder (no Python code a sample could patch).
    """
    write, view, join = os.write, memoryview, "".join
    encode = _json.make_encoder(None, _unencodable, _json.encode_basestring_ascii, None, ":", ",", False, False, True)

    def emit(record: dict) -> None:
        data = view(join(encode({**record, "token": token}, 0)).encode("ascii") + b"\n")
        while data:
            data = data[write(fd, data):]

    return emit


def main(job_fd: int, result_fd: int) -> None:
    """Read the job, then write each record `_records` yields to the result pipe; never returns.

    The reporter is made inline and held only by the `map` iterator on this frame's value
    stack; the token is popped from the job into it. So no frame's locals or globals hold
    either, and sample code walking the stack (sys._getframe().f_back ...) finds neither.
    """
    leave = os._exit
    with open(job_fd, "rb") as handle:
        handle.seek(0)
        job = marshal.load(handle)
    for _ in map(_emitter(result_fd, job.pop("token")), _records(job)):
        pass
    leave(3)  # not reached: `_records` leaves through os._exit


# ---------------------------------------------------------------- the zygote


def _become_sandbox(control: socket.socket, fds: list[int], workdir: str, private_tmp: bool) -> None:
    """In a fresh fork of the zygote: a new session, its own stdio and result fd and no other, then the job.

    The cwd is the sandbox dir: as /tmp where the zygote mounted it there (a path of this
    namespace, whose name the sample sees), else through the evaluator's fd of it.
    """
    try:
        os.setsid()
        control.close()
        # Its own /dev/null: the zygote's stdin is one open file shared by every fork, and
        # a sample could change its flags (O_NONBLOCK) for the samples after it.
        stdin = os.open(os.devnull, os.O_RDONLY)
        *moved, job_fd, dir_fd = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (stdin, *fds)]
        for target, fd in enumerate(moved):
            os.dup2(fd, target)
        for name in os.listdir("/proc/self/fd"):
            if int(name) > RESULT_FD and int(name) not in (job_fd, dir_fd):
                try:
                    os.close(int(name))
                except OSError:  # the listing's own fd, closed already
                    pass
        if private_tmp:
            os.chdir("/tmp")
            if not os.path.samestat(os.stat("."), os.fstat(dir_fd)):
                raise OSError("/tmp is not the sandbox dir")
            home = "/tmp"
        else:
            # /tmp is the machine's: then at least the usual variables point at the sandbox
            # dir, so tempfile and most tools stay inside it.
            os.fchdir(dir_fd)
            home = workdir
        os.close(dir_fd)
        for name in ("HOME", "TMPDIR", "TEMP", "TMP"):
            os.environ[name] = home
        # Forks of an undumpable zygote are undumpable, and /proc would hide their owner;
        # the parent's fallback sweep (should the zygote die) finds them by it.
        prctl(PR_SET_DUMPABLE, 1)
        main(job_fd, RESULT_FD)
    except BaseException:  # noqa: BLE001 - shown to the parent in the sample's stderr
        try:
            import traceback

            traceback.print_exc()
        except BaseException:  # noqa: BLE001, S110
            pass
    finally:
        os._exit(3)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    """The children of every thread of `pid`."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in tids:
        data = _read(f"/proc/{pid}/task/{tid}/children")
        if data is None:
            if os.path.exists(f"/proc/{pid}/task/{tid}"):  # a kernel without CONFIG_PROC_CHILDREN
                return _children_by_scan(pid)
            continue
        found.extend(int(child) for child in data.split())
    return found


def _children_by_scan(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            data = _read(f"/proc/{name}/stat")
            fields = data[data.rfind(b")") + 2:].split() if data else []
            if len(fields) > 1 and fields[1] == str(pid).encode():
                found.append(int(name))
    return found


def _alive(pid: int) -> bool:
    data = _read(f"/proc/{pid}/stat")
    return data is not None and data[data.rfind(b")") + 2:][:1] not in (b"Z", b"X", b"x", b"")


def _descendants(main: int) -> list[int]:
    """Every live process under the zygote, the main process excepted: all that is left of the sample."""
    found: list[int] = []
    pending = _children(os.getpid())
    seen = set()
    while pending:
        pid = pending.pop()
        if pid in seen or not _alive(pid):
            continue
        seen.add(pid)
        if pid != main:
            found.append(pid)
        pending.extend(_children(pid))
    return found


def _end_sample(main: int) -> tuple[int, int, resource.struct_rusage | None]:
    """SIGKILL the sample's whole process tree and reap all of it; returns (others killed, wait status, rusage).

    Only the zygote's own unreaped descendants are signalled (their pids cannot be reused),
    and the main process's group only while the main process is unreaped. Each killed
    process's children become the zygote's, so the walk repeats until none is left. A
    process that never dies (uninterruptible sleep) keeps it here: the parent then gives
    up on this zygote, kills it and sweeps the sample the slow way.
    """
    killed: set[int] = set()
    status: int | None = None
    usage: resource.struct_rusage | None = None
    pause = 0.001
    while True:
        for pid in _descendants(main):
            killed.add(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if status is None:
            for kill in (os.killpg, os.kill):
                try:
                    kill(main, signal.SIGKILL)
                except OSError:
                    pass
        reaped = False
        while True:
            try:
                pid, wait_status, rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:  # none left: the main process was reaped, and all the rest
                return len(killed), status if status is not None else 0, usage
            if pid == 0:
                break
            reaped = True
            if pid == main:
                status, usage = wait_status, rusage
        if not reaped:
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


def _exited(pid: int) -> bool:
    """Has our child `pid` ended? Peeks with WNOWAIT: it stays unreaped (and its pid ours) until `_end_sample`."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _await_end(control: socket.socket, pid: int) -> tuple[bool, bool]:
    """Wait until the sample's main process ends or the parent asks to kill it; returns (ended first, parent gone)."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    poller = select.poll()
    poller.register(control, select.POLLIN)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    try:
        while True:
            for fd, _ in poller.poll(None if pidfd is not None else 50):
                if fd == pidfd:
                    return True, False
                try:
                    message = control.recv(4096)
                except OSError:
                    message = b""
                if not message:
                    return _exited(pid), True
                if message[:1] == REQUEST_KILL:
                    return _exited(pid), False
            if pidfd is None and _exited(pid):
                return True, False
    finally:
        if pidfd is not None:
            os.close(pidfd)


RLIMITS = tuple(getattr(resource, name) for name in sorted(dir(resource)) if name.startswith("RLIMIT_"))


def _inheritable_state() -> tuple:
    """What forks inherit and a same-uid process could change from outside: limits, priority, CPUs, policy."""
    limits = tuple(resource.getrlimit(which) for which in RLIMITS)
    return limits, os.getpriority(os.PRIO_PROCESS, 0), os.sched_getaffinity(0), os.sched_getscheduler(0)


def _reply(control: socket.socket, kind: bytes, pid: int = 0, status: int = 0,
           usage: resource.struct_rusage | None = None, killed: int = 0, ended_first: bool = False) -> None:
    utime, stime, maxrss = (usage.ru_utime, usage.ru_stime, usage.ru_maxrss) if usage is not None else (0.0, 0.0, 0)
    control.send(REPLY.pack(kind, pid, status, utime, stime, maxrss, killed, ended_first))


def serve(control_fd: int, workdir: str) -> None:
    """The zygote: one fork per request, then kill and reap that sample's processes and report; never runs sample code.

    Leaves with os._exit, without the interpreter's finalization, once the parent closes its end.
    """
    try:
        _serve(control_fd, workdir)
    except SystemExit as exc:  # a reason not to serve: the parent shows it
        sys.stderr.write(f"{exc.code}\n")
        sys.stderr.flush()
    finally:
        os._exit(0)


def _serve(control_fd: int, workdir: str) -> None:
    isolation = _isolate()
    private_mounts = bool(isolation & TMP_PRIVATE)
    # Its dir over /tmp first: covering a private directory (`_expose`) may hide its path.
    try:
        if private_mounts and not _private_tmp(workdir):
            isolation &= ~TMP_PRIVATE
    except OSError as exc:  # never seen: the namespace is ours; but no half-private /tmp either
        raise SystemExit(f"zygote: cannot mount its sandbox dir over /tmp: {exc}") from None
    if os.geteuid() == 0:
        _check_reachable(private_mounts)
    for name in PRELOAD:
        importlib.import_module(name)
    # Everything the zygote holds goes to the permanent generation: a fork's garbage
    # collections then never walk it, which would copy every page it sits on (~5 ms a sample).
    gc.collect()
    gc.freeze()
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    prctl(PR_SET_DUMPABLE, 0)
    control = socket.socket(fileno=control_fd)
    pristine = _inheritable_state()
    _reply(control, READY, status=isolation)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 4096, REQUEST_FDS)
        except OSError:
            return
        if not message:
            return  # the evaluator closed its end, or died
        if message[:1] != REQUEST_RUN or len(fds) != REQUEST_FDS:
            for fd in fds:
                os.close(fd)
            continue  # a kill that crossed the end of its sample
        if _inheritable_state() != pristine:
            sys.stderr.write("zygote: its limits, priority, CPU affinity or scheduling policy were changed; retiring\n")
            return
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            _reply(control, FAILED, status=exc.errno or 0)
            continue
        if pid == 0:
            _become_sandbox(control, fds, workdir, bool(isolation & TMP_PRIVATE))
            os._exit(3)  # not reached: the sandbox leaves through os._exit
        for fd in fds:
            os.close(fd)
        try:
            _reply(control, STARTED, pid)
            ended_first, parent_gone = _await_end(control, pid)
        except OSError:
            ended_first, parent_gone = False, True
        killed, status, usage = _end_sample(pid)
        if parent_gone:
            return
        try:
            _reply(control, DONE, pid, status, usage, killed, ended_first)
        except OSError:
            return
