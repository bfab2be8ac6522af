"""Who edits the code: an external coding agent, the configured LLM, or a directory of patches.

An agent gets one turn per attempt: the worktree reset to the current best, a prompt
(the program's instructions, the results so far, the best, the rules), and returns a
one-sentence hypothesis after editing the working tree — or gives up, which stops its
worker. It never commits, runs the experiment or decides: the loop does that, and
checks the edit before anything runs.

``kind: command`` runs a shell line in the worktree with the prompt in a file
(``{prompt_file}`` in the line, and ``$RATIOCINATOR_PROMPT_FILE``). The hypothesis is
the first line of ``.autoresearch/hypothesis.txt`` if the agent writes it, else the
last ``HYPOTHESIS: ...`` line of its output; creating ``.autoresearch/give_up`` stops
the loop. Recipes for common coding agents' non-interactive modes (recipes, not tested
integrations; check your agent's current flags)::

    claude -p "$(cat {prompt_file})" --permission-mode acceptEdits        # Claude Code
    codex exec --full-auto "$(cat {prompt_file})"                          # OpenAI Codex CLI
    aider --message-file {prompt_file} --yes --no-auto-commits             # aider
    gemini -p "$(cat {prompt_file})" --yolo                                # Gemini CLI

``kind: llm`` asks the configured model for ``{hypothesis, diff}`` with the editable
files quoted, checks the diff with ``git apply --check`` and re-asks with git's own
complaint (a bounded number of times) before applying it. ``kind: patches`` applies
``*.patch``/``*.diff`` files of a directory in name order, one per attempt, and gives
up when they run out: scripted sessions and tests.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field

from ratiocinator.autoresearch.gitops import Git
from ratiocinator.autoresearch.guard import matches_any
from ratiocinator.autoresearch.processes import kill_orphan
from ratiocinator.backends.process import kill_group, process_start_time
from ratiocinator.llm.config import LlmConfig
from ratiocinator.llm.providers import Completion, LlmError, estimate_cost, make_provider
from ratiocinator.llm.structured import ask_structured

LOOP_DIR = ".autoresearch"
PROMPT_NAME = "prompt.md"
HYPOTHESIS_NAME = "hypothesis.txt"
GIVE_UP_NAME = "give_up"
PATCH_SUFFIXES = (".patch", ".diff")
MAX_HYPOTHESIS = 300
_SUBJECT = re.compile(r"^Subject:\s*(?:\[[^\]]*\]\s*)?(.*)$")


class AgentStopped(Exception):
    """The user stopped the loop during the agent's turn; nothing is recorded for it."""


@dataclass(frozen=True)
class Turn:
    """One agent turn: where to edit, what to read, where its own output goes."""

    worktree: Path
    prompt: str
    worker: int
    env: Mapping[str, str]
    stop: threading.Event
    log_path: Path
    pid_file: Path | None = None  # where a command agent's process is noted, so a resume can stop an orphan


@dataclass(frozen=True)
class Proposal:
    """An edit made in the worktree: its hypothesis, or why the agent could not make one (``error``)."""

    hypothesis: str
    ref: str = ""
    cost: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class GiveUp:
    """The agent has nothing more to try."""

    reason: str
    cost: float = 0.0


