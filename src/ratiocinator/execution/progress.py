"""What a researcher sees while ``research`` runs.

On a terminal: a live rich panel with a bar of runs done out of planned and an ETA from the
measured run times, spend against ``max_dollars``, the best arm so far (mean ± CI once it has two
runs), a per-arm table with the latest streamed metric of the runs in flight, and failures by
class. Elsewhere (CI, a log file): one plain line per event carrying the same facts
(``done 11/27``, ETA, best so far, about a second old at most), so nothing is lost to cursor tricks.

Both read the experiment's state from the ledger (read-only, ``analysis.live``), the same state
the web dashboard shows, rather than keeping counts of their own that could drift from it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ratiocinator.analysis.live import ArmState, LiveRun, LiveState, clock, live_state, mean_ci
from ratiocinator.backends.base import Slot
from ratiocinator.execution.executor import ProgressSink, RunResult
from ratiocinator.store.ledger import Ledger

STATE_MAX_AGE_S = 1.0  # the live panel re-reads the ledger at most this often
# ...and, for a big study whose read takes long, at most this share of the orchestrator's time.
STATE_READ_SHARE = 0.02
MAX_ARM_ROWS = 12  # a bigger design shows its running and best arms, and says how many more there are


class _Watch:
    """The experiment's live state, re-read from a read-only ledger at most once a second (or on demand)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # state_after_finish holds it across state()
        self._ledger: Ledger | None = None
        self._experiment_id: str | None = None
        self._state: LiveState | None = None
        self._read_at = 0.0
        self._max_age = STATE_MAX_AGE_S
        self._last_took: float | None = None  # how long the last read took (None before the first since `open`)
        self.finished_since_read = 0  # runs seen to finish since the last read (a read is due when they may be all)
        self.done_since_read = 0  # of those, the ones done for good (a "done" count between reads)

    def open(self, ledger_path: Path, experiment_id: str) -> None:
        with self._lock:
            if self._ledger is not None:
                self._ledger.close()
            self._ledger = Ledger(ledger_path, read_only=True)
            self._experiment_id = experiment_id
            self._state, self._read_at, self._last_took, self._max_age = None, 0.0, None, STATE_MAX_AGE_S

    def state(self, *, fresh: bool = False) -> LiveState | None:
        with self._lock:
            if self._ledger is None or self._experiment_id is None:
                return None
            if fresh or self._state is None or time.monotonic() - self._read_at >= self._max_age:
                started = time.monotonic()
                try:
                    self._state = live_state(self._ledger, self._experiment_id)
                except sqlite3.Error:  # a display never stops a study: show the last state, read again later
                    return self._state
                self._read_at = time.monotonic()
                # The share goes by the faster of the last two reads: one slow read (the first, or the one
                # that loads numpy for the first interval) would otherwise hold a short study's standing
                # still to its end. Two slow reads in a row are a big study's.
                took = self._read_at - started
                timed = 0.0 if self._last_took is None else min(took, self._last_took)
                self._last_took = took
                self._max_age = max(STATE_MAX_AGE_S, timed / STATE_READ_SHARE)
                self.finished_since_read = self.done_since_read = 0
            return self._state

    def state_after_finish(self, *, for_good: bool = True) -> LiveState | None:
        """The state for a run's finish line: re-read at most once a second, and for what may be the last run.

        Reading the whole experiment costs O(runs) (tens of ms at 200 arms); doing it on every finish made the
        orchestrator's per-run cost grow with the study. Between reads a line carries the standing of the last
        read, at most STATE_MAX_AGE_S old (longer where a read is slow: see STATE_READ_SHARE); the study's final
        line is always fresh.
        """
        with self._lock:
            self.finished_since_read += 1
            self.done_since_read += for_good  # a transient failure runs again: not done yet
            prior = self._state
            last = prior is not None and prior.done + self.finished_since_read >= prior.planned
            return self.state(fresh=last)

    def close(self) -> None:
        with self._lock:
            if self._ledger is not None:
                self._ledger.close()
            self._ledger = None


