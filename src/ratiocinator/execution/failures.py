"""Why a run did not succeed: one failure class per run, decided by evidence.

The classifier reads what a run left behind (exit code or signal, the head and tail of
its logs, its final metrics) and names exactly one class together with the lines that
decided it. A Python traceback is trusted first, because its last exception is what
actually ended the process; loose log patterns are only consulted when there is none,
so a warning printed early in a run cannot mislabel a later crash. Runs that exit 0 are
checked too: a "success" that loaded zero samples or ends with a NaN loss is not one.

Only ``infra`` and a host-memory ``oom`` while other runs shared the host are
*transient*: retrying them can succeed. Every other class is deterministic and retrying
it would only burn money.
"""

from __future__ import annotations

import math
import re
import signal as signals
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ratiocinator.execution.metrics import MAX_METRIC_NAMES

LOG_TAIL_BYTES = 64 * 1024
LOG_HEAD_BYTES = 16 * 1024
MAX_EVIDENCE = 6
EVIDENCE_CHARS = 300
CONSTANT_MIN_RUNS = 4  # fewer identical values can be a coincidence (a small eval set's accuracy)


class Failure(StrEnum):
    OOM = "oom"
    CUDA_ERROR = "cuda_error"
    MISSING_DEPENDENCY = "missing_dependency"
    SYNTAX_ERROR = "syntax_error"
    RUNTIME_ERROR = "runtime_error"
    TIMEOUT = "timeout"
    NAN_DIVERGENCE = "nan_divergence"
    NO_METRICS = "no_metrics"
    DEGENERATE_DATA = "degenerate_data"
    KILLED = "killed"
    DISK_FULL = "disk_full"
    INFRA = "infra"
    UNKNOWN = "unknown"


DESCRIPTIONS: dict[str, str] = {
    Failure.OOM: "ran out of host or GPU memory",
    Failure.CUDA_ERROR: "a CUDA, driver or GPU-library error",
    Failure.MISSING_DEPENDENCY: "a module, library or program the code needs is not installed",
    Failure.SYNTAX_ERROR: "the code does not parse",
    Failure.RUNTIME_ERROR: "an exception in the code",
    Failure.TIMEOUT: "killed at the spec's train_timeout_s",
    Failure.NAN_DIVERGENCE: "the goal or loss became NaN or infinite",
    Failure.NO_METRICS: "exited without reporting the goal metric",
    Failure.DEGENERATE_DATA: "ran on no real data (zero samples, Git LFS pointers, constant metrics)",
    Failure.KILLED: "ended by a signal",
    Failure.DISK_FULL: "the disk filled up",
    Failure.INFRA: "the backend could not start the run or lost its host",
    Failure.UNKNOWN: "failed without recognisable evidence",
}


@dataclass(frozen=True)
class Diagnosis:
    """One run's verdict: its class (None: it succeeded) and the evidence that decided it."""

    failure: Failure | None
    reason: str = ""
    evidence: tuple[str, ...] = ()
    detail: Mapping[str, Any] = field(default_factory=dict)
    transient: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"class": self.failure.value if self.failure else None, "reason": self.reason,
                "evidence": list(self.evidence), "detail": dict(self.detail), "transient": self.transient}


SUCCESS = Diagnosis(None)


@dataclass(frozen=True)
class RunEvidence:
    """Everything the classifier may look at for one finished run."""

    exit_code: int | None
    signal: int | None
    timed_out: bool
    timeout_s: float
    goal: str
    final: Mapping[str, float]
    stdout: str = ""
    stderr: str = ""
    checkout: Path | None = None
    shared_host: bool = False
    oom_kills: int = 0  # kernel OOM kills on the host while the run was alive (0 when unknown)
    malformed_metric_lines: int = 0
    dropped_metric_names: int = 0  # points of names past the per-run cap (see metrics.MAX_METRIC_NAMES)


