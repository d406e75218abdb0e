"""One timer task that cancels the expired cancel scopes of protected calls.

Giving every protected call its own anyio deadline (``anyio.fail_after``)
schedules and cancels one event-loop timer per call, and that alone costs as
much as a whole hand-built chain of rate limiter, breaker, bulkhead and
timeout. So a protected call enters a *deadline-less* cancel scope and
registers it, with its exact deadline, in the :class:`DeadlineTimer` of its
``AsyncInfrastructure``; a single task sleeps until the earliest deadline and
cancels what has expired. The idea of the timer wheels of Netty and Kafka,
shaped for Python:

* Calls with the same timeout expire in the order they started (the clock is
  monotonic), so each distinct timeout value keeps its calls in one
  insertion-ordered ``dict`` (scope -> deadline): registering is one dict
  store, finishing one dict delete, both O(1) in C; the front of each dict is
  its earliest deadline. No heap, no loop timer per call.
* The task wakes at the earliest front deadline, but never later than
  ``now + smallest timeout``. A call registered while it sleeps therefore
  expires no earlier than that wake-up, so registering never has to wake the
  timer; only a *new, smaller* timeout value does. With nothing registered
  the task sleeps until a registration wakes it (one flag test per
  registration): an idle infrastructure costs nothing.

On asyncio the timer task steps out of being the current task while it
cancels (see :func:`_cancel_outside_task`): anyio's ``CancelScope.cancel()``
called from a task writes that task's ``repr`` into the cancellation's
message, and formatting the timer task's coroutine cost about 40,000
instructions per expired call, a tenth of a timed-out call's whole unwinding
(``anyio.fail_after``'s loop timers cancel from callbacks, outside any task).
The cancellations still happen in the timer's own loop iteration, as before.

The deadline is the call's own start time plus its timeout, read when the call
starts, so a timer that runs late under load (10,000 calls starting in one loop
iteration) still cancels each call at its own deadline, not at the time the
timer got round to it. A timeout fires no earlier than its deadline and, on a
responsive loop, one loop iteration after it; a loop blocked by synchronous
code delays this timer exactly as it delays ``asyncio.timeout`` (the
coordinator then reports the overrun, see ``_protected_call``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import anyio.abc

from seawall._clock import Clock, in_trio_task

__all__ = ["DeadlineTimer", "TimerStatistics"]

#: Beyond this many distinct timeout values, empty groups are dropped when the timer runs.
_MAX_IDLE_GROUPS = 64


@dataclass(frozen=True, slots=True)
class TimerStatistics:
    """A snapshot of the deadline timer, from :meth:`AsyncInfrastructure.statistics`.

    Attributes:
        running: Whether the timer task runs (outside ``async with`` each call
            carries its own anyio deadline instead).
        pending: Calls registered that have neither finished nor expired.
        expired: Calls the timer has cancelled so far.
        timeouts: The distinct timeout values with a group, ascending.
        idle: Whether the timer sleeps with nothing to wait for.
    """

    running: bool
    pending: int
    expired: int
    timeouts: tuple[float, ...]
    idle: bool


class DeadlineTimer:
    """Cancel registered cancel scopes once their deadline has passed.

    Args:
        clock: The clock deadlines are read from and slept on.

    A call registers and unregisters in one dict::

        group = timer.register(scope, deadline, timeout)   # None: not running (scope.deadline was set)
        ...
        group.pop(scope, None)                             # gone already if the timer expired it
    """

    __slots__ = ("_cancel", "_clock", "_groups", "_idle", "_min_timeout", "_sleep_scope", "expired", "running")

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        # timeout value -> {scope: deadline}, each dict in deadline order.
        self._groups: dict[float, dict[Any, float]] = {}
        self._min_timeout = math.inf
        self._sleep_scope: anyio.CancelScope | None = None
        self._idle = False
        # Cancels a list of scopes: in the timer task itself, or (asyncio) as if from no task.
        self._cancel: Callable[[list[Any]], None] = _cancel_all
        #: Whether the timer task is running (else callers use their own deadlines).
        self.running = False
        #: How many scopes this timer has cancelled.
        self.expired = 0

    def register(self, scope: Any, deadline: float, timeout: float) -> dict[Any, float] | None:
        """File ``scope`` to be cancelled at ``deadline``; return the dict to remove it from when done.

        When the timer is not running (outside ``async with infra``) the scope
        gets ``timeout`` as an anyio deadline of its own, and ``None`` is returned.
        """
        if not self.running:
            scope.deadline = anyio.current_time() + timeout
            return None
        try:
            group = self._groups[timeout]  # (a subscript, not .get(): no method call on every call)
        except KeyError:
            group = self._new_group(timeout)
        group[scope] = deadline
        if self._idle:
            self._idle = False
            self._poke()
        return group

    def _new_group(self, timeout: float) -> dict[Any, float]:
        group = self._groups[timeout] = {}
        if timeout < self._min_timeout:
            # The timer may be asleep past this timeout's first deadline.
            self._min_timeout = timeout
            self._poke()
        return group

    def statistics(self) -> TimerStatistics:
        """A snapshot of the timer's counts."""
        return TimerStatistics(
            running=self.running,
            pending=sum(len(group) for group in self._groups.values()),
            expired=self.expired,
            timeouts=tuple(sorted(self._groups)),
            idle=self._idle,
        )

    def _poke(self) -> None:
        if self._sleep_scope is not None:
            self._sleep_scope.cancel()

    def expire(self) -> float:
        """Cancel every scope whose deadline has passed; return the next wake-up time."""
        now = self._clock.now()
        wake = math.inf
        due: list[Any] = []
        for group in self._groups.values():
            while group:
                scope = next(iter(group))
                deadline = group[scope]
                if deadline > now:
                    wake = min(wake, deadline)
                    break
                del group[scope]
                due.append(scope)
        if due:
            self.expired += len(due)
            self._cancel(due)
        if len(self._groups) > _MAX_IDLE_GROUPS:
            # Per-call timeouts of many different values: forget the idle ones.
            for timeout in [t for t, group in self._groups.items() if not group]:
                del self._groups[timeout]
            self._min_timeout = min(self._groups, default=math.inf)
        if not math.isinf(wake):
            # A call may register meanwhile without waking the timer (see the module doc).
            wake = min(wake, now + self._min_timeout)
        # Nothing to wait for: sleep until the next registration wakes it.
        self._idle = math.isinf(wake)
        return wake

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The timer task: run it in a task group; cancel the group to stop it."""
        self.running = True
        self._cancel = _cancel_all if in_trio_task() else partial(_cancel_outside_task, asyncio.current_task())
        task_status.started()
        try:
            while True:
                wake = self.expire()
                with anyio.CancelScope() as self._sleep_scope:
                    if math.isinf(wake):
                        await anyio.sleep_forever()
                    else:
                        # (expire() read the clock a moment ago: the wake-up may be due already)
                        await self._clock.sleep(max(wake - self._clock.now(), 0.0))
                self._sleep_scope = None
        finally:
            self.running = False
            self._sleep_scope = None
            self._hand_over()

    def _hand_over(self) -> None:
        """Give the calls still registered a deadline of their own: this timer is stopping.

        A call that outlives its infrastructure (it runs in another task
        group) must still time out: its scope gets the remaining time as an
        anyio deadline (the clock may be a fake one, anyio's is the loop's).
        """
        now = self._clock.now()
        loop_now = anyio.current_time()
        for group in self._groups.values():
            for scope, deadline in group.items():
                scope.deadline = loop_now + max(deadline - now, 0.0)
            group.clear()

    def __repr__(self) -> str:
        stats = self.statistics()
        return f"DeadlineTimer(running={stats.running}, pending={stats.pending}, expired={stats.expired})"


def _cancel_all(scopes: list[Any]) -> None:
    """Cancel each scope (an expired deadline)."""
    for scope in scopes:
        scope.cancel()


def _cancel_outside_task(timer_task: asyncio.Task[Any] | None, scopes: list[Any]) -> None:
    """Cancel each scope as a loop callback would, with no current task (asyncio; see the module doc).

    ``asyncio.tasks._leave_task``/``_enter_task`` are what the event loop
    itself calls around each step of a task (3.11 to 3.13); the timer task is
    current again before this returns, whatever a cancellation raised.
    """
    if timer_task is None:  # pragma: no cover - the timer always runs as a task
        _cancel_all(scopes)
        return
    loop = timer_task.get_loop()
    asyncio.tasks._leave_task(loop, timer_task)
    try:
        _cancel_all(scopes)
    finally:
        asyncio.tasks._enter_task(loop, timer_task)