def one_line(text: str, limit: int = MAX_HYPOTHESIS) -> str:
    """A hypothesis as one line (it becomes a results.tsv cell and a commit subject)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class Agent(ABC):
    """Makes one edit per turn in the worktree."""

    wants_files = False  # whether the prompt must quote the editable files (an LLM cannot open them)

    @abstractmethod
    def propose(self, turn: Turn) -> Proposal | GiveUp:
        """Edit ``turn.worktree`` and say why; raise AgentStopped when ``turn.stop`` is set mid-turn."""

    def worst_case_cost(self, prompt: str) -> float:
        """Dollars one turn may cost at most, reserved against max_dollars before it starts."""
        return 0.0


# -- patches ---------------------------------------------------------------------------


class PatchAgent(Agent):
    """One patch file per turn, in name order; each file is proposed once per session (resume included)."""

    def __init__(self, directory: Path, used: Iterable[str] = ()) -> None:
        self.directory = directory
        self._used = set(used)
        self._lock = threading.Lock()

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.is_file() and p.suffix in PATCH_SUFFIXES)

    def _claim(self) -> Path | None:
        with self._lock:
            for path in self.files():
                if path.name not in self._used:
                    self._used.add(path.name)
                    return path
        return None

    def propose(self, turn: Turn) -> Proposal | GiveUp:
        path = self._claim()
        if path is None:
            return GiveUp(f"no patches left in {self.directory}")
        data = path.read_bytes()
        hypothesis = patch_hypothesis(data, path)
        problem = Git(turn.worktree, turn.env).apply(data)
        if problem is not None:
            return Proposal(hypothesis, ref=path.name, error=f"patch {path.name} does not apply: {problem}")
        return Proposal(hypothesis, ref=path.name)


def patch_hypothesis(data: bytes, path: Path) -> str:
    """A format-patch's Subject, else the first ``#`` comment before the diff, else the file name."""
    comment = None
    for raw in data.decode("utf-8", "replace").splitlines():
        if raw.startswith(("diff --git", "--- ", "Index: ")):
            break
        subject = _SUBJECT.match(raw)
        if subject and subject.group(1).strip():
            return one_line(subject.group(1))
        if comment is None and raw.startswith("#") and raw.lstrip("#").strip():
            comment = raw.lstrip("#").strip()
    return one_line(comment) if comment else path.stem


# -- an external command ---------------------------------------------------------------


