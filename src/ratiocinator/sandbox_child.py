"""The harness inside each sandboxed child of `ratiocinator.execeval`: confine, run, report.

The parent starts it as `python -I -c <this source> JOB_FILE` in a fresh session and a
fresh temp dir. It reads and deletes the job file, drops privileges (when started as
root) and lowers its resource limits, then runs the program and the instrumented tests
in one `__main__` namespace. It writes JSON records carrying the job's random token to
a private pipe: `started` once confined, and one final record only when the tests ran to
the end, raised, or did not compile. A sample that leaves any other way (`os._exit`, a
signal, a kill) leaves no final record, so neither printing nor exiting can pass for
success.

The tests are rewritten so every `assert` reports whether it ran and held, and every
top-level `check*`/`test*` function reports that it was called: that is how the parent
tells "the tests passed" from "no test ever ran".

Stdlib only, and it must not import ratiocinator: it runs as a plain `-c` script.
"""

from __future__ import annotations

import ast
import builtins
import json
import linecache
import os
import resource
import sys
import traceback
import types

HARNESS_FILE = sys._getframe().f_code.co_filename
PROGRAM_FILE = "<program>"
TEST_FILE = "<test>"
# Names no source code can spell, so the program cannot shadow the hooks by accident.
ASSERT_HOOK = "<ratiocinator assert>"
CHECKER_HOOK = "<ratiocinator checker>"
CHECKER_PREFIXES = ("check", "test")
# Freed before reporting a MemoryError, so the report itself can be built.
RESERVE_BYTES = 4 * 1024 * 1024
MESSAGE_CHARS = 2000
TRACEBACK_CHARS = 4000
SOURCE_LINE_CHARS = 500

# Linux constants for prctl(2) and capset(2).
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
        self.asserts_executed += 1
        held = bool(value)
        if not held:
            self.asserts_failed += 1
        return held

    def on_checker(self, name: str) -> None:
        self.checkers_called.add(name)


class _CountAsserts(ast.NodeTransformer):
    """`assert cond, msg` -> `assert <hook>(cond), msg`: same truth test, now counted."""

    def visit_Assert(self, node: ast.Assert) -> ast.Assert:
        self.generic_visit(node)
        call = ast.Call(func=ast.Name(id=ASSERT_HOOK, ctx=ast.Load()), args=[node.test], keywords=[])
        node.test = ast.copy_location(call, node.test)
        return node


def instrument_test(source: str) -> tuple[types.CodeType, list[str]]:
    """Compile the test code with counted asserts; returns the code and its top-level checkers."""
    tree = ast.parse(source, TEST_FILE)
    checkers = []
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name.startswith(CHECKER_PREFIXES):
            checkers.append(stmt.name)
            call = ast.Call(func=ast.Name(id=CHECKER_HOOK, ctx=ast.Load()), args=[ast.Constant(stmt.name)], keywords=[])
            hook = ast.copy_location(ast.Expr(call), stmt.body[0])
            has_docstring = isinstance(stmt.body[0], ast.Expr) and isinstance(stmt.body[0].value, ast.Constant) \
                and isinstance(stmt.body[0].value.value, str)
            stmt.body.insert(1 if has_docstring else 0, hook)
    tree = ast.fix_missing_locations(_CountAsserts().visit(tree))
    return compile(tree, TEST_FILE, "exec", dont_inherit=True, optimize=0), checkers


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
        if libc.prctl(*(ctypes.c_ulong(a) for a in args)) != 0:
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


def _frame(summary: traceback.FrameSummary | None) -> dict | None:
    if summary is None:
        return None
    return {"file": summary.filename, "line": summary.lineno, "function": summary.name}


def _syntax_record(exc: BaseException, where: str) -> dict:
    line = getattr(exc, "lineno", None)
    text = getattr(exc, "text", None)
    return {
        "status": "syntax_error",
        "phase": "compile",
        "raised_in": where,
        "error_type": type(exc).__name__,
        "message": _clip(getattr(exc, "msg", None) or _describe(exc), MESSAGE_CHARS),
        "frame": {"file": PROGRAM_FILE if where == "program" else TEST_FILE, "line": line, "function": None},
        "user_frame": None,
        "source_line": _clip(text.strip() if isinstance(text, str) else None, SOURCE_LINE_CHARS),
        "offset": getattr(exc, "offset", None),
    }


def _exception_record(exc: BaseException, phase: str) -> dict:
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
    except BaseException:  # noqa: BLE001 - the sample may have closed or replaced stderr
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
        "exit_status": exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1,
    }


def _remember_source(filename: str, source: str) -> None:
    """Let tracebacks show the program's and the tests' own lines."""
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)


def run_sample(job: dict) -> dict:
    """Compile, run the program, run the tests, call `check(entry_point)` when due; never raises."""
    reserve = [bytearray(RESERVE_BYTES)]
    try:
        program = compile(job["program"], PROGRAM_FILE, "exec", dont_inherit=True, optimize=0)
    except (SyntaxError, ValueError, RecursionError) as exc:
        return _syntax_record(exc, "program")
    try:
        test, checkers = instrument_test(job["test"])
    except (SyntaxError, ValueError, RecursionError) as exc:
        return _syntax_record(exc, "test")
    _remember_source(PROGRAM_FILE, job["program"])
    _remember_source(TEST_FILE, job["test"])

    tally = Tally()
    module = types.ModuleType("__main__")
    namespace = module.__dict__
    namespace["__builtins__"] = builtins
    sys.modules["__main__"] = module
    phase = "program"
    try:
        exec(program, namespace)
        phase = "test"
        namespace[ASSERT_HOOK] = tally.on_assert
        namespace[CHECKER_HOOK] = tally.on_checker
        exec(test, namespace)
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
        record = _exception_record(exc, phase)
    else:
        record = {"status": "completed", "phase": phase}
    record.update(
        asserts_executed=tally.asserts_executed,
        asserts_failed=tally.asserts_failed,
        checkers_defined=checkers,
        checkers_called=sorted(tally.checkers_called),
    )
    return record


def _finish(status: int) -> None:
    """Flush what the sample printed and leave at once: no atexit, no joining its threads."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    os._exit(status)


def _emitter(fd: int, token: str):
    """Bind everything writing a record needs now, before any sample code can rebind it."""
    write, dumps = os.write, json.dumps

    def emit(record: dict) -> None:
        data = memoryview((dumps({**record, "token": token}) + "\n").encode())
        while data:
            data = data[write(fd, data):]

    return emit


def main(job_path: str) -> None:
    harness_pid = os.getpid()
    with open(job_path, encoding="utf-8") as handle:
        job = json.load(handle)
    os.unlink(job_path)
    emit = _emitter(job.pop("result_fd"), job.pop("token"))
    try:
        confine(job)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        emit({"status": "sandbox_error", "message": f"{type(exc).__name__}: {exc}"})
        _finish(3)
    emit({"status": "started"})
    sys.argv = [PROGRAM_FILE]
    record = run_sample(job)
    if os.getpid() != harness_pid:
        # A process the sample forked ran out of the harness: it must not report.
        _finish(record.get("exit_status", 0) if record["status"] == "exception" else 0)
    record.pop("exit_status", None)
    emit(record)
    _finish(0)


if __name__ == "__main__":
    main(sys.argv[1])
