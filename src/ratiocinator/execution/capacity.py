"""Which slots the executor may start runs in, and when an idle rented slot is worth giving back.

On a rented instance an idle slot is billed like a busy one. Once the queue is empty,
a slot with nothing to do either waits for the next iteration (paid idle) or is given
back and rented again later (paid boot + setup). The rule weighs the two: give it back
when the iteration's expected remaining time exceeds what getting it back would cost,
and always in the experiment's last iteration or once nothing more will be launched.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Iterable

from ratiocinator.backends.base import Slot


class SlotPool:
    """Free and usable slots; a slot leaves for good when it is lost or given back."""

    def __init__(self, slots: Iterable[Slot]) -> None:
        self.usable: list[Slot] = []
        self.free: list[Slot] = []
        self._seen: set[Slot] = set()
        self._changed = asyncio.Event()
        self.add(slots)

    def add(self, slots: Iterable[Slot]) -> list[Slot]:
        """Slots not seen before join the pool (free); returns them."""
        new = [s for s in slots if s not in self._seen]
        for slot in new:
            self._seen.add(slot)
            self.usable.append(slot)
            self.free.append(slot)
        if new:
            self._changed.set()
        return new

    def put(self, slot: Slot) -> None:
        """A run ended in ``slot``: it is free again (unless it left the pool meanwhile)."""
        if slot in self.usable and slot not in self.free:
            self.free.append(slot)
            self._changed.set()

    def drop(self, slot: Slot) -> None:
        """``slot`` can take no more runs (its instance was lost or given back)."""
        if slot in self.usable:
            self.usable.remove(slot)
        if slot in self.free:
            self.free.remove(slot)
        self._changed.set()

    async def take(self) -> Slot | None:
        """The next free slot, waiting for one; None when no usable slot is left to wait for."""
        while True:
            if self.free:
                return self.free.pop(0)
            if not self.usable:
                return None
            self._changed.clear()
            await self._changed.wait()


def remaining_s(elapsed: float, durations: list[float], timeout_s: float) -> float:
    """Expected seconds left for a run ``elapsed`` seconds in: the mean excess of the finished runs that
    lasted longer; past every one of them, as long again as it has run (never past its timeout)."""
    longer = [d - elapsed for d in durations if d > elapsed]
    if longer:
        return statistics.fmean(longer)
    return max(min(elapsed, timeout_s - elapsed), 0.0)


def expected_wait_s(live_starts: Iterable[float], durations: list[float], now: float, timeout_s: float) -> float | None:
    """Seconds until the last live run is expected to end; None when no run has finished to estimate from."""
    if not durations:
        return None
    return max((remaining_s(now - start, durations, timeout_s) for start in live_starts), default=0.0)


def should_give_back(*, last_iteration: bool, stopping: bool, wait_s: float | None, reacquire_s: float) -> bool:
    """Give an idle billed slot back now, or hold it for the next iteration."""
    if last_iteration or stopping:
        return True
    return wait_s is not None and wait_s > reacquire_s


__all__ = ["SlotPool", "expected_wait_s", "remaining_s", "should_give_back"]