def _describe(result: RunResult) -> str:
    if result.status == "succeeded":
        goal = f" goal={result.goal:.6g}" if result.goal is not None else ""
        return f"run {result.run_id} {result.arm} #{result.replicate} succeeded{goal}"
    return (f"run {result.run_id} {result.arm} #{result.replicate} {result.status}"
            f" ({result.failure}: {result.reason[:160]})")


def _money(state: LiveState) -> str:
    v = state.overview
    budget = f" of ${v.goal.max_dollars:.2f}" if v.goal is not None else ""
    return f"${v.spent:.4f} spent{budget}" + (f" (${v.reserved:.4f} reserved)" if v.reserved else "")


def _best(state: LiveState) -> str:
    if state.best is None or state.overview.goal is None:
        return "best —"
    return f"best {state.best.name} {state.overview.goal.metric} {mean_ci(state.best)}"


def _failures(state: LiveState) -> str:
    return ", ".join(f"{name} {n}" for name, n in state.failures.items())


def _point(run: LiveRun) -> str:
    if run.last is None:
        return ""
    p = run.last.point
    value = "non-finite" if p.value is None else f"{p.value:.4g}"
    return f"{run.last.metric}={value}" + (f"@{p.step}" if p.step is not None else "")


def summary_line(state: LiveState, *, finished_since: int = 0) -> str:
    """``done 11/27, running 2, ETA 0:00:14, best d1_w64 val_r2 0.61 ± 0.02 (n=3), $0.0000 spent of $0.00``.

    ``finished_since``: runs seen to finish after ``state`` was read, counted into "done" (the rest of the
    line is the standing as read)."""
    done = min(state.done + finished_since, state.planned)
    parts = [f"done {done}/{state.planned}", f"running {len(state.running)}", f"ETA {clock(state.eta_s)}",
             _best(state), _money(state)]
    if state.failures:
        parts.append(f"failures {_failures(state)}")
    return ", ".join(parts)


