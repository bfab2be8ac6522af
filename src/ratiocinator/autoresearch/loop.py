"""The session: a baseline, then per worker edit → check → commit → run → decide, until told to stop.

One session per run tag. The shared branch ``autoresearch/<tag>`` only ever points at
the best commit: workers edit in their own worktrees (``<home>/autoresearch/<tag>/
worker-<i>``, branch ``autoresearch/<tag>-w<i>``), and a keep advances the shared branch
by compare-and-swap under the session lock, after the ledger has recorded it (so a
crash in between is repaired on resume by fast-forwarding the branch to the ledger's
best). A discard is ``git reset --hard`` of the worker's branch to the best.

When another worker kept a commit while a candidate was being evaluated, the candidate
is first judged against the new best on its own numbers; if it still wins, it is
rebased onto (or merged with, per ``integrate``) the new best and evaluated again from
there, since the combination is a different program. A conflict discards it with the
reason. Every attempt — kept, discarded, crashed, violating, interrupted — is in the
ledger with its full diff before anything runs.

With ``overlap`` (command and LLM agents), a worker's agent starts its next turn as soon as
its attempt is committed, while that attempt is measured from a second worktree
(``measure-<i>``, on branch ``autoresearch/<tag>-w<i>-measure``): the worker's GPU slot runs while the agent thinks.
The next attempt then starts from the best as it was; if its predecessor was kept meanwhile,
it is rebased onto the new best before it is measured (a conflict discards it). At most one
attempt per worker is measured at a time, so each slot still runs one run.

Stops on max_iterations, max_dollars, the agent giving up (or failing repeatedly),
Ctrl-C or SIGTERM (the live run's process group is killed and the attempt recorded as
``interrupted``; exit 130), and resumes from the ledger after any of them, ``kill -9``
included.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ratiocinator.autoresearch.agents import (
    LOOP_DIR,
    Agent,
    AgentFailures,
    AgentStopped,
    CommandAgent,
    GiveUp,
    LlmAgent,
    PatchAgent,
    Turn,
    quote_files,
    stop_orphan_agent,
)
from ratiocinator.autoresearch.decide import Decision, noise_aware, noise_floor, strictly_better
from ratiocinator.autoresearch.engine import Engine, RunOutcome, RunRequest
from ratiocinator.autoresearch.gitops import Git, GitError
from ratiocinator.autoresearch.guard import check_edit, matches_any, protected_hashes
from ratiocinator.autoresearch.program import LoadedProgram, Program
from ratiocinator.autoresearch.prompt import build_prompt
from ratiocinator.autoresearch.results import write_outputs
from ratiocinator.autoresearch.store import Attempt, Session, Store
from ratiocinator.errors import RatiocinatorError, SpecError, UsageError
from ratiocinator.llm.config import llm_from_env
from ratiocinator.llm.providers import Completion, LlmUnavailable, require_sdk
from ratiocinator.spec.source import load_stored
from ratiocinator.store.budget import run_cost, run_worst_case
from ratiocinator.store.ledger import Ledger
from ratiocinator.store.paths import Paths

MAX_INTEGRATION_ROUNDS = 3
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Outcome:
    """How a session ended, for the CLI."""

    tag: str
    status: str  # done | failed | interrupted
    reason: str
    exit_code: int
    best_commit: str | None
    best_metric: float | None
    attempts: int
    report_dir: Path


def session_dir(home: Path, tag: str) -> Path:
    return Paths(home).autoresearch(tag)


class _Stop(Exception):
    """Ends one worker's loop with a reason (not an error)."""

    def __init__(self, reason: str, *, everyone: bool = False, failed: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.everyone = everyone
        self.failed = failed


class _Shared:
    """What the workers share: the lock around the best and the branch, the stop flag, the reasons they stopped."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.stop = threading.Event()
        self.inflight = 0
        self.reasons: list[str] = []
        self.failed = False
        self.user_interrupt = False  # Ctrl-C or SIGTERM, as opposed to a stop for a failure or the budget
        self.error: BaseException | None = None

    def note(self, reason: str, *, failed: bool = False) -> None:
        with self.lock:
            if reason not in self.reasons:
                self.reasons.append(reason)
            self.failed = self.failed or failed


class AutoResearch:
    """One session of a program (new or resumed); ``run()`` does everything and returns the Outcome."""

    def __init__(self, loaded: LoadedProgram, home: Path, *, max_iterations: int | None = None,
                 environ: Mapping[str, str] | None = None, echo: Callable[[str], None] = lambda line: None) -> None:
        self.loaded = loaded
        self.program: Program = loaded.program
        self.home = Path(home)
        self.dir = session_dir(self.home, self.program.tag)
        self.environ = dict(os.environ if environ is None else environ)
        self.max_iterations = max_iterations if max_iterations is not None else self.program.max_iterations
        self._echo = echo
        self._echo_lock = threading.Lock()
        self.shared = _Shared()
        self.repo = Git(loaded.repo, self.environ)
        self.session: Session | None = None
        self.floor: float | None = None
        self._patch_agent: PatchAgent | None = None
        self.engine: Engine | None = None  # where the runs go, made when the session starts

    # -- the whole session -----------------------------------------------------------

    def run(self) -> Outcome:
        if not self.repo.is_repo():
            raise SpecError(f"{self.loaded.where('repo')}: {self.loaded.repo} is not a git repository",
                            hint="repo is relative to the program file")
        store = Store(Ledger(Paths(self.home).ledger))
        try:
            with self._session_lock():
                self.engine = Engine(self.loaded, self.home, self.environ)
                try:
                    return self._run(store)
                finally:
                    self._close_engine(store)
        finally:
            store.close()

    def _close_engine(self, store: Store) -> None:
        """Give rented instances back; when that settled money, write the outputs again so the report shows it."""
        assert self.engine is not None
        before = None if self.session is None else store.money(self.session.id)
        for problem in self.engine.close():
            self._say(problem)
        if self.session is not None and store.money(self.session.id) != before:
            self._write_outputs(store)

    @contextmanager
    def _session_lock(self) -> Iterator[None]:
        """One orchestrator per session: a second one is refused, and the OS drops the lock if we die."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"autoresearch session '{self.program.tag}' is already running (another process holds"
                                 f" {self.dir / 'lock'})",
                                 hint="wait for it, or stop it (Ctrl-C); the same command then resumes") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _run(self, store: Store) -> Outcome:
        if self.program.agent.kind == "llm":
            config = self.program.llm or llm_from_env(self.environ)
            if config is None:
                raise SpecError(f"{self.loaded.where('agent', 'kind')}: agent kind 'llm' needs an llm: section in the"
                                " program or RATIOCINATOR_LLM_PROVIDER and RATIOCINATOR_LLM_MODEL in the environment")
            require_sdk(config)  # a missing `llm` extra is said before the session starts
        self.runs.start()
        existing = store.session_by_tag(self.program.tag)
        session = self._resume(store, existing) if existing is not None else self._create(store)
        self.runs.attach(session.id)  # rented instances are this session's money (a resume attached already)
        self.session = session
        self._patch_agent = (PatchAgent(self.loaded.patches_dir, store.agent_refs(session.id))
                             if self.program.agent.kind == "patches" and self.loaded.patches_dir else None)
        previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
        if previous is not None:
            signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        try:
            if self._best(store) is None:
                self._in_threads([self._baseline])
            best = self._best(store)
            if best is not None and not self.shared.stop.is_set() and not self.shared.failed:
                self.floor = noise_floor(self._baseline_values(store)) if self.program.k > 1 else None
                self._in_threads([functools.partial(self._worker, i) for i in range(self.program.workers)])
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return self._finish(store)

    def _in_threads(self, jobs: list[Callable[[], None]]) -> None:
        """Run jobs in threads; Ctrl-C (or SIGTERM) in the main thread stops them all and waits for their cleanup.

        The wait is on events, not Thread.join: on Python 3.11 a KeyboardInterrupt inside join()
        can mark a still-running thread as finished (gh-90882), and the process would then exit
        under a thread that is still writing the ledger.
        """
        done = [threading.Event() for _ in jobs]
        threads = [threading.Thread(target=self._guarded(job, event), name=f"autoresearch-{i}", daemon=True)
                   for i, (job, event) in enumerate(zip(jobs, done, strict=True))]
        for thread in threads:
            thread.start()
        while True:
            try:
                for event in done:
                    while not event.wait(0.1):
                        pass
                break
            except KeyboardInterrupt:
                self.shared.user_interrupt = True
                self.shared.stop.set()  # the workers notice within a poll, kill their runs and record them

    def _guarded(self, job: Callable[[], None], done: threading.Event) -> Callable[[], None]:
        def run() -> None:
            try:
                job()
            except _Stop as stop:
                if stop.reason:
                    self.shared.note(stop.reason, failed=stop.failed)
                if stop.everyone:
                    self.shared.stop.set()
            except BaseException as exc:  # noqa: BLE001 - any error stops every worker and is reported by the main thread
                with self.shared.lock:
                    if self.shared.error is None:
                        self.shared.error = exc
                self.shared.failed = True
                self.shared.stop.set()
            finally:
                done.set()
        return run

    def _finish(self, store: Store) -> Outcome:
        assert self.session is not None
        interrupted = self.shared.user_interrupt
        error = self.shared.error
        if error is not None and not interrupted:
            reason = error.message if isinstance(error, RatiocinatorError) else f"{type(error).__name__}: {error}"
            status, code = "failed", 1
        elif interrupted:
            status, code, reason = ("interrupted", EXIT_INTERRUPTED,
                                    "interrupted by the user; run the same command to resume")
        else:
            reason = "; ".join(self.shared.reasons) or "stopped"
            status, code = ("failed", 1) if self.shared.failed else ("done", 0)
        store.update_session(self.session.id, status=status, reason=reason)
        self.session = store.session(self.session.id)
        self._write_outputs(store)
        best = self._best(store)
        for i in range(self.program.workers):  # every worktree ends at the best, as after a discard
            try:
                if best is not None and best.commit_sha:
                    self.worktree(i).reset_hard(best.commit_sha)
            except GitError:
                pass  # the error that ended the session (reported below) matters more
        if error is not None and not interrupted and not isinstance(error, RatiocinatorError):
            raise error
        return Outcome(tag=self.program.tag, status=status, reason=reason, exit_code=code,
                       best_commit=None if best is None else best.commit_sha,
                       best_metric=None if best is None else best.metric,
                       attempts=store.agent_attempts(self.session.id), report_dir=self.dir)

    # -- creating and resuming -------------------------------------------------------

    def _create(self, store: Store) -> Session:
        program = self.program
        branches = [program.branch, *(program.worker_branch(i) for i in range(program.workers))]
        branches += [program.measure_branch(i) for i in range(program.workers)] if program.overlaps else []
        taken = [b for b in branches if self.repo.branch_exists(b)]
        if taken:
            raise UsageError(
                f"branch '{taken[0]}' already exists in {self.loaded.repo}, but the ledger at {self.home} has no"
                f" autoresearch session '{program.tag}'",
                hint=f"choose a new tag in {self.loaded.where('tag')}, delete the branch (git branch -D {taken[0]}),"
                     " or pass the --home whose ledger ran it")
        base_branch = program.base_branch or self.repo.current_branch()
        if base_branch is None:
            raise SpecError(f"{self.loaded.path}: the repository is on a detached HEAD, so there is no base branch to"
                            " start from",
                            hint="set base_branch: in the program")
        base = self.repo.resolve(base_branch)
        if base is None:
            raise SpecError(f"{self.loaded.where('base_branch')}: base_branch '{base_branch}' names no commit in"
                            f" {self.loaded.repo}")
        session = store.create_session(
            tag=program.tag, repo=str(self.loaded.repo), branch=program.branch, base_branch=base_branch,
            base_commit=base,
            program_path=str(self.loaded.path), program_text=self.loaded.text, program_sha256=self.loaded.sha256,
            protected={}, status="setup")
        self.repo.create_branch(program.branch, base)
        self._say(f"session {program.tag}: branch {program.branch} from {base_branch} at {base[:7]}")
        return self._prepare(store, session, base)

    def _resume(self, store: Store, session: Session) -> Session:
        if Path(session.repo) != self.loaded.repo:
            raise UsageError(f"tag '{self.program.tag}' belongs to a session on {session.repo}, not {self.loaded.repo}",
                             hint=f"choose another tag in {self.loaded.where('tag')}")
        self._refuse_changed_metric(session)
        for attempt in store.attempts(session.id):
            if attempt.status == "running":
                if attempt.pid is not None:
                    self.runs.kill_orphan(attempt.pid, attempt.pid_start)
                store.finish_attempt(attempt.id, status="interrupted",
                                     reason="the orchestrator stopped during this attempt", values=attempt.values)
        for pid_file in self.dir.glob("agent-w*.pid"):
            stop_orphan_agent(pid_file)
        for line in self.runs.attach(session.id):  # paid at their lifetime, before the rest is settled at worst
            self._say(line)
        store.settle_open(session.id)
        best = session.best_commit or session.base_commit
        tip = self.repo.resolve(session.branch)
        if tip is None:
            self.repo.create_branch(session.branch, best)
        elif tip != best:
            if not self.repo.is_ancestor(tip, best):
                raise UsageError(
                    f"branch '{session.branch}' is at {tip[:12]}, but the ledger's best commit is {best[:12]}: the"
                    " branch was moved outside the loop",
                    hint=f"move it back (git branch -f {session.branch} {best}) or start a new tag")
            self.repo.move_branch(session.branch, best, tip)  # the ledger recorded a keep the branch never saw
        if self.loaded.sha256 != session.program_sha256:
            store.update_session(session.id, program_path=str(self.loaded.path), program_text=self.loaded.text,
                                 program_sha256=self.loaded.sha256)
        kept = sum(a.status == "keep" for a in store.attempts(session.id))
        self._say(f"session {session.tag}: resuming at {best[:7]} ({store.agent_attempts(session.id)} attempts so far,"
                  f" {kept} kept)")
        return self._prepare(store, store.session(session.id), best)

    def _refuse_changed_metric(self, session: Session) -> None:
        try:
            old = Program.model_validate(load_stored(session.program_text))
        except Exception:  # noqa: BLE001 - an older program that no longer validates cannot be compared
            return
        now = self.program
        if (old.metric.name, old.metric.direction) != (now.metric.name, now.metric.direction):
            raise UsageError(
                f"{self.loaded.where('metric')}: session '{now.tag}' decided with {old.metric.name}"
                f" ({old.metric.direction} is better); the program now says {now.metric.name} ({now.metric.direction})."
                " Results would not compare",
                hint="start a new tag for a new metric")

    def _prepare(self, store: Store, session: Session, at: str) -> Session:
        """Worktrees for every worker at ``at``, loop-owned paths ignored, shared data linked, protected hashes
        checked."""
        program = self.program
        excludes = [f"/{LOOP_DIR}/"] + ([f"/{program.log_file}"] if program.log_file else [])
        excludes += ["/results.tsv"] if program.results_tsv_in_repo else []
        self.repo.add_excludes(excludes)
        for i in range(program.workers):
            tree = self.repo.ensure_worktree(self.dir / f"worker-{i}", program.worker_branch(i), at)
            self.worktree(i).reset_hard(at)
            self._link(tree.cwd)
            if program.overlaps:
                self._link(self.repo.ensure_worktree(self.measure_dir(i), program.measure_branch(i), at).cwd)
                self.measure_tree(i).reset_hard(at)
        actual = protected_hashes(self.dir / "worker-0", program.protected)
        if session.status == "setup":
            store.update_session(session.id, protected=actual, status="running")
        else:
            changed = sorted(p for p in set(session.protected) & set(actual) if session.protected[p] != actual[p])
            gone = sorted(p for p in set(session.protected) - set(actual) if matches_any(p, program.protected))
            if changed or gone:
                what = ", ".join([*(f"{p} changed" for p in changed), *(f"{p} deleted" for p in gone)])
                raise UsageError(f"protected files differ from when session '{session.tag}' started: {what}",
                                 hint="restore them: every result so far was measured against the originals")
            store.update_session(session.id, protected=actual, status="running")
        return store.session(session.id)

    def _link(self, worktree: Path) -> None:
        """Symlink the program's ``link`` paths (untracked data, build caches) from the repository into a worktree."""
        for rel in self.program.link:
            rel = rel.strip("/")
            source, target = self.loaded.repo / rel, worktree / rel
            if not (source.exists() or source.is_symlink()):
                raise SpecError(f"{self.loaded.where('link')}: link path '{rel}' does not exist in {self.loaded.repo}")
            if target.is_symlink():
                continue
            if target.exists():
                raise SpecError(f"{self.loaded.where('link')}: link path '{rel}' is tracked by git; link is for files"
                                " git does not track (data, build caches)")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)

    # -- the best so far -------------------------------------------------------------

    def _best(self, store: Store) -> Attempt | None:
        assert self.session is not None
        session = store.session(self.session.id)
        return None if session.best_attempt is None else store.attempt(session.best_attempt)

    def _baseline_values(self, store: Store) -> list[float]:
        assert self.session is not None
        baselines = [a for a in store.attempts(self.session.id) if a.status == "baseline"]
        return baselines[-1].values if baselines else []

    # -- the baseline ----------------------------------------------------------------

    def _baseline(self) -> None:
        assert self.session is not None
        store = Store(Ledger(Paths(self.home).ledger))
        try:
            session = store.session(self.session.id)
            base = session.best_commit or session.base_commit
            git = self.worktree(0)
            git.reset_hard(base)
            attempt = store.add_attempt(session.id, worker=0, parent=base, baseline=True, hypothesis="baseline")
            store.update_attempt(attempt.id, commit_sha=base)
            try:
                self._measure_baseline(store, attempt, git)
            except _Stop:
                raise
            # Recorded rather than left running; the error itself is reported by the caller.
            except BaseException as exc:
                if store.attempt(attempt.id).status == "running":
                    stopped = self.shared.stop.is_set()
                    store.finish_attempt(attempt.id, status="interrupted" if stopped else "crash",
                                         reason="the session stopped during the baseline" if stopped
                                         else f"the loop failed: {exc}")
                raise
        finally:
            store.close()

    def _measure_baseline(self, store: Store, attempt: Attempt, git: Git) -> None:
        """k runs of the base commit; any crash stops the session, since nothing can be compared without it."""
        assert self.session is not None
        runs = _Runs(self, store, attempt, worker=0, git=git)
        values: list[float] = []
        while len(values) < self.program.k:
            outcome = runs.once(len(values))
            if outcome.status != "ok":
                status = "crash" if outcome.status == "crash" else "interrupted"
                store.finish_attempt(attempt.id, status=status, reason=outcome.reason, values=values)
                self._say_attempt(store.attempt(attempt.id))
                self._write_outputs(store)
                if outcome.status == "over_budget":
                    raise _Stop(outcome.reason, everyone=True)
                if status == "interrupted":
                    raise _Stop("")  # whoever stopped the session said why
                raise _Stop(f"the baseline crashed ({outcome.reason}); fix the run and start again: log tail:\n"
                            f"{outcome.log_tail[-1500:]}", everyone=True, failed=True)
            assert outcome.metric is not None  # an "ok" run carries its finite metric
            values.append(outcome.metric)
        store.finish_attempt(attempt.id, status="baseline", reason=f"{len(values)} run(s)", best_of=self.session.id,
                             values=values, metric=statistics.fmean(values))
        self._say_attempt(store.attempt(attempt.id))
        self._write_outputs(store)

    # -- workers ---------------------------------------------------------------------

    def _worker(self, worker: int) -> None:
        _Worker(self, worker).run()

    def _claim_turn(self, store: Store) -> None:
        """Count one more agent turn in flight, or stop when max_iterations or max_dollars says so.

        A claimed turn counts until its attempt is in the ledger (``_release_turn`` then, under the
        same lock), so an attempt is never counted twice, nor a turn not at all.
        """
        assert self.session is not None
        with self.shared.lock:
            if self.shared.stop.is_set():
                raise _Stop("")  # whoever set the flag said why
            if (self.max_iterations is not None
                and store.agent_attempts(self.session.id) + self.shared.inflight >= self.max_iterations):
                raise _Stop(f"max_iterations reached ({self.max_iterations})")
            if self.program.max_dollars is not None:
                spent, reserved = store.money(self.session.id)
                worst = run_worst_case(self.runs.price_per_hour, self.program.hard_timeout_s)
                if spent + reserved + worst > self.program.max_dollars + 1e-9:
                    raise _Stop(f"max_dollars reached (${spent:.2f} spent of ${self.program.max_dollars:.2f})",
                                everyone=True)
            self.shared.inflight += 1

    def _release_turn(self) -> None:
        with self.shared.lock:
            self.shared.inflight -= 1

    def make_agent(self, worker: int, store: Store) -> Agent:
        spec = self.program.agent
        if spec.kind == "patches":
            assert self._patch_agent is not None
            return self._patch_agent
        if spec.kind == "command":
            assert spec.command is not None
            return CommandAgent(spec.command, spec.timeout_s)
        config = self.program.llm or llm_from_env(self.environ)
        assert config is not None  # checked when the session started
        if spec.timeout_s < config.timeout_s:
            config = config.model_copy(update={"timeout_s": spec.timeout_s})

        def record(completion: Completion) -> None:
            store.ledger.record_llm_call(
                None, stage=f"autoresearch:{self.program.tag}", iteration=worker, provider=completion.provider,
                model=completion.model, prompt_sha256=hashlib.sha256(json.dumps(completion.request, sort_keys=True,
                                                                                 default=str).encode()).hexdigest(),
                request=completion.request, response=completion.response, text=completion.text,
                input_tokens=completion.input_tokens, output_tokens=completion.output_tokens,
                cost=completion.cost_dollars, latency_s=completion.latency_s, attempts=completion.attempts)

        return LlmAgent(config, environ=self.environ, max_attempts=spec.max_attempts, on_completion=record)

    def decide(self, values: list[float], best: Attempt) -> Decision:
        metric = self.program.metric
        if self.program.k == 1:
            assert best.metric is not None
            return strictly_better(values[0], best.metric, lower_is_better=metric.lower_is_better, name=metric.name)
        if best.values:
            reference = best.values
        else:
            assert best.metric is not None  # the best attempt was measured
            reference = [best.metric]
        return noise_aware(values, reference, k=self.program.k, floor=self.floor or 0.0,
                           confidence=self.program.confidence, lower_is_better=metric.lower_is_better, name=metric.name)

    def worktree(self, worker: int) -> Git:
        """Git in a worker's worktree; linked data stays untouched by clean and out of every commit."""
        return Git(self.dir / f"worker-{worker}", self.environ, keep=self.program.link)

    def measure_dir(self, worker: int) -> Path:
        return self.dir / f"measure-{worker}"

    def measure_tree(self, worker: int) -> Git:
        """Git in the worktree where a worker's attempts are measured while its agent edits the next one."""
        return Git(self.measure_dir(worker), self.environ, keep=self.program.link)

    @property
    def runs(self) -> Engine:
        assert self.engine is not None, "the engine is made when the session starts"
        return self.engine

    def run_env(self, worker: int, replicate: int, attempt: Attempt) -> dict[str, str]:
        """The attempt's own variables; the engine adds the run contract's (and the worker's GPUs, by its slot)."""
        program = self.program
        return {"RATIOCINATOR_BUDGET_S": f"{program.budget_s:g}",
                "RATIOCINATOR_TIMEOUT_S": f"{program.hard_timeout_s:g}",
                "RATIOCINATOR_WORKER": str(worker), "RATIOCINATOR_REPLICATE": str(replicate),
                "RATIOCINATOR_ATTEMPT": str(attempt.iteration), "RATIOCINATOR_TAG": program.tag}

    # -- output ----------------------------------------------------------------------

    def _write_outputs(self, store: Store) -> None:
        assert self.session is not None
        with self.shared.lock:
            session = store.session(self.session.id)
            spent, _ = store.money(session.id)
            write_outputs(self.dir, session, store.attempts(session.id), self.program, floor=self.floor, spent=spent,
                          repo_copy=self.loaded.repo / "results.tsv" if self.program.results_tsv_in_repo else None,
                          ledger=store.ledger.path)

    def _say(self, line: str) -> None:
        with self._echo_lock:
            self._echo(line)

    def _say_attempt(self, a: Attempt) -> None:
        name = self.program.metric.name
        value = ("" if a.metric is None
                 else f" {name} {a.metric:.6f}" + (f" ({len(a.values)} runs)" if len(a.values) > 1 else ""))
        what = "baseline" if a.is_baseline else a.hypothesis
        self._say(f"[w{a.worker} #{a.iteration}] {a.status}{value} — {what}"
                  + (f" ({a.reason})" if a.status != "baseline" and a.reason else ""))


