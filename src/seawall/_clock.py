"""The one monotonic clock of seawall, injectable for tests.

Every primitive reads time through a :class:`Clock`: ``now()`` for decisions
and ``sleep()`` for waiting. Timeouts and waits follow the running event
loop's clock, never the wall clock, so a changed system time or time zone
cannot open a breaker or refill a bucket:

* On asyncio, and outside any event loop, that is :class:`MonotonicClock`:
  ``time.monotonic``, the very clock asyncio's event loop reports from
  ``loop.time()``. ``now`` *is* the C function, so a decision on a hot path
  (``RateLimiter.hit_nowait``) pays for no Python frame of seawall's.
* Under trio the loop's clock is the run's own (``trio.current_time()``): a
  :class:`trio.testing.MockClock`, or trio's system clock, which reads
  ``time.perf_counter`` plus a random offset. Reading ``time.monotonic``
  there would put decisions and waits on two clocks: under a ``MockClock``
  a wait would end in virtual time while the bucket had not drained in real
  time.

A primitive built with ``clock=None`` asks :func:`current_clock` once, when
it is built, which of the two it runs on (a probe per ``now()`` would cost
more than the decision). Build it inside the run that uses it, as anyio asks
of its own primitives; one built under trio keeps reading the current trio
run's clock, and one built outside any loop reads ``time.monotonic`` on
every backend (trio's system clock ticks at the same rate, so its waits still
last as long, but a ``MockClock`` does not move it). Pass ``clock=`` to pin
a clock explicitly.

Tests inject :class:`FakeClock` and move time with ``advance()`` instead of
sleeping; sleepers on a fake clock wake exactly when virtual time passes
their deadline.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, runtime_checkable

import anyio
import anyio.lowlevel

from seawall._errors import ConfigurationError

__all__ = ["Clock", "FakeClock", "MonotonicClock", "current_clock", "default_clock", "in_trio_task", "require_asyncio"]


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
    """The production clock on asyncio: ``time.monotonic`` (asyncio's ``loop.time()``) and ``anyio.sleep``."""

    __slots__ = ()

    now = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)

    def __repr__(self) -> str:
        return "MonotonicClock()"


#: The clock of asyncio and of code outside any event loop (see :func:`current_clock`).
default_clock: Clock = MonotonicClock()


def in_trio_task() -> bool:
    """Whether the caller runs in a trio task (anyio's trio backend), not on asyncio or outside any loop."""
    # No trio without importing it: on asyncio this is one dict lookup. (Not
    # "no asyncio loop": in trio's guest mode an asyncio loop runs the thread.)
    trio = sys.modules.get("trio")
    return trio is not None and bool(trio.lowlevel.in_trio_task())


def require_asyncio(subject: str, operation: str, *, path: str, instead: str) -> None:
    """Fail at once under trio for ``subject``, which runs on asyncio only.

    A library built on asyncio's loop (asyncpg, redis-py, aiolimiter) would
    otherwise fail deep inside, with "no running event loop"; this names the
    component, the call, and what to use instead, as a ``ConfigurationError``
    at ``path``.
    """
    if in_trio_task():
        raise ConfigurationError(
            f"{path}: {subject} runs on asyncio only, and {operation} was called under trio; {instead}",
            path=path,
        ) from None


class _TrioClock:
    """The clock of the trio run the caller is in: ``trio.current_time()`` and ``trio.sleep()``.

    Both read whichever run is current when called, so one instance serves
    every run; outside a run ``now()`` raises :class:`RuntimeError`.
    """

    __slots__ = ("now", "sleep")

    def __init__(self) -> None:
        import trio  # only ever built inside a trio run, so importable

        # Bound once: the hot paths call ``now`` straight, with no frame of ours.
        self.now: Callable[[], float] = trio.current_time
        self.sleep: Callable[[float], Coroutine[Any, Any, None]] = trio.sleep

    def __repr__(self) -> str:
        return "TrioClock()"


@functools.cache
def _trio_clock() -> _TrioClock:
    return _TrioClock()


def current_clock() -> Clock:
    """The running event loop's clock, which is what ``clock=None`` means for a primitive.

    :data:`default_clock` (a :class:`MonotonicClock`) on asyncio and outside
    any event loop; under trio, a clock reading the trio run's own time, so a
    :class:`trio.testing.MockClock` moves it. Called once per primitive, when
    it is built (see the module docstring).
    """
    return _trio_clock() if in_trio_task() else default_clock


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
