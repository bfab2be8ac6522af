"""Smoke runs: every distinct arm once in trial mode, before any real run is paid for.

Each arm runs with ``RATIOCINATOR_TRIAL=1`` under a short wall limit on the same
backend, host and workspace the experiment will use, and must report the goal metric,
finite. Its outcome is classified exactly like a real run (same evidence, same classes).
Then the arms are compared: arms that differ in configuration but produce the very same
metric series did not feel their knobs ("this knob changes nothing").
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ratiocinator.backends.base import Backend, Host, LaunchFailure, LaunchRequest, Slot, Workspace
from ratiocinator.execution.contract import runner_environment
from ratiocinator.execution.failures import Diagnosis, Failure, RunEvidence, diagnose, read_log
from ratiocinator.execution.metrics import LineSplitter, MetricSummary, make_parser
from ratiocinator.planning.plan import Plan, PlannedArm
from ratiocinator.spec.models import LoadedSpec


@dataclass
class SmokeOutcome:
    """One arm's trial run: its verdict, its metric series and where its logs are."""

    arm: PlannedArm
    diagnosis: Diagnosis
    series: dict[str, list[tuple[int | None, float]]] = field(default_factory=dict)
    log_dir: Path | None = None
    duration_s: float = 0.0
    stdout: str = ""

    @property
    def ok(self) -> bool:
        return self.diagnosis.failure is None

    def signature(self) -> tuple:
        """Everything the arm measured, exactly: equal signatures mean indistinguishable runs."""
        return tuple(sorted((name, tuple(points)) for name, points in self.series.items()))


def distinct_arms(plan: Plan) -> list[PlannedArm]:
    """One arm per distinct configuration (same knobs and flags run once)."""
    seen: set[tuple] = set()
    arms = []
    for arm in plan.arms:
        key = (tuple(sorted(arm.env.items())), tuple(arm.args))
        if key not in seen:
            seen.add(key)
            arms.append(arm)
    return arms


async def run_smoke(
    *,
    loaded: LoadedSpec,
    backend: Backend,
    host: Host,
    workspace: Workspace,
    argv: tuple[str, ...],
    arms: Sequence[PlannedArm],
    smoke_dir: Path,
    base_env: dict[str, str],
    extra_env: dict[str, str] | None = None,
    on_done: Callable[[SmokeOutcome], None] | None = None,
) -> list[SmokeOutcome]:
    """Run every arm once in trial mode on the host's slots; outcomes in arm order."""
    free: asyncio.Queue[Slot] = asyncio.Queue()
    for slot in host.slots:
        free.put_nowait(slot)
    if smoke_dir.exists():
        await asyncio.to_thread(shutil.rmtree, smoke_dir)  # logs of an older check must not be read as this one's

    async def one(index: int, arm: PlannedArm) -> SmokeOutcome:
        slot = await free.get()
        try:
            outcome = await _smoke_one(loaded, backend, host, workspace, argv, arm, slot,
                                       smoke_dir / f"{index:03d}-{_slug(arm.name)}", base_env, extra_env or {})
        finally:
            free.put_nowait(slot)
        if on_done is not None:
            on_done(outcome)
        return outcome

    return list(await asyncio.gather(*(one(i, arm) for i, arm in enumerate(arms))))


async def _smoke_one(
    loaded: LoadedSpec, backend: Backend, host: Host, workspace: Workspace, argv: tuple[str, ...], arm: PlannedArm,
    slot: Slot, run_dir: Path, base_env: dict[str, str], extra_env: dict[str, str],
) -> SmokeOutcome:
    spec = loaded.spec
    timeout_s = spec.check.smoke_timeout_s
    out_dir = run_dir / "out"
    await asyncio.to_thread(out_dir.mkdir, parents=True)
    env = runner_environment(base_env, workspace, arm.env, arm=arm.name, run_id=0, seed=0, seed_env=spec.seed_env,
                             out_dir=out_dir, trial=True, extra=extra_env)
    request = LaunchRequest(run_id=0, argv=(*argv, *arm.args), cwd=workspace.checkout, env=env, slot=slot,
                            log_dir=run_dir, out_dir=out_dir, timeout_s=timeout_s)
    parser = make_parser(spec.metrics.protocol, json_prefix=spec.metrics.json_prefix,
                         patterns=dict(spec.metrics.patterns))
    summary = MetricSummary()
    series: dict[str, list[tuple[int | None, float]]] = {}
    started = time.monotonic()
    try:
        handle = await backend.launch(host, request)
    except Exception as exc:
        failure = Failure(exc.failure) if isinstance(exc, LaunchFailure) else Failure.INFRA
        diagnosis = Diagnosis(failure, f"could not start the runner: {exc}", (str(exc)[:300],))
        return SmokeOutcome(arm, diagnosis, log_dir=run_dir)

    async def consume() -> None:
        splitters = {"stdout": LineSplitter(), "stderr": LineSplitter()}
        with open(run_dir / "stdout.log", "wb") as out_log, open(run_dir / "stderr.log", "wb") as err_log:
            logs = {"stdout": out_log, "stderr": err_log}

            def ingest(name: str, chunk: bytes) -> None:  # in a worker thread: the loop keeps the timeout
                logs[name].write(chunk)
                record(splitters[name].feed(chunk))

            async for name, chunk in handle.output():
                await asyncio.to_thread(ingest, name, chunk)
            for splitter in splitters.values():
                record(splitter.flush())

    def record(lines: list[str]) -> None:
        for line in lines:
            points = parser.feed_line(line)
            if points:
                summary.add(points)
                for p in points:
                    series.setdefault(p.name, []).append((p.step, p.value))

    consumer = asyncio.create_task(consume())
    timed_out = False
    try:
        exit_info = await asyncio.wait_for(asyncio.shield(handle.wait()), timeout_s)
    except LaunchFailure as exc:  # the backend lost the host mid-run
        await consumer
        return SmokeOutcome(arm, Diagnosis(Failure(exc.failure), f"lost the run's host: {exc}", (str(exc)[:300],),
                                           transient=exc.transient), series, run_dir, time.monotonic() - started)
    except TimeoutError:
        timed_out = True
        await handle.cancel()
        exit_info = await handle.wait()
    except asyncio.CancelledError:
        await asyncio.shield(handle.cancel(grace_s=2.0))
        consumer.cancel()
        raise
    await handle.reap_strays()
    await consumer
    stdout = read_log(run_dir / "stdout.log")
    diagnosis = diagnose(RunEvidence(
        exit_code=exit_info.exit_code, signal=exit_info.signal, timed_out=timed_out, timeout_s=timeout_s,
        goal=spec.goal_metric, final=summary.final, stdout=stdout, stderr=read_log(run_dir / "stderr.log"),
        checkout=handle.workdir or workspace.checkout, malformed_metric_lines=parser.problem_count,
        dropped_metric_names=parser.dropped_names,
    ))
    if timed_out:  # in a smoke run the limit is the check's, not train_timeout_s
        diagnosis = Diagnosis(Failure.TIMEOUT,
                              f"the trial run did not finish within check.smoke_timeout_s ({timeout_s:g}s)",
                              (f"no exit within {timeout_s:g}s with RATIOCINATOR_TRIAL=1",
                               "make the runner's trial mode short (one batch, one epoch),"
                               " or raise check.smoke_timeout_s"),
                              {"timeout_s": timeout_s})
    return SmokeOutcome(arm, diagnosis, series, run_dir, time.monotonic() - started, stdout)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", name)[:60]


