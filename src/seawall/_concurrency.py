"""ConcurrencyLimiter: bound the calls in flight, adaptively, with priorities.

A limiter admits a call while fewer than its current ``limit`` calls are in
flight; otherwise the call waits (up to ``timeout``, among at most
``max_waiting`` waiters) or is refused with
:class:`~seawall.ConcurrencyLimitExceeded`. The limit is fixed
(``algorithm="fixed"``) or adapts from the latency and the drops it observes,
after the ideas of Netflix's concurrency-limits library (which borrows them
from TCP congestion control):

``aimd``
    Additive increase, multiplicative decrease: ``+1`` per window that saw
    no drop while the limit was used, ``x0.9`` per window that saw a drop.
    As in Netflix's ``AIMDLimit``, a call that took longer than 5 s (its
    default ``timeout``) counts as a drop, so an upstream that turns slow
    without failing still brings the limit down.
``vegas``
    TCP Vegas's queue estimate ``limit * (1 - no_load_latency / latency)``
    with Netflix's ``VegasLimit`` thresholds (``alpha = 3 log10 limit``,
    ``beta = 6 log10 limit``): grow while the estimated queue is short, shrink
    while it is long. Seawall's variant shrinks by half the excess queue (not
    by ``log10 limit``), so a limit far too high comes down in a few windows.
``gradient2`` (default)
    Netflix's ``Gradient2Limit`` rule: ``gradient = clamp(1.5 * reference /
    latency, 0.5, 1.0)``, ``new = limit * gradient + 4`` (a small queue
    allowance), smoothed ``limit += 0.2 * (new - limit)``; while the gradient
    is 1 (no sign of a queue) the limit grows by ``sqrt(limit)`` per window,
    unsmoothed, so a limit that starts low finds the capacity quickly. The reference is
    the *no-load* latency, measured as Envoy's adaptive-concurrency filter
    measures its minimum RTT (see below), not Netflix's long-term average
    latency: an average learnt while the upstream is already overloaded
    never shows the overload.

Invariants and rules:

* ``in_flight`` counts admitted calls not yet released; it never exceeds the
  limit at the moment of admission (a limit that drops below it admits nothing
  until enough calls end; nothing in flight is cut off).
* Adaptation is per window, not per sample: each release adds its latency to
  the window's counters (a sum, a minimum, a drop count: O(1)); once
  ``window`` seconds have passed *and* the window holds at least 10 samples,
  the algorithm runs once and the counters start over.
* The no-load latency (``vegas``, ``gradient2``) is the minimum latency seen,
  re-measured by a *probe*: after the first window, and then every 60
  windows, the limit drops to ``max(min_limit, 3)`` until 5 calls admitted
  during the probe have ended; their minimum is the new no-load latency and
  the limit goes back to where it was. (Envoy's filter does the same to
  learn its ``minRTT``.)
* Priorities: ``priorities=P`` allows priorities ``0`` (most important) to
  ``P - 1``. Priority ``p`` is admitted only while ``in_flight < limit -
  floor(limit * p / (2 * P))`` (at least 1): the least important class can
  fill a bit more than half of the limit, and the rest stays reserved for
  more important calls. A freed slot goes to the most important waiter (FIFO
  within a priority). When the queue is full, a call more important than
  the least important waiter takes that waiter's place (the newest of the
  least important is shed, with :class:`~seawall.ConcurrencyLimitExceeded`);
  otherwise the newcomer is refused.
* Nothing leaks: a waiter cancelled while waiting leaves the queue, and one
  cancelled just after it was handed a slot passes the slot on.
* Telemetry: every refusal emits ``("seawall", "concurrency_limiter",
  "call_rejected")`` with its ``reason`` (``"limit"``, ``"max_waiting"``,
  ``"shed"``, ``"timeout"``), and every change of the integer limit emits
  ``("seawall", "concurrency_limiter", "limit_changed")``: at most once per
  window (or probe), never per call. Admission and release read no topic.

The fast form :meth:`ConcurrencyLimiter.acquire_nowait` holds the decision;
the waiting form :meth:`ConcurrencyLimiter.acquire` calls it and waits only
when it raises :class:`anyio.WouldBlock`. Neither ``acquire_nowait`` nor
``release`` awaits; ``acquire`` and ``async with limiter()`` are checkpoints
only when they wait.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Final, Literal

import anyio
from anyio import WouldBlock

from seawall._awaitables import DONE
from seawall._checks import MAX_SECONDS, count, describe, seconds
from seawall._clock import Clock, current_clock
from seawall._errors import ConcurrencyLimitExceeded, ConfigurationError, ConfigurationTypeError
from seawall._logging import logger
from seawall._telemetry import CONCURRENCY_CALL_REJECTED, CONCURRENCY_LIMIT_CHANGED

__all__ = ["ConcurrencyLimiter", "ConcurrencyLimiterStatistics", "ConcurrencySlot"]

Algorithm = Literal["fixed", "aimd", "vegas", "gradient2"]
_ALGORITHMS: Final = ("fixed", "aimd", "vegas", "gradient2")

#: Samples a window needs before the algorithm runs on it.
_MIN_SAMPLES: Final = 10
#: Windows between two probes of the no-load latency.
_PROBE_EVERY: Final = 60
#: Calls admitted during a probe whose latency makes the no-load latency.
_PROBE_SAMPLES: Final = 5
#: The limit during a probe (at least ``min_limit``).
_PROBE_LIMIT: Final = 3
#: Seconds of latency from which an ``aimd`` sample counts as a drop (Netflix AIMDLimit's default timeout).
_AIMD_DROP_LATENCY: Final = 5.0

# The states of a waiter.
_WAITING, _GRANTED, _SHED, _GONE = range(4)


@dataclass(frozen=True, slots=True)
class ConcurrencyLimiterStatistics:
    """A snapshot of a :class:`ConcurrencyLimiter`, from :meth:`ConcurrencyLimiter.statistics`."""

    name: str | None
    algorithm: str
    limit: int
    """The limit in force now."""
    in_flight: int
    """Admitted calls not yet released."""
    waiting: tuple[int, ...]
    """Waiters per priority (index 0: the most important)."""
    admitted: int
    """Calls admitted since the limiter was made."""
    rejected: tuple[int, ...]
    """Per priority: calls refused at once (no room to wait)."""
    shed: tuple[int, ...]
    """Per priority: waiters pushed out of the queue by more important calls."""
    timed_out: tuple[int, ...]
    """Per priority: waiters that gave up after ``timeout``."""
    latency: float | None
    """The average latency of the last completed window, in seconds (``None``: none yet)."""
    no_load_latency: float | None
    """The no-load latency estimate (``vegas``, ``gradient2``), in seconds."""
    min_limit: int
    max_limit: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view."""
        return {
            "name": self.name,
            "algorithm": self.algorithm,
            "limit": self.limit,
            "in_flight": self.in_flight,
            "waiting": list(self.waiting),
            "admitted": self.admitted,
            "rejected": list(self.rejected),
            "shed": list(self.shed),
            "timed_out": list(self.timed_out),
            "latency": self.latency,
            "no_load_latency": self.no_load_latency,
            "min_limit": self.min_limit,
            "max_limit": self.max_limit,
        }