def read_log(path: Path, *, head: int = LOG_HEAD_BYTES, tail: int = LOG_TAIL_BYTES) -> str:
    """The start and the end of a log (where data loading and the fatal error are printed)."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(0)
            if size <= head + tail:
                return _excerpt(fh.read(), b"")
            first = fh.read(head)
            fh.seek(size - tail)
            return _excerpt(first, fh.read(tail))
    except OSError:
        return ""


class LogExcerpt:
    """What `read_log` would read from a log, kept while the log is written: its start and its end.

    The executor sees every byte a run prints on its way to the log file, so its diagnosis needs no
    second reading of the files."""

    __slots__ = ("head", "tail", "size", "_head_bytes", "_tail_bytes")

    def __init__(self, *, head: int = LOG_HEAD_BYTES, tail: int = LOG_TAIL_BYTES) -> None:
        self.head = bytearray()  # the whole log while it is short; its first ``head`` bytes after
        self.tail = b""  # once the log is longer than ``head + tail``: its last ``tail`` bytes
        self.size = 0
        self._head_bytes, self._tail_bytes = head, tail

    def add(self, chunk: bytes) -> None:
        limit = self._head_bytes + self._tail_bytes
        if self.size > limit:  # a chunk as long as the end kept replaces it without copying the chunk whole
            self.tail = chunk[-self._tail_bytes:] if len(chunk) >= self._tail_bytes \
                else (self.tail + chunk)[-self._tail_bytes:]
        elif self.size + len(chunk) <= limit:
            self.head += chunk
        else:  # the log outgrows the whole: what is kept splits into its start and its end
            self.head += chunk
            self.tail = bytes(self.head[self._head_bytes:][-self._tail_bytes:])
            del self.head[self._head_bytes:]
        self.size += len(chunk)

    def text(self) -> str:
        return _excerpt(bytes(self.head), self.tail)


def _excerpt(first: bytes, last: bytes) -> str:
    """A log's text: all of it (``first``), or its start and end cut at whole lines (with ``last``)."""
    if last:
        data = first.rsplit(b"\n", 1)[0] + b"\n[... log truncated ...]\n" + last.split(b"\n", 1)[-1]
    else:
        data = first
    return data.decode("utf-8", errors="replace")


# -- Python tracebacks ------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    file: str
    line: int
    function: str | None


@dataclass(frozen=True)
class PythonException:
    type: str
    message: str
    text: str  # the exception line as printed
    frames: tuple[Frame, ...]

    @property
    def short_type(self) -> str:
        return self.type.rsplit(".", 1)[-1]


_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+)(?:, in (?P<func>.+))?\s*$')
_EXCEPTION = re.compile(r"^(?P<type>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?::\s?(?P<message>.*))?$")


def last_exception(text: str) -> PythonException | None:
    """The exception that ended a Python process: the first unindented line after its last traceback frame,
    or, for a traceback laid out otherwise (see `_other_layout`), its last exception line."""
    return _standard_layout(text) or _other_layout(text)


# What a launcher or logger puts before each line ("[rank0]: ", "(pid=42) "), then the rules and
# boxes of exception groups ("  |   ", "  +-+---") and rich tracebacks ("│ ", "╰───").
_DECORATION = re.compile(r"^(?:\[[^\]\n]{1,40}\]:?\s?|\([^)\n]{1,40}\)\s)?[\s|+│┃╰╭─━\-]*")
# In a layout without frames, only a name that says "exception" is taken for one (not a source line).
_EXCEPTION_NAME = re.compile(r"(?:Error|Exception|Warning|Interrupt|Exit|Group|StopIteration)$")


