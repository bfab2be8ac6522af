"""What a researcher sees while ``research`` runs.

On a terminal: a live rich panel (runs done / running / failed, elapsed, dollars spent
and reserved, the runs in flight). Elsewhere (CI, a log file): one plain line per
event, so nothing is lost to cursor tricks.
"""

from __future__ import annotations

import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ratiocinator.backends.base import Slot
from ratiocinator.execution.executor import ProgressSink, RunResult


class _Counts:
    def __init__(self, total: int | None = None) -> None:
        self.started = time.monotonic()
        self.running: dict[int, tuple[str, int, str, float]] = {}
        self.succeeded = 0
        self.failed = 0
        self.spent = 0.0
        self.reserved = 0.0
        self.last: list[str] = []

    def elapsed(self) -> str:
        seconds = int(time.monotonic() - self.started)
        return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _describe(result: RunResult) -> str:
    if result.status == "succeeded":
        goal = f" goal={result.goal:.6g}" if result.goal is not None else ""
        return f"run {result.run_id} {result.arm} #{result.replicate} succeeded{goal}"
    return (f"run {result.run_id} {result.arm} #{result.replicate} {result.status}"
            f" ({result.failure}: {result.reason[:160]})")


class PlainProgress(ProgressSink):
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.counts = _Counts()

    def run_started(self, run_id: int, arm: str, replicate: int, slot: Slot) -> None:
        self.counts.running[run_id] = (arm, replicate, slot.label, time.monotonic())
        self.console.print(f"[{self.counts.elapsed()}] run {run_id} {arm} #{replicate} started on {slot.label}",
                           markup=False)

    def run_finished(self, result: RunResult) -> None:
        self.counts.running.pop(result.run_id, None)
        self.counts.succeeded += result.status == "succeeded"
        self.counts.failed += result.status == "failed"
        c = self.counts
        self.console.print(
            f"[{c.elapsed()}] {_describe(result)} — done {c.succeeded + c.failed} (failed {c.failed}),"
            f" running {len(c.running)}, ${c.spent:.4f} spent, ${c.reserved:.4f} reserved",
            markup=False,
        )

    def money(self, spent: float, reserved: float) -> None:
        self.counts.spent, self.counts.reserved = spent, reserved

    def message(self, text: str) -> None:
        self.console.print(f"[{self.counts.elapsed()}] {text}", markup=False)


class LiveProgress(PlainProgress):
    """A rich Live panel; finished runs and messages scroll above it."""

    def __init__(self, console: Console | None = None) -> None:
        super().__init__(console or Console())
        self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=True,
                         get_renderable=self._render)

    def __enter__(self) -> LiveProgress:
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.stop()

    def _render(self) -> Group:
        c = self.counts
        head = Text.assemble(
            ("elapsed ", "dim"), c.elapsed(), ("   done ", "dim"), str(c.succeeded + c.failed),
            ("   running ", "dim"), str(len(c.running)), ("   failed ", "dim"),
            (str(c.failed), "red" if c.failed else ""),
            ("   spent ", "dim"), f"${c.spent:.4f}", ("   reserved ", "dim"), f"${c.reserved:.4f}",
        )
        table = Table(box=None, show_header=True, header_style="dim", pad_edge=False)
        for col in ("run", "arm", "rep", "slot", "for"):
            table.add_column(col)
        now = time.monotonic()
        for run_id, (arm, replicate, slot, since) in sorted(self.counts.running.items()):
            table.add_row(str(run_id), arm, str(replicate), slot, f"{now - since:.0f}s")
        return Group(head, table)

    def run_started(self, run_id: int, arm: str, replicate: int, slot: Slot) -> None:
        self.counts.running[run_id] = (arm, replicate, slot.label, time.monotonic())

    def run_finished(self, result: RunResult) -> None:
        self.counts.running.pop(result.run_id, None)
        self.counts.succeeded += result.status == "succeeded"
        self.counts.failed += result.status == "failed"
        style = "green" if result.status == "succeeded" else "red"
        self.console.print(Text(f"[{self.counts.elapsed()}] {_describe(result)}", style=style))
