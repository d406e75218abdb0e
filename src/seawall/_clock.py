"""The one monotonic clock of seawall, injectable for tests.

Every primitive reads time through a :class:`Clock`: ``now()`` for decisions
and ``sleep()`` for waiting. Production uses :class:`MonotonicClock`, which is
``time.monotonic`` - the very clock asyncio's event loop reports from
``loop.time()`` - and never the wall clock, so a changed system time or
time zone cannot open a breaker or refill a bucket.

Tests inject :class:`FakeClock` and move time with ``advance()`` instead of
sleeping; sleepers on a fake clock wake exactly when virtual time passes
their deadline.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from typing import Protocol, runtime_checkable

import anyio
import anyio.lowlevel

__all__ = ["Clock", "FakeClock", "MonotonicClock", "default_clock"]


@runtime_checkable
class Clock(Protocol):
    """A source of monotonic time in seconds, and a way to wait on it."""

    def now(self) -> float:
        """Return the current time in seconds (arbitrary epoch, never goes back)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...


class MonotonicClock:
    """The production clock: ``time.monotonic`` and ``anyio.sleep``."""

    __slots__ = ()

    now = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)

    def __repr__(self) -> str:
        return "MonotonicClock()"


default_clock: Clock = MonotonicClock()


class FakeClock:
    """A clock that only moves when told to; for deterministic tests.

    Args:
        start: The initial reading, in seconds.

    ``sleep()`` on a fake clock suspends until ``advance()`` (or ``set()``)
    moves time to or past the sleeper's deadline; sleepers wake in deadline
    order.
    """

    __slots__ = ("_now", "_sleepers", "_tiebreak")

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._tiebreak = itertools.count()

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and wake every sleeper that is due."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"FakeClock.advance() needs a finite, non-negative number of seconds, got {seconds!r}")
        self.set(self._now + seconds)

    def set(self, now: float) -> None:
        """Move time to ``now`` (which may not be in the past) and wake due sleepers."""
        if now < self._now:
            raise ValueError(f"FakeClock cannot go back in time: {now!r} < {self._now!r}")
        self._now = float(now)
        while self._sleepers and self._sleepers[0][0] <= self._now:
            heapq.heappop(self._sleepers)[2].set()

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        entry = (self._now + seconds, next(self._tiebreak), event)
        heapq.heappush(self._sleepers, entry)
        try:
            await event.wait()
        finally:
            if not event.is_set():  # cancelled before it was due: no longer a sleeper
                self._sleepers.remove(entry)
                heapq.heapify(self._sleepers)

    @property
    def sleepers(self) -> int:
        """How many tasks are sleeping on this clock and not yet woken."""
        return sum(1 for _, _, event in self._sleepers if not event.is_set())

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now!r}, sleepers={self.sleepers})"