def _other_layout(text: str) -> PythonException | None:
    """The exception after the last "Traceback (most recent call last)" in a layout `_standard_layout` cannot
    read: each line prefixed (torchrun's "[rank0]: "), an exception group (its innermost listed exception),
    or a rich box (the exception line under it). Frames are read where the prefix alone was in the way."""
    lines = text.splitlines()
    start = max((i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line), default=None)
    if start is None:
        return None
    prefix = lines[start][: lines[start].index("Traceback")]
    if prefix.strip() and not prefix.strip(" |+│┃╭─━-"):
        prefix = ""  # a box or a rule, not a prefix to strip
    if prefix:
        unprefixed = _standard_layout("\n".join(line[len(prefix):] if line.startswith(prefix) else line
                                                for line in lines[start:]))
        if unprefixed is not None:
            return unprefixed
    found = None
    for line in lines[start + 1 :]:
        body = _DECORATION.sub("", line, count=1).rstrip(" │┃")
        match = _EXCEPTION.match(body)
        if match and _EXCEPTION_NAME.search(match["type"]):
            found = PythonException(match["type"], (match["message"] or "").strip(), body, ())
    return found


def _standard_layout(text: str) -> PythonException | None:
    lines = text.splitlines()
    last_frame = max((i for i, line in enumerate(lines) if _FRAME.match(line)), default=None)
    if last_frame is None:
        return None
    frames: list[Frame] = []
    i = last_frame
    while i >= 0 and not lines[i].startswith("Traceback (most recent call last)"):
        match = _FRAME.match(lines[i])
        if match:
            frames.append(Frame(match["file"], int(match["line"]), match["func"]))
        elif lines[i] and not lines[i][0].isspace():
            break  # the block above is another output, not this traceback
        i -= 1
    for line in lines[last_frame + 1 :]:
        if not line.strip() or line[0].isspace():
            continue  # the frame's source line and the caret markers
        match = _EXCEPTION.match(line.rstrip())
        if match is None:
            return None
        return PythonException(match["type"], (match["message"] or "").strip(), line.rstrip(), tuple(reversed(frames)))
    return None


def user_frame(frames: Iterable[Frame], checkout: Path | None) -> Frame | None:
    """The deepest frame in the user's own code: inside the checkout and not an installed package."""
    frames = list(frames)

    def installed(frame: Frame) -> bool:
        return any(part in frame.file for part in ("site-packages", "dist-packages", "/.venv/", "/lib/python3"))

    if checkout is not None:
        root = str(checkout.resolve())
        for frame in reversed(frames):
            if frame.file.startswith(root) and not installed(frame):
                return frame
    for frame in reversed(frames):
        if not installed(frame) and not frame.file.startswith("<"):
            return frame
    return frames[-1] if frames else None


def frame_text(frame: Frame, checkout: Path | None) -> str:
    path = frame.file
    if checkout is not None:
        root = str(checkout.resolve()).rstrip("/") + "/"
        if path.startswith(root):
            path = path[len(root):]
    return f"{path}:{frame.line}" + (f" in {frame.function}" if frame.function else "")


# -- log patterns -----------------------------------------------------------------------


def _any(*patterns: str) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


_OOM = _any(r"CUDA out of memory", r"OutOfMemoryError", r"\bMemoryError\b", r"std::bad_alloc",
            r"Cannot allocate memory", r"RESOURCE_EXHAUSTED", r"\b[Oo]ut of memory\b", r"\bOOM when allocating")
_GPU = _any(r"CUDA", r"\bGPU\b", r"cuda", r"\bHIP\b", r"hipError", r"XLA", r"\bdevice\b")
_DISK_FULL = _any(r"No space left on device", r"\[Errno 28\]", r"Disk quota exceeded", r"\[Errno 122\]")
_CUDA = _any(r"CUDA error", r"CUDA_ERROR_\w+", r"cudaError\w*", r"CUBLAS_STATUS_\w+", r"CUDNN_STATUS_\w+",
             r"NCCL error", r"ncclInternalError|ncclSystemError|ncclUnhandledCudaError", r"device-side assert",
             r"no CUDA-capable device", r"No CUDA GPUs are available", r"Found no NVIDIA driver",
             r"NVIDIA driver on your system is too old", r"CUDA driver version is insufficient",
             r"Torch not compiled with CUDA enabled", r"NVML_ERROR|Failed to initialize NVML",
             r"AcceleratorError")