class _Runs:
    """Runs of one attempt: each reserved against the budget, recorded, and settled at its true cost."""

    def __init__(self, session: AutoResearch, store: Store, attempt: Attempt, *, worker: int, git: Git) -> None:
        self.s = session
        self.store = store
        self.attempt = attempt
        self.worker = worker
        self.git = git
        self.run_s = 0.0
        self.count = 0  # runs so far, across integration rounds: each gets its own log
        self.secondary: dict[str, list[float]] = {}

    def once(self, replicate: int) -> RunOutcome:
        program = self.s.program
        assert self.s.session is not None
        price = self.s.runs.price_per_hour
        charge = self.store.reserve(self.s.session.id,
                                    amount=run_worst_case(price, program.hard_timeout_s),
                                    limit=program.max_dollars, kind="compute", attempt_id=self.attempt.id)
        if charge is None:
            spent, _ = self.store.money(self.s.session.id)
            return RunOutcome("over_budget", None,
                              reason=f"max_dollars reached (${spent:.2f} spent) before run {replicate + 1}")
        self.count += 1
        run_dir = self.s.dir / "logs" / f"attempt-{self.attempt.id}-run-{self.count}"
        commit = self.git.head()
        request = RunRequest(commit=commit, worker=self.worker, worktree=self.git.cwd,
                             env=self.s.run_env(self.worker, replicate, self.attempt), run_dir=run_dir,
                             run_id=self.attempt.id)
        outcome = self.s.runs.run(
            request, timeout_s=program.hard_timeout_s, stop=self.s.shared.stop,
            on_start=lambda pid, start, host: self.store.update_attempt(self.attempt.id, pid=pid, pid_start=start,
                                                                         host=host))
        self.store.settle(charge, run_cost(price, outcome.duration_s, program.hard_timeout_s))
        self.run_s += outcome.duration_s
        names = [*program.secondary_metrics, *([program.memory_metric] if program.memory_metric else [])]
        for name in dict.fromkeys(names):
            if name in outcome.metrics:
                self.secondary.setdefault(name, []).append(outcome.metrics[name])
        failed = {"failure": outcome.failure, "evidence": outcome.evidence} if outcome.failure else {}
        self.store.update_attempt(self.attempt.id, run_s=self.run_s, log_tail=outcome.log_tail,
                                  log_path=str(run_dir / "output.log"), secondary=self.secondary, pid=None,
                                  host=outcome.host, **failed)
        return outcome


