"""Hedging: another concurrent attempt when the first is slow; the first success wins.

A :class:`Hedge` is a key's ``"hedge"`` section at run time: when an attempt
has not finished after ``delay`` seconds, another one starts, concurrently
(at most ``max_hedges`` more, one every ``delay``); the first to succeed
wins, and the others are cancelled in the same anyio task group, so each
gives back whatever it took (its rate-limit token stays spent, its breaker
admission, concurrency slot and pool worker are released). The coordinator
runs each attempt as a whole protected call (``ProtectedCall``), so every
hedge pays the key's limiter, breaker and pool, and its failure counts
toward the breaker like any other.

The rules:

* ``delay`` is seconds, or a percentile (``"p95"``) of the key's recent
  latencies: those of successful attempts over the last 60 s, at most the
  last 1,000. Until :data:`MIN_SAMPLES` of them are in that window the key
  does not hedge: a cold key learns its latencies first, and never doubles
  its load on a guess. The percentile is recomputed at most once a second
  of the clock or every :data:`_REFRESH_SAMPLES` new samples, so a call
  does not sort a thousand floats.
* A failure does not start a hedge (that is what retry is for, and retry's
  budget bounds it; a hedge on failure would multiply an outage's load).
  Hedges already running go on: one of them may still succeed.
* When every attempt fails, the first attempt's own exception propagates,
  unchanged: the call fails as it would have without hedging (the hedges'
  exceptions were counted by the breaker; a hedge refused by the rate
  limiter must not hide the first attempt's real error).
* No hedge starts at or past the call's deadline; each runs under what is
  left of it.
* Cancellation of the caller cancels every attempt (they run in one task
  group inside the caller's scope).

Telemetry: ``("seawall", "hedge", "started")`` when a hedge starts
(``delay``: the seconds it waited; metadata ``key`` and ``attempt``, the
hedge's index, 1 for the first hedge), and ``("seawall", "hedge", "won")``
when a race in which at least one hedge started is won (``latency``: seconds
from the first attempt's start; metadata ``key``, ``attempt``: the winner's
index, 0 when the first attempt won after all, and ``hedges``: how many
started).
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, Generic, TypeVar

import anyio
import anyio.abc

from seawall._checks import count, describe, seconds
from seawall._clock import Clock
from seawall._errors import ConfigurationError, ConfigurationTypeError
from seawall._telemetry import HEDGE_STARTED, HEDGE_WON

__all__ = ["MAX_HEDGES", "MIN_SAMPLES", "Hedge", "check_policy"]

T = TypeVar("T")

#: The most hedges a call may start (each is a whole attempt: more would be a load multiplier).
MAX_HEDGES: Final = 10
#: Successful attempts the latency window needs before a percentile delay hedges.
MIN_SAMPLES: Final = 20
#: The latency window, in seconds of the clock...
WINDOW: Final = 60.0
#: ...and the most samples it keeps.
MAX_SAMPLES: Final = 1000
#: New samples after which the percentile is recomputed (else once a second).
_REFRESH_SAMPLES: Final = 32

_PERCENTILE = re.compile(r"p(\d{1,2}(?:\.\d+)?)")

#: One attempt: ``attempt(index, remaining)`` with index 0 the first, ``remaining`` the seconds left.
Attempt = Callable[[int, float], Awaitable[T]]


def check_policy(delay: object, max_hedges: object, prefix: str = "") -> tuple[float, float | None, int]:
    """Validate a hedge's options; return ``(seconds, percentile, max_hedges)``.

    ``delay`` is seconds (``seconds`` set, ``percentile`` ``None``) or a
    string ``"pNN"`` with NN from 1 to 99.9 (``percentile`` set, ``seconds``
    0). Errors name ``prefix`` + the option.
    """
    path = f"{prefix}delay"
    if isinstance(delay, str):
        match = _PERCENTILE.fullmatch(delay)
        value = float(match.group(1)) if match else math.nan
        if not 1.0 <= value <= 99.9:
            raise ConfigurationError(
                f"{path}: expected seconds or a percentile from 'p1' to 'p99.9' (like 'p95'), got {delay!r}",
                path=path,
            )
        fixed, percentile = 0.0, value
    elif isinstance(delay, int | float) and not isinstance(delay, bool):
        fixed, percentile = seconds(delay, path), None
    else:
        raise ConfigurationTypeError(
            f"{path}: expected seconds or a percentile like 'p95', got {describe(delay)}", path=path
        )
    hedges = count(max_hedges, f"{prefix}max_hedges", minimum=1, maximum=MAX_HEDGES)
    return fixed, percentile, hedges


class Hedge:
    """A hedging policy: when another attempt starts, how many may, and the latencies it learns from.

    Args:
        delay: Seconds after which another attempt starts, or a percentile
            of recent successful latencies (``"p95"``).
        max_hedges: Attempts that may start besides the first (1 to 10).
        clock: Where delays and latencies take their time (a
            :class:`~seawall.FakeClock` in tests).

    Raises:
        ConfigurationError: An argument is invalid; ``path`` names it.
    """

    __slots__ = ("_added", "_cached", "_clock", "_fixed", "_percentile", "_refresh_at", "_samples", "max_hedges")

    def __init__(self, delay: float | str = "p95", max_hedges: int = 1, *, clock: Clock) -> None:
        self._fixed, self._percentile, self.max_hedges = check_policy(delay, max_hedges)
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)  # (when, latency)
        self._cached: float | None = None  # the percentile as last computed (None: too few samples)
        self._refresh_at = -math.inf  # when the cached percentile goes stale
        self._added = 0  # samples recorded since it was computed

    @property
    def percentile(self) -> float | None:
        """The percentile the delay follows (``None``: a fixed delay)."""
        return self._percentile

    @property
    def samples(self) -> int:
        """Successful latencies in the window now."""
        self._expire(self._clock.now())
        return len(self._samples)

    def record(self, latency: float) -> None:
        """Learn the latency of a successful attempt (a fixed delay learns nothing)."""
        if self._percentile is not None:
            self._samples.append((self._clock.now(), latency))
            self._added += 1

    def _expire(self, now: float) -> None:
        samples = self._samples
        horizon = now - WINDOW
        while samples and samples[0][0] < horizon:
            samples.popleft()
            self._added += 1  # (the window changed: the percentile may have)

    def delay(self) -> float | None:
        """Seconds the next call's first attempt runs alone (``None``: it will not be hedged)."""
        percentile = self._percentile
        if percentile is None:
            return self._fixed
        now = self._clock.now()
        if now < self._refresh_at and self._added < _REFRESH_SAMPLES:
            return self._cached
        self._expire(now)
        samples = self._samples
        self._added = 0
        if len(samples) < MIN_SAMPLES:
            self._cached = None
            self._refresh_at = -math.inf  # (recomputed at once: counting is cheap while the window fills)
            return None
        ordered = sorted(latency for _, latency in samples)
        # The nearest-rank percentile: the smallest latency at or above the share of samples.
        self._cached = ordered[max(math.ceil(percentile / 100.0 * len(ordered)) - 1, 0)]
        self._refresh_at = now + 1.0
        return self._cached

    async def run(self, attempt: Attempt[T], remaining: float, key: str) -> T:
        """Run ``attempt(0, remaining)``, hedged as the policy says; return the first success.

        Args:
            attempt: Starts attempt ``index`` with ``remaining`` seconds left of the call.
            remaining: Seconds left of the call's deadline.
            key: Names the call in telemetry.

        Raises:
            Exception: The first attempt's own exception, when every attempt failed.
        """
        delay = self.delay()
        clock = self._clock
        start = clock.now()
        if delay is None or delay >= remaining:
            result = await attempt(0, remaining)  # no hedge can start: the plain call
            self.record(clock.now() - start)
            return result
        return await _Race(self, attempt, key, start, start + remaining).run(delay)

    def __repr__(self) -> str:
        delay = f"'p{self._percentile:g}'" if self._percentile is not None else repr(self._fixed)
        return f"Hedge(delay={delay}, max_hedges={self.max_hedges}, samples={len(self._samples)})"