_NO_MODULE = re.compile(r"No module named '(?P<module>[^']+)'")
_NO_NAME = re.compile(r"cannot import name '(?P<name>[^']+)' from '(?P<module>[^']+)'")
_NO_LIBRARY = re.compile(r"(?P<module>lib[\w.+-]*\.so[\w.]*): cannot open shared object file")
_NO_COMMAND = re.compile(r"(?:^|: )(?P<command>[\w./+-]+): (?:command not found|No such file or directory)$")
_SHELL_SYNTAX = _any(r"syntax error near unexpected token", r"syntax error: unexpected end of file",
                     r"unexpected EOF while looking for matching")
_LFS = _any(r"version https://git-lfs\.github\.com/spec/v1", r"\bgit-lfs\b", r"\bGit LFS pointer",
            r"invalid load key, 'v'")
_ZERO_SAMPLES = re.compile(
    r"(?i)\b(?:loaded|found|read|using|got|with|loading|on)\s+0\s+"
    r"(?:train(?:ing)?\s+|val(?:idation)?\s+|test\s+)?"
    r"(?:samples?|examples?|rows|records|images|graphs|items|files|sequences|instances|documents|data\s?points)\b"
    r"|\b(?:num_samples|n_samples|num_examples|n_examples|dataset[_ ]size|dataset[_ ]length|len\(dataset\)"
    r"|train[_ ]size|n_train|num_train|samples|examples)\s*[:=]\s*0(?![.\d])"
    r"|\b(?:empty dataset|dataset is empty)\b"
)
_ZERO_SAMPLE_METRIC = re.compile(
    r"^(?:n|num|number_of)?_?(?:train|training|val|valid|validation|test|eval)?_?"
    r"(?:samples|examples|rows|records|items|instances|graphs|images|sequences|size)(?:_(?:loaded|seen|total))?$"
    r"|^(?:dataset|train|val|test)_(?:size|len|length)$|^n_(?:train|val|test)$"
)
_NAN_TEXT = re.compile(r"(?i)\bnan\b|\binf(?:inity)?\b|non-finite|not finite")
_SHELL_SIGNAL_WORDS: dict[int, str] = {
    signals.SIGKILL: "Killed", signals.SIGSEGV: "Segmentation fault", signals.SIGABRT: "Aborted",
    signals.SIGTERM: "Terminated", signals.SIGBUS: "Bus error", signals.SIGINT: "Interrupt",
}


def _clip(line: str) -> str:
    line = line.strip()
    return line if len(line) <= EVIDENCE_CHARS else line[: EVIDENCE_CHARS - 1] + "…"


def _search(pattern: re.Pattern[str], text: str) -> str | None:
    """The last log line matching ``pattern`` (the one nearest the end decides)."""
    for line in reversed(text.splitlines()):
        if pattern.search(line):
            return line
    return None


def signal_name(number: int) -> str:
    try:
        return signals.Signals(number).name
    except ValueError:
        return f"signal {number}"


# -- the classifier ---------------------------------------------------------------------