class _Waiter:
    """A task queued in :meth:`ConcurrencyLimiter.acquire`; woken by cancelling its scope."""

    __slots__ = ("priority", "scope", "state", "ticket")

    def __init__(self, priority: int, scope: anyio.CancelScope) -> None:
        self.priority = priority
        self.scope = scope
        self.state = _WAITING
        self.ticket = 0.0


def _ceilings(limit: int, priorities: int) -> dict[int, int]:
    """The most calls in flight at which each priority is still admitted (see the module docstring)."""
    return {p: max(1, limit - (limit * p) // (2 * priorities)) for p in range(priorities)}


class ConcurrencyLimiter:
    """Bounds the calls in flight; the bound is fixed or adapts from observed latency.

    Args:
        limit: The fixed limit (``algorithm="fixed"``, where it is required).
        algorithm: ``"fixed"``, ``"aimd"``, ``"vegas"`` or ``"gradient2"``
            (see the module docstring for the rules).
        initial_limit: Where an adaptive limit starts.
        min_limit: The lower bound of an adaptive limit.
        max_limit: The upper bound of an adaptive limit.
        max_waiting: How many calls may wait for a slot at once (``None``: no
            bound). ``0`` (default): a call that finds no slot is refused at once.
        timeout: Seconds a call waits for a slot (``None``: no limit; ``0``:
            never waits).
        priorities: How many priorities there are (``0`` most important).
        window: Seconds of samples per adaptive update (at least 10 samples).
        name: Names the limiter in errors and statistics.
        clock: The clock for latencies and waits (``seawall.FakeClock`` in
            tests); by default the running loop's.

    Raises:
        ConfigurationError: A value out of range (or ``ConfigurationTypeError``
            for a wrong type); ``path`` names the argument.

    Use ``async with limiter(priority=0):`` around a call, or pair
    :meth:`acquire_nowait` (or ``await`` :meth:`acquire`) with
    :meth:`release`.
    """

    __slots__ = (
        "_adaptive",
        "_admitted",
        "_algorithm",
        "_ceilings",
        "_clock",
        "_drop_latency",
        "_latency",
        "_limit",
        "_limit_f",
        "_long",
        "_max_limit",
        "_max_waiting",
        "_min_limit",
        "_name",
        "_noload",
        "_now",
        "_priorities",
        "_probe_min",
        "_probe_n",
        "_probe_saved",
        "_probe_start",
        "_probing",
        "_queues",
        "_rejected",
        "_shed",
        "_timed_out",
        "_timeout",
        "_to_probe",
        "_w_count",
        "_w_drops",
        "_w_end",
        "_w_min",
        "_w_peak",
        "_w_sum",
        "_waiting",
        "_window",
        "in_flight",
    )

    def __init__(
        self,
        *,
        limit: int | None = None,
        algorithm: Algorithm = "gradient2",
        initial_limit: int = 20,
        min_limit: int = 1,
        max_limit: int = 1000,
        max_waiting: int | None = 0,
        timeout: float | timedelta | None = 0.0,
        priorities: int = 1,
        window: float | timedelta = 1.0,
        name: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        if algorithm not in _ALGORITHMS:
            raise ConfigurationError(
                f"algorithm: must be one of {', '.join(_ALGORITHMS)}, got {describe(algorithm)}", path="algorithm"
            )
        self._algorithm: str = algorithm
        self._min_limit = count(min_limit, "min_limit", minimum=1)
        self._max_limit = count(max_limit, "max_limit", minimum=1)
        if self._max_limit < self._min_limit:
            raise ConfigurationError(
                f"max_limit: must be at least min_limit ({min_limit}), got {describe(max_limit)}", path="max_limit"
            )
        if algorithm == "fixed":
            if limit is None:
                raise ConfigurationError('limit: algorithm="fixed" needs a limit', path="limit")
            start = count(limit, "limit", minimum=1)
            self._min_limit = self._max_limit = start
        else:
            if limit is not None:
                raise ConfigurationError(
                    f'limit: only algorithm="fixed" takes a limit; an adaptive one starts at initial_limit, '
                    f"got limit={describe(limit)}",
                    path="limit",
                )
            start = count(initial_limit, "initial_limit", minimum=1)
            if not self._min_limit <= start <= self._max_limit:
                raise ConfigurationError(
                    f"initial_limit: must be between min_limit ({self._min_limit}) and max_limit "
                    f"({self._max_limit}), got {describe(initial_limit)}",
                    path="initial_limit",
                )
        self._max_waiting = None if max_waiting is None else count(max_waiting, "max_waiting", minimum=0)
        self._timeout = None if timeout is None else seconds(timeout, "timeout", inclusive=True, maximum=MAX_SECONDS)
        self._priorities = count(priorities, "priorities", minimum=1, maximum=1000)
        self._window = seconds(window, "window")
        if name is not None and not isinstance(name, str):
            raise ConfigurationTypeError(f"name: must be a str or None, got {describe(name)}", path="name")
        self._name = name
        if clock is None:
            clock = current_clock()
        elif not isinstance(clock, Clock):
            raise ConfigurationTypeError(f"clock: must provide now() and sleep(), got {describe(clock)}", path="clock")
        self._clock = clock
        self._now = clock.now
        self._adaptive = algorithm != "fixed"
        self._limit_f = float(start)
        self._limit = start
        self._ceilings = _ceilings(start, self._priorities)
        #: Admitted calls not yet released (read it; :meth:`release` changes it).
        self.in_flight = 0
        self._queues: list[deque[_Waiter]] = [deque() for _ in range(self._priorities)]
        self._waiting = 0
        self._admitted = 0
        self._rejected = [0] * self._priorities
        self._shed = [0] * self._priorities
        self._timed_out = [0] * self._priorities
        # The current window's counters (adaptive algorithms).
        self._w_count = 0
        self._w_sum = 0.0
        self._w_min = math.inf
        self._w_drops = 0
        self._w_peak = 0
        self._w_end = self._now() + self._window if self._adaptive else math.inf
        # A sample slower than this counts as a drop (aimd only: vegas and gradient2 read the latency itself).
        self._drop_latency = _AIMD_DROP_LATENCY if algorithm == "aimd" else math.inf
        self._latency: float | None = None
        self._long: float | None = None
        # The no-load latency and its probe (vegas, gradient2).
        self._noload: float | None = None
        self._probing = False
        self._probe_start = 0.0
        self._probe_min = math.inf
        self._probe_n = 0
        self._probe_saved = self._limit_f
        self._to_probe = 1 if algorithm in ("vegas", "gradient2") else -1

    # -- configuration and state -----------------------------------------

    @property
    def name(self) -> str | None:
        """Names the limiter in errors and statistics."""
        return self._name

    @property
    def algorithm(self) -> str:
        """The algorithm that sets the limit."""
        return self._algorithm

    @property
    def limit(self) -> int:
        """The limit on calls in flight in force now."""
        return self._limit

    @property
    def priorities(self) -> int:
        """How many priorities there are (``0`` is the most important)."""
        return self._priorities

    @property
    def timeout(self) -> float | None:
        """Seconds a call waits for a slot (``None``: no limit)."""
        return self._timeout

    def statistics(self) -> ConcurrencyLimiterStatistics:
        """A snapshot of the limit, the calls in flight and waiting, and the refusals (no I/O)."""
        return ConcurrencyLimiterStatistics(
            name=self._name,
            algorithm=self._algorithm,
            limit=self._limit,
            in_flight=self.in_flight,
            waiting=tuple(sum(1 for w in queue if w.state == _WAITING) for queue in self._queues),
            admitted=self._admitted,
            rejected=tuple(self._rejected),
            shed=tuple(self._shed),
            timed_out=tuple(self._timed_out),
            latency=self._latency,
            no_load_latency=self._noload,
            min_limit=self._min_limit,
            max_limit=self._max_limit,
        )

    # -- the non-waiting form ----------------------------------------------

    def acquire_nowait(self, priority: int = 0) -> float:
        """Admit one call now, or raise; pair it with :meth:`release`.

        Returns:
            The call's ticket: the clock reading at admission for an adaptive
            limiter (``0.0`` for a fixed one). Hand it to :meth:`release` so
            the call's latency is measured.

        Raises:
            anyio.WouldBlock: No slot now, but the call may wait for one
                (:meth:`acquire` would wait); nothing was taken.
            ConcurrencyLimitExceeded: No slot, and no room or time to wait.
            ConfigurationError: ``priority`` is not one of this limiter's.
        """
        try:
            ceiling = self._ceilings[priority]
        except (KeyError, TypeError):  # not one of ours, or unhashable
            raise self._bad_priority(priority) from None
        if self.in_flight < ceiling and type(priority) is int:
            self.in_flight += 1
            self._admitted += 1
            return self._now() if self._adaptive else 0.0
        if type(priority) is not int:  # (True and 1.0 find priority 1's ceiling)
            raise self._bad_priority(priority)
        if self._may_wait(priority):
            raise WouldBlock
        self._rejected[priority] += 1
        # No room to wait: none by configuration ("limit"), or the queue is full of calls as important ("max_waiting").
        self._report_refusal(priority, "max_waiting" if self._max_waiting and self._timeout != 0.0 else "limit")
        raise self._refusal(priority)

    def release(self, ticket: float | None = None, *, dropped: bool = False) -> None:
        """Give back a slot taken by :meth:`acquire_nowait` or :meth:`acquire`.

        Args:
            ticket: What the admission returned; ``None`` gives the slot back
                without a latency sample (a cancelled call, or one whose
                latency says nothing about the upstream).
            dropped: The call failed in a way that means overload (it timed
                out): ``aimd`` and ``vegas`` shrink the limit on drops
                (``aimd`` counts a call slower than 5 s as one too).

        Raises:
            RuntimeError: Nothing is in flight.
        """
        in_flight = self.in_flight
        if in_flight <= 0:
            raise RuntimeError("ConcurrencyLimiter.release() called with no call in flight")
        self.in_flight = in_flight - 1
        if self._waiting:
            self._grant()
        if ticket is not None and self._adaptive:
            self._sample(ticket, in_flight, dropped)

    def _may_wait(self, priority: int) -> bool:
        """Whether a call of ``priority`` finding no slot may queue (perhaps by shedding a less important waiter)."""
        if self._timeout == 0.0 or self._max_waiting == 0:
            return False
        if self._max_waiting is None or self._waiting < self._max_waiting:
            return True
        return any(self._queues[p] for p in range(priority + 1, self._priorities))

    def _report_refusal(self, priority: int, reason: str) -> None:
        """Tell the telemetry handlers (and the debug log) that a call of ``priority`` was refused for ``reason``."""
        if CONCURRENCY_CALL_REJECTED.handlers:
            CONCURRENCY_CALL_REJECTED.emit(
                {"limit": self._limit, "in_flight": self.in_flight, "waiting": self._waiting},
                {"name": self._name, "reason": reason, "priority": priority, "algorithm": self._algorithm},
            )
        if logger.is_enabled_for(logging.DEBUG):
            logger.debug(
                "concurrency_limit_rejected",
                name=self._name,
                reason=reason,
                priority=priority,
                limit=self._limit,
                in_flight=self.in_flight,
            )

    def _refusal(self, priority: int) -> ConcurrencyLimitExceeded:
        return ConcurrencyLimitExceeded(
            name=self._name, limit=self._limit, priority=priority, retry_after=self._latency
        )

    def _bad_priority(self, priority: object) -> ConfigurationError:
        top = self._priorities - 1
        if isinstance(priority, bool) or not isinstance(priority, int):
            return ConfigurationTypeError(
                f"priority: expected an integer from 0 to {top}, got {describe(priority)}", path="priority"
            )
        return ConfigurationError(f"priority: must be from 0 to {top}, got {describe(priority)}", path="priority")

    # -- the waiting form --------------------------------------------------

    async def acquire(self, priority: int = 0) -> float:
        """Admit one call, waiting (up to ``timeout``) for a slot; pair it with :meth:`release`.

        A checkpoint only when it waits. Cancelled while waiting, it takes
        nothing.

        Returns:
            The call's ticket, for :meth:`release`.

        Raises:
            ConcurrencyLimitExceeded: No slot within ``timeout``, no room to
                wait, or shed for a more important call.
            ConfigurationError: ``priority`` is not one of this limiter's.
        """
        try:
            return self.acquire_nowait(priority)
        except WouldBlock:
            return await self._wait(priority)

    async def _wait(self, priority: int) -> float:
        """Queue for a slot (shedding a less important waiter if the queue is full)."""
        if self._max_waiting is not None and self._waiting >= self._max_waiting:
            self._shed_one(priority)
        scope = anyio.CancelScope()
        waiter = _Waiter(priority, scope)
        self._queues[priority].append(waiter)
        self._waiting += 1
        timeout = self._timeout
        try:
            with scope:
                if timeout is None:
                    await anyio.sleep_forever()
                else:
                    await self._clock.sleep(timeout)
        except BaseException:
            self._leave(waiter)
            raise
        state = waiter.state
        if state == _GRANTED:
            return waiter.ticket
        if state == _WAITING:  # the sleep ran out
            self._leave(waiter)
            self._timed_out[priority] += 1
            self._report_refusal(priority, "timeout")
        raise self._refusal(priority)  # timed out, or shed (reported by the call that shed it)

    def _shed_one(self, priority: int) -> None:
        """Push the newest of the least important waiters (less important than ``priority``) out of the queue."""
        for p in range(self._priorities - 1, priority, -1):
            queue = self._queues[p]
            if queue:
                victim = queue.pop()
                self._waiting -= 1
                victim.state = _SHED
                self._shed[p] += 1
                victim.scope.cancel()
                self._report_refusal(p, "shed")
                return
        raise AssertionError("unreachable: _may_wait() found a less important waiter")  # pragma: no cover

    def _leave(self, waiter: _Waiter) -> None:
        """A waiter is done waiting (cancelled or timed out): out of the queue; a slot it was handed goes on."""
        state = waiter.state
        waiter.state = _GONE
        if state == _WAITING:
            self._queues[waiter.priority].remove(waiter)
            self._waiting -= 1
        elif state == _GRANTED:
            self.release(None)  # handed a slot just as it was cancelled: the next waiter gets it

    def _grant(self) -> None:
        """Hand free slots to the waiters, most important first (FIFO within a priority)."""
        ceilings = self._ceilings
        for p, queue in enumerate(self._queues):
            while queue and self.in_flight < ceilings[p]:
                waiter = queue.popleft()
                self._waiting -= 1
                self.in_flight += 1
                self._admitted += 1
                waiter.state = _GRANTED
                waiter.ticket = self._now() if self._adaptive else 0.0
                waiter.scope.cancel()
            if queue:
                return  # a more important waiter still waits: nobody less important may pass it

    # -- the guarded block -------------------------------------------------

    def __call__(self, priority: int = 0) -> ConcurrencySlot:
        """``async with limiter(priority=0):`` holds a slot for the block (waiting per ``timeout``)."""
        return ConcurrencySlot(self, priority)

    # -- adaptation --------------------------------------------------------

    def _sample(self, ticket: float, in_flight: int, dropped: bool) -> None:
        """Add one call's latency to the window; close the window when it is due."""
        now = self._now()
        latency = now - ticket
        if self._probing:
            self._probe_sample(ticket, latency, now)
            return
        self._w_count += 1
        self._w_sum += latency
        if latency < self._w_min:
            self._w_min = latency
        if in_flight > self._w_peak:
            self._w_peak = in_flight
        if dropped or latency > self._drop_latency:
            self._w_drops += 1
        if now >= self._w_end and self._w_count >= _MIN_SAMPLES:
            self._close_window(now)

    def _close_window(self, now: float) -> None:
        """Run the algorithm once on the window's counters, then start a new window."""
        average = self._w_sum / self._w_count
        self._latency = average
        if self._w_min < (self._noload if self._noload is not None else math.inf):
            self._noload = self._w_min
        limit = self._limit_f
        app_limited = self._w_peak * 2 < limit
        drops = self._w_drops
        self._w_count = self._w_drops = self._w_peak = 0
        self._w_sum = 0.0
        self._w_min = math.inf
        self._w_end = now + self._window
        if self._to_probe > 0:
            self._to_probe -= 1
            if self._to_probe == 0:
                self._start_probe(now)
                return
        algorithm = self._algorithm
        if algorithm == "aimd":
            new = limit * 0.9 if drops else (limit if app_limited else limit + 1.0)
        elif algorithm == "vegas":
            new = self._vegas(limit, average, drops, app_limited)
        else:
            new = self._gradient2(limit, average, app_limited)
        self._set_limit(new)

    def _vegas(self, limit: float, latency: float, drops: int, app_limited: bool) -> float:
        log = max(1.0, math.log10(max(limit, 1.0)))
        if drops:
            return limit - log
        if app_limited or self._noload is None or latency <= 0.0:
            return limit
        queue = limit * (1.0 - self._noload / latency)
        alpha, beta = 3.0 * log, 6.0 * log
        if queue <= log:
            return limit + beta
        if queue < alpha:
            return limit + log
        if queue > beta:
            return limit - max(log, (queue - beta) / 2.0)
        return limit

    def _gradient2(self, limit: float, latency: float, app_limited: bool) -> float:
        reference = self._noload
        if reference is None or latency <= 0.0:
            return limit
        gradient = min(1.0, max(0.5, 1.5 * reference / latency))
        if gradient >= 1.0:
            # No sign of a queue: grow by sqrt(limit), unsmoothed (unless too little traffic to tell).
            return limit if app_limited else limit + math.sqrt(limit)
        return limit + 0.2 * (limit * gradient + 4.0 - limit)

    def _start_probe(self, now: float) -> None:
        self._probing = True
        self._probe_start = now
        self._probe_min = math.inf
        self._probe_n = 0
        self._probe_saved = self._limit_f
        self._set_limit(float(max(self._min_limit, _PROBE_LIMIT)), cause="probe")

    def _probe_sample(self, ticket: float, latency: float, now: float) -> None:
        if ticket < self._probe_start:
            return  # admitted before the probe, at the old concurrency: says nothing of the no-load latency
        self._probe_n += 1
        if latency < self._probe_min:
            self._probe_min = latency
        if self._probe_n >= _PROBE_SAMPLES:
            self._noload = self._probe_min
            self._probing = False
            self._to_probe = _PROBE_EVERY
            self._w_end = now + self._window
            self._set_limit(self._probe_saved, cause="probe_done")

    def _set_limit(self, value: float, *, cause: str = "update") -> None:
        """Move the limit to ``value``: within the bounds, unless ``cause`` is ``"probe"`` (a probe's limit).

        ``cause`` (``"update"``: the algorithm's, once per window; ``"probe"``,
        ``"probe_done"``: a probe's start and end) goes to the ``limit_changed`` event.
        """
        if cause != "probe":
            value = min(float(self._max_limit), max(float(self._min_limit), value))
            self._limit_f = value
        limit = max(1, int(value))
        previous = self._limit
        if limit == previous:
            return
        self._limit = limit
        self._ceilings = _ceilings(limit, self._priorities)
        if CONCURRENCY_LIMIT_CHANGED.handlers:
            CONCURRENCY_LIMIT_CHANGED.emit(
                {"limit": limit, "previous_limit": previous},
                {"name": self._name, "algorithm": self._algorithm, "cause": cause},
            )
        if logger.is_enabled_for(logging.DEBUG):
            logger.debug(
                "concurrency_limit_changed",
                name=self._name,
                algorithm=self._algorithm,
                limit=limit,
                previous_limit=previous,
                cause=cause,
            )
        if limit > previous and self._waiting:
            self._grant()

    def __repr__(self) -> str:
        name = "" if self._name is None else f" {self._name!r}"
        return (
            f"<ConcurrencyLimiter{name} {self._algorithm} limit={self._limit} "
            f"in_flight={self.in_flight} waiting={self._waiting}>"
        )


class ConcurrencySlot:
    """What ``limiter(priority)`` returns: an async context manager holding one slot for its block.

    Entering admits at once where it can (no checkpoint) and waits per the
    limiter's ``timeout`` otherwise. Leaving releases the slot: a block that
    ended in a :class:`TimeoutError` is a drop, one that raised anything else
    or was cancelled gives no latency sample.
    """

    __slots__ = ("_limiter", "_priority", "_ticket")

    def __init__(self, limiter: ConcurrencyLimiter, priority: int) -> None:
        self._limiter = limiter
        self._priority = priority
        self._ticket: float | None = None

    def __aenter__(self) -> Any:
        if self._ticket is not None:
            raise RuntimeError("this slot is held already; call limiter() again for another block")
        try:
            self._ticket = self._limiter.acquire_nowait(self._priority)
        except WouldBlock:
            return self._enter_waiting()
        return DONE

    async def _enter_waiting(self) -> None:
        self._ticket = await self._limiter._wait(self._priority)

    def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Any:
        ticket, self._ticket = self._ticket, None
        if ticket is None:
            raise RuntimeError("this slot is not held")
        if exc is None:
            self._limiter.release(ticket)
        elif isinstance(exc, TimeoutError):
            self._limiter.release(ticket, dropped=True)
        else:
            self._limiter.release(None)
        return DONE