class PlainProgress(ProgressSink):
    """One line per event, each with the experiment's standing: for logs and CI."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.started = time.monotonic()
        self.watched = _Watch()
        self.spent = self.reserved = 0.0

    def elapsed(self) -> str:
        return clock(time.monotonic() - self.started)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def watch(self, ledger_path: Path, experiment_id: str) -> None:
        self.watched.open(ledger_path, experiment_id)

    def close(self) -> None:
        self.watched.close()

    def run_started(self, run_id: int, arm: str, replicate: int, slot: Slot) -> None:
        self._line(f"[{self.elapsed()}] run {run_id} {arm} #{replicate} started on {slot.label}")

    def run_finished(self, result: RunResult) -> None:
        state = self.watched.state_after_finish(for_good=not result.transient)
        standing = summary_line(state, finished_since=self.watched.done_since_read) if state is not None \
            else f"${self.spent:.4f} spent"
        self._line(f"[{self.elapsed()}] {_describe(result)} — {standing}")

    def money(self, spent: float, reserved: float) -> None:
        self.spent, self.reserved = spent, reserved

    def message(self, text: str) -> None:
        self._line(f"[{self.elapsed()}] {text}")

    def _line(self, text: str) -> None:
        """One plain line, written as it is (two a run: rich's rendering would cost tens of µs each). An
        output that cannot encode a character (a log opened as ASCII) gets a ``?`` in its place."""
        file = self.console.file
        line = text + "\n"
        try:
            file.write(line)
        except UnicodeEncodeError:
            encoding = getattr(file, "encoding", None) or "ascii"
            file.write(line.encode(encoding, "replace").decode(encoding))
        file.flush()


class LiveProgress(PlainProgress):
    """A rich Live panel under the scrolling lines of finished runs and messages."""

    def __init__(self, console: Console | None = None) -> None:
        super().__init__(console or Console())
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("[dim]ETA[/dim] {task.fields[eta]}  [dim]elapsed[/dim] {task.fields[elapsed]}"),
                            console=self.console, auto_refresh=False)
        self.runs_task: TaskID = self.bar.add_task("runs", total=None, eta="—", elapsed="0:00:00")
        self.live = Live(console=self.console, refresh_per_second=4, transient=True, get_renderable=self._render)

    def __enter__(self) -> LiveProgress:
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.stop()
        self.close()

    def _render(self) -> RenderableType:
        state = self.watched.state()
        if state is None:
            return Text.assemble(("elapsed ", "dim"), self.elapsed(), ("   spent ", "dim"), f"${self.spent:.4f}")
        self.bar.update(self.runs_task, total=max(state.planned, 1), completed=state.done, eta=clock(state.eta_s),
                        elapsed=self.elapsed())
        parts: list[RenderableType] = [self.bar, self._budget(state), Text(_best(state), style="bold")]
        parts.append(self._arms(state))
        if state.failures:
            parts.append(Text(f"failures by class: {_failures(state)}", style="red"))
        return Group(*parts)

    @staticmethod
    def _budget(state: LiveState) -> RenderableType:
        v = state.overview
        limit = v.goal.max_dollars if v.goal is not None else 0.0
        line = Table.grid(padding=(0, 1))
        line.add_column()
        line.add_column(width=40)
        line.add_column()
        # Spent and reserved against max_dollars; a study with no budget (local, free) shows no bar.
        bar: RenderableType = ProgressBar(total=limit, completed=min(v.spent + v.reserved, limit), width=40) \
            if limit > 0 else Text("no budget (max_dollars 0)", style="dim")
        line.add_row("money", bar, _money(state))
        return line

    @staticmethod
    def _arms(state: LiveState) -> RenderableType:
        goal = state.overview.goal
        table = Table(box=None, show_header=True, header_style="dim", pad_edge=False, show_edge=False)
        table.add_column("arm", no_wrap=True, overflow="ellipsis", max_width=28)
        table.add_column("done", justify="right", no_wrap=True)
        table.add_column(goal.metric if goal else "goal", no_wrap=True)
        table.add_column("running (latest point)", overflow="ellipsis", no_wrap=True)
        by_arm: dict[str, list[LiveRun]] = {}
        for run in state.running:
            by_arm.setdefault(run.arm, []).append(run)
        shown = _arms_shown(state, by_arm)
        for arm in shown:
            live = "  ".join(f"#{r.replicate} {clock(r.elapsed_s)} {_point(r)}".rstrip()
                             for r in by_arm.get(arm.name, []))
            failed = f" [red]{arm.failed}✗[/red]" if arm.failed else ""
            style = "bold green" if state.best is not None and arm.name == state.best.name else ""
            table.add_row(Text(arm.name, style=style), f"{arm.done}/{arm.planned}{failed}", mean_ci(arm), live)
        hidden = len(state.arms) - len(shown)
        if hidden:
            table.add_row(Text(f"… {hidden} more arms", style="dim"), "", "", "")
        return table

    def run_started(self, run_id: int, arm: str, replicate: int, slot: Slot) -> None:
        pass  # the panel shows runs in flight

    def run_finished(self, result: RunResult) -> None:
        self.watched.state_after_finish(for_good=not result.transient)
        style = "green" if result.status == "succeeded" else "red"
        self.console.print(Text(f"[{self.elapsed()}] {_describe(result)}", style=style))


def _arms_shown(state: LiveState, by_arm: dict[str, list[LiveRun]]) -> list[ArmState]:
    """Every arm when they fit; otherwise the ones with runs in flight, then the best by the goal."""
    if len(state.arms) <= MAX_ARM_ROWS:
        return list(state.arms)
    goal = state.overview.goal
    sign = -1.0 if goal is None or goal.maximize else 1.0
    ranked = sorted(state.arms, key=lambda a: (a.name not in by_arm, a.mean is None, sign * (a.mean or 0.0)))
    keep = {a.name for a in ranked[:MAX_ARM_ROWS]}
    return [a for a in state.arms if a.name in keep]