def diagnose(run: RunEvidence) -> Diagnosis:
    """The run's failure class with its evidence; ``SUCCESS`` when nothing is wrong."""
    if run.timed_out:
        return Diagnosis(Failure.TIMEOUT, f"killed after the {run.timeout_s:g}s train_timeout_s",
                         (f"no exit within {run.timeout_s:g}s; the process group was killed",),
                         {"timeout_s": run.timeout_s})
    logs = run.stderr + "\n" + run.stdout
    shell_signal = _shell_reported_signal(run.exit_code, run.stderr)
    sig = run.signal if run.signal is not None else shell_signal
    if sig is None and not run.exit_code:
        return _diagnose_exit_zero(run, logs)
    exit_text = f"signal {sig} ({signal_name(sig)})" if sig is not None else f"exit code {run.exit_code}"
    if sig == signals.SIGKILL and run.oom_kills > 0:
        return _oom(run, f"the kernel's OOM killer ended it ({run.oom_kills} OOM kill(s) on the host during the run)",
                    [exit_text], "host")
    exc = last_exception(run.stderr) or last_exception(run.stdout)
    if exc is not None:
        return _diagnose_exception(run, exc, exit_text, logs)
    return _diagnose_log(run, logs, sig, exit_text)


def _diagnose_exit_zero(run: RunEvidence, logs: str) -> Diagnosis:
    if run.dropped_metric_names:
        return Diagnosis(Failure.RUNTIME_ERROR,
                         f"printed more than {MAX_METRIC_NAMES:,} distinct metric names ({run.dropped_metric_names:,}"
                         " point(s) of further names dropped): the metrics protocol matched what is not a metric",
                         ("exit code 0", f"{len(run.final):,} metric names recorded"),
                         {"dropped_metric_points": run.dropped_metric_names})
    degenerate = _degenerate_evidence(run, logs)
    if degenerate is not None:
        return degenerate
    goal = run.final.get(run.goal)
    if goal is None:
        seen = ", ".join(sorted(run.final)[:10]) or "none"
        note = f"; {run.malformed_metric_lines} malformed metric line(s)" if run.malformed_metric_lines else ""
        tail = [_clip(line) for line in logs.strip().splitlines()[-2:] if line.strip()]
        return Diagnosis(Failure.NO_METRICS, f"exited 0 without reporting '{run.goal}' (metrics seen: {seen}{note})",
                         ("exit code 0", f"metrics seen: {seen}", *tail), {"metrics_seen": sorted(run.final)})
    nonfinite = _nonfinite_losses(run)
    if not math.isfinite(goal):
        return Diagnosis(Failure.NAN_DIVERGENCE, f"final {run.goal} is {goal}", (f"final {run.goal} = {goal}",),
                         {"metric": run.goal})
    if nonfinite:
        name = nonfinite[0]
        return Diagnosis(Failure.NAN_DIVERGENCE, f"exited 0 but its final {name} is {run.final[name]}",
                         tuple(f"final {n} = {run.final[n]}" for n in nonfinite), {"metric": name})
    return SUCCESS


def _diagnose_exception(run: RunEvidence, exc: PythonException, exit_text: str, logs: str) -> Diagnosis:
    frame = user_frame(exc.frames, run.checkout)
    where = frame_text(frame, run.checkout) if frame else None
    evidence = [exit_text, _clip(exc.text)] + ([f"at {where}"] if where else [])
    detail: dict[str, Any] = {"exception": exc.type}
    if where:
        detail["frame"] = where
    kind = exc.short_type
    text = exc.text
    if kind in ("MemoryError", "OutOfMemoryError") or _OOM.search(text):
        return _oom(run, text, evidence, "gpu" if _GPU.search(text) else "host", detail)
    if _DISK_FULL.search(text):
        return Diagnosis(Failure.DISK_FULL, _clip(text), tuple(evidence), detail)
    if _CUDA.search(text):
        return Diagnosis(Failure.CUDA_ERROR, _clip(text), tuple(evidence), detail)
    if kind in ("ModuleNotFoundError", "ImportError") or _NO_LIBRARY.search(text):
        module = _missing_module(text)
        if module:
            detail["module"] = module
        return Diagnosis(Failure.MISSING_DEPENDENCY,
                         f"missing {module or 'dependency'} ({kind})" + (f" at {where}" if where else ""),
                         tuple(evidence), detail)
    if kind in ("SyntaxError", "IndentationError", "TabError"):
        last = exc.frames[-1] if exc.frames else None
        at = frame_text(last, run.checkout) if last else where
        evidence = [exit_text, _clip(text)] + ([f"at {at}"] if at else [])
        return Diagnosis(Failure.SYNTAX_ERROR, f"{kind} at {at}: {exc.message}" if at else _clip(text), tuple(evidence),
                         {**detail, "frame": at} if at else detail)
    degenerate = _degenerate_evidence(run, logs, crashed=exc)
    if degenerate is not None:
        return degenerate
    if _NAN_TEXT.search(exc.message) or _nonfinite_losses(run):
        losses = _nonfinite_losses(run)
        extra = [f"last {n} = {run.final[n]}" for n in losses]
        return Diagnosis(Failure.NAN_DIVERGENCE, _clip(text), tuple(evidence + extra), detail)
    return Diagnosis(Failure.RUNTIME_ERROR,
                     f"{exc.type}: {exc.message}"[:EVIDENCE_CHARS] + (f" at {where}" if where else ""),
                     tuple(evidence), detail)


