"""RateLimiter: a rule of ``limit`` hits per ``window`` seconds, kept per key.

Two ways through a limiter:

* :meth:`RateLimiter.hit` decides at once: it admits, or raises
  :class:`~seawall.RateLimitExceeded` with the exact ``retry_after`` and
  consumes nothing. With the in-memory backend it never suspends: the
  decision is one dict lookup and a few float operations on the caller's
  clock (see ``backends/_limiter_memory.py``).
* :meth:`RateLimiter.acquire` waits its turn. With buckets in this process
  the waiting is seawall's own engine (:class:`_Line`), on anyio primitives
  so it runs on asyncio and trio alike: FIFO per key, a waiter whose turn
  came keeps it, one timer for all the limiter's waiters (one of the waiting
  tasks sleeps on the limiter's clock for everyone), and a cancelled waiter
  takes nothing. It decides with the same bucket and the same ``take`` that
  :meth:`~RateLimiter.hit` uses. With a remote backend the waiters of a key
  wait in a FIFO lock and retry after the ``retry_after`` the backend
  reports (:class:`_RetryQueue`).

Both have a synchronous non-waiting form for buckets in this process
(:meth:`~RateLimiter.hit_nowait`, :meth:`~RateLimiter.acquire_nowait`), which
raise :class:`anyio.WouldBlock` with a remote backend.

Time comes from the limiter's clock: an injected one (a
:class:`~seawall.FakeClock` in tests), the backend's, or the running loop's
as :func:`seawall._clock.current_clock` finds it when the limiter is built.

The status returned by :meth:`~RateLimiter.hit` is a frozen dataclass whose
fields are computed on first access: building eight fields of a frozen
dataclass costs about as much as the whole decision, and most callers never
look at them.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from functools import partial
from heapq import heappop, heappush
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NoReturn, Protocol, cast

import anyio
from anyio import WouldBlock

from seawall._checks import number
from seawall._clock import Clock, current_clock
from seawall._errors import ConfigurationError, ConfigurationTypeError, RateLimitExceeded
from seawall._logging import logger
from seawall._telemetry import LIMITER_REQUEST_ALLOWED, LIMITER_REQUEST_DENIED
from seawall.backends._limiter_memory import GcraTable, MemoryRateLimitBackend, admission_slack, take_all
from seawall.backends._limiter_protocol import (
    MIN_COST_SHARE,
    AcquireHooks,
    Algorithm,
    BucketTable,
    LocalRateLimitBackend,
    MultiRuleBackend,
    RateLimitBackend,
    RateLimitDecision,
    RateLimitRule,
    check_rule,
)

__all__ = [
    "Admission",
    "LimiterLike",
    "MultiRateLimiter",
    "RateLimitBucket",
    "RateLimitStatus",
    "RateLimiter",
    "carry_over",
]


class _Lazy:
    """Holds what a lazily built status is computed from, until first read."""

    __slots__ = ("_source",)


_new: Final = object.__new__
_set_source: Final = _Lazy._source.__set__  # type: ignore[attr-defined]
_get_source: Final = _Lazy._source.__get__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class RateLimitStatus(_Lazy):
    """A snapshot of one bucket.

    Attributes:
        key: The bucket's key.
        allowed: Whether a hit of cost 1 would be admitted at the time of the snapshot.
        current_count: The bucket's level (GCRA: may be fractional while it drains)
            or the count of the current window (fixed window).
        limit: The rule's limit.
        window: The rule's window, in seconds.
        remaining: How many hits of cost 1 would be admitted at once.
        retry_after: Seconds until a hit of cost 1 would be admitted (``0.0`` if now).
        reset_after: Seconds until the bucket is empty again (``0.0`` if it is).
    """

    key: str
    allowed: bool
    current_count: float
    limit: float
    window: float
    remaining: int
    retry_after: float
    reset_after: float

    if not TYPE_CHECKING:  # pragma: no branch - hidden from type checkers: ``status.typo`` stays an error

        def __getattr__(self, name: str) -> Any:
            # Only reached while the fields are unset: a status from ``hit()``
            # carries ``(table, key, state, now)`` and fills them all on first read.
            try:
                table, key, state, now = _get_source(self)
            except AttributeError:
                raise AttributeError(name) from None
            count, remaining, next_after, reset_after = table.describe(state, now)
            rule = table.rule
            set_key, set_allowed, set_count, set_limit, set_window, set_remaining, set_retry, set_reset = _SETTERS
            set_key(self, key)
            set_allowed(self, next_after == 0.0)
            set_count(self, count)
            set_limit(self, rule.limit)
            set_window(self, rule.window)
            set_remaining(self, remaining)
            set_retry(self, next_after)
            set_reset(self, reset_after)
            return object.__getattribute__(self, name)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict."""
        return {name: getattr(self, name) for name in _STATUS_FIELDS}


_STATUS_FIELDS: Final = tuple(field.name for field in fields(RateLimitStatus))
# The slot descriptors' setters, in field order: the frozen dataclass refuses
# plain assignment, and these are the cheapest way around it.
_SETTERS: Final = tuple(getattr(RateLimitStatus, name).__set__ for name in _STATUS_FIELDS)


#: The default cost. Hot paths skip validation for exactly this object (small
#: ints are cached), so ``cost=True`` or ``cost=1.0`` still gets checked.
_ONE: Final = 1

#: The least ``retry_after`` of a denial (seconds): a denied hit is never told "now".
_MIN_RETRY_AFTER: Final = 1e-6


def _bad_key(key: object) -> str:
    if isinstance(key, str):
        return key
    raise ConfigurationTypeError(f"key must be a str, got {key!r}", path="key")


class _Waiter:
    """One task waiting in :meth:`RateLimiter.acquire`, in the line of its key."""

    __slots__ = ("cost", "event", "gone", "turn")

    def __init__(self, cost: float) -> None:
        self.cost = cost
        # Set to wake the task: its turn has come, or it is to keep the timer.
        self.event = anyio.Event()
        # Its cost fits now (it is the head of its key): it takes on waking.
        self.turn = False
        # It left the line (admitted, or cancelled having taken nothing); skipped when met.
        self.gone = False