# -- comparing arms --------------------------------------------------------------------------


@dataclass(frozen=True)
class UnchangedKnob:
    """A knob whose every setting produced the same measurements, or arms that did."""

    knobs: tuple[str, ...]
    arms: tuple[tuple[str, str], ...]  # pairs of arm names with identical output
    logs_identical: bool
    points: int

    def message(self) -> str:
        pairs = "; ".join(f"{a} = {b}" for a, b in self.arms[:3])
        what = "logs too" if self.logs_identical else "logs differ"
        if len(self.knobs) == 1:
            return (f"knob {self.knobs[0]} changes nothing: arms that differ only in it produced identical metrics"
                    f" ({self.points} points; {what}): {pairs}")
        return (f"arms that differ in {', '.join(self.knobs)} produced identical metrics"
                f" ({self.points} points; {what}): {pairs}")


def _config(arm: PlannedArm) -> dict[str, str]:
    config = dict(arm.env)
    if arm.args:
        config["(flags)"] = " ".join(arm.args)
    return config


def unchanged_knobs(outcomes: Iterable[SmokeOutcome], allow: Iterable[str] = ()) -> list[UnchangedKnob]:
    """Knobs that changed nothing in the smoke runs, decided from pairs of arms.

    A knob is flagged when every pair of succeeded arms that differ in it alone measured
    exactly the same series. Arms differing in several knobs whose outputs are identical
    are flagged together, unless one of those knobs is already flagged on its own.
    """
    ok = [o for o in outcomes if o.ok and o.series]
    allowed = set(allow)
    configs = {o.arm.name: _config(o.arm) for o in ok}
    by_knob: dict[str, list[tuple[SmokeOutcome, SmokeOutcome]]] = {}
    multi: list[tuple[tuple[str, ...], SmokeOutcome, SmokeOutcome]] = []
    for i, a in enumerate(ok):
        for b in ok[i + 1:]:
            ca, cb = configs[a.arm.name], configs[b.arm.name]
            differing = tuple(sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k)))
            if len(differing) == 1:
                by_knob.setdefault(differing[0], []).append((a, b))
            elif differing and a.signature() == b.signature():
                multi.append((differing, a, b))
    found: list[UnchangedKnob] = []
    flagged: set[str] = set()
    for knob, pairs in sorted(by_knob.items()):
        if knob in allowed or any(a.signature() != b.signature() for a, b in pairs):
            continue
        flagged.add(knob)
        found.append(UnchangedKnob((knob,), tuple((a.arm.name, b.arm.name) for a, b in pairs),
                                   all(_same_log(a, b) for a, b in pairs), _points(pairs[0][0])))
    for knobs, a, b in multi:
        if set(knobs) & (flagged | allowed):
            continue
        found.append(UnchangedKnob(knobs, ((a.arm.name, b.arm.name),), _same_log(a, b), _points(a)))
    return found


def _points(outcome: SmokeOutcome) -> int:
    return sum(len(points) for points in outcome.series.values())


def _same_log(a: SmokeOutcome, b: SmokeOutcome) -> bool:
    """Logs equal once each run's own identity (its arm name, its directory) is masked."""
    def masked(o: SmokeOutcome) -> str:
        text = o.stdout.replace(str(o.log_dir), "<run>") if o.log_dir else o.stdout
        return text.replace(o.arm.name, "<arm>")
    return masked(a) == masked(b)