def _diagnose_log(run: RunEvidence, logs: str, sig: int | None, exit_text: str) -> Diagnosis:
    """No traceback: the log lines nearest the end, then the signal, then the metrics."""
    line = _search(_OOM, logs)
    if line:
        return _oom(run, line, [exit_text, _clip(line)], "gpu" if _GPU.search(line) else "host")
    for pattern, failure in ((_DISK_FULL, Failure.DISK_FULL), (_CUDA, Failure.CUDA_ERROR)):
        line = _search(pattern, logs)
        if line:
            return Diagnosis(failure, _clip(line), (exit_text, _clip(line)))
    line = _search(_NO_COMMAND, run.stderr) if run.exit_code == 127 else None
    match = _NO_COMMAND.search(line) if line else None
    if line and match:
        command = match["command"]
        return Diagnosis(Failure.MISSING_DEPENDENCY, f"missing program '{command}' (exit 127)",
                         (exit_text, _clip(line)),
                         {"module": command})
    line = _search(_SHELL_SYNTAX, run.stderr)
    if line:
        return Diagnosis(Failure.SYNTAX_ERROR, _clip(line), (exit_text, _clip(line)))
    degenerate = _degenerate_evidence(run, logs, crashed=True)
    if degenerate is not None:
        return degenerate
    if sig is not None:
        words = _search(re.compile(re.escape(_SHELL_SIGNAL_WORDS.get(sig, "\0"))), run.stderr)
        return Diagnosis(Failure.KILLED, f"terminated by signal {sig} ({signal_name(sig)})",
                         (exit_text, *([_clip(words)] if words else [])), {"signal": signal_name(sig)})
    losses = _nonfinite_losses(run)
    if losses:
        return Diagnosis(Failure.NAN_DIVERGENCE,
                         f"exited with {exit_text} after {losses[0]} became {run.final[losses[0]]}",
                         (exit_text, *(f"last {n} = {run.final[n]}" for n in losses)), {"metric": losses[0]})
    tail = [_clip(line) for line in run.stderr.strip().splitlines()[-3:] if line.strip()]
    if not tail:
        tail = [_clip(line) for line in run.stdout.strip().splitlines()[-3:] if line.strip()]
    return Diagnosis(Failure.UNKNOWN, f"{exit_text}" + (f": {tail[-1]}" if tail else ", no output"), (exit_text, *tail))


def _oom(run: RunEvidence, text: str, evidence: list[str], memory: str,
         detail: dict[str, Any] | None = None) -> Diagnosis:
    transient = memory == "host" and run.shared_host
    note = " while other runs shared the host (will retry)" if transient else ""
    return Diagnosis(Failure.OOM, f"out of {memory} memory{note}: {_clip(text)}",
                     tuple(evidence)
                     + (("other runs were live on the host",) if run.shared_host and memory == "host" else ()),
                     {**(detail or {}), "memory": memory, "shared_host": run.shared_host}, transient)