class _Queue:
    """The waiters of one key of a limiter whose buckets are in this process, in arrival order."""

    __slots__ = ("key", "line", "queued", "ticket", "users", "waiters")

    def __init__(self, line: _Line, key: str) -> None:
        self.line = line
        self.key = key
        # Live waiters, and the gone ones behind the head that were not met yet.
        self.waiters: deque[_Waiter] = deque()
        self.users = 0  # live waiters
        self.queued = 0.0  # their costs: what a hit() on the key must wait behind
        self.ticket = -1  # the current entry of the head on the line's timer (-1: none)

    async def acquire(self, cost: float) -> None:
        await self.line.wait(self, cost)

    def __repr__(self) -> str:
        return f"<waiting line key={self.key!r} waiters={self.users} queued={self.queued!r}>"


class _Line:
    """The waiting engine of a limiter whose buckets are in this process (a :class:`BucketTable`).

    * FIFO per key: only the head of a key's line may take; newcomers queue
      behind it (and ``hit()`` is denied) while the line exists, so a head
      whose turn came keeps it until it runs.
    * One timer for all waiters of the limiter: a heap of the times at which
      each key's head fits, and at any moment exactly one waiting task, the
      *keeper*, sleeps on the limiter's clock until the earliest of them and
      gives the heads that are due their turn. Every other waiter waits on
      its own :class:`anyio.Event`. The timer lives in a waiter's own task -
      no background task, so nothing outlives the waiters and the limiter
      needs no lifecycle - and passes to another waiter when the keeper leaves.
    * A head takes from the bucket itself, in its own task, only once it
      runs: a waiter cancelled before that has taken nothing, and its turn
      passes to the next head.

    Per admitted waiter this is O(1) plus O(log keys) on the timer: a
    deque pop, an event, a timer entry. Waiters cancelled mid-line are only
    marked (and their cost no longer queued), and dropped when they reach
    the head, so mass cancellation stays linear.
    """

    __slots__ = (
        "_clock",
        "_due",
        "_keeper",
        "_keeper_scope",
        "_keeper_until",
        "_slack",
        "_table",
        "_tickets",
        "_waiting",
    )

    def __init__(self, table: BucketTable, clock: Clock, waiting: dict[str, _Queue | _RetryQueue]) -> None:
        self._table = table
        self._clock = clock
        self._waiting = waiting
        # A wait this short is no wait: GCRA admits within this slack of its
        # window (see tolerance()), so a head whose retry time rounds to a few
        # ulps fits now. (Sleeping them on a FakeClock would wait for an advance.)
        self._slack = admission_slack(table)
        # The timer: ``(when the head fits, ticket, line)``; an entry whose
        # ticket is no longer its line's is stale, dropped when met.
        self._due: list[tuple[float, int, _Queue]] = []
        self._tickets = itertools.count()
        self._keeper: _Waiter | None = None
        self._keeper_scope: anyio.CancelScope | None = None  # the keeper's sleep, while it sleeps
        self._keeper_until = math.inf  # when that sleep ends

    async def wait(self, queue: _Queue, cost: float) -> None:
        """Queue up behind the key's waiters; return once ``cost`` is taken from the bucket."""
        waiter = _Waiter(cost)
        queue.waiters.append(waiter)
        queue.users += 1
        queue.queued += cost
        if queue.users == 1:  # a new line: this waiter is its head
            self._rouse(queue, self._clock.now())
        try:
            await self._park(queue, waiter)
        finally:
            self._leave(queue, waiter)

    async def _park(self, queue: _Queue, waiter: _Waiter) -> None:
        table, clock, key = self._table, self._clock, queue.key
        while True:
            if waiter.turn:
                waiter.turn = False
                now = clock.now()
                if table.take(key, waiter.cost, now) is not None:
                    return
                # Woken a hair early (a loop timer may fire up to its resolution
                # early): wait the rest on the timer, never at once again.
                self._arm(queue, now + max(table.retry_after(key, waiter.cost, now), _MIN_RETRY_AFTER))
                continue
            if self._keeper is None and self._next_due() is not None:
                self._keeper = waiter
            if self._keeper is waiter:
                await self._keep_time(waiter)
            else:
                await waiter.event.wait()
                waiter.event = anyio.Event()

    async def _keep_time(self, waiter: _Waiter) -> None:
        """Be the timer until this waiter's turn: sleep to the earliest due head, give the due heads their turn."""
        clock = self._clock
        while self._keeper is waiter and not waiter.turn:
            due = self._next_due()
            if due is None:
                self._keeper = None  # nothing to time: every head has its turn
                return
            delay = due - clock.now()
            if delay > 0.0:
                # In a scope of its own, so that an earlier due (another key)
                # or this waiter's own turn (a reset) can cut the sleep short.
                scope = self._keeper_scope = anyio.CancelScope()
                self._keeper_until = due
                try:
                    with scope:
                        await clock.sleep(delay)
                finally:
                    self._keeper_scope = None
                    self._keeper_until = math.inf
            self._fire(clock.now())

    def _next_due(self) -> float | None:
        due = self._due
        while due:
            when, ticket, queue = due[0]
            if queue.ticket == ticket:
                return when
            heappop(due)
        return None

    def _fire(self, now: float) -> None:
        """Give their turn to the heads due by ``now`` (or put them back on the timer)."""
        due = self._due
        while due and due[0][0] <= now:
            _, ticket, queue = heappop(due)
            if queue.ticket == ticket:
                queue.ticket = -1
                self._rouse(queue, now)

    def _rouse(self, queue: _Queue, now: float) -> None:
        """The head of ``queue`` gets its turn if its cost fits at ``now``, else a place on the timer."""
        head = queue.waiters[0]
        wait = self._table.retry_after(queue.key, head.cost, now)
        if wait <= self._slack:
            head.turn = True
            self._wake(head)
        else:
            self._arm(queue, now + wait)

    def _arm(self, queue: _Queue, due: float) -> None:
        ticket = queue.ticket = next(self._tickets)
        heappush(self._due, (due, ticket, queue))
        if self._keeper is None:
            self._wake(queue.waiters[0])  # nobody keeps time: the head does
        elif due < self._keeper_until and self._keeper_scope is not None:
            self._keeper_scope.cancel()  # the keeper would sleep past it: it re-arms

    def _wake(self, waiter: _Waiter) -> None:
        if waiter is self._keeper:
            if self._keeper_scope is not None:
                self._keeper_scope.cancel()
        else:
            waiter.event.set()

    def _leave(self, queue: _Queue, waiter: _Waiter) -> None:
        """``waiter`` is done (admitted, or cancelled having taken nothing): the line moves up."""
        waiter.gone = True
        queue.users -= 1
        queue.queued -= waiter.cost
        waiters = queue.waiters
        if not queue.users:
            queue.ticket = -1
            waiters.clear()
            if self._waiting.get(queue.key) is queue:
                del self._waiting[queue.key]
        elif waiters[0] is waiter:
            while waiters[0].gone:
                waiters.popleft()
            queue.ticket = -1
            self._rouse(queue, self._clock.now())
        if self._keeper is waiter:
            # Hand the timer to the head due first (it would wake for it anyway).
            self._keeper = None
            if self._next_due() is not None:
                self._wake(self._due[0][2].waiters[0])

    def poke(self, queue: _Queue) -> None:
        """The bucket of ``queue`` was reset: its head may fit now."""
        if not queue.waiters[0].turn:
            queue.ticket = -1
            self._rouse(queue, self._clock.now())

    def __repr__(self) -> str:
        due = self._next_due()
        timer = "idle" if due is None else f"next at {due!r}"
        return f"<waiting engine keys={len(self._waiting)} timer={timer}>"


