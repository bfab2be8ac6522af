"""Judging: turning what a sandbox left (its records, streams and how it ended) into a label with evidence.

Why: only a final record written on the private pipe after the tests ran to the end can make
a sample pass; without one, how the process ended (wall clock, CPU or memory limit, a signal,
an exit) says why it failed. The labels and the evidence keys are listed in `engine`.
"""

from __future__ import annotations

import json
import signal
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from ratiocinator.execeval.instrument import PROGRAM_FILE, TEST_FILE, _Compiled
from ratiocinator.execeval.samples import Limits, Sample, SampleResult, SandboxError
from ratiocinator.execeval.sandbox import _Run


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
