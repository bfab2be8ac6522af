"""The ``research`` job from spec to report, resumable after any interruption.

    spec → plan → code (commit, knobs, LFS) → host + workspace → runs → ledger → report

Re-running the same command with the same spec resumes the same experiment: runs that
finished are kept, runs the previous orchestrator left ``running`` are reconciled as
``interrupted`` (their processes killed) and run again as new attempts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ratiocinator.backends import registry
from ratiocinator.backends.base import Backend, HardwareFinding, Host, Workspace
from ratiocinator.check.memory import remembered_pass, review_key
from ratiocinator.data.staging import fetch_before_renting, record_staging
from ratiocinator.errors import BackendError, DataError, PlanError, UsageError, WorkspaceError
from ratiocinator.execution.contract import inherited_env, runner_argv
from ratiocinator.llm.config import LlmConfig, llm_from_env
from ratiocinator.llm.providers import LlmError, LlmUnavailable, estimate_cost, make_provider, require_sdk
from ratiocinator.llm.session import LlmBudgetExceeded, LlmSession, RecordingProvider
from ratiocinator.planning.plan import Plan, refuse_ignored_knobs, with_constants
from ratiocinator.planning.planner import Decision, Planner, PlanningContext, SpecPlanner
from ratiocinator.repo import workspace as ws
from ratiocinator.repo.knobs import KnobReport, discover_knobs
from ratiocinator.repo.provenance import remote_url
from ratiocinator.spec.models import LoadedSpec, Spec
from ratiocinator.store.budget import Budget, run_cost, run_worst_case
from ratiocinator.store.ledger import Experiment, Ledger
from ratiocinator.store.paths import Paths
from ratiocinator.store.records import FINISHED, DecisionRecord, ExperimentStatus, ReadinessRecord, RunStatus

# For `plan`'s LLM estimate: a typical stage prompt (knobs, statistics or facts) before the reply.
ESTIMATED_PROMPT_CHARS = 12_000


def make_backend(loaded: LoadedSpec, paths: Paths) -> Backend:
    return registry.make_backend(loaded, paths.home)


def refuse_unmet_hardware(findings: list[HardwareFinding], loaded: LoadedSpec) -> None:
    unmet = [f for f in findings if f.status == "unmet"]
    if unmet:
        lines = "\n  ".join(f"{loaded.where('hardware', f.field)}: hardware.{f.field}: {f.detail}" for f in unmet)
        raise BackendError(
            f"this machine does not meet the spec's hardware requirements:\n  {lines}",
            hint="run where the hardware is available, or relax the hardware section of the spec",
        )


# -- the code ---------------------------------------------------------------------


@dataclass(frozen=True)
class CodeView:
    """The runner's code at the commit that will run, as seen before anything runs."""

    repo: str
    commit: str
    checkout: Path
    knobs: KnobReport


def resolve_commit(loaded: LoadedSpec, paths: Paths) -> tuple[str, str]:
    repo = ws.resolve_repo_url(loaded.spec.repo_url, loaded.path.parent)
    return repo, ws.resolve_commit(repo, loaded.spec.repo_branch, paths.repos, timeout_s=loaded.spec.download_timeout_s)


def uncommitted_warning(loaded: LoadedSpec, paths: Paths) -> str | None:
    """A warning when the local ``repo_url`` has edits the runs will not see (they run the commit), or None."""
    try:
        repo = ws.resolve_repo_url(loaded.spec.repo_url, loaded.path.parent)
        commit, files = ws.uncommitted_changes(repo, loaded.spec.repo_branch, ignore=(loaded.path, paths.home))
    except WorkspaceError:
        return None  # the commands that need the repository say what is wrong with it
    if not files or commit is None:
        return None
    shown = ", ".join(files[:8]) + (f" (and {len(files) - 8} more)" if len(files) > 8 else "")
    return (f"warning: uncommitted changes in {repo}: these files differ from the commit that will run"
            f" ({commit[:7]}): {shown} — commit them to study them")


def inspect_code(loaded: LoadedSpec, paths: Paths, commit: str | None = None, *,
                 require_lfs: bool = True) -> CodeView:
    """Check out the commit (cached) and read which knobs its runner reads (``require_lfs=False``: also
    when the data is Git LFS pointers, for reading the code only)."""
    repo = ws.resolve_repo_url(loaded.spec.repo_url, loaded.path.parent)
    if commit is None:
        repo, commit = resolve_commit(loaded, paths)
    checkout = ws.checkout(repo, commit, paths.repos, lfs_timeout_s=loaded.spec.download_timeout_s,
                           require_lfs=require_lfs)
    ws.within(checkout, loaded.spec.runner_script, "runner_script")  # a link out of the repository is refused
    if not (checkout / loaded.spec.runner_script).is_file():
        raise PlanError(
            f"{loaded.where('runner_script')}: runner_script '{loaded.spec.runner_script}' does not exist"
            f" at commit {commit[:12]}",
            hint="the path is relative to the repository root; is the file committed on that branch?",
        )
    knobs = discover_knobs(checkout, loaded.spec.runner_script)
    return CodeView(repo=repo, commit=commit, checkout=checkout, knobs=knobs)


