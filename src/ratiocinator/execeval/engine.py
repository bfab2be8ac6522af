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

This module runs samples: each one compiled (`instrument`), forked from its worker's zygote
(`identities`, `sandbox`), watched, and judged (`judge`); many at a time (`evaluate`); and
their summaries. The other modules each say what they are for.
"""

from __future__ import annotations

import marshal
import os
import secrets
import selectors
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import suppress
from typing import Any

from ratiocinator.errors import UsageError
from ratiocinator.execeval.identities import _fork_sandbox, _Identities, _Identity
from ratiocinator.execeval.instrument import ASSERT_FAILED, ASSERT_HELD, CHECKER_CALLED, _compile, _Compiled
from ratiocinator.execeval.judge import _Ended, _judge, _lost_result, _syntax_result
from ratiocinator.execeval.processes import _kill_sandbox, _tasks_of_user
from ratiocinator.execeval.samples import LABELS, Limits, Sample, SampleResult
from ratiocinator.execeval.sandbox import _anonymous_file, _Run, _Tail, _watch, _Zygote

DRAIN_S = 2.0
# What each isolation key says when a sample was not isolated: the weakest value wins.
EXPOSED = {"network": "open", "tmp": "shared"}


class _Cancelled(Exception):
    """The evaluation was interrupted; the sample's sandbox has been killed."""


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