class _RetryQueue:
    """FIFO waiting on a remote backend: one waiter at a time asks, sleeping ``retry_after`` between tries.

    The bucket is only known by asking the store (a round trip), so the head
    of each key sleeps until the retry time the store reported: a timer per
    waiting key, where the in-process :class:`_Line` has one per limiter.
    """

    __slots__ = ("_key", "_limiter", "_lock", "_sleep", "_wakes", "queued", "users")

    def __init__(self, limiter: RateLimiter, key: str) -> None:
        self._limiter = limiter
        self._key = key
        self._lock = anyio.Lock()
        # The head waiter's sleep until its retry time, while it sleeps.
        self._sleep: anyio.CancelScope | None = None
        # How many times wake() was called: a reset that lands while the head
        # waiter is still asking a remote backend must not be slept through.
        self._wakes = 0
        self.users = 0
        self.queued = 0.0

    async def acquire(self, cost: float) -> None:
        limiter = self._limiter
        self.users += 1
        self.queued += cost
        try:
            async with self._lock:
                while True:
                    wakes = self._wakes
                    delay = await limiter._try_take(self._key, cost)
                    if delay is None:
                        return
                    if self._wakes != wakes:
                        continue  # the bucket was reset while we asked: ask again now
                    # A scope of its own, so that wake() can cut the sleep short
                    # (on the limiter's clock, which may be a fake one).
                    sleep = self._sleep = anyio.CancelScope()
                    try:
                        with sleep:
                            await limiter.clock.sleep(delay)
                    finally:
                        self._sleep = None
        finally:
            self.queued -= cost
            self.users -= 1
            if not self.users and limiter._waiting.get(self._key) is self:
                del limiter._waiting[self._key]

    def wake(self) -> None:
        """Make the head waiter ask again now (its bucket was reset)."""
        self._wakes += 1
        if self._sleep is not None:
            self._sleep.cancel()

    def __repr__(self) -> str:
        return f"<retry queue key={self._key!r} waiters={self.users} queued={self.queued!r}>"


class LimiterLike(Protocol):
    """What the coordinator needs of a rate limiter: a :class:`RateLimiter`, or an adapted third-party one.

    ``resident_buckets`` is ``None`` for a limiter that only decides by
    awaiting (a remote backend, an adapter): the coordinator then awaits
    :meth:`hit` instead of calling a synchronous ``acquire_nowait``.
    """

    @property
    def limit(self) -> float: ...

    @property
    def window(self) -> float: ...

    @property
    def name(self) -> str | None: ...

    @property
    def resident_buckets(self) -> int | None: ...

    async def hit(self, key: str = ..., cost: float = ...) -> RateLimitStatus: ...

    async def acquire(self, key: str = ..., cost: float = ...) -> None: ...

    async def status(self, key: str = ...) -> RateLimitStatus: ...

    async def reset(self, key: str = ...) -> None: ...


class Admission:
    """What ``async with limiter(key, cost=..., wait=...)`` enters: ``acquire()`` or ``hit()`` of any limiter."""

    __slots__ = ("_cost", "_key", "_limiter", "_wait")

    def __init__(self, limiter: LimiterLike, key: str, cost: float, wait: bool) -> None:
        self._limiter = limiter
        self._key = key
        self._cost = cost
        self._wait = wait

    async def __aenter__(self) -> None:
        if self._wait:
            await self._limiter.acquire(self._key, self._cost)
        else:
            await self._limiter.hit(self._key, self._cost)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