def _missing_module(text: str) -> str | None:
    for pattern in (_NO_NAME, _NO_MODULE, _NO_LIBRARY):
        match = pattern.search(text)
        if match:
            if pattern is _NO_NAME:
                return f"{match['module']} (name '{match['name']}')"
            return match["module"]
    return None


def _nonfinite_losses(run: RunEvidence) -> list[str]:
    return sorted(n for n, v in run.final.items() if not math.isfinite(v) and (n == run.goal or "loss" in n.lower()))


def _degenerate_evidence(run: RunEvidence, logs: str, crashed: object = None) -> Diagnosis | None:
    """Zero samples loaded, or Git LFS pointers read as data."""
    line = _search(_LFS, logs)
    if line:
        return Diagnosis(Failure.DEGENERATE_DATA, "the run read a Git LFS pointer instead of the data file",
                         (_clip(line),
                          "run `git lfs pull` in the repository, or make the data source provide the real files"),
                         {"cause": "lfs_pointer"})
    zero_metrics = sorted(n for n, v in run.final.items() if v == 0 and _ZERO_SAMPLE_METRIC.match(n.lower()))
    if zero_metrics:
        return Diagnosis(Failure.DEGENERATE_DATA, f"the run reported {zero_metrics[0]} = 0: it saw no data",
                         tuple(f"final {n} = 0" for n in zero_metrics),
                         {"cause": "zero_samples", "metric": zero_metrics[0]})
    line = _search(_ZERO_SAMPLES, logs)
    if line:
        crash = f" and then crashed ({crashed.text})" if isinstance(crashed, PythonException) else ""
        return Diagnosis(Failure.DEGENERATE_DATA, f"the run loaded no data{crash}"[:EVIDENCE_CHARS],
                         (_clip(line),) + ((_clip(crashed.text),) if isinstance(crashed, PythonException) else ()),
                         {"cause": "zero_samples"})
    return None


def _shell_reported_signal(exit_code: int | None, stderr: str) -> int | None:
    """A shell runner reports its child's death by signal N as exit 128+N and a word ("Killed")."""
    if exit_code is None or not 128 < exit_code < 128 + 65:
        return None
    number = exit_code - 128
    word = _SHELL_SIGNAL_WORDS.get(number)
    if word and re.search(rf"(?m)\b{re.escape(word)}\b", stderr):
        return number
    return None


# -- across runs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmOutcome:
    """An arm's configuration and its succeeded runs' goal values, for the cross-arm check."""

    name: str
    config: tuple[tuple[str, str], ...]
    runs: tuple[tuple[int, float], ...]  # (run id, goal value)


def constant_across_arms(arms: Iterable[ArmOutcome], goal: str) -> Diagnosis | None:
    """Arms that differ in configuration but whose every run reports the very same goal value.

    Seeds and knobs both move a real metric; a value identical to the last bit across
    all of them (at least ``CONSTANT_MIN_RUNS`` runs) means the data or the knobs never
    reached the model.
    """
    arms = [a for a in arms if a.runs]
    if len({a.config for a in arms}) < 2 or sum(len(a.runs) for a in arms) < CONSTANT_MIN_RUNS:
        return None
    values = {value for a in arms for _, value in a.runs}
    if len(values) != 1:
        return None
    value = values.pop()
    names = ", ".join(a.name for a in arms[:8]) + (f" and {len(arms) - 8} more" if len(arms) > 8 else "")
    runs = sum(len(a.runs) for a in arms)
    return Diagnosis(Failure.DEGENERATE_DATA,
                     f"{goal} is exactly {value!r} in all {runs} runs of {len(arms)} arms that differ ({names})",
                     (f"{goal} = {value!r} in every run", f"arms: {names}",
                      "check that the data loads and that the knobs reach the model"),
                     {"cause": "constant_metric", "value": value})
