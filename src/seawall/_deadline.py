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
  wake the timer; only a *new, smaller* timeout value does. With nothing
  registered at all the task sleeps until a registration wakes it (one
  flag test per registration), so an idle infrastructure costs nothing.

Even that registration reads the clock and adds the timeout on every call.
On the real clock, while calls keep arriving, the timer *ticks* (every
:data:`TICK` seconds) and calls register without any clock read: each
distinct timeout value has a :class:`Slot` whose ``open`` dict collects the
calls started since the last tick. At each tick the timer closes the open
dict with the deadline ``tick time + timeout``: every call in it started no
later than that tick, so none fires early, and each fires at most one tick
late. When a tick finds nothing to close the timer stops ticking; the next
call then registers exactly (as above) and starts it again. Fake clocks
always register exactly (tests advance them in jumps).

Granularity: a timeout fires no earlier than its deadline and, as long as
the event loop is not blocked, at most one tick (5 ms) plus one loop
iteration after it (stated as at most 10 ms late in the docs and tests). A
loop blocked by synchronous code delays this timer exactly as it delays
``asyncio.timeout``.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import anyio
import anyio.abc

from seawall._clock import Clock, MonotonicClock

__all__ = ["GRANULARITY", "TICK", "DeadlineTimer", "Slot"]

#: The documented upper bound on how late a timeout fires on a responsive loop.
GRANULARITY = 0.010

#: Seconds between the ticks that close the slots' open dicts (half the granularity).
TICK = GRANULARITY / 2