class RateLimiter:
    """At most ``limit`` hits per ``window`` seconds, per key.

    Args:
        limit: The capacity of a bucket: hits (units of cost) per window.
        window: The window in seconds (a ``timedelta`` is accepted).
        algorithm: ``"gcra"`` (default): a leaky bucket of capacity ``limit``
            draining at ``limit / window`` per second, so a burst of ``limit``
            passes at once and then hits pass at the drain rate.
            ``"fixed_window"``: at most ``limit`` hits in each window aligned
            to a multiple of ``window`` on the limiter's clock.
        backend: Where buckets live; a new :class:`~seawall.backends.MemoryRateLimitBackend`
            when ``None``.
        name: A name for logs and telemetry; also namespaces the buckets in a shared backend.
        clock: The clock for decisions and waiting (tests inject a
            :class:`~seawall.FakeClock`); by default the backend's clock, else
            the running event loop's, looked up when the limiter is built
            (``time.monotonic`` on asyncio and outside any loop, the run's own
            clock under trio: see ``seawall._clock``).

    Raises:
        ConfigurationTypeError: ``limit`` or ``window`` is not a number, ``name`` not a str.
        ConfigurationError: ``limit`` or ``window`` is out of the bounds every
            backend evaluates exactly (``limit`` up to ``1e12``, ``window`` from
            ``0.001`` to ``1e9`` seconds), or ``algorithm`` is unknown.
    """

    __slots__ = (
        "_hooks",
        "_line",
        "_now",
        "_rule",
        "_table",
        "_take",
        "_waiting",
        "algorithm",
        "backend",
        "clock",
        "limit",
        "name",
        "window",
    )

    def __init__(
        self,
        limit: float,
        window: float | timedelta,
        *,
        algorithm: Algorithm = "gcra",
        backend: RateLimitBackend | None = None,
        name: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        if isinstance(window, timedelta):
            window = window.total_seconds()
        if name is not None and not isinstance(name, str):
            raise ConfigurationTypeError(f"name: must be a str or None, got {name!r}", path="name")
        # Every backend evaluates exactly the rules check_rule() accepts (see its bounds).
        check_rule(RateLimitRule(limit, window, algorithm, name))
        self.limit: Final = float(limit)
        self.window: Final = float(window)
        self.algorithm: Final = algorithm
        self.name: Final = name
        if clock is None:
            # The backend's clock, else the running loop's (asked once: see seawall._clock).
            clock = cast("Clock", getattr(backend, "clock", None) or current_clock())
        elif not isinstance(clock, Clock):
            raise TypeError(f"clock must be a seawall Clock (now() and sleep()), got {clock!r}")
        self.clock: Final = clock
        self._now = clock.now  # bound once: the hot path calls it on every hit
        if backend is None:
            backend = MemoryRateLimitBackend(clock=clock)
        elif not isinstance(backend, RateLimitBackend):
            raise TypeError(f"backend must implement RateLimitBackend (take, peek, reset), got {backend!r}")
        self.backend: Final = backend
        self._rule = RateLimitRule(self.limit, self.window, algorithm, name)
        # The in-process fast path: a synchronous table, decided on our clock.
        self._table = backend.table(self._rule) if isinstance(backend, LocalRateLimitBackend) else None
        self._take = None if self._table is None else self._table.take
        # Keys with tasks in acquire(): their line, dropped with the last waiter.
        self._waiting: dict[str, _Queue | _RetryQueue] = {}
        # The waiting engine of in-process buckets (remote ones wait in a _RetryQueue per key).
        self._line = None if self._table is None else _Line(self._table, clock, self._waiting)
        # What every bucket handle's fused acquire borrows (built once: a plan per call makes a handle).
        self._hooks = AcquireHooks(self._now, self._waiting, self._refuse, LIMITER_REQUEST_ALLOWED, self._emit_allowed)

    # -- deciding ---------------------------------------------------------

    async def hit(self, key: str = "default", cost: float = 1) -> RateLimitStatus:
        """Admit one hit of ``cost`` on bucket ``key`` now, or raise; never waits.

        Args:
            key: The bucket.
            cost: What the hit takes from the bucket (a finite positive number up to ``limit``).

        Returns:
            The bucket's status after the hit (its fields are computed when first read).

        Raises:
            RateLimitExceeded: the hit does not fit now (nothing was taken);
                ``retry_after`` is when it would. Tasks waiting in
                :meth:`acquire` on the same key go first.
            TypeError: ``key`` is not a str or ``cost`` not a number.
            ValueError: ``cost`` is out of range: below ``limit * 2**-40`` or above
                ``limit`` (a :class:`~seawall.ConfigurationError`).
        """
        if self._take is not None:
            return self.hit_nowait(key, cost)  # buckets in this process: decided without awaiting
        if type(key) is not str:
            key = _bad_key(key)
        if cost is not _ONE:  # not `!= 1`: True == 1, and a bool is no cost
            cost = self._check_cost(cost)
        return await self._hit_remote(key, cost)

    def hit_nowait(self, key: str = "default", cost: float = 1) -> RateLimitStatus:
        """:meth:`hit`, synchronously: admit one hit of ``cost`` on bucket ``key`` now, or raise.

        The same decision as ``await limiter.hit(key, cost)`` - same bucket,
        same status, same :class:`~seawall.RateLimitExceeded`, same telemetry
        - for callers that cannot or would rather not await (a synchronous
        callback, a hot path saving a coroutine frame). It can decide only
        when the buckets are in this process (the in-memory backend); with a
        remote backend (Redis) the decision is a round trip, and it raises
        :class:`anyio.WouldBlock` having done nothing: ``await hit()`` then.
        Tasks waiting in :meth:`acquire` on the key go first, exactly as for
        :meth:`hit`: a hit that would pass them is denied, not queued.

        Args:
            key: The bucket.
            cost: What the hit takes from the bucket (a finite positive number up to ``limit``).

        Returns:
            The bucket's status after the hit (its fields are computed when first read).

        Raises:
            anyio.WouldBlock: The backend is remote; nothing was taken or asked.
            RateLimitExceeded: The hit does not fit now (nothing was taken).
            TypeError: ``key`` is not a str or ``cost`` not a number.
            ValueError: ``cost`` is out of range: below ``limit * 2**-40`` or above
                ``limit`` (a :class:`~seawall.ConfigurationError`).
        """
        if type(key) is not str:
            key = _bad_key(key)
        if cost is not _ONE:  # not `!= 1`: True == 1, and a bool is no cost
            cost = self._check_cost(cost)
        take = self._take
        if take is None:
            raise WouldBlock
        now = self._now()
        if self._waiting and key in self._waiting:
            self._deny_queued(key, cost, now)
        state = take(key, cost, now)
        if state is None:
            self._deny(key, cost, cast("BucketTable", self._table).retry_after(key, cost, now))
        if LIMITER_REQUEST_ALLOWED.handlers:
            self._emit_allowed(key, cost)
        status = _new(RateLimitStatus)
        _set_source(status, (self._table, key, state, now))
        return status

    def acquire_nowait(self, key: str = "default", cost: float = 1) -> None:
        """:meth:`acquire` without the waiting: take ``cost`` from bucket ``key`` now, or raise.

        The pair of :meth:`acquire` as anyio's ``acquire_nowait`` is of
        ``acquire``: where :meth:`acquire` would wait (the hit does not fit,
        or tasks already wait on the key), this raises instead. It decides
        exactly as :meth:`hit_nowait` and emits the same telemetry, but
        returns nothing, which spares building a status: the form for hot
        paths that only need "admitted or not". Like :meth:`hit_nowait` it
        needs the buckets in this process.

        Args:
            key: The bucket.
            cost: What the hit takes from the bucket (a finite positive number up to ``limit``).

        Raises:
            anyio.WouldBlock: The backend is remote; nothing was taken or asked.
            RateLimitExceeded: The hit does not fit now (nothing was taken);
                ``retry_after`` is when it would.
            TypeError: ``key`` is not a str or ``cost`` not a number.
            ValueError: ``cost`` is out of range: below ``limit * 2**-40`` or above
                ``limit`` (a :class:`~seawall.ConfigurationError`).
        """
        # hit_nowait() without the status (building it costs as much as the decision).
        if type(key) is not str:
            key = _bad_key(key)
        if cost is not _ONE:  # not `!= 1`: True == 1, and a bool is no cost
            cost = self._check_cost(cost)
        take = self._take
        if take is None:
            raise WouldBlock
        now = self._now()
        if self._waiting and key in self._waiting:
            self._deny_queued(key, cost, now)
        if take(key, cost, now) is None:
            self._deny(key, cost, cast("BucketTable", self._table).retry_after(key, cost, now))
        if LIMITER_REQUEST_ALLOWED.handlers:
            self._emit_allowed(key, cost)

    def bucket(self, key: str = "default", cost: float = 1) -> RateLimitBucket:
        """A handle on bucket ``key`` whose :meth:`~RateLimitBucket.acquire_nowait` takes ``cost``.

        ``key`` and ``cost`` are checked here, once, so the handle's
        :meth:`~RateLimitBucket.acquire_nowait` skips the argument checks of
        :meth:`acquire_nowait` on every call: the form for a hot path that
        always hits the same bucket (the coordinator keeps one per protection
        key). It decides exactly as ``limiter.acquire_nowait(key, cost)``.

        Raises:
            TypeError: ``key`` is not a str or ``cost`` not a number.
            ValueError: ``cost`` is out of range: below ``limit * 2**-40`` or above
                ``limit`` (a :class:`~seawall.ConfigurationError`).
        """
        if type(key) is not str:
            key = _bad_key(key)
        if cost is not _ONE:  # not `!= 1`: True == 1, and a bool is no cost
            cost = self._check_cost(cost)
        return RateLimitBucket(self, key, cost)

    async def _hit_remote(self, key: str, cost: float) -> RateLimitStatus:
        queue = self._waiting.get(key)
        if queue is not None:
            # Waiters go first; a remote bucket's retry time is only known by asking.
            decision = await self.backend.peek(key, self._rule)
            limit_wait = (queue.queued + cost) / self.limit * self.window
            self._deny(key, cost, max(decision.next_after, limit_wait))
        decision = await self.backend.take(key, cost, self._rule)
        if not decision.admitted:
            self._deny(key, cost, decision.retry_after)
        if LIMITER_REQUEST_ALLOWED.handlers:
            self._emit_allowed(key, cost)
        # Filled through the slots' setters: the frozen dataclass's __init__ (object.__setattr__ per field)
        # is 4% of a sequential Redis decision's client instructions.
        status = _new(RateLimitStatus)
        set_key, set_allowed, set_count, set_limit, set_window, set_remaining, set_retry, set_reset = _SETTERS
        next_after = decision.next_after
        set_key(status, key)
        set_allowed(status, next_after == 0.0)
        set_count(status, decision.current_count)
        set_limit(status, self.limit)
        set_window(status, self.window)
        set_remaining(status, decision.remaining)
        set_retry(status, next_after)
        set_reset(status, decision.reset_after)
        return status

    async def _try_take(self, key: str, cost: float) -> float | None:
        """Ask the (remote) backend to take ``cost``; return ``None``, else the seconds to wait."""
        decision = await self.backend.take(key, cost, self._rule)
        # A remote store that denies with no retry time must not make us spin.
        return None if decision.admitted else max(decision.retry_after, 1e-3)

    async def acquire(self, key: str = "default", cost: float = 1) -> None:
        """Wait until a hit of ``cost`` on bucket ``key`` is admitted, then take it.

        Waiters on a key are served strictly in arrival order, whatever
        their cost (a smaller cost never passes a larger one, so none
        starves), and a waiter whose turn has come keeps it against
        newcomers. Cancelling a waiter (anyio cancel scope,
        ``asyncio.timeout``, ``task.cancel()``) takes nothing from the
        bucket and lets the waiters behind it move up.

        A checkpoint only when it waits: a hit that fits at once, with
        nobody waiting on the key, is taken without suspending.

        Raises:
            TypeError: ``key`` is not a str or ``cost`` not a number.
            ValueError: ``cost`` is out of range: below ``limit * 2**-40`` or above
                ``limit`` (a :class:`~seawall.ConfigurationError`).
        """
        if type(key) is not str:
            key = _bad_key(key)
        if cost is not _ONE:  # not `!= 1`: True == 1, and a bool is no cost
            cost = self._check_cost(cost)
        waiting = self._waiting.get(key)
        if waiting is None:
            take = self._take
            if take is not None and take(key, cost, self.clock.now()) is not None:
                if LIMITER_REQUEST_ALLOWED.handlers:
                    self._emit_allowed(key, cost)
                return
            line = self._line
            waiting = _RetryQueue(self, key) if line is None else _Queue(line, key)
            self._waiting[key] = waiting
        # The line drops itself from _waiting when its last waiter leaves.
        await waiting.acquire(cost)
        if LIMITER_REQUEST_ALLOWED.handlers:
            self._emit_allowed(key, cost)

    def __call__(self, key: str = "default", *, cost: float = 1, wait: bool = True) -> Admission:
        """``async with limiter(key, cost=..., wait=...):`` waits (``acquire``) or denies (``hit``)."""
        return Admission(self, key, cost, wait)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    # -- inspecting -------------------------------------------------------

    async def status(self, key: str = "default") -> RateLimitStatus:
        """The status of bucket ``key`` now; an unknown key is an empty bucket."""
        if type(key) is not str:
            key = _bad_key(key)
        table = self._table
        if table is None:
            decision = await self.backend.peek(key, self._rule)
            count, remaining, next_after, reset_after = (
                decision.current_count,
                decision.remaining,
                decision.next_after,
                decision.reset_after,
            )
        else:
            now = self.clock.now()
            count, remaining, next_after, reset_after = table.describe(table.peek(key, now), now)
        return RateLimitStatus(
            key, next_after == 0.0, count, self.limit, self.window, remaining, next_after, reset_after
        )

    async def reset(self, key: str = "default") -> None:
        """Empty bucket ``key``. Tasks of this process waiting on it are woken if they now fit."""
        if type(key) is not str:
            key = _bad_key(key)
        await self.backend.reset(key, self._rule)
        waiting = self._waiting.get(key)
        if isinstance(waiting, _Queue):
            waiting.line.poke(waiting)
        elif waiting is not None:
            waiting.wake()

    def carry_over(self, old: RateLimiter, prefix: str) -> int:
        """Fill this limiter's buckets named ``prefix...`` from ``old``'s, scaled to this rule.

        For a rule that changes (a reconfigured key): a bucket that was half
        full under the old rule is half full under the new one, so a client
        that spent its budget does not get a fresh one from a reconfiguration.
        Only buckets in this process carry over (a remote store keeps the old
        rule's buckets apart); returns how many did.
        """
        table, source = self._table, old._table
        if table is None or source is None or old is self:
            return 0
        now = self._now()
        carried = source.levels(prefix, old._now())
        for key, share in carried:
            table.fill(key, share, now)
        return len(carried)

    @property
    def resident_buckets(self) -> int | None:
        """How many buckets the in-process backend holds for this rule (``None`` for remote ones)."""
        return None if self._table is None else len(self._table)

    # -- internals --------------------------------------------------------

    def _check_cost(self, cost: object) -> float:
        value = number(cost, "cost", minimum=self.limit * MIN_COST_SHARE, inclusive=True)
        if value > self.limit:
            raise ConfigurationError(
                f"cost: {cost!r} is above the limit {self.limit!r}: it could never be admitted", path="cost"
            )
        return value

    def _metadata(self, key: str, cost: float) -> dict[str, Any]:
        return {
            "key": key,
            "limit": self.limit,
            "window": self.window,
            "cost": cost,
            "algorithm": self.algorithm,
            "name": self.name,
        }

    def _acquirer(self, key: str, cost: float) -> Callable[[], None]:
        """The decision of ``acquire_nowait(key, cost)`` as one function, for :class:`RateLimitBucket`."""
        table = self._table
        if table is None:

            def remote() -> None:
                raise WouldBlock

            return remote
        return table.acquirer(key, cost, self._hooks)

    def _refuse(self, key: str, cost: float, now: float) -> NoReturn:
        """Deny a hit that waiters are queued ahead of, or that does not fit (acquire_nowait's denials)."""
        if self._waiting and key in self._waiting:
            self._deny_queued(key, cost, now)
        self._deny(key, cost, cast("BucketTable", self._table).retry_after(key, cost, now))

    def _emit_allowed(self, key: str, cost: float) -> None:
        LIMITER_REQUEST_ALLOWED.emit({"cost": cost}, self._metadata(key, cost))

    def _deny_queued(self, key: str, cost: float, now: float) -> NoReturn:
        # Waiters in acquire() go first: the hit fits once the bucket has room
        # for everything queued ahead of it too.
        # For GCRA that is exact (the level may exceed ``limit`` in the formula);
        # a fixed window reports the end of the current window, a lower bound.
        table = cast("BucketTable", self._table)
        ahead = cost + self._waiting[key].queued
        if not isinstance(table, GcraTable):
            ahead = min(ahead, self.limit)
        self._deny(key, cost, table.retry_after(key, ahead, now))

    def _deny(self, key: str, cost: float, retry_after: float) -> NoReturn:
        # Every denial passes here, so every denial carries a positive retry time:
        # one that reads 0 (queued waiters are due but have not run yet) would
        # tell a client to retry at once, into the same denial.
        if retry_after < _MIN_RETRY_AFTER:
            retry_after = _MIN_RETRY_AFTER
        if LIMITER_REQUEST_DENIED.handlers:
            LIMITER_REQUEST_DENIED.emit({"cost": cost, "retry_after": retry_after}, self._metadata(key, cost))
        if logger.is_enabled_for(logging.DEBUG):
            logger.debug(
                "rate_limit_denied", key=key, limit=self.limit, window=self.window, cost=cost, retry_after=retry_after
            )
        raise RateLimitExceeded(key=key, limit=self.limit, window=self.window, retry_after=retry_after)

    def __repr__(self) -> str:
        resident = "" if self._table is None else f", buckets={len(self._table)}"
        return (
            f"RateLimiter(limit={self.limit!r}, window={self.window!r}, algorithm={self.algorithm!r}, "
            f"name={self.name!r}{resident}, waiting_keys={len(self._waiting)})"
        )


class RateLimitBucket:
    """One bucket of a :class:`RateLimiter`, its key and cost checked once; from :meth:`RateLimiter.bucket`.

    Attributes:
        limiter: The limiter the bucket belongs to.
        key: The bucket's key.
        cost: What each :meth:`acquire_nowait` takes.
        acquire_nowait: Call it for ``limiter.acquire_nowait(key, cost)``
            without the argument checks: a function built for this bucket
            (with the in-memory backend, the limiter's checks and the bucket
            arithmetic in one frame). It raises :class:`anyio.WouldBlock`
            with a remote backend (nothing taken or asked), and
            :class:`~seawall.RateLimitExceeded` when the hit does not fit
            now (nothing taken).
    """

    __slots__ = ("acquire_nowait", "cost", "key", "limiter")

    def __init__(self, limiter: RateLimiter | MultiRateLimiter, key: str, cost: float) -> None:
        self.limiter: Final = limiter
        self.key: Final = key
        self.cost: Final = cost
        self.acquire_nowait: Final[Callable[[], None]] = limiter._acquirer(key, cost)

    def __repr__(self) -> str:
        return f"RateLimitBucket(key={self.key!r}, cost={self.cost!r}, limiter={self.limiter!r})"


def _binding(statuses: list[RateLimitStatus]) -> RateLimitStatus:
    """The status of the rule that binds: the fewest hits left, then the longest wait (the first of a tie)."""
    return min(statuses, key=lambda status: (status.remaining, -status.retry_after))


def _slot_key(key: str) -> str:
    """``key`` behind a Redis Cluster hash tag of its own, so every rule's bucket of it is in one slot.

    The tag only picks the slot (the key itself follows it whole), so it
    need not be one-to-one: a ``}`` inside is replaced so the tag cannot end
    early, and the ``~`` keeps it non-empty (an empty tag hashes the whole name).
    """
    return "{~" + key.replace("}", "~") + "}" + key


class MultiRateLimiter:
    """Several rules on the same buckets: a hit is admitted only when every rule admits it.

    The decision is one step: with buckets in this process every rule is
    checked, then all are taken (no suspension, the same tables and
    arithmetic as each :class:`RateLimiter`); with a remote backend it is
    one :meth:`~seawall.backends.MultiRuleBackend.take_all` (on Redis one
    script over the rules' keys, which share a cluster slot). A denial takes
    from no rule, and its ``retry_after`` is the largest of the denying rules'.

    :meth:`acquire` waits that ``retry_after`` and decides again, until
    admitted: unlike a single rule's line it is not FIFO among waiters.

    Args:
        limiters: Two or more limiters with distinct rules; the first one's clock
            times every decision. With a remote backend, all on the same one.

    Raises:
        ConfigurationError: Fewer than two limiters, two with the same rule,
            different remote backends, or a remote backend without ``take_all``.
    """

    __slots__ = ("_remote", "_rules", "_tables", "backend", "clock", "limiters")

    def __init__(self, limiters: tuple[RateLimiter, ...]) -> None:
        if len(limiters) < 2:
            raise ConfigurationError("limiters: a MultiRateLimiter needs at least two rules", path="limiters")
        first = limiters[0]
        rules = tuple(limiter._rule for limiter in limiters)
        if len(set(rules)) != len(rules):
            raise ConfigurationError("limiters: two limiters have the same rule", path="limiters")
        self.limiters: Final = limiters
        self.backend: Final = first.backend
        self.clock: Final = first.clock
        self._rules = rules
        tables = tuple(limiter._table for limiter in limiters)
        # In this process: the tables themselves (a synchronous decision); else the backend's take_all.
        self._tables: tuple[BucketTable, ...] | None = None if None in tables else cast("Any", tables)
        self._remote = self._tables is None
        if self._remote and any(limiter.backend is not first.backend for limiter in limiters):
            # (Buckets in this process decide together whatever their backend objects; remote ones in one store.)
            raise ConfigurationError("limiters: every rule must use the same remote backend", path="limiters")
        if self._remote and not isinstance(self.backend, MultiRuleBackend):
            raise ConfigurationError(
                f"limiters: {type(self.backend).__name__} cannot decide several rules atomically (no take_all)",
                path="limiters",
            )

    # The LimiterLike face: the first rule's numbers (the key's own, for logs and a plain status).
    @property
    def limit(self) -> float:
        """The first rule's limit."""
        return self.limiters[0].limit

    @property
    def window(self) -> float:
        """The first rule's window."""
        return self.limiters[0].window

    @property
    def name(self) -> str | None:
        """The first rule's name."""
        return self.limiters[0].name

    @property
    def resident_buckets(self) -> int | None:
        """Buckets resident over all rules in this process (``None`` with a remote backend)."""
        tables = self._tables
        return None if tables is None else sum(len(table) for table in tables)

    def _wait(self, key: str, cost: float) -> tuple[RateLimiter, float] | None:
        """Take ``cost`` under every rule now, or return the rule that waits longest and its wait."""
        tables = cast("tuple[BucketTable, ...]", self._tables)
        found = take_all(tables, key, cost, self.clock.now())
        return None if found is None else (self.limiters[found[0]], found[1])

    async def _wait_remote(
        self, key: str, cost: float
    ) -> tuple[tuple[RateLimiter, float] | None, tuple[RateLimitDecision, ...]]:
        """The backend's one decision over every rule: ``(None or the longest wait, each rule's decision)``."""
        backend = cast("MultiRuleBackend", self.backend)
        admitted, decisions = await backend.take_all(_slot_key(key), cost, self._rules)
        if admitted:
            return None, decisions
        waits = [decision.retry_after for decision in decisions]
        worst = waits.index(max(waits))
        # A remote store that denies with no retry time must not make a waiter spin.
        return (self.limiters[worst], max(waits[worst], 1e-3)), decisions

    def _check(self, key: object, cost: object) -> tuple[str, float]:
        if type(key) is not str:
            key = _bad_key(key)
        if cost is not _ONE:
            # The tightest limit bounds the cost (a cost above any rule's limit never passes).
            cost = min(self.limiters, key=lambda limiter: limiter.limit)._check_cost(cost)
        return key, cast("float", cost)

    def acquire_nowait(self, key: str = "default", cost: float = 1) -> None:
        """Take ``cost`` from bucket ``key`` under every rule now, or raise (nothing taken).

        Raises:
            anyio.WouldBlock: The backend is remote; nothing was taken or asked.
            RateLimitExceeded: A rule denies the hit; ``retry_after`` is the largest of the denying rules'.
        """
        key, cost = self._check(key, cost)
        if self._remote:
            raise WouldBlock
        self._admit(key, cost, self._wait(key, cost))

    def bucket(self, key: str = "default", cost: float = 1) -> RateLimitBucket:
        """A handle whose ``acquire_nowait`` is ``self.acquire_nowait(key, cost)`` (checked once)."""
        key, cost = self._check(key, cost)
        return RateLimitBucket(self, key, cost)

    def _acquirer(self, key: str, cost: float) -> Callable[[], None]:
        if self._remote:

            def remote() -> None:
                raise WouldBlock

            return remote
        return partial(self.acquire_nowait, key, cost)

    def _admit(self, key: str, cost: float, denied: tuple[RateLimiter, float] | None) -> None:
        if denied is not None:
            denied[0]._deny(key, cost, denied[1])
        if LIMITER_REQUEST_ALLOWED.handlers:
            self.limiters[0]._emit_allowed(key, cost)

    async def hit(self, key: str = "default", cost: float = 1) -> RateLimitStatus:
        """Take ``cost`` under every rule now or raise :class:`~seawall.RateLimitExceeded` (nothing taken).

        Returns:
            The status of the binding rule after the hit (see :meth:`status`).
        """
        key, cost = self._check(key, cost)
        if not self._remote:
            self._admit(key, cost, self._wait(key, cost))
            return await self.status(key)  # (in this process: no suspension, no round trip)
        denied, decisions = await self._wait_remote(key, cost)
        self._admit(key, cost, denied)
        # The status from the decision itself: asking for it again would cost a round trip per rule.
        found = [
            RateLimitStatus(
                key,
                decision.next_after == 0.0,
                decision.current_count,
                limiter.limit,
                limiter.window,
                decision.remaining,
                decision.next_after,
                decision.reset_after,
            )
            for limiter, decision in zip(self.limiters, decisions, strict=True)
        ]
        return _binding(found)

    async def acquire(self, key: str = "default", cost: float = 1) -> None:
        """Wait until every rule admits ``cost`` on bucket ``key``, then take it from all.

        Each denial waits the largest ``retry_after`` and decides again;
        a cancelled waiter has taken nothing.
        """
        key, cost = self._check(key, cost)
        while True:
            denied = (await self._wait_remote(key, cost))[0] if self._remote else self._wait(key, cost)
            if denied is None:
                break
            await self.clock.sleep(denied[1])
        if LIMITER_REQUEST_ALLOWED.handlers:
            self.limiters[0]._emit_allowed(key, cost)

    async def statuses(self, key: str = "default") -> list[RateLimitStatus]:
        """The status of bucket ``key`` under each rule, in the rules' order."""
        if type(key) is not str:
            key = _bad_key(key)
        stored = _slot_key(key) if self._remote else key
        found = [await limiter.status(stored) for limiter in self.limiters]
        return [replace(status, key=key) for status in found] if self._remote else found

    async def status(self, key: str = "default") -> RateLimitStatus:
        """The status of bucket ``key`` under the binding rule: the fewest hits left, then the longest wait."""
        return _binding(await self.statuses(key))

    async def reset(self, key: str = "default") -> None:
        """Empty bucket ``key`` under every rule."""
        if type(key) is not str:
            key = _bad_key(key)
        stored = _slot_key(key) if self._remote else key
        for limiter in self.limiters:
            await limiter.reset(stored)

    def __call__(self, key: str = "default", *, cost: float = 1, wait: bool = True) -> Admission:
        """``async with limiter(key, cost=..., wait=...):`` waits (``acquire``) or denies (``hit``)."""
        return Admission(self, key, cost, wait)

    def __repr__(self) -> str:
        rules = ", ".join(f"{limiter.limit!r}/{limiter.window!r}s" for limiter in self.limiters)
        return f"MultiRateLimiter([{rules}], backend={type(self.backend).__name__})"


def _rules_of(limiter: LimiterLike | None) -> tuple[RateLimiter, ...]:
    if isinstance(limiter, MultiRateLimiter):
        return limiter.limiters
    return (limiter,) if isinstance(limiter, RateLimiter) else ()


def carry_over(new: LimiterLike, old: LimiterLike | None, prefix: str) -> int:
    """Fill ``new``'s buckets named ``prefix...`` from ``old``'s (a reconfigured key), each rule scaled.

    Each rule of ``new`` takes the levels of ``old``'s rule of the same
    window, else of the rule in its place: a key going from 10/s to 10/s
    and 50/min keeps its 10/s levels, and its minute's buckets start empty.
    Only buckets in this process carry over; returns how many did.
    """
    sources = _rules_of(old)
    carried = 0
    for index, limiter in enumerate(_rules_of(new)):
        same = [source for source in sources if source.window == limiter.window]
        source = same[0] if same else sources[index] if index < len(sources) else None
        if source is not None:
            carried += limiter.carry_over(source, prefix)
    return carried
