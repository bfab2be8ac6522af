"""The harness inside each sandboxed child of `ratiocinator.execeval`: confine, run, report.

The parent starts `python -I` in a fresh session and a fresh temp dir (as root when the
evaluator is root: the harness drops privileges itself), which imports this module and
calls `main(JOB_FILE)`. It reads and deletes the job file (a marshal of the already compiled
program and instrumented tests), drops privileges when started as root, lowers its
resource limits, then runs the program and the tests in one `__main__` namespace. It
writes JSON records carrying the job's random token to a private pipe: `started` once
confined, and one final record only when the tests ran to the end or raised. A sample
that leaves any other way (`os._exit`, a signal, a kill) leaves no final record, so
neither printing nor exiting can pass for success.

The parent rewrote the tests so that every `assert` calls the assert hook with its
condition and every top-level `check*`/`test*` function calls the checker hook first;
the hooks installed here count what actually ran.

Stdlib only, no other ratiocinator module, and as few imports as it can: interpreter
start-up is most of the cost of a sample.
"""

from __future__ import annotations

import builtins
import marshal
import os
import resource
import sys
import types
from _json import encode_basestring_ascii

HARNESS_FILE = sys._getframe().f_code.co_filename
PROGRAM_FILE = "<program>"
TEST_FILE = "<test>"
# Freed before reporting a MemoryError, so the report itself can be built.
RESERVE_BYTES = 1024 * 1024
MESSAGE_CHARS = 2000
TRACEBACK_CHARS = 4000
SOURCE_LINE_CHARS = 500

# Linux constants for prctl(2) and capset(2).
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
CAP_DAC_READ_SEARCH = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522


class Tally:
    """What the instrumented tests actually executed."""

    def __init__(self) -> None:
        self.asserts_executed = 0
        self.asserts_failed = 0
        self.checkers_called: set[str] = set()

    def on_assert(self, value: object) -> bool:
        held = bool(value)
        self.asserts_executed += 1
        if not held:
            self.asserts_failed += 1
        return held

    def on_checker(self, name: str) -> None:
        self.checkers_called.add(name)


def to_json(value: object) -> str:
    """JSON for the few types a record holds, without importing json (and with it, re)."""
    if value is None or value is True or value is False:
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(value) if value - value == 0 else "null"
    if isinstance(value, str):
        return encode_basestring_ascii(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(to_json(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{encode_basestring_ascii(str(k))}:{to_json(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot encode {type(value).__name__}")


def _lower_limit(which: int, soft: int, hard: int) -> None:
    _, current_hard = resource.getrlimit(which)
    if current_hard != resource.RLIM_INFINITY:
        hard = min(hard, current_hard)
    resource.setrlimit(which, (min(soft, hard), hard))


def _drop_privileges(uid: int, keep_read_search: bool) -> None:
    """Become `uid` with no capabilities, except read/search of files if the interpreter needs it.

    CAP_DAC_READ_SEARCH stays (also as an ambient capability, so a `python` the sample
    starts keeps it) only when the interpreter or its libraries sit in a directory other
    users cannot enter, such as /root/.pyenv. No new privileges can be gained after this.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def prctl(*args: int) -> None:
        # Always five arguments: some options reject nonzero leftovers in the unused ones.
        padded = (args + (0, 0, 0, 0))[:5]
        if libc.prctl(*(ctypes.c_ulong(a) for a in padded)) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"prctl{args}: {os.strerror(error)}")

    class CapHeader(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class CapData(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    prctl(PR_SET_KEEPCAPS, 1)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    kept = 1 << CAP_DAC_READ_SEARCH if keep_read_search else 0
    data = (CapData * 2)()
    data[0].effective = data[0].permitted = data[0].inheritable = kept
    if libc.capset(ctypes.byref(CapHeader(LINUX_CAPABILITY_VERSION_3, 0)), data) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"capset: {os.strerror(error)}")
    if keep_read_search:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_DAC_READ_SEARCH)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    # Changing uid made the process undumpable, which hides its owner in /proc; the parent
    # finds the sandbox's processes by that owner.
    prctl(PR_SET_DUMPABLE, 1)


def confine(job: dict) -> None:
    """Drop privileges if asked to, then lower every resource limit; the address space last."""
    if job["sandbox_uid"] is not None:
        _drop_privileges(job["sandbox_uid"], job["keep_read_search"])
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


def _frame(summary: object) -> dict | None:
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


def run_sample(job: dict, harness_pid: int) -> dict:
    """Run the program, the tests, then `check(entry_point)` when due; never raises."""
    reserve = [bytearray(RESERVE_BYTES)]
    tally = Tally()
    module = types.ModuleType("__main__")
    namespace = module.__dict__
    namespace["__builtins__"] = builtins
    sys.modules["__main__"] = module
    phase = "program"
    try:
        exec(job["program"], namespace)  # noqa: S102 - running the sample is the point
        phase = "test"
        namespace[job["assert_hook"]] = tally.on_assert
        namespace[job["checker_hook"]] = tally.on_checker
        exec(job["test"], namespace)  # noqa: S102
        entry_point = job["entry_point"]
        check = namespace.get("check")
        if entry_point and isinstance(check, types.FunctionType) and check.__code__.co_filename == TEST_FILE:
            # What HumanEval's own harness appends: `check(<entry_point>)`.
            phase = "check"
            if entry_point not in namespace:
                raise NameError(f"entry point {entry_point!r} is not defined by the program")
            tally.checkers_called.add("check")
            check(namespace[entry_point])
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are outcomes too
        reserve.clear()
        if os.getpid() != harness_pid:
            _leave_fork(exc)
        record = _exception_record(exc, phase, job)
    else:
        if os.getpid() != harness_pid:
            _finish(0)
        record = {"status": "completed", "phase": phase}
    record.update(
        asserts_executed=tally.asserts_executed,
        asserts_failed=tally.asserts_failed,
        checkers_called=sorted(tally.checkers_called),
    )
    return record


def _finish(status: int) -> None:
    """Flush what the sample printed and leave at once: no atexit, no joining its threads."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001, S110 - the sample may have broken its streams
            pass
    os._exit(status & 0xFF)


def _leave_fork(exc: BaseException) -> None:
    """A process the sample forked ran on into the harness: one line to stderr, never a record."""
    try:
        sys.stderr.write(f"{type(exc).__name__} in forked process {os.getpid()}: {_describe(exc)[:200]}\n")
    except BaseException:  # noqa: BLE001, S110 - the sample may have broken its streams
        pass
    _finish(exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1)


def _emitter(fd: int, token: str):
    """Bind everything writing a record needs now, before any sample code can rebind it."""
    write, encode = os.write, to_json

    def emit(record: dict) -> None:
        data = memoryview((encode({**record, "token": token}) + "\n").encode("ascii"))
        while data:
            data = data[write(fd, data):]

    return emit


def main(job_path: str) -> None:
    harness_pid = os.getpid()
    with open(job_path, "rb") as handle:
        job = marshal.load(handle)
    os.unlink(job_path)
    emit = _emitter(job.pop("result_fd"), job.pop("token"))
    try:
        confine(job)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        emit({"status": "sandbox_error", "message": f"{type(exc).__name__}: {exc}"})
        _finish(3)
    emit({"status": "started"})
    sys.argv = [PROGRAM_FILE]
    record = run_sample(job, harness_pid)
    emit(record)
    _finish(0)


if __name__ == "__main__":
    main(sys.argv[1])