@dataclass(frozen=True)
class _Candidate:
    """An attempt committed and ready to measure: ``commit`` built on ``base`` (the best when the agent began)."""

    attempt: Attempt
    commit: str
    base: str


class _Worker:
    """One worker's loop in its own worktree and thread, with its own ledger connection.

    Sequentially: the agent edits, the attempt is committed and measured, then the next turn.
    With the program's overlap, each committed attempt is measured in a thread of its own (in
    the worker's measuring worktree) while the agent already works on the next one; the worker
    waits for that measurement before it hands over the next, and before it ends.
    """

    def __init__(self, session: AutoResearch, worker: int) -> None:
        self.s = session
        self.worker = worker
        self.program = session.program
        self.git = session.worktree(worker)
        self.branch = self.program.worker_branch(worker)
        self.failures = AgentFailures(self.program.agent.max_failures)
        self.current: Attempt | None = None  # the attempt being made, finished here if an error cuts it short
        self.measuring: threading.Event | None = None  # set when the attempt measured behind the agent is decided
        self.claimed = False  # a turn counted in flight whose attempt is not in the ledger yet

    def run(self) -> None:
        store = Store(Ledger(Paths(self.s.home).ledger))
        try:
            agent = self.s.make_agent(self.worker, store)
            while True:
                self.s._claim_turn(store)
                self.claimed = True
                try:
                    candidate = self._propose(store, agent)
                    if candidate is not None and self.program.overlaps:
                        self._wait_for_measuring()  # one run per slot: the previous attempt is decided first
                        self._measure_behind(candidate)
                    elif candidate is not None:
                        self._evaluate(store, candidate, self.git)
                except _Stop:
                    raise
                except BaseException as exc:
                    self._cut_short(store, exc)
                    raise
                finally:
                    if self.claimed:  # the turn ended without an attempt
                        self.claimed = False
                        self.s._release_turn()
        finally:
            try:
                self._wait_for_measuring()
            finally:
                store.close()

    def _wait_for_measuring(self) -> None:
        """Until the attempt measured behind the agent is decided (a stop kills its run, so this ends)."""
        done, self.measuring = self.measuring, None
        while done is not None and not done.wait(0.1):
            pass

    def _measure_behind(self, candidate: _Candidate) -> None:
        """Measure ``candidate`` in the worker's measuring worktree, in a thread, while the agent goes on.

        The thread has its own ledger connection and is guarded like a worker: a stop or an error
        there stops the session the same way.
        """
        self.current = None  # from here the measuring thread answers for the attempt
        done = threading.Event()

        def measure() -> None:
            store = Store(Ledger(Paths(self.s.home).ledger))
            git = self.s.measure_tree(self.worker)
            try:
                git.reset_hard(candidate.commit)
                self._evaluate(store, candidate, git)
            except _Stop:
                raise
            except BaseException as exc:
                self._record_cut_short(store, candidate.attempt, exc, git)
                raise
            finally:
                store.close()

        self.measuring = done
        threading.Thread(target=self.s._guarded(measure, done), name=f"autoresearch-measure-{self.worker}",
                         daemon=True).start()

    def _cut_short(self, store: Store, exc: BaseException) -> None:
        """An error (or a Ctrl-C killing a git command) mid-attempt: record the attempt rather than leave it running."""
        attempt, self.current = self.current, None
        if attempt is not None:
            self._record_cut_short(store, attempt, exc, self.git)

    def _record_cut_short(self, store: Store, attempt: Attempt, exc: BaseException, git: Git) -> None:
        if store.attempt(attempt.id).status != "running":
            return
        interrupted = self.s.shared.stop.is_set()
        reason = "the session stopped during this attempt" if interrupted else f"the loop failed: {exc}"
        store.finish_attempt(attempt.id, status="interrupted" if interrupted else "crash", reason=reason)
        try:
            git.reset_hard(attempt.parent_commit)
        except GitError:
            pass  # the error being reported matters more than a tidy worktree; the next start resets it

    def _propose(self, store: Store, agent: Agent) -> _Candidate | None:
        """The agent's turn up to a commit; None when the attempt ended without one (a crash or a violation)."""
        s, program = self.s, self.program
        assert s.session is not None
        with s.shared.lock:
            best = s._best(store)
        assert best is not None and best.commit_sha is not None
        parent = best.commit_sha
        self.git.reset_hard(parent)
        attempts = store.attempts(s.session.id)
        files = quote_files(self.git.cwd, program.editable, program.agent.context_bytes) if agent.wants_files else None
        prompt = build_prompt(s.loaded, attempts=attempts, best=best, floor=s.floor, files=files)
        llm_charge = None
        worst = agent.worst_case_cost(prompt)
        if worst > 0:
            llm_charge = store.reserve(s.session.id, amount=worst, limit=program.max_dollars, kind="llm")
            if llm_charge is None:
                raise _Stop("max_dollars reached (no room for the next LLM turn)", everyone=True)
        turn = Turn(worktree=self.git.cwd, prompt=prompt, worker=self.worker, env=s.environ, stop=s.shared.stop,
                    log_path=s.dir / "logs" / f"agent-w{self.worker}-{len(attempts)}.log",
                    pid_file=s.dir / f"agent-w{self.worker}.pid")
        started = time.monotonic()
        try:
            proposal = agent.propose(turn)
        except (AgentStopped, LlmUnavailable) as exc:
            if llm_charge is not None:
                store.settle(llm_charge, sum(c.cost_dollars for c in getattr(exc, "completions", [])))
            self.git.reset_hard(parent)
            if isinstance(exc, LlmUnavailable):
                raise _Stop(f"the LLM is unavailable ({exc.message}); run the same command later to resume",
                            everyone=True, failed=True) from None
            raise _Stop("") from None  # AgentStopped: whoever stopped the session said why
        agent_s = time.monotonic() - started
        if isinstance(proposal, GiveUp):
            if llm_charge is not None:
                store.settle(llm_charge, proposal.cost)
            self.git.reset_hard(parent)
            raise _Stop(f"the agent gave up: {proposal.reason}")
        if self.git.current_branch() != self.branch:  # the agent switched branches: take ours back, keep its edits out
            self.git.run("checkout", "--quiet", "--force", self.branch)
            proposal = replace(proposal, error=proposal.error or "the agent switched branches; its edit was dropped")
            self.git.reset_hard(parent)
        self.git.fold_commits(parent)
        self.git.stage_all()
        changes = self.git.staged_changes(parent)
        diff = self.git.staged_diff(parent)
        with s.shared.lock:  # recorded and no longer in flight at once, for _claim_turn's count
            attempt = store.add_attempt(s.session.id, worker=self.worker, parent=parent,
                                        hypothesis=proposal.hypothesis, diff=diff, agent_ref=proposal.ref,
                                        agent_s=agent_s)
            self.claimed = False
            s._release_turn()
        self.current = attempt
        if llm_charge is not None:
            store.settle(llm_charge, proposal.cost, attempt_id=attempt.id)
        error = proposal.error or (None if changes else "the agent made no change")
        if error is not None and self.failures.record(error):
            self._end(store, attempt, "crash", error, parent, self.git)
            raise _Stop(f"the agent failed {self.failures.count} times in a row (last: {error})", failed=True)
        if error is not None:
            self._end(store, attempt, "crash", error, parent, self.git)
            return None
        self.failures.record(None)
        verdict = check_edit(changes, editable=program.editable, protected=program.protected,
                             expected=s.session.protected, actual=protected_hashes(self.git.cwd, program.protected))
        message = (f"{proposal.hypothesis}\n\n"
                   f"autoresearch {program.tag} attempt {attempt.iteration} (worker {self.worker})")
        if not verdict.ok:
            snapshot = self.git.snapshot(parent, f"[violation] {message}")
            store.update_attempt(attempt.id, commit_sha=snapshot)
            self._end(store, attempt, "violation", verdict.summary, parent, self.git)
            return None
        try:
            commit = self.git.commit(message)
        except GitError as exc:
            self._end(store, attempt, "crash", f"git commit failed: {exc.message}", parent, self.git)
            return None
        store.update_attempt(attempt.id, commit_sha=commit)
        return _Candidate(store.attempt(attempt.id), commit, parent)

    def _evaluate(self, store: Store, candidate: _Candidate, git: Git) -> None:
        """Run to a decision in ``git``'s worktree (at the commit); integrate with a best kept meanwhile, up to
        MAX_INTEGRATION_ROUNDS times.

        A best kept before the first run (the attempt's predecessor, when the agent's turn overlapped
        its measuring) is integrated at once: there are no numbers yet to judge the candidate by.
        """
        s = self.s
        assert s.session is not None
        attempt, commit, base = candidate.attempt, candidate.commit, candidate.base
        runs = _Runs(s, store, attempt, worker=self.worker, git=git)
        notes: list[str] = []
        with s.shared.lock:
            first = s._best(store)
        assert first is not None and first.commit_sha is not None
        if first.commit_sha != base:
            newer = first.commit_sha
            notes.append(f"the best moved to {newer[:7]} before it was measured, {s.program.integrate}d onto it")
            combined = self._integrate(git, attempt, commit, newer)
            if combined is None:
                return self._end(store, attempt, "discard",
                                 f"conflicts with {newer[:7]}, kept while it was being made", newer, git)
            commit, base = combined, newer
            store.update_attempt(attempt.id, commit_sha=commit)
        for _ in range(MAX_INTEGRATION_ROUNDS + 1):
            with s.shared.lock:
                snapshot = s._best(store)
            assert snapshot is not None
            values: list[float] = []
            runs.secondary = {}  # secondary metrics describe the commit being measured now
            while True:
                outcome = runs.once(len(values))
                if outcome.status != "ok":
                    status = "crash" if outcome.status == "crash" else "interrupted"
                    self._end(store, attempt, status, "; ".join([*notes, outcome.reason]), base, git, values=values)
                    if outcome.status == "over_budget":
                        raise _Stop(outcome.reason, everyone=True)
                    if status == "interrupted":
                        raise _Stop("")  # whoever stopped the session said why
                    return
                assert outcome.metric is not None  # an "ok" run carries its finite metric
                values.append(outcome.metric)
                decision = s.decide(values, snapshot)
                if decision.action != "rerun":
                    break
            if not decision.keep:  # the best only improves, so a discard against an older best stands
                return self._end(store, attempt, "discard", "; ".join([*notes, decision.reason]), base, git,
                                 values=values)
            with s.shared.lock:
                current = s._best(store)
                assert current is not None and current.commit_sha is not None
                decision = s.decide(values, current)
                if not decision.keep:
                    return self._end(store, attempt, "discard", "; ".join([*notes, decision.reason]), base, git,
                                     values=values)
                if current.commit_sha == base:
                    store.finish_attempt(attempt.id, status="keep", reason="; ".join([*notes, decision.reason]),
                                         best_of=s.session.id, values=values, metric=statistics.fmean(values))
                    if not s.repo.move_branch(s.program.branch, commit, base):
                        raise GitError(f"branch {s.program.branch} moved outside the loop while keeping {commit[:12]}")
                    if self.current is not None and self.current.id == attempt.id:
                        self.current = None
                    s._say_attempt(store.attempt(attempt.id))
                    s._write_outputs(store)
                    git.reset_hard(commit)
                    return
                newer = current.commit_sha
            # Another worker kept a commit while this one ran: combine, then measure the combination.
            notes.append(f"{statistics.fmean(values):.6f} on {base[:7]}; the best moved to {newer[:7]},"
                         f" {s.program.integrate}d onto it")
            combined = self._integrate(git, attempt, commit, newer)
            if combined is None:
                return self._end(store, attempt, "discard",
                                 f"conflicts with {newer[:7]}, kept by another worker meanwhile",
                                 base, git, values=values)
            commit, base = combined, newer
            store.update_attempt(attempt.id, commit_sha=commit)
        self._end(store, attempt, "discard", f"the best moved {MAX_INTEGRATION_ROUNDS} times during evaluation", base,
                  git)

    def _integrate(self, git: Git, attempt: Attempt, commit: str, onto: str) -> str | None:
        """``commit`` combined with the newer best ``onto`` (rebased or merged, per the program); None on conflict."""
        if self.s.program.integrate == "rebase":
            return git.rebase_onto(commit, onto)
        return git.merge_into(commit, onto, f"merge autoresearch attempt {attempt.iteration} onto the best")

    def _end(self, store: Store, attempt: Attempt, status: str, reason: str, reset_to: str, git: Git,
             values: list[float] | None = None) -> None:
        fields: dict[str, Any] = {}
        if values is not None:
            fields["values"] = values
            if values and status == "discard":
                fields["metric"] = statistics.fmean(values)
        store.finish_attempt(attempt.id, status=status, reason=reason, **fields)
        if self.current is not None and self.current.id == attempt.id:
            self.current = None
        git.reset_hard(reset_to)
        self.s._say_attempt(store.attempt(attempt.id))
        self.s._write_outputs(store)


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    """SIGTERM stops the session like Ctrl-C: runs are killed and recorded as interrupted."""
    raise KeyboardInterrupt
