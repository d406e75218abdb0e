"""One timer task that cancels the expired cancel scopes of protected calls.

Giving every protected call its own anyio deadline (``anyio.fail_after``)
schedules and cancels one event-loop timer per call, and measured here that
alone costs as much as a whole hand-built chain of rate limiter, breaker,
bulkhead and timeout. So a protected call enters a *deadline-less* cancel
scope and registers it with the :class:`DeadlineTimer` of its
``AsyncInfrastructure``; a single task sleeps until the earliest deadline and
cancels what has expired. This is the idea of the timer wheels in Netty and
Kafka, shaped for Python:

* Calls with the same timeout expire in the order they started (the clock is
  monotonic), so each distinct timeout value keeps its calls in one
  insertion-ordered ``dict`` (scope -> deadline): registering is one dict
  store, finishing is one dict delete, both O(1) in C; the front of each dict
  is its earliest deadline. There is no heap and no per-call loop timer.
* The task wakes at the earliest front deadline, but never later than
  ``now + smallest timeout``. Any call registered while it sleeps therefore
  expires no earlier than that wake-up, so registering a call never has to
  wake the timer; only a *new, smaller* timeout value does.

Granularity: a timeout fires no earlier than its deadline and, as long as
the event loop is not blocked, within one loop iteration after the timer
task's sleep ends (asyncio's timer resolution, about 1 ms; stated as at most
10 ms late in the docs and tests). A loop blocked by synchronous code delays
this timer exactly as it delays ``asyncio.timeout``.
"""

from __future__ import annotations

import math
from typing import Any

import anyio
import anyio.abc

from seawall._clock import Clock, MonotonicClock

__all__ = ["GRANULARITY", "DeadlineTimer"]

#: The documented upper bound on how late a timeout fires on a responsive loop.
GRANULARITY = 0.010

#: Beyond this many distinct timeout values, empty groups are dropped when the timer runs.
_MAX_IDLE_GROUPS = 64


class DeadlineTimer:
    """Cancel registered cancel scopes once their deadline has passed.

    Args:
        clock: The clock deadlines are read from and slept on.

    The hot path is used inline by the coordinator::

        group = timer.groups.get(timeout)
        if group is None:
            group = timer.group(timeout)
        group[scope] = clock.now() + timeout
        ...
        group.pop(scope, None)   # the timer removes expired scopes itself
    """

    __slots__ = ("_clock", "_min_timeout", "_sleep_scope", "expired", "groups", "running")

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        #: timeout value -> {scope: deadline}, each dict in deadline order.
        self.groups: dict[float, dict[Any, float]] = {}
        self._min_timeout = math.inf
        self._sleep_scope: anyio.CancelScope | None = None
        #: Whether the timer task is running (else callers use their own deadlines).
        self.running = False
        #: How many scopes this timer has cancelled.
        self.expired = 0

    def group(self, timeout: float) -> dict[Any, float]:
        """Return the group for ``timeout``, creating it (and waking the timer) if new."""
        found = self.groups.get(timeout)
        if found is None:
            found = self.groups[timeout] = {}
            if timeout < self._min_timeout:
                # The timer may be asleep past this timeout's first deadline.
                self._min_timeout = timeout
                self._poke()
        return found

    @property
    def pending(self) -> int:
        """How many registered calls have not finished or expired yet."""
        return sum(len(group) for group in self.groups.values())

    def _poke(self) -> None:
        if self._sleep_scope is not None:
            self._sleep_scope.cancel()

    def expire(self) -> float:
        """Cancel every scope whose deadline has passed; return the next wake-up time."""
        now = self._clock.now()
        wake = now + self._min_timeout
        for group in self.groups.values():
            while group:
                scope = next(iter(group))
                deadline = group[scope]
                if deadline > now:
                    wake = min(wake, deadline)
                    break
                del group[scope]
                scope.cancel()
                self.expired += 1
        if len(self.groups) > _MAX_IDLE_GROUPS:
            # Per-call timeouts of many different values: forget the idle ones.
            for timeout in [t for t, group in self.groups.items() if not group]:
                del self.groups[timeout]
            self._min_timeout = min(self.groups, default=math.inf)
        return wake

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The timer task: run it in a task group; cancel the group to stop it."""
        self.running = True
        task_status.started()
        try:
            while True:
                wake = self.expire()
                with anyio.CancelScope() as self._sleep_scope:
                    if math.isinf(wake):
                        await anyio.sleep_forever()
                    else:
                        await self._clock.sleep(wake - self._clock.now())
                self._sleep_scope = None
        finally:
            self.running = False
            self._sleep_scope = None
            self._hand_over()

    def _hand_over(self) -> None:
        """Give the calls still registered their own deadline: this timer is stopping.

        A call that outlives its infrastructure (it runs in another task group)
        must still time out. On the monotonic clock, deadlines are in the event
        loop's time already, so each scope simply gets its deadline back.
        """
        real_clock = isinstance(self._clock, MonotonicClock)
        for group in self.groups.values():
            for scope, deadline in group.items():
                if real_clock:
                    scope.deadline = deadline
            group.clear()

    def __repr__(self) -> str:
        return f"DeadlineTimer(running={self.running}, pending={self.pending}, expired={self.expired})"