class Slot:
    """The calls of one timeout value registered without a clock read.

    A call stores its scope in ``open`` (``slot.open[scope] = None``) and
    deletes it from that same dict when it finishes; the timer replaces
    ``open`` at each tick and keeps the closed dicts, each with its
    deadline, in ``closed`` (oldest first). ``open`` is ``None`` while the
    timer does not tick, so a call needs one test to know which way to
    register.
    """

    __slots__ = ("closed", "open", "released", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.open: dict[Any, None] | None = None
        self.closed: deque[tuple[float, dict[Any, None]]] = deque()
        #: No kept plan uses this timeout any more: the timer drops the slot once its calls are done.
        self.released = False

    @property
    def done(self) -> bool:
        """Whether no call is registered in it."""
        return not self.open and not self.closed


#: Beyond this many distinct timeout values, empty groups are dropped when the timer runs.
_MAX_IDLE_GROUPS = 64


class DeadlineTimer:
    """Cancel registered cancel scopes once their deadline has passed.

    Args:
        clock: The clock deadlines are read from and slept on.

    The coordinator uses it inline. While the timer ticks, a kept key's call::

        group = slot.open              # None when not ticking: register exactly
        group[scope] = None
        ...
        del group[scope]               # KeyError if the timer expired it

    and otherwise (exactly, then ``start_ticking()`` / ``wake_if_idle()``)::

        group = timer.groups.get(timeout) or timer.group(timeout)
        group[scope] = clock.now() + timeout
        ...
        group.pop(scope, None)         # the timer removes expired scopes itself
    """

    __slots__ = (
        "_clock",
        "_keep_ticking",
        "_min_timeout",
        "_real_clock",
        "_sleep_scope",
        "expired",
        "groups",
        "idle",
        "running",
        "slots",
        "ticking",
    )

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
        #: timeout value -> its Slot (registration without a clock read, real clock only).
        self.slots: dict[float, Slot] = {}
        #: Whether the timer is ticking: only then may a call register in a Slot.
        self.ticking = False
        self._keep_ticking = False
        #: Whether the timer sleeps with no deadline at all (nothing registered).
        self.idle = False
        self._real_clock = isinstance(clock, MonotonicClock)

    def slot(self, timeout: float) -> Slot:
        """The :class:`Slot` of ``timeout``, kept until :meth:`release` (hold it per configured key)."""
        found = self.slots.get(timeout)
        if found is None:
            found = self.slots[timeout] = Slot(timeout)
            if self.ticking:
                found.open = {}
        found.released = False
        return found

    def release(self, timeout: float) -> None:
        """No kept plan uses ``timeout`` any more: drop its slot once the calls in it are done.

        Without this, every timeout value ever configured would cost each tick
        a look. Calls of a plan fetched earlier may still hold the slot: until
        it is dropped they register in it as before; after that its ``open``
        stays ``None``, which sends them to the exact registration.
        """
        slot = self.slots.get(timeout)
        if slot is not None:
            slot.released = True
            if slot.done:
                self._drop(slot)

    def _drop(self, slot: Slot) -> None:
        del self.slots[slot.timeout]
        slot.open = None

    def start_ticking(self) -> None:
        """Tick from now on (a call just registered exactly): later calls can use the slots.

        Only while running, and only on the real clock. The timer keeps
        ticking for at least one tick, then for as long as ticks find calls.
        """
        if self.running and self._real_clock and not self.ticking:
            self.ticking = True
            self._keep_ticking = True
            for slot in self.slots.values():
                slot.open = {}
            self._poke()

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
        exact = sum(len(group) for group in self.groups.values())
        return exact + sum(
            len(slot.open or ()) + sum(len(bucket) for _, bucket in slot.closed) for slot in self.slots.values()
        )

    def _poke(self) -> None:
        if self._sleep_scope is not None:
            self._sleep_scope.cancel()

    def expire(self) -> float:
        """Cancel every scope whose deadline has passed; return the next wake-up time."""
        now = self._clock.now()
        wake = math.inf
        waiting = False  # whether a registered call is still running
        for group in self.groups.values():
            while group:
                scope = next(iter(group))
                deadline = group[scope]
                if deadline > now:
                    wake = min(wake, deadline)
                    waiting = True
                    break
                del group[scope]
                scope.cancel()
                self.expired += 1
        if len(self.groups) > _MAX_IDLE_GROUPS:
            # Per-call timeouts of many different values: forget the idle ones.
            for timeout in [t for t, group in self.groups.items() if not group]:
                del self.groups[timeout]
            self._min_timeout = min(self.groups, default=math.inf)
        if waiting:
            # A call may register meanwhile without waking the timer (see the module doc).
            wake = min(wake, now + self._min_timeout)
        if self.slots:
            wake = self._expire_slots(now, wake)
        # Nothing to wait for: sleep until the next exact registration wakes it.
        self.idle = math.isinf(wake)
        return wake

    def wake_if_idle(self) -> None:
        """A call just registered exactly: wake the timer if it sleeps with nothing to wait for."""
        if self.idle:
            self.idle = False
            self._poke()

    def _expire_slots(self, now: float, wake: float) -> float:
        """Close the slots' open dicts (deadline ``now + timeout``) and cancel the expired ones."""
        ticking = self._keep_ticking
        self._keep_ticking = False
        finished: list[Slot] = []  # released slots with no call left: dropped after the loop
        for slot in self.slots.values():
            if slot.open:
                # Every call in it started no later than now: never early.
                slot.closed.append((now + slot.timeout, slot.open))
                slot.open = {}
                ticking = True
            closed = slot.closed
            while closed:
                deadline, bucket = closed[0]
                if not bucket:
                    closed.popleft()  # all its calls finished
                    continue
                if deadline > now:
                    wake = min(wake, deadline)
                    break
                closed.popleft()
                for scope in list(bucket):
                    scope.cancel()
                self.expired += len(bucket)
                bucket.clear()  # the calls' own deletes become no-ops
            if slot.released and slot.done:
                finished.append(slot)
        for slot in finished:
            self._drop(slot)
        self.ticking = ticking and self.running
        if self.ticking:
            wake = min(wake, now + TICK)
        else:
            for slot in self.slots.values():
                slot.open = None  # (all empty: a call registered since would have kept the ticks)
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
                        # (expire() read the clock a moment ago: the wake-up may be due already)
                        await self._clock.sleep(max(wake - self._clock.now(), 0.0))
                self._sleep_scope = None
        finally:
            self.running = False
            self.ticking = False
            self._sleep_scope = None
            self._hand_over()

    def _hand_over(self) -> None:
        """Give the calls still registered their own deadline: this timer is stopping.

        A call that outlives its infrastructure (it runs in another task group)
        must still time out. On the monotonic clock, deadlines are in the event
        loop's time already, so each scope simply gets its deadline back.
        """
        real_clock = self._real_clock
        for group in self.groups.values():
            for scope, deadline in group.items():
                if real_clock:
                    scope.deadline = deadline
            group.clear()
        if self.slots:
            # Only the real clock fills slots. An open dict's calls started by now.
            now = self._clock.now()
            for slot in self.slots.values():
                for scope in slot.open or ():
                    scope.deadline = now + slot.timeout
                slot.open = None
                for deadline, bucket in slot.closed:
                    for scope in bucket:
                        scope.deadline = deadline
                slot.closed.clear()

    def __repr__(self) -> str:
        return f"DeadlineTimer(running={self.running}, pending={self.pending}, expired={self.expired})"