class CommandAgent(Agent):
    """A coding agent's non-interactive mode, run in the worktree (module docstring for recipes)."""

    def __init__(self, command: str, timeout_s: float) -> None:
        self.command = command
        self.timeout_s = timeout_s

    def propose(self, turn: Turn) -> Proposal | GiveUp:
        loop_dir = turn.worktree / LOOP_DIR
        loop_dir.mkdir(exist_ok=True)
        prompt_file = loop_dir / PROMPT_NAME
        hypothesis_file = loop_dir / HYPOTHESIS_NAME
        give_up_file = loop_dir / GIVE_UP_NAME
        for stale in (hypothesis_file, give_up_file):
            stale.unlink(missing_ok=True)
        prompt_file.write_text(turn.prompt, encoding="utf-8")
        line = self.command.replace("{prompt_file}", shlex.quote(str(prompt_file)))
        env = {**turn.env, "RATIOCINATOR_PROMPT_FILE": str(prompt_file),
               "RATIOCINATOR_HYPOTHESIS_FILE": str(hypothesis_file), "RATIOCINATOR_GIVE_UP_FILE": str(give_up_file)}
        turn.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(turn.log_path, "wb") as out:
            proc = subprocess.Popen(["bash", "-c", line], cwd=turn.worktree, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            if turn.pid_file is not None:
                turn.pid_file.write_text(f"{proc.pid} {process_start_time(proc.pid)}\n")
            try:
                ending = _wait_agent(proc, self.timeout_s, turn.stop)
            finally:
                kill_group(proc.pid)
                if turn.pid_file is not None:
                    turn.pid_file.unlink(missing_ok=True)
        if ending == "stopped":
            raise AgentStopped
        output = turn.log_path.read_text(encoding="utf-8", errors="replace")
        if give_up_file.exists():
            return GiveUp(one_line(give_up_file.read_text(encoding="utf-8", errors="replace")) or "the agent gave up")
        hypothesis = _stated_hypothesis(hypothesis_file, output)
        if ending == "timeout":
            return Proposal(hypothesis, error=f"the agent command ran past agent.timeout_s ({self.timeout_s:g} s)")
        if proc.returncode:
            tail = " | ".join(output.strip().splitlines()[-5:])
            return Proposal(hypothesis, error=f"the agent command exited with code {proc.returncode}: {tail[-600:]}")
        return Proposal(hypothesis)


def _wait_agent(proc: subprocess.Popen[bytes], timeout_s: float, stop: threading.Event) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            proc.wait(timeout=0.05)
            return "exited"
        except subprocess.TimeoutExpired:
            pass
        ending = "stopped" if stop.is_set() else "timeout" if time.monotonic() >= deadline else None
        if ending:
            kill_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                kill_group(proc.pid)
                proc.wait()
            return ending


def _stated_hypothesis(file: Path, output: str) -> str:
    if file.exists():
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                return one_line(line)
    stated = [m.group(1) for m in re.finditer(r"(?im)^\W*HYPOTHESIS:\s*(.+)$", output)]
    return one_line(stated[-1]) if stated else "(the agent stated no hypothesis)"


# -- the configured LLM ----------------------------------------------------------------


class LlmEdit(BaseModel):
    """What the model returns for one attempt."""

    hypothesis: str = Field(description="one sentence: the change and why it should improve the metric")
    diff: str = Field("", description="a unified diff (git diff format, paths a/... b/... from the repository root)")
    give_up: bool = Field(False, description="true only when there is nothing more worth trying")


SYSTEM = (
    "You are an autonomous ML researcher improving one metric by editing code, one change per attempt. "
    "Each reply is one experiment: a one-sentence hypothesis and a unified diff that applies with `git apply` "
    "to the files quoted in the prompt, touching only editable files."
)


class LlmAgent(Agent):
    """Asks the configured model for ``{hypothesis, diff}`` and applies it (re-asking with git's complaint)."""

    wants_files = True

    def __init__(self, config: LlmConfig, *, environ: Mapping[str, str], max_attempts: int,
                 on_completion: Callable[[Completion], None] = lambda c: None) -> None:
        self.config = config
        self.environ = environ
        self.max_attempts = max_attempts
        self.on_completion = on_completion

    def worst_case_cost(self, prompt: str) -> float:
        return estimate_cost(self.config, len(SYSTEM) + len(prompt)) * self.max_attempts

    def propose(self, turn: Turn) -> Proposal | GiveUp:
        provider = make_provider(self.config, self.environ)
        git = Git(turn.worktree, turn.env)

        def applies(edit: LlmEdit) -> list[str]:
            if edit.give_up:
                return []
            if not edit.diff.strip():
                return ["diff is empty; give one change as a unified diff, or set give_up to true"]
            problem = git.apply(_patch_bytes(edit.diff), check_only=True)
            return [] if problem is None else [f"`git apply --check` rejects the diff: {problem}"]

        try:
            result = ask_structured(provider, system=SYSTEM, user=turn.prompt, schema=LlmEdit,
                                    max_attempts=self.max_attempts, check=applies)
        except LlmError as exc:
            for completion in exc.completions:
                self.on_completion(completion)
            return Proposal("(the model proposed no usable edit)", cost=sum(c.cost_dollars for c in exc.completions),
                            error=exc.message)
        for completion in result.completions:
            self.on_completion(completion)
        edit = result.value
        if edit.give_up:
            return GiveUp(one_line(edit.hypothesis) or "the model gave up", cost=result.cost_dollars)
        problem = git.apply(_patch_bytes(edit.diff))
        return Proposal(one_line(edit.hypothesis), cost=result.cost_dollars,
                        error=None if problem is None else f"the diff stopped applying: {problem}")


def _patch_bytes(diff: str) -> bytes:
    return (diff if diff.endswith("\n") else diff + "\n").encode("utf-8")


def quote_files(worktree: Path, editable: list[str], limit: int) -> str:
    """The tracked editable files, fenced, up to ``limit`` bytes in all (for agents that cannot open files)."""
    listed = Git(worktree).out("ls-files", "-z")
    paths = [p for p in listed.split("\0") if p and matches_any(p, editable)]
    parts: list[str] = []
    used = 0
    skipped: list[str] = []
    for rel in paths:
        try:
            text = (worktree / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            skipped.append(rel)
            continue
        if used + len(text) > limit:
            skipped.append(rel)
            continue
        used += len(text)
        parts.append(f"### {rel}\n```\n{text}{'' if text.endswith(chr(10)) else chr(10)}```")
    if skipped:
        parts.append("Not quoted (binary or over the size limit): " + ", ".join(skipped))
    return "\n\n".join(parts)


@dataclass
class AgentFailures:
    """Consecutive turns without a usable edit; too many stop the worker rather than loop on a broken agent."""

    limit: int
    count: int = 0
    last: list[str] = field(default_factory=list)

    def record(self, error: str | None) -> bool:
        """Count one turn; True when the limit is reached."""
        if error is None:
            self.count, self.last = 0, []
            return False
        self.count += 1
        self.last.append(error)
        return self.count >= self.limit


def stop_orphan_agent(pid_file: Path) -> None:
    """Kill a command agent an earlier orchestrator left running (its pid file survived it)."""
    try:
        pid_text, start_text = pid_file.read_text().split()
        kill_orphan(int(pid_text), None if start_text == "None" else int(start_text))
    except (OSError, ValueError):
        pass
    pid_file.unlink(missing_ok=True)
