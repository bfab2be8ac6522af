"""The samples of an exec-eval and their results: what one sample is, what it may use, how it was labelled.

Why a module of its own: the loader, the limits and the result shape are the evaluation's
contract with its callers (the CLI, the bench, tests); they need nothing of the sandbox.
`load_samples` reads JSONL (HumanEval or plain style, see `engine`); `LABELS` are every
label a `SampleResult` can carry.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ratiocinator.errors import RatiocinatorError, UsageError

LABELS = ("success", "wrong_output", "runtime_error", "syntax_error", "timeout", "memory_error", "no_tests_ran")


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