class _Race(Generic[T]):
    """One hedged call: its attempts in one task group, the first success kept."""

    __slots__ = (
        "_attempt",
        "_deadline",
        "_failed",
        "_group",
        "_hedge",
        "_hedges",
        "_key",
        "_result",
        "_running",
        "_start",
    )

    def __init__(self, hedge: Hedge, attempt: Attempt[T], key: str, start: float, deadline: float) -> None:
        self._hedge = hedge
        self._attempt = attempt
        self._key = key
        self._start = start
        self._deadline = deadline
        self._hedges = 0  # hedges started
        self._running = 1  # attempts started and not finished (counted when started: see _launch)
        self._failed: Exception | None = None  # the first attempt's exception
        self._result: tuple[int, T] | None = None  # (the winner's index, its result)
        self._group: anyio.abc.TaskGroup | None = None

    async def run(self, delay: float) -> T:
        async with anyio.create_task_group() as group:
            self._group = group
            group.start_soon(self._launch, delay)
            await self._one(0, self._deadline - self._start)  # the first attempt runs in the caller's task
        if self._result is not None:
            return self._result[1]
        raise self._failed  # type: ignore[misc]  # (set: the first attempt failed, and so did every hedge)

    async def _launch(self, delay: float) -> None:
        """Start a hedge every ``delay`` seconds while no attempt has won, up to ``max_hedges``."""
        clock = self._hedge._clock
        group = self._group
        assert group is not None  # (set before this task starts)
        for index in range(1, self._hedge.max_hedges + 1):
            await clock.sleep(delay)
            remaining = self._deadline - clock.now()
            if remaining <= 0.0:
                return  # the call's time is up: its attempts time out themselves
            if HEDGE_STARTED.handlers:
                HEDGE_STARTED.emit({"delay": delay}, {"key": self._key, "attempt": index})
            # Counted now, not when its task first runs: a failure meanwhile must not end the race.
            self._running += 1
            self._hedges += 1
            group.start_soon(self._one, index, remaining)

    async def _one(self, index: int, remaining: float) -> None:
        """Run attempt ``index``; a success ends the race, the last failure too."""
        clock = self._hedge._clock
        started = clock.now()
        try:
            result = await self._attempt(index, remaining)
        except Exception as exc:
            self._running -= 1
            if index == 0:
                self._failed = exc
            if self._running == 0 and self._group is not None:
                self._group.cancel_scope.cancel()  # every attempt failed: start no more hedges
            return
        self._running -= 1
        if self._result is not None:
            return  # another attempt won in the same moment: this result goes unused
        self._result = (index, result)
        now = clock.now()
        self._hedge.record(now - started)
        if self._group is not None:
            self._group.cancel_scope.cancel()  # the losers (and the launcher) are cancelled here
        if self._hedges and HEDGE_WON.handlers:
            meta = {"key": self._key, "attempt": index, "hedges": self._hedges}
            HEDGE_WON.emit({"latency": now - self._start}, meta)