# -- experiments --------------------------------------------------------------------


def open_experiment(ledger: Ledger, loaded: LoadedSpec, *, new: bool) -> tuple[Experiment, bool]:
    """(experiment, resumed): the latest one for this exact spec unless ``new`` is asked."""
    existing = ledger.experiments_for_spec(loaded.name, loaded.sha256)
    if existing and not new:
        return existing[-1], True
    base = f"{loaded.name}-{loaded.sha256[:8]}"
    taken = ledger.experiment_ids()
    exp_id = base
    n = 2
    while exp_id in taken:
        exp_id, n = f"{base}-{n}", n + 1
    experiment = ledger.create_experiment(
        id=exp_id, name=loaded.name, spec_path=str(loaded.path), spec_text=loaded.text,
        spec_sha256=loaded.sha256, backend=loaded.spec.backend,
    )
    return experiment, False


@contextmanager
def experiment_lock(path: Path) -> Iterator[None]:
    """One orchestrator per experiment: a second one would record runs twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise UsageError(
                f"experiment {path.stem} is already being run by {holder}",
                hint="wait for it to finish, or stop it (Ctrl-C) and run the command again to resume",
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        yield
    finally:
        fh.close()


def reconcile(ledger: Ledger, backend: Backend, experiment: Experiment, price_per_hour: float, timeout_s: float) -> int:
    """Runs left ``running`` by a dead orchestrator: a run that finished but whose record the ledger could not
    take (a full disk) is recorded from the experiment's outcome journal; the others' leftovers are killed, and
    they are marked interrupted (to run again); money is settled. Returns how many will run again."""
    from ratiocinator.execution import outcomes

    count = 0
    now = time.time()
    journals: dict[Path, dict[int, outcomes.RunOutcome]] = {}  # runs folder -> the outcomes it keeps
    for run in ledger.runs(experiment.id, status=RunStatus.RUNNING):
        finished = None
        if run.log_dir:
            run_dir = Path(run.log_dir)
            if run_dir.parent not in journals:
                journals[run_dir.parent] = outcomes.kept(run_dir.parent)
            finished = journals[run_dir.parent].get(run.id) or outcomes.kept_in_run_folder(run_dir)
        if finished is not None:
            ledger.finish_run(run.id, settle_charge=finished.charge, **finished.ledger_fields())
            ledger.event(experiment.id, "recovered", f"run {run.id} finished ({finished.status}) before the"
                         " orchestrator could record it; recorded from the outcome it left", run_id=run.id)
            continue
        killed = backend.kill_orphan(run.pid, run.pid_start) if run.pid else False
        elapsed = now - run.started_at
        cost = run_cost(price_per_hour, elapsed, timeout_s)
        ledger.finish_run(
            run.id, status=RunStatus.INTERRUPTED, failure=None,
            reason="the orchestrator stopped while this run was live"
                   + ("; its leftover processes were killed" if killed else ""),
            exit_code=None, signal=None, final={}, counts={}, cost=cost, ended_at=now,
        )
        ledger.event(experiment.id, "reconciled", f"run {run.id} marked interrupted", run_id=run.id, killed=killed)
        count += 1
    for charge in ledger.open_charges(experiment.id):
        spent = run_cost(price_per_hour, now - charge["created_at"], timeout_s)
        ledger.settle(charge["id"], min(charge["reserved"], spent))
    return count


# -- the job ----------------------------------------------------------------------


if TYPE_CHECKING:
    from ratiocinator.execution.executor import ExecutionSummary, ProgressSink
    from ratiocinator.report.publish import ReportFiles


@dataclass
class ResearchOutcome:
    experiment_id: str
    status: str
    report: ReportFiles | None
    succeeded: int
    failed: int
    message: str

    @property
    def exit_code(self) -> int:
        if self.status == ExperimentStatus.INTERRUPTED:
            return 130
        if self.status in (ExperimentStatus.PAUSED, ExperimentStatus.NOT_READY):
            return 1  # not done: the same command continues once the cause is fixed
        return 0 if self.succeeded else 1


class Research:
    """One invocation of ``ratiocinator research``."""

    def __init__(self, loaded: LoadedSpec, home: Path, *, progress: ProgressSink | None = None, new: bool = False,
                 planner: Planner | None = None, check: bool = True, llm_review: bool = True,
                 backend: Backend | None = None, replay_from: str | None = None,
                 environ: dict[str, str] | None = None) -> None:
        # The executor loads with a Research: `validate`, `knobs` and `check` import this module and run nothing.
        from ratiocinator.execution.executor import ProgressSink

        self.loaded = loaded
        self.spec = loaded.spec
        self.paths = Paths(Path(home).expanduser().resolve())  # runners start elsewhere: no relative paths
        self.progress = progress or ProgressSink()
        self.environ = dict(os.environ if environ is None else environ)
        self.llm_config = loaded.spec.llm or llm_from_env(self.environ)
        self.replay_from = replay_from
        self.new = new or replay_from is not None  # a replay is a new experiment answering from an old one
        self.planner = planner or default_planner(loaded, llm=self.llm_config is not None or replay_from is not None)
        self.check = check
        self.llm_review = llm_review
        self.backend = backend

    def run(self) -> ResearchOutcome:
        self.planner.check()  # planning errors (no arms, bad baseline) surface before the ledger is touched
        if self.llm_config is not None and self.replay_from is None:
            require_sdk(self.llm_config)  # so does a missing `llm` extra
        backend = self.backend or make_backend(self.loaded, self.paths)
        findings = backend.check_hardware(self.loaded)
        refuse_unmet_hardware(findings, self.loaded)
        ledger = Ledger(self.paths.ledger)
        try:
            if self.replay_from is not None:
                self.replay_from = ledger.find_experiment(self.replay_from).id
            experiment, resumed = open_experiment(ledger, self.loaded, new=self.new)
            if resumed and experiment.status in FINISHED:
                report = _write_report(ledger, experiment.id, self.paths.report(experiment.id))
                counts = _counts(ledger, experiment.id)
                moved = self._branch_moved(experiment)
                return ResearchOutcome(experiment.id, experiment.status, report, counts[0], counts[1],
                                       f"experiment {experiment.id} already finished ({experiment.status})"
                                       + (f" at commit {moved}; its results are that code's. Run the same command"
                                          " with --new to study the new code" if moved else
                                          "; use --new to run it again"))
            with experiment_lock(self.paths.lock(experiment.id)):
                return self._run_locked(ledger, backend, experiment, resumed, findings)
        finally:
            ledger.close()

    def _branch_moved(self, experiment: Experiment) -> str | None:
        """``OLD, but repo_branch has moved to NEW (files changed: ...)`` when the branch the spec names has
        commits past the experiment's; None when it has not, or cannot be read (offline)."""
        old = experiment.commit_sha
        if not old:
            return None
        try:
            repo, new = resolve_commit(self.loaded, self.paths)
        except WorkspaceError:
            return None
        if new == old:
            return None
        files = ws.changed_files(repo, old, new, self.paths.repos)
        shown = ", ".join(files[:8]) + (f" (and {len(files) - 8} more)" if len(files) > 8 else "")
        changed = f"{len(files)} file(s) changed: {shown}" if files else "no file changed"
        return f"{old[:7]}, but {self.spec.repo_branch} has moved to {new[:7]} since ({changed})"

    def _run_locked(self, ledger: Ledger, backend: Backend, experiment: Experiment, resumed: bool,
                    findings: list[HardwareFinding]) -> ResearchOutcome:
        spec = self.spec
        exp_id = experiment.id
        price = backend_price(self.loaded)
        backend.attach(Budget(ledger, exp_id, spec.max_dollars))  # rented instances: reserved through it
        self.progress.watch(ledger.path, exp_id)
        if resumed:
            n = reconcile(ledger, backend, experiment, price, spec.train_timeout_s)
            self.progress.message(f"resuming {exp_id}" + (f" ({n} interrupted run(s) will run again)" if n else ""))
        ledger.update_experiment(exp_id, status=ExperimentStatus.RUNNING)
        ledger.event(exp_id, "hardware", "hardware findings", findings=[f.__dict__ for f in findings])
        try:
            outcome = asyncio.run(self._run_async(ledger, backend, experiment))
        except LlmUnavailable as exc:  # the provider is down or throttling past the retries: pause, resumably
            note = f"paused: {exc.message}; run the same command to resume (finished runs and decisions are kept)"
            ledger.update_experiment(exp_id, status=ExperimentStatus.PAUSED, note=note)
            ledger.event(exp_id, "paused", str(exc), level="warning")
            counts = _counts(ledger, exp_id)
            return ResearchOutcome(exp_id, ExperimentStatus.PAUSED, None, counts[0], counts[1], note)
        except LlmBudgetExceeded as exc:
            ledger.update_experiment(exp_id, status=ExperimentStatus.BUDGET_EXHAUSTED, note=exc.message)
            ledger.event(exp_id, "budget_stop", exc.message, level="warning")
            counts = _counts(ledger, exp_id)
            report = _write_report(ledger, exp_id, self.paths.report(exp_id)) if ledger.runs(exp_id) else None
            return ResearchOutcome(exp_id, ExperimentStatus.BUDGET_EXHAUSTED, report, counts[0], counts[1], exc.message)
        except (KeyboardInterrupt, asyncio.CancelledError):
            ledger.update_experiment(exp_id, status=ExperimentStatus.INTERRUPTED,
                                     note="interrupted; run the same command to resume")
            ledger.event(exp_id, "interrupted", "the orchestrator was interrupted", level="warning")
            counts = _counts(ledger, exp_id)
            return ResearchOutcome(exp_id, ExperimentStatus.INTERRUPTED, None, counts[0], counts[1],
                                   "interrupted; run the same command again to resume")
        except BaseException as exc:
            ledger.update_experiment(exp_id, status=ExperimentStatus.FAILED, note=str(exc).splitlines()[0][:500])
            ledger.event(exp_id, "error", str(exc), level="error")
            raise
        return outcome

    async def _run_async(self, ledger: Ledger, backend: Backend, experiment: Experiment) -> ResearchOutcome:
        _cancel_on_sigterm()
        spec = self.spec
        exp_id = experiment.id
        if experiment.commit_sha and ledger.runs(exp_id):
            commit = experiment.commit_sha  # every run of an experiment uses one commit
            moved = await asyncio.to_thread(self._branch_moved, experiment)
            if moved:
                self.progress.message(f"resuming at commit {moved}; this experiment finishes on its own commit,"
                                      " --new starts one on the new code")
        else:  # nothing ran yet (first start, or a setup failure the user may have fixed upstream)
            _, commit = await asyncio.to_thread(resolve_commit, self.loaded, self.paths)
            ledger.update_experiment(exp_id, commit_sha=commit)
        code = await asyncio.to_thread(inspect_code, self.loaded, self.paths, commit)
        remote = await asyncio.to_thread(remote_url, code.repo)  # what the paper says to clone, not a local path
        ledger.event(exp_id, "code", f"commit {commit}", commit=commit, repo=code.repo, remote=remote,
                     knobs=sorted(code.knobs.knobs))
        self.progress.message(f"experiment {exp_id} at commit {commit[:12]}")
        data = await fetch_before_renting(self.loaded, self.paths.home, ledger, exp_id, self.progress.message)

        host = await backend.acquire(self.loaded)
        # host.info's keys are descriptive ("cpus", "ssh <label>", ...), never the event's own level or run_id.
        described: dict[str, Any] = {"name": host.name, "slots": [s.label for s in host.slots],
                                     "price_per_hour": host.price_per_hour, **host.info}
        ledger.event(exp_id, "host", f"host {host.name}", **described)
        budget = Budget(ledger, exp_id, spec.max_dollars)
        price = host.price_per_hour
        llm = self._llm_session(ledger, exp_id)
        environments: asyncio.Task[None] | None = None
        try:
            self.progress.message("preparing the workspace (clone, deps, verify" + (", data)" if data else ")"))
            workspace = await record_staging(data, self.loaded, backend, host, ledger, budget,
                                             backend.prepare(host, self.loaded, commit))
            # The paper's record of the software (an interpreter start and every installed package's metadata,
            # a few tenths of a second): no run needs it, so it is read while the first runs start.
            environments = asyncio.create_task(self._record_environments(ledger, exp_id, backend, host, workspace))
            argv = runner_argv(workspace.checkout, spec.runner_script, "python")
            extra_env: dict[str, str] = {}  # the data directory comes with the workspace: each host's own copy
            status, note = ExperimentStatus.COMPLETED, ""
            reviewed = False
            for iteration in range(1, spec.max_iterations + 1):
                decision = await asyncio.to_thread(self._decide, PlanningContext(
                    iteration, ledger, exp_id, code.knobs, budget, price, spec.train_timeout_s, llm))
                if decision.plan is None:
                    note = decision.reason
                    break
                plan = decision.plan
                refuse_ignored_knobs(self.loaded, plan, code.knobs)
                ledger.record_arms(exp_id, iteration, plan.arms, plan.baseline)
                arm_ids = {a.name: a.id for a in ledger.arms(exp_id)}
                done = ledger.terminal_replicates(exp_id, spec.failure_policy.max_attempts)
                pending = [r for r in plan.runs() if (r.arm, r.replicate) not in done]
                ledger.event(exp_id, "plan", f"iteration {iteration}: {len(plan.arms)} arms, {len(pending)} runs to go",
                             iteration=iteration, arms=[a.name for a in plan.arms], pending=len(pending),
                             worst_case=run_worst_case(price, spec.train_timeout_s) * len(pending))
                if pending and not reviewed:
                    reviewed = True
                    problem = await self._review(ledger, exp_id, commit, code, plan, backend, host, workspace, argv,
                                                 extra_env, llm)
                    if problem:
                        status, note = ExperimentStatus.NOT_READY, problem
                        break
                self.progress.message(f"iteration {iteration}: {len(plan.arms)} arms × {plan.replicates} replicates,"
                                      f" {len(pending)} runs to go")
                from ratiocinator.execution.executor import Executor  # loaded with the Research (see __init__)

                executor = Executor(
                    ledger=ledger, backend=backend, host=host, workspace=workspace, loaded=self.loaded, plan=plan,
                    experiment_id=exp_id, commit=commit, arm_ids=arm_ids, argv=argv, runs_dir=self.paths.runs(exp_id),
                    budget=budget, progress=self.progress, extra_env=extra_env, base_env=self.runner_env(),
                    last_iteration=iteration == spec.max_iterations,
                )
                summary: ExecutionSummary = await executor.run(pending)
                host = executor.host  # capacity may have been given back or rented again
                if summary.early_stop:
                    status, note = ExperimentStatus.STOPPED, summary.early_stop
                    break
                if summary.budget_stop:
                    status, note = ExperimentStatus.BUDGET_EXHAUSTED, summary.budget_stop
                    break
                degenerate = flag_constant_metric(ledger, exp_id, spec.goal_metric)
                if degenerate:
                    status, note = ExperimentStatus.STOPPED, f"stopped: {degenerate}"
                    self.progress.message(note)
                    break
            await environments  # in the ledger before the machines go back and the report reads it
        finally:
            if environments is not None:  # stopped by an error or a signal: the probe is not waited for
                environments.cancel()
                await asyncio.gather(environments, return_exceptions=True)
            await backend.release(host)
        ledger.update_experiment(exp_id, status=status, note=note)
        if llm is not None and ledger.runs(exp_id, status=RunStatus.SUCCEEDED):
            await asyncio.to_thread(self._narrate, ledger, exp_id, llm)
        report = _write_report(ledger, exp_id, self.paths.report(exp_id)) if ledger.runs(exp_id) else None
        succeeded, failed = _counts(ledger, exp_id)
        return ResearchOutcome(exp_id, status, report, succeeded, failed, note)

    async def _record_environments(self, ledger: Ledger, exp_id: str, backend: Backend, host: Host,
                                   workspace: Workspace) -> None:
        for found in await backend.environments(host, workspace, self.loaded):  # per machine, for the paper
            described = {"host": host.name, "slots": [s.label for s in host.slots], **found}
            ledger.event(exp_id, "environment", f"environment of {described['host']}", **described)

    def plan_first_iteration(self) -> tuple[str, Plan, Decision]:
        """Decide iteration 1 now (an LLM design) and record it, so `research` later runs exactly this plan."""
        ledger = Ledger(self.paths.ledger)
        try:
            experiment, _ = open_experiment(ledger, self.loaded, new=self.new)
            with experiment_lock(self.paths.lock(experiment.id)):
                _, commit = resolve_commit(self.loaded, self.paths)
                if not ledger.runs(experiment.id):
                    created = experiment.status == ExperimentStatus.CREATED
                    ledger.update_experiment(experiment.id, commit_sha=commit,
                                             status=ExperimentStatus.PLANNED if created else None)
                code = inspect_code(self.loaded, self.paths,
                                    experiment.commit_sha if ledger.runs(experiment.id) else commit)
                budget = Budget(ledger, experiment.id, self.spec.max_dollars)
                context = PlanningContext(1, ledger, experiment.id, code.knobs, budget, backend_price(self.loaded),
                                          self.spec.train_timeout_s, self._llm_session(ledger, experiment.id))
                decision = self._decide(context)
        finally:
            ledger.close()
        if decision.plan is None:
            raise PlanError(f"the planner proposes nothing to run: {decision.reason}")
        return experiment.id, decision.plan, decision

    def llm_estimate(self) -> dict[str, float | int] | None:
        """Worst-case LLM dollars for a whole experiment: design, review, each later iteration, the discussion."""
        if self.llm_config is None:
            return None
        calls = 1 + 1 + (self.spec.max_iterations - 1) + 1
        per_call = estimate_cost(self.llm_config, ESTIMATED_PROMPT_CHARS, None)
        return {"calls": calls, "per_call_dollars": per_call, "worst_case_dollars": calls * per_call,
                "assumed_prompt_tokens": ESTIMATED_PROMPT_CHARS // 4, "max_tokens": self.llm_config.max_tokens}

    def runner_env(self) -> dict[str, str]:
        return runner_env(self.environ, self.loaded)

    def _llm_session(self, ledger: Ledger, exp_id: str) -> LlmSession | None:
        """The experiment's LLM: a replay of another experiment's calls, the configured provider, or none."""
        if self.replay_from is not None:
            calls = ledger.llm_calls(self.replay_from)
            recorded = {"provider": calls[0].provider, "model": calls[0].model} if calls else None
            config = self.llm_config or (LlmConfig.model_validate(recorded) if recorded is not None else None)
            if config is None:
                raise UsageError(f"experiment {self.replay_from} recorded no LLM calls; there is nothing to replay",
                                 hint="`ratiocinator status` lists experiments; replay one that was planned by an LLM")
            ledger.event(exp_id, "replay", f"LLM calls answered from experiment {self.replay_from}",
                         source=self.replay_from)
            return LlmSession(Budget(ledger, exp_id, self.spec.max_dollars), config, replay_from=self.replay_from)
        if self.llm_config is None:
            return None
        return LlmSession(Budget(ledger, exp_id, self.spec.max_dollars), self.llm_config,
                          inner=make_provider(self.llm_config, self.environ))

    def _narrate(self, ledger: Ledger, exp_id: str, llm: LlmSession) -> None:
        """The LLM's discussion of the results, recorded for the paper; a failure leaves the paper without it."""
        from ratiocinator.report.writer import write_narrative

        if ledger.llm_calls(exp_id, stage="write"):
            return  # written before an interruption; the paper re-reads it from the ledger
        self.progress.message("writing the discussion with the LLM (every number is checked against the ledger)")
        try:
            write_narrative(ledger, exp_id, llm.provider("write"))
        except (LlmError, LlmUnavailable, LlmBudgetExceeded) as exc:
            ledger.event(exp_id, "narrative_failed", f"the LLM discussion was not written: {exc.message}",
                         level="warning")
            self.progress.message(f"the LLM discussion was not written: {exc.message}")

    def _decide(self, context: PlanningContext) -> Decision:
        """The iteration's decision: the one recorded earlier (a resume), else the planner's, recorded now.

        Recording the plan itself, not only that a decision was made, is what lets a resumed
        experiment continue with the same arms whatever planner (or model) chose them.
        """
        ledger, exp_id, iteration = context.ledger, context.experiment_id, context.iteration
        for recorded in reversed(ledger.decisions(exp_id)):
            if recorded.iteration == iteration:
                plan = Plan.from_json(recorded.plan) if recorded.plan else None
                return Decision(_with_constants(plan, self.spec), recorded.reason, recorded.record)
        decision = self.planner.next_iteration(context)
        decision = Decision(_with_constants(decision.plan, self.spec), decision.reason, decision.record)
        ledger.record_decision(exp_id, DecisionRecord(iteration, self.planner.name, decision.reason,
                                                      decision.plan.to_json() if decision.plan else None,
                                                      decision.record))
        return decision

    async def _review(self, ledger: Ledger, exp_id: str, commit: str, code: CodeView, plan: Plan, backend: Backend,
                      host: Host, workspace: Workspace, argv: tuple[str, ...], extra_env: dict[str, str],
                      llm: LlmSession | None) -> str | None:
        """The readiness review before the first paid run; why the code is not ready, or None."""
        if not self.check:
            ledger.record_readiness(exp_id, ReadinessRecord(commit, skipped=True, is_code_ready=False),
                                    "the readiness review was skipped (--skip-check)", level="warning")
            self.progress.message("readiness review skipped (--skip-check)")
            return None
        earlier = [v for v in ledger.readiness_verdicts(exp_id) if v.commit == commit and v.is_code_ready]
        if earlier:
            self.progress.message(f"readiness review passed earlier at commit {commit[:12]}")
            return None
        key = review_key(self.loaded, plan, commit, smoke=True,
                         llm_model=llm.config.model if llm is not None and self.llm_review else None)
        # A replay re-runs the recorded experiment call for call, its review included.
        remembered = None if self.replay_from else remembered_pass(ledger, key, smoke=self.spec.check.smoke)
        if remembered is not None:
            ledger.record_readiness(exp_id, remembered, f"ready: the review passed earlier at commit {commit[:12]}"
                                    " with the same arms and settings (reused)")
            self.progress.message(f"readiness review: reusing the review that passed at commit {commit[:12]} with the"
                                  " same arms and settings (no smoke runs repeated)")
            return None
        from ratiocinator.check.readiness import review  # the static checks' parsers: only for a review that runs

        self.progress.message("readiness review: static checks, smoke runs, cross-arm comparison")
        arms = len({(tuple(sorted(a.env.items())), tuple(a.args)) for a in plan.arms})
        smoke_s = self.spec.check.smoke_timeout_s
        budget = Budget(ledger, exp_id, self.spec.max_dollars)
        charge = budget.reserve(run_worst_case(host.price_per_hour, smoke_s) * arms, kind="smoke",
                                note=f"{arms} smoke run(s) × {smoke_s:g}s")
        started = time.time()
        try:
            readiness = await review(
                loaded=self.loaded, checkout=code.checkout, knobs=code.knobs, plan=plan, backend=backend, host=host,
                workspace=workspace, argv=argv, smoke_dir=self.paths.runs(exp_id) / "smoke", smoke=charge is not None,
                smoke_off_reason=f"max_dollars cannot cover {arms} smoke run(s) of {smoke_s:g}s",
                llm_config=llm.config if llm is not None and self.llm_review else None,
                llm_provider=(lambda: llm.provider("review")) if llm is not None else None,
                llm_off_reason="disabled (--no-llm-review)" if llm is not None else "no LLM configured",
                extra_env=extra_env, environ=self.runner_env(), commit=commit, on_message=self.progress.message,
            )
        finally:
            if charge is not None:
                budget.settle(charge, min(run_worst_case(host.price_per_hour, smoke_s) * arms,
                                          run_cost(host.price_per_hour, time.time() - started, smoke_s * arms)))
        data = readiness.to_json()
        record = ReadinessRecord(data["commit"], skipped=False, is_code_ready=data["is_code_ready"],
                                 code_issue=data["code_issue"], checks=data["checks"],
                                 review_key=key if charge is not None else None)
        ledger.record_readiness(exp_id, record,
                                "ready" if readiness.is_code_ready else f"not ready: {readiness.code_issue}",
                                level="info" if readiness.is_code_ready else "error")
        for check in readiness.checks:
            if check.status in ("failed", "warning"):
                self.progress.message(f"check {check.name}: {check.status} — {check.summary}")
        if readiness.is_code_ready:
            return None
        return (f"not ready: {readiness.code_issue}; nothing was run. Fix the code (`ratiocinator check SPEC` shows the"
                " evidence) and run again, or pass --skip-check to run anyway")


def flag_constant_metric(ledger: Ledger, experiment_id: str, goal: str) -> str | None:
    """Fail every run of arms that differ yet report one identical goal value; say why, or None."""
    from ratiocinator.execution.failures import ArmOutcome, Failure, constant_across_arms

    metrics = ledger.run_metrics(experiment_id)
    arms = {a.name: a for a in ledger.arms(experiment_id)}
    by_arm: dict[str, list[tuple[int, float]]] = {}
    for run in ledger.runs(experiment_id, status=RunStatus.SUCCEEDED):
        value = metrics.get(run.id, {}).get(goal, (None, False))[0]
        if value is not None:
            by_arm.setdefault(run.arm, []).append((run.id, value))
    outcomes = [
        ArmOutcome(name, tuple(sorted(arms[name].env.items())) + tuple(("arg", a) for a in arms[name].args),
                   tuple(runs))
        for name, runs in by_arm.items()
    ]
    diagnosis = constant_across_arms(outcomes, goal)
    if diagnosis is None:
        return None
    for outcome in outcomes:
        for run_id, _ in outcome.runs:
            ledger.reclassify_run(run_id, failure=Failure.DEGENERATE_DATA.value, reason=diagnosis.reason,
                                  evidence=diagnosis.to_json())
    ledger.event(experiment_id, "degenerate", diagnosis.reason, level="error", **diagnosis.to_json())
    return diagnosis.reason


def runner_env(environ: dict[str, str], loaded: LoadedSpec) -> dict[str, str]:
    """What runs inherit from the orchestrator: the runner contract's allow-list and the spec's ``pass_env``
    (never the LLM's key or settings, nor any other provider's, unless passed on purpose)."""
    return inherited_env(environ, loaded.spec.pass_env)


def default_planner(loaded: LoadedSpec, *, llm: bool) -> Planner:
    """The LLM planner when a model is configured (or replayed), else a search over the spec's
    search space when it declares one, else the spec's own arms."""
    if llm:
        from ratiocinator.planning.llm_planner import LlmPlanner

        return LlmPlanner(loaded)
    if loaded.spec.search is not None:
        from ratiocinator.planning.search import SearchPlanner

        return SearchPlanner(loaded)
    return SpecPlanner(loaded)


def _with_constants(plan: Plan | None, spec: Spec) -> Plan | None:
    """Whatever a planner proposed, with the spec's constant knobs (``env``) under each arm's own."""
    return None if plan is None else dataclasses.replace(plan, arms=with_constants(plan.arms, spec))


def backend_price(loaded: LoadedSpec) -> float:
    """The price a run is charged at, as the spec's backend prices it."""
    return registry.backend_price(loaded)


def _counts(ledger: Ledger, experiment_id: str) -> tuple[int, int]:
    runs = ledger.runs(experiment_id)
    return sum(r.status == RunStatus.SUCCEEDED for r in runs), sum(r.status == RunStatus.FAILED for r in runs)


def _cancel_on_sigterm() -> None:
    """SIGTERM stops the orchestrator like Ctrl-C: runs are killed and marked interrupted."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)


def plan_summary(plan: Plan, price: float, timeout_s: float) -> dict[str, float | int]:
    runs = plan.n_runs
    return {"arms": len(plan.arms), "replicates": plan.replicates, "runs": runs,
            "worst_case_dollars": run_worst_case(price, timeout_s) * runs}


def _write_report(ledger: Ledger, experiment_id: str, out_dir: Path) -> ReportFiles:
    """The paper, imported late: planning and running never load the report stack (scipy, matplotlib)."""
    from ratiocinator.report.publish import write_report

    return write_report(ledger, experiment_id, out_dir)


# -- the readiness review on its own (`ratiocinator check`) ---------------------------------


if TYPE_CHECKING:
    from ratiocinator.check.readiness import Readiness


def check_spec(loaded: LoadedSpec, home: Path, *, smoke: bool = True, use_llm: bool = True,
               on_message: Callable[[str], None] | None = None) -> Readiness:
    """The review ``research`` runs first, without an experiment; only the LLM's calls (so what was paid
    for can be audited) and the verdict under its review key (so ``research`` can reuse a pass) are
    written to the ledger, with no experiment."""
    from ratiocinator.check.readiness import CheckResult, Readiness, review
    from ratiocinator.data.local_copy import local_copy
    from ratiocinator.data.provenance import describe_copy
    from ratiocinator.planning.plan import PlannedArm, plan_iteration

    paths = Paths(Path(home).expanduser().resolve())
    if loaded.spec.arms or loaded.spec.factors:
        plan = plan_iteration(loaded)
    else:  # the arms will come from a planner: smoke-test the code with its own defaults
        plan = Plan(with_constants((PlannedArm("defaults", {}, (), "the code's own defaults"),), loaded.spec),
                    "defaults", 1)
    configured = loaded.spec.llm or llm_from_env(os.environ)
    config = configured if use_llm else None
    commit: str | None = None
    if config is not None:
        require_sdk(config)
    try:
        data = local_copy(loaded, paths.home)  # size, reachability and checksums before anything is acquired
    except DataError as exc:
        return Readiness([CheckResult("data", "failed", exc.message, ({"hint": exc.hint or ""},))])
    try:
        _, commit = resolve_commit(loaded, paths)
        code = inspect_code(loaded, paths, commit)
    except PlanError as exc:  # the runner is not in the checkout
        return Readiness([CheckResult("runner", "failed", exc.message, ({"hint": exc.hint or ""},))], commit)
    except WorkspaceError as exc:  # clone, fetch or LFS content
        name = "lfs" if isinstance(exc, ws.LfsContentMissing) else "checkout"
        return Readiness([CheckResult(name, "failed", exc.message, ({"hint": exc.hint or ""},))], commit)
    backend = make_backend(loaded, paths)
    unmet = [f for f in backend.check_hardware(loaded) if f.status == "unmet"]
    opened: list[Ledger] = []

    def reviewer() -> RecordingProvider:
        assert config is not None
        opened.append(Ledger(paths.ledger))
        return RecordingProvider(make_provider(config, os.environ), opened[-1], "review")

    async def run() -> Readiness:
        off = ""
        workspace = host = None
        if unmet:
            off = "this machine does not meet the spec's hardware: " + "; ".join(
                f"{f.field}: {f.detail}" for f in unmet)
        else:
            host = await backend.acquire(loaded)
        try:
            if host is not None:
                try:
                    workspace = await backend.prepare(host, loaded, code.commit)
                except (WorkspaceError, DataError) as exc:
                    off = f"the workspace could not be prepared: {exc.message}"
            result = await review(
                loaded=loaded, checkout=code.checkout, knobs=code.knobs, plan=plan, backend=backend, host=host,
                workspace=workspace, argv=runner_argv(code.checkout, loaded.spec.runner_script, "python"),
                smoke_dir=paths.checks(f"{loaded.name}-{loaded.sha256[:8]}"), smoke=smoke and not off,
                smoke_off_reason=off or "disabled (--no-smoke)", llm_config=config,
                environ=runner_env(dict(os.environ), loaded),
                llm_provider=reviewer,
                llm_off_reason="disabled (--no-llm)" if not use_llm
                else "no LLM configured (spec `llm:` or RATIOCINATOR_LLM_* variables)",
                extra_env={},
                commit=code.commit, on_message=on_message,
            )
            if off.startswith("the workspace"):
                result.checks.insert(0, CheckResult("deps", "failed", off))
            if data is not None:
                result.checks.insert(0, CheckResult("data", "passed", f"{describe_copy(data)}; staged on"
                                                    f" {', '.join(workspace.staging_s) if workspace else 'no host'}"))
            _remember(result, review_key(loaded, plan, code.commit, smoke=smoke,
                                         llm_model=config.model if config is not None else None))
            return result
        finally:
            if host is not None:
                await backend.release(host)

    def _remember(result: Readiness, key: str) -> None:
        """The verdict, kept in the ledger (with no experiment) for `research` to reuse."""
        data = result.to_json()
        ledger = Ledger(paths.ledger)
        opened.append(ledger)
        ledger.record_readiness(None, ReadinessRecord(data["commit"], skipped=False,
                                                      is_code_ready=data["is_code_ready"],
                                                      code_issue=data["code_issue"], checks=data["checks"],
                                                      review_key=key),
                                "ready" if result.is_code_ready else f"not ready: {result.code_issue}",
                                level="info" if result.is_code_ready else "error")

    try:
        return asyncio.run(run())
    finally:
        for ledger in opened:
            ledger.close()
