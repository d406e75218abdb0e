"""ConnectionPool: a Poolboy-style pool of workers with a size and an overflow.

The pool keeps ``size`` workers (connections, clients...) made by a factory,
lends them out one task at a time, and may create up to ``max_overflow`` extra
workers under load, which it closes again when they come back and nobody is
waiting for them (Poolboy's overflow). The decisions, in order:

* checkout: the most recently returned idle worker (LIFO, so surplus workers at
  the bottom of the stack age out under ``max_idle``), else a new worker while
  fewer than ``size + max_overflow`` exist, else wait in FIFO order up to the
  timeout and raise :class:`~seawall.PoolTimeout`.
* return: the worker goes straight to the oldest waiter (a newcomer never barges
  past a waiter), else back onto the idle stack, else - an overflow worker nobody
  needs - it is closed.

The uncontended path is plain bookkeeping: a ``list`` as the idle stack, a
``set`` of lent workers, no task, event or lock. Everything else is on anyio,
so the pool runs on asyncio and trio alike:

* Waiting: one small waiter object per waiting task (what it was handed, and
  a loop future on asyncio or an :class:`anyio.Event` on trio to wake it) in
  a ``deque``; one timer for all their timeouts, a task sleeping on the
  pool's clock until the earliest deadline.
* Background work - closing a worker from a synchronous path
  (``checkin_nowait``, a dead idle worker met by ``checkout_nowait``), the
  timeout timer, the ``max_idle`` reaper - runs in tasks the pool owns
  (:class:`_Background`) and :meth:`ConnectionPool.close` waits for: a pool
  has no task of its own to host them, since it is started and closed by
  whichever task calls :meth:`~ConnectionPool.start`/:meth:`~ConnectionPool.close`
  (or never started at all), and an anyio task group belongs to the one task
  that entered it and must be left by it, in order.

Every path that gives a worker back survives cancellation: awaited cleanup runs
in a shielded anyio cancel scope, and if a native asyncio cancellation cuts
into it anyway, the worker is closed in a background task and the counts are
settled before the cancellation propagates. So a task cancelled while waiting,
while holding a worker or while its worker is being created loses nothing.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Final, Generic, Protocol, TypeVar, cast, runtime_checkable

import anyio
from anyio import WouldBlock

from seawall._checks import count, seconds
from seawall._clock import Clock, current_clock, in_trio_task
from seawall._errors import ConfigurationError, ConfigurationTypeError, PoolClosed, PoolTimeout
from seawall._logging import logger
from seawall._telemetry import ANY_HANDLER, POOL_CHECKIN, POOL_CHECKOUT, POOL_TIMEOUT

__all__ = ["ConnectionPool", "PoolCheckout", "PoolFactory", "PoolLease", "PoolStatus"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


@runtime_checkable
class PoolFactory(Protocol[T]):
    """What a pool needs to make and dispose of its workers.

    Required: ``async create() -> T`` and ``async close(worker)``. Optional
    attributes, looked up once when the pool is built (absent or ``None``
    means "not supported"):

    * ``async reset(worker)``: run on every return, e.g. roll back an open
      transaction. A reset that raises marks the worker dead.
    * ``async check(worker) -> bool``: run on return when the block that held
      the worker raised; ``False`` (or an exception) marks it dead.
    * ``is_closed(worker) -> bool``: a cheap synchronous test, without I/O, run
      on every checkout and return; ``True`` marks the worker dead (asyncpg's
      ``Connection.is_closed()``, httpx's ``AsyncClient.is_closed``).

    Dead workers are closed and never handed out again; their slot is free for
    a replacement.
    """

    async def create(self) -> T:
        """Make a new worker."""
        ...

    async def close(self, worker: T) -> None:
        """Dispose of ``worker``; it is not used again."""
        ...


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """A snapshot of a pool's counts.

    Attributes:
        name: The pool's name (``None`` if it has none).
        size: Workers the pool keeps.
        max_overflow: Extra workers it may create under load.
        idle: Workers ready to be checked out.
        in_use: Workers checked out (or being created for a checkout).
        overflow: Workers beyond ``size`` that exist right now.
        waiting: Tasks waiting for a worker.
    """

    name: str | None
    size: int
    max_overflow: int
    idle: int
    in_use: int
    overflow: int
    waiting: int

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as a plain dict."""
        return {
            "name": self.name,
            "size": self.size,
            "max_overflow": self.max_overflow,
            "idle": self.idle,
            "in_use": self.in_use,
            "overflow": self.overflow,
            "waiting": self.waiting,
        }


class PoolLease(Generic[T]):
    """One pooled worker, as :meth:`ConnectionPool.checkout_nowait` lends it.

    Attributes:
        conn: The worker (connection, client...; ``None`` in a bulkhead). Use
            it until the lease is given back with
            :meth:`~ConnectionPool.checkin_nowait` or
            :meth:`~ConnectionPool.checkin`, and not after.

    The pool keeps one lease per worker for the worker's whole life, so a
    lease is a handle on the worker, not on one checkout: give it back once.
    """

    __slots__ = ("_created", "_idle_since", "_lent_at", "_orphaned", "conn")

    def __init__(self, conn: T, created: float) -> None:
        self.conn = conn
        self._created = created
        self._idle_since = created
        # Set when close() gave up waiting for the holder and closed the
        # worker under it: the holder's return then has nothing left to do.
        self._orphaned = False
        # When an observed checkout_nowait() lent it (for the checkin event's "held").
        self._lent_at: float | None = None

    def closed_under_holder(self) -> bool:
        """Whether close() gave up on the holder and closed the worker (a method: it can change at any await)."""
        return self._orphaned

    def __repr__(self) -> str:
        return f"<PoolLease conn={self.conn!r}>"


class _NullFactory:
    """The bulkhead's factory: slots without a resource behind them."""

    __slots__ = ()

    async def create(self) -> None:
        return None

    async def close(self, worker: None) -> None:
        return None


class _CallableFactory:
    """Adapt a zero-argument async callable to the factory protocol.

    Closing tries the worker's own ``aclose()``, then ``close()`` (awaited if it
    returns an awaitable); ``is_closed`` reads the worker's ``is_closed``
    (attribute or method) when it has one.
    """

    __slots__ = ("_create",)

    def __init__(self, create: Callable[[], Awaitable[Any]]) -> None:
        self._create = create

    async def create(self) -> Any:
        made = self._create()
        if not inspect.isawaitable(made):
            # A plain function is accepted (``lambda: asyncpg.connect(dsn)``
            # returns an awaitable), so a sync one is only caught here.
            raise ConfigurationTypeError(
                f"the pool's factory {self._create!r} returned {made!r}, not an awaitable: a callable "
                "factory must be async (or return an awaitable), e.g. `async def connect(): ...`",
                path="factory",
            )
        return await made

    async def close(self, worker: Any) -> None:
        closer = getattr(worker, "aclose", None) or getattr(worker, "close", None)
        if closer is not None:
            result = closer()
            if inspect.isawaitable(result):
                await result

    def is_closed(self, worker: Any) -> bool:
        flag = getattr(worker, "is_closed", False)
        return bool(flag() if callable(flag) else flag)


# What a waiter can be handed, besides a worker.
_SLOT: Final = object()  # "a slot is yours: create your own worker"
_TIMEOUT: Final = object()
_CLOSED: Final = object()
_GONE: Final = object()  # it left (cancelled) before anything was handed to it


class _Waiter:
    """A task waiting in :meth:`ConnectionPool.checkout`: what it was handed, and how it is woken.

    On asyncio the wake-up is a bare future of the loop, awaited as it is: a
    contended checkout costs a third less than through an :class:`anyio.Event`
    (which looks up the running backend when made, and wraps an
    ``asyncio.Event`` that makes a future of its own). Elsewhere (trio) it is
    an :class:`anyio.Event`. Either way cancellation is the task's own: anyio's
    scopes and asyncio's ``task.cancel()`` interrupt the wait alike.
    """

    __slots__ = ("_event", "_future", "got")

    def __init__(self) -> None:
        self.got: object = None  # a PoolLease, _SLOT, _TIMEOUT, _CLOSED or _GONE once done
        self._future: asyncio.Future[None] | None = None
        self._event: anyio.Event | None = None
        if in_trio_task():
            self._event = anyio.Event()
        else:
            self._future = asyncio.get_running_loop().create_future()

    def wait(self) -> Awaitable[object]:
        """What to await until :meth:`hand` is called (the future itself on asyncio: no frame of ours)."""
        if self._future is not None:
            return self._future
        return cast("anyio.Event", self._event).wait()

    def hand(self, got: object) -> None:
        self.got = got
        if self._future is not None:
            if not self._future.done():  # (a future cancelled with its task is done)
                self._future.set_result(None)
        else:
            cast("anyio.Event", self._event).set()


class _Background:
    """The tasks a pool runs on its own: started on the running event loop, awaited by ``close()``.

    anyio has no way to start a task that no caller owns, so each backend's
    own is used: an asyncio task (kept referenced here: the loop holds only
    weak ones), or a trio system task, which no caller's cancel scope
    reaches either. The pool owns them in the sense that matters: it counts
    them, :meth:`wait` returns when the last one is done, and a job never
    raises (its errors are logged) - an error escaping a trio system task
    would crash the whole run.
    """

    __slots__ = ("_idle", "_name", "_running", "_tasks")

    def __init__(self, name: str | None) -> None:
        self._name = name
        self._running = 0
        self._idle: anyio.Event | None = None  # set when the last job ends, while someone waits
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, job: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        """Run ``await job(*args)`` in the background; needs a running event loop."""
        self._running += 1
        if in_trio_task():
            import trio

            trio.lowlevel.spawn_system_task(self._run, job, args)
        else:
            task = asyncio.get_running_loop().create_task(self._run(job, args))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, job: Callable[..., Coroutine[Any, Any, None]], args: tuple[Any, ...]) -> None:
        try:
            await job(*args)
        except Exception as exc:  # a bug of ours: logged, never raised into the event loop
            logger.error("pool_background_task_failed", pool=self._name, job=job.__name__, error=repr(exc))
        finally:
            self._running -= 1
            if not self._running and self._idle is not None:
                self._idle.set()
                self._idle = None

    async def wait(self) -> None:
        """Return once no background task is running."""
        while self._running:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    def __len__(self) -> int:
        return self._running


def _seconds(name: str, value: float | timedelta | None) -> float | None:
    """A duration option: ``None``, or finite positive seconds (a ``timedelta`` is converted)."""
    return None if value is None else seconds(value, name)


class ConnectionPool(Generic[T]):
    """A pool of ``size`` workers plus up to ``max_overflow`` temporary ones.

    Args:
        factory: Makes the workers: an object with ``async create()`` and
            ``async close(worker)`` (optionally ``reset``, ``check`` and
            ``is_closed``, see :class:`PoolFactory`), or an async callable with
            no arguments, or ``None`` for a bulkhead whose workers are ``None``.
        size: Workers kept open (created by :meth:`start`). ``0`` is allowed
            when ``max_overflow > 0``: every worker is then created on demand
            and closed on return.
        max_overflow: Extra workers created under load, closed again on return
            when nobody waits (or after ``max_idle``, if set).
        timeout: Default seconds a checkout waits before :class:`PoolTimeout`;
            ``None`` waits without limit.
        name: A name for errors, logs, telemetry and status.
        max_idle: Seconds after which an idle overflow worker is closed. With
            ``None`` (default) overflow workers close as soon as they come back
            with nobody waiting; workers within ``size`` are always kept.
        max_lifetime: Seconds after which a worker is closed (on return or on
            checkout) and replaced, so connections rotate. ``None``: no limit.
        max_waiting: How many checkouts may wait at once; one beyond that
            fails at once with :class:`PoolTimeout` (``None``: no bound).
        clock: The clock for timeouts and ages; tests inject a ``FakeClock``.

    Raises:
        ValueError: a count or duration out of range.
        TypeError: a value of the wrong type, or a factory without
            ``create``/``close`` that is not callable either.
    """

    __slots__ = (
        "_background",
        "_bulkhead",
        "_busy",
        "_check",
        "_clock",
        "_close_done",
        "_closed",
        "_closing",
        "_deadlines",
        "_drain",
        "_factory",
        "_fast_return",
        "_fast_take",
        "_idle",
        "_is_closed",
        "_limit",
        "_max_idle",
        "_max_lifetime",
        "_max_waiting",
        "_name",
        "_overflow",
        "_plain_return",
        "_plain_take",
        "_reaper",
        "_reset",
        "_size",
        "_started",
        "_timeout",
        "_timer",
        "_timer_at",
        "_timer_scope",
        "_total",
        "_waiters",
    )

    def __init__(
        self,
        factory: PoolFactory[T] | Callable[[], Awaitable[T]] | None = None,
        *,
        size: int = 10,
        max_overflow: int = 0,
        timeout: float | timedelta | None = 5.0,
        name: str | None = None,
        max_idle: float | timedelta | None = None,
        max_lifetime: float | timedelta | None = None,
        clock: Clock | None = None,
        max_waiting: int | None = None,
    ) -> None:
        self._size = count(size, "size", minimum=0)
        self._overflow = count(max_overflow, "max_overflow", minimum=0)
        if self._size + self._overflow < 1:
            raise ConfigurationError(
                f"size: must be at least 1 (or max_overflow at least 1 when size is 0), got size={size!r}", path="size"
            )
        self._timeout = _seconds("timeout", timeout)
        self._max_idle = _seconds("max_idle", max_idle)
        self._max_lifetime = _seconds("max_lifetime", max_lifetime)
        self._max_waiting = None if max_waiting is None else count(max_waiting, "max_waiting", minimum=0)
        if name is not None and not isinstance(name, str):
            raise ConfigurationTypeError(f"name: must be a str or None, got {name!r}", path="name")
        self._name = name
        if clock is not None and not isinstance(clock, Clock):
            raise ConfigurationTypeError(
                f"clock: must be a seawall Clock (now() and sleep()), got {clock!r}", path="clock"
            )
        # By default the running loop's clock, asked once (see seawall._clock).
        self._clock: Clock = clock or current_clock()

        resolved: Any
        # A bulkhead's slots are a count, not objects: it makes its (None)
        # workers on demand, synchronously, so its cost follows the peak of
        # concurrent use, never its size (a million slots cost nothing).
        self._bulkhead = factory is None
        if factory is None:
            resolved = _NullFactory()
        elif callable(getattr(factory, "create", None)) and callable(getattr(factory, "close", None)):
            resolved = factory
        elif callable(factory) and not hasattr(factory, "create"):
            resolved = _CallableFactory(factory)
        else:
            missing = [m for m in ("create", "close") if not callable(getattr(factory, m, None))]
            raise ConfigurationTypeError(
                f"factory: must have async create() and close(worker) methods or be an async callable "
                f"with no arguments; {factory!r} lacks {' and '.join(missing)}",
                path="factory",
            )
        self._factory = resolved
        self._reset: Callable[[Any], Awaitable[None]] | None = getattr(resolved, "reset", None)
        self._check: Callable[[Any], Awaitable[bool]] | None = getattr(resolved, "check", None)
        self._is_closed: Callable[[Any], bool] | None = getattr(resolved, "is_closed", None)
        # A return with nothing to await (no reset, no age limit) is pure
        # bookkeeping; __aexit__ does it inline.
        self._plain_return = self._reset is None and self._max_lifetime is None
        # An idle worker that needs no test (no is_closed, no age limit) is lent as it is.
        self._plain_take = self._is_closed is None and self._max_lifetime is None

        self._limit = self._size + self._overflow
        self._idle: list[PoolLease[Any]] = []  # a stack: the top is the most recently returned
        self._busy: set[PoolLease[Any]] = set()
        self._waiters: deque[_Waiter] = deque()  # oldest first; done ones are skipped when met
        # Deadlines of the waiters that have one. One timer serves them all
        # (a background task sleeping until the earliest): a timer per waiter
        # would cost a heap push and pop on every contended checkout.
        self._deadlines: dict[_Waiter, float] = {}
        self._timer = False  # whether the timer task runs
        self._timer_at: float | None = None  # when it wakes next
        self._timer_scope: anyio.CancelScope | None = None  # its sleep, cut short for an earlier deadline
        self._total = 0  # workers that exist or are being created or closed
        self._closing = 0  # of those, being closed right now
        self._started = False
        self._closed = False
        # The non-waiting forms' common cases, one flag each (cleared by close()):
        # lend the top idle worker untested; put a worker back untested, no reset, no idle clock.
        # (The coordinator calls checkout_nowait/checkin_nowait: these cases live here only.)
        self._fast_take = self._plain_take
        self._fast_return = self._plain_take and self._reset is None and self._max_idle is None
        # close()'s grace-period sleep, cut short when the last lent worker is back.
        self._drain: anyio.CancelScope | None = None
        self._close_done: anyio.Event | None = None
        self._reaper: anyio.CancelScope | None = None  # the max_idle reaper's, while it runs
        self._background = _Background(name)  # background closes, the timer, the reaper

    # -- public API --------------------------------------------------------

    @property
    def name(self) -> str | None:
        """The pool's name."""
        return self._name

    @property
    def size(self) -> int:
        """Workers the pool keeps."""
        return self._size

    @property
    def max_overflow(self) -> int:
        """Extra workers the pool may create under load."""
        return self._overflow

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    def status(self) -> PoolStatus:
        """A snapshot of the counts (exact at the moment of the call)."""
        stacked = len(self._idle)
        live = self._total - self._closing
        # A bulkhead's slots that were never used yet are idle too (made on demand).
        unmade = self._size - live if self._bulkhead and live < self._size and not self._closed else 0
        return PoolStatus(
            name=self._name,
            size=self._size,
            max_overflow=self._overflow,
            idle=stacked + unmade,
            in_use=live - stacked,
            overflow=max(0, live - self._size),
            waiting=sum(1 for waiter in self._waiters if waiter.got is None),
        )

    def checkout(self, timeout: float | timedelta | None = None) -> PoolCheckout[T]:
        """Borrow a worker for an ``async with`` block.

        Args:
            timeout: Seconds to wait when every worker is busy; the pool's
                ``timeout`` when ``None``.

        Returns:
            An async context manager yielding the worker.

        Raises:
            PoolTimeout: No worker became free in time (on entering the block).
            PoolClosed: The pool is closed.
        """
        if timeout is None:
            return PoolCheckout(self, self._timeout)
        return PoolCheckout(self, seconds(timeout, "timeout"))

    # -- the non-waiting form ------------------------------------------------

    def checkout_nowait(self) -> PoolLease[T]:
        """Borrow an idle worker now, synchronously, or raise :class:`anyio.WouldBlock`.

        The non-waiting form of :meth:`checkout` (as anyio's ``acquire_nowait``
        is of ``acquire``): it lends the most recently returned idle worker,
        tested as :meth:`checkout` tests it (``is_closed``, ``max_lifetime``).
        When no idle worker is ready - one would have to be created (I/O) or
        waited for - it raises :class:`anyio.WouldBlock` and lends nothing:
        ``async with pool.checkout()`` then. Dead or expired idle workers met
        on the way are retired, as :meth:`checkout` retires them. A bulkhead
        has nothing to create: it lends a new slot while one is free.

        Give the lease back exactly once, with :meth:`checkin_nowait` or
        ``await`` :meth:`checkin`, on every path (``try``/``finally``), or the
        worker stays lent.

        Returns:
            The lease; ``lease.conn`` is the worker.

        Raises:
            anyio.WouldBlock: No idle worker is ready; nothing was lent.
            PoolClosed: The pool is closed.
        """
        idle = self._idle
        if idle and self._fast_take:
            worker = idle.pop()
            self._busy.add(worker)
            if ANY_HANDLER.attached:
                self._lent(worker)
            return worker
        if self._closed:
            raise PoolClosed(name=self._name)
        while idle:
            worker = idle.pop()
            if self._usable(worker):
                self._busy.add(worker)
                if ANY_HANDLER.attached:
                    self._lent(worker)
                return worker
            self._retire(worker)
        if self._bulkhead and self._total < self._limit:
            # A free slot and nothing to create: a bulkhead lends a new (None) worker at once.
            self._total += 1
            worker = PoolLease(None, self._clock.now())
            self._busy.add(worker)
            if ANY_HANDLER.attached:
                self._lent(worker)
            return worker
        raise WouldBlock

    def checkin_nowait(self, lease: PoolLease[T], raised: bool = False) -> None:
        """Give back a worker lent by :meth:`checkout_nowait`, synchronously, or raise :class:`anyio.WouldBlock`.

        It can when the return awaits nothing: the factory has no ``reset``,
        and - after a block that raised - no ``check`` either. Then the worker
        goes to the oldest waiter or back to the idle stack, or, found dead
        (``is_closed``) or past ``max_lifetime``, or surplus overflow, is
        closed in a background task (its slot frees when the close is done).
        Otherwise it raises :class:`anyio.WouldBlock` with the worker still
        lent: ``await pool.checkin(lease, raised=raised)`` then. A lease whose
        worker :meth:`close` already closed under its holder (after the
        grace period) is accepted and nothing is done.

        Args:
            lease: What :meth:`checkout_nowait` returned.
            raised: Whether the block that used the worker raised (the
                factory's ``check`` then decides whether the worker lives).

        Raises:
            anyio.WouldBlock: The return must await ``reset``/``check``; the worker is still lent.
            RuntimeError: ``lease`` is not lent out by this pool (given back already?).
        """
        # (``raised`` is not keyword-only: CPython 3.11 does not specialize
        # calls of functions with keyword-only parameters.)
        if self._fast_return and not raised and lease._lent_at is None:
            # The common case, with _give_back()'s own common case inline: a
            # frame is a third of the cost of this call.
            try:
                self._busy.remove(lease)
            except KeyError:
                raise RuntimeError(f"{lease!r} is not checked out of this pool (given back already?)") from None
            if not self._waiters and self._total - self._closing <= self._size:
                self._idle.append(lease)
            else:
                self._give_back(lease)
            return
        if self._reset is not None or (raised and self._check is not None):
            raise WouldBlock
        try:
            self._busy.remove(lease)
        except KeyError:
            if lease._orphaned:
                return  # close() closed it after the grace period
            raise RuntimeError(f"{lease!r} is not checked out of this pool (given back already?)") from None
        if lease._lent_at is not None:
            self._returned(lease, raised)
        if self._plain_take or self._usable(lease):
            self._give_back(lease)
        else:
            self._spawn_dispose(lease)

    async def checkin(self, lease: PoolLease[T], raised: bool = False) -> None:
        """Give back a worker lent by :meth:`checkout_nowait`, awaiting what the return needs.

        Runs what leaving ``async with pool.checkout()`` runs: the factory's
        ``check`` after a block that raised, its ``reset``, or the close of a
        dead worker. Shielded from cancellation, so a cancelled caller loses
        nothing.

        Args:
            lease: What :meth:`checkout_nowait` returned.
            raised: Whether the block that used the worker raised.

        Raises:
            RuntimeError: ``lease`` is not lent out by this pool (given back already?).
        """
        if lease not in self._busy:
            if lease._orphaned:
                return
            raise RuntimeError(f"{lease!r} is not checked out of this pool (given back already?)")
        if lease._lent_at is not None:
            self._returned(lease, raised)
        await self._check_in(lease, raised)

    def _lent(self, worker: PoolLease[Any]) -> None:
        """Telemetry of a ``checkout_nowait`` while some handler is attached (it never waits)."""
        if POOL_CHECKOUT.handlers or POOL_CHECKIN.handlers:
            worker._lent_at = self._clock.now()
            if POOL_CHECKOUT.handlers:
                POOL_CHECKOUT.emit({"duration": 0.0, "wait": 0.0}, {"pool": self._name})

    def _returned(self, worker: PoolLease[Any], raised: bool) -> None:
        """Telemetry of the return of a worker an observed ``checkout_nowait`` lent."""
        lent_at = cast(float, worker._lent_at)
        worker._lent_at = None
        if POOL_CHECKIN.handlers:
            held = self._clock.now() - lent_at
            POOL_CHECKIN.emit({"duration": held, "held": held}, {"pool": self._name, "raised": raised})

    async def start(self) -> None:
        """Create the ``size`` workers (concurrently); idempotent.

        Raises:
            PoolClosed: The pool was closed.
            Exception: The first error of the factory's ``create()``, as
                itself; the workers created so far are closed again.
        """
        if self._closed:
            raise PoolClosed(name=self._name)
        if self._started:
            return
        if self._bulkhead:
            self._started = True  # its workers are made on demand (see checkout_nowait)
            return
        errors: list[Exception] = []
        created: list[PoolLease[Any]] = []

        async def make_one() -> None:
            # The slot is reserved here, not by the spawner, so a child that is
            # cancelled before it ever runs reserves nothing; the check makes
            # concurrent start() calls fill the pool once, not twice.
            if self._total - self._closing >= self._size:
                return
            self._total += 1
            try:
                worker = await self._create_reserved()
            except Exception as exc:
                errors.append(exc)
            else:
                created.append(worker)

        ok = False
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self._size - self._total):
                    tg.start_soon(make_one)
            ok = not errors
        finally:
            for worker in created:
                self._busy.discard(worker)
            if ok:
                for worker in created:
                    self._give_back(worker)
            else:
                # A failed start leaves nothing open: ``async with pool`` will
                # not reach __aexit__ to close what was made.
                with anyio.CancelScope(shield=True):
                    for worker in created:
                        await self._dispose(worker)
        if errors:
            raise errors[0]
        self._started = True

    async def close(self, *, grace: float | timedelta = 10.0) -> None:
        """Close the pool: no more checkouts, every worker closed.

        Waiters fail with :class:`PoolClosed` at once. Idle workers are closed
        now; workers still checked out are closed when they come back, or -
        after ``grace`` seconds - under their holders. Calling it again waits
        for the first call to finish.

        Args:
            grace: Seconds to wait for checked-out workers to come back.
        """
        grace_s = seconds(grace, "grace")
        if self._close_done is not None:
            await self._close_done.wait()
            return
        self._close_done = anyio.Event()
        self._closed = True
        self._fast_take = self._fast_return = False
        try:
            if self._reaper is not None:
                self._reaper.cancel()
            if self._timer_scope is not None:
                self._timer_scope.cancel()  # it sees the pool closed and ends
            waiters = self._waiters
            while waiters:
                waiter = waiters.popleft()
                if waiter.got is None:
                    waiter.hand(_CLOSED)
            with anyio.CancelScope(shield=True):
                while self._idle:
                    await self._dispose(self._idle.pop())
            if self._busy:
                # Wait up to ``grace`` on the pool's clock; the last return cancels the sleep.
                self._drain = anyio.CancelScope()
                try:
                    with self._drain:
                        await self._clock.sleep(grace_s)
                finally:
                    self._drain = None
                if self._busy:
                    logger.warning("pool_close_grace_expired", pool=self._name, in_use=len(self._busy))
                    with anyio.CancelScope(shield=True):
                        for worker in list(self._busy):
                            worker._orphaned = True
                            self._busy.discard(worker)
                            await self._dispose(worker)
            if self._background:
                with anyio.CancelScope(shield=True):
                    await self._background.wait()
        finally:
            self._close_done.set()

    async def __aenter__(self) -> ConnectionPool[T]:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        s = self.status()
        state = "closed" if self._closed else "open"
        return (
            f"<ConnectionPool name={self._name!r} {state} size={self._size} max_overflow={self._overflow} "
            f"idle={s.idle} in_use={s.in_use} waiting={s.waiting}>"
        )

    # -- internals -------------------------------------------------------------

    def _usable(self, worker: PoolLease[Any]) -> bool:
        """Whether an idle or returned worker may be handed out (no I/O)."""
        if self._is_closed is not None and self._is_closed(worker.conn):
            return False
        return self._max_lifetime is None or self._clock.now() - worker._created < self._max_lifetime

    async def _acquire(self, max_wait: float | None) -> PoolLease[Any]:
        """The slow path of checkout: retire dead idle workers, create, or wait."""
        if self._closed:
            raise PoolClosed(name=self._name)
        idle = self._idle
        while idle:
            worker = idle.pop()
            if self._usable(worker):
                self._busy.add(worker)
                return worker
            self._retire(worker)
        if self._total < self._limit:
            self._total += 1
            return await self._create_reserved()
        got = await self._wait(max_wait)
        if got is _SLOT:
            return await self._create_reserved()
        return cast("PoolLease[Any]", got)

    async def _wait(self, max_wait: float | None) -> object:
        """Queue up (FIFO) for a worker or a free slot; beyond ``max_waiting`` waiters, fail at once."""
        bound = self._max_waiting
        if bound is not None:
            waiting = sum(1 for queued in self._waiters if queued.got is None)
            if waiting >= bound:
                if POOL_TIMEOUT.handlers:
                    POOL_TIMEOUT.emit({"duration": 0.0}, {"pool": self._name, "timeout": max_wait})
                raise PoolTimeout(
                    f"pool {self._name!r} is at capacity with {waiting} checkouts waiting (max_waiting={bound})",
                    name=self._name,
                    timeout=max_wait,
                )
        waiter = _Waiter()
        self._waiters.append(waiter)
        if max_wait is not None:
            deadline = self._clock.now() + max_wait
            self._deadlines[waiter] = deadline
            if self._timer_at is None or deadline < self._timer_at:
                self._arm_timer(deadline)
        try:
            await waiter.wait()
        except BaseException:
            self._abandon(waiter)
            raise
        finally:
            if max_wait is not None:
                del self._deadlines[waiter]
        got = waiter.got
        if got is _TIMEOUT:
            self._forget(waiter)
            if POOL_TIMEOUT.handlers:
                POOL_TIMEOUT.emit({"duration": max_wait}, {"pool": self._name, "timeout": max_wait})
            logger.warning("pool_checkout_timeout", pool=self._name, timeout=max_wait)
            raise PoolTimeout(name=self._name, timeout=max_wait)
        if got is _CLOSED:
            raise PoolClosed(name=self._name)
        return got

    def _arm_timer(self, deadline: float) -> None:
        """Make the one waiter timer wake at ``deadline`` (earlier than it would)."""
        self._timer_at = deadline
        if not self._timer:
            self._timer = True
            self._background.spawn(self._run_timer)
        elif self._timer_scope is not None:
            self._timer_scope.cancel()  # it sleeps past the new deadline: it goes back to sleep for it

    async def _run_timer(self) -> None:
        """The timer task: sleep until ``_timer_at``, time out the waiters due, until none has a deadline."""
        clock = self._clock
        try:
            while self._timer_at is not None and not self._closed:
                delay = self._timer_at - clock.now()
                if delay > 0.0:
                    self._timer_scope = anyio.CancelScope()
                    with self._timer_scope:
                        await clock.sleep(delay)
                    self._timer_scope = None
                else:
                    self._timer_at = self._expire(clock.now())
        finally:
            self._timer = False
            self._timer_at = None
            self._timer_scope = None

    def _expire(self, now: float) -> float | None:
        """Time out every waiter due by ``now``; return the next deadline, if any."""
        upcoming: float | None = None
        for waiter, deadline in self._deadlines.items():
            if waiter.got is not None:
                continue
            if deadline <= now:
                waiter.hand(_TIMEOUT)
            elif upcoming is None or deadline < upcoming:
                upcoming = deadline
        return upcoming

    def _someone_waits(self) -> bool:
        """Whether a queued waiter has been handed nothing yet (the others are skipped when met)."""
        return any(waiter.got is None for waiter in self._waiters)

    def _forget(self, waiter: _Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass  # already popped by a hand-off that skipped it

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter left (cancelled): pass on whatever it was handed meanwhile."""
        self._forget(waiter)
        got = waiter.got
        if got is None:
            waiter.got = _GONE
        elif isinstance(got, PoolLease):
            # Handed a worker just as it was cancelled: it goes to the next
            # waiter or back to the stack, untouched (it was reset already).
            self._busy.discard(got)
            self._give_back(got)
        elif got is _SLOT:
            self._total -= 1
            self._slot_freed()

    async def _create_reserved(self) -> PoolLease[Any]:
        """Create a worker in a slot already counted in ``_total``."""
        try:
            conn = await self._factory.create()
        except BaseException:
            self._total -= 1
            self._slot_freed()
            raise
        worker = PoolLease(conn, self._clock.now())
        if self._closed:
            self._spawn_dispose(worker)
            raise PoolClosed(name=self._name)
        self._busy.add(worker)
        return worker

    def _give_back(self, worker: PoolLease[Any]) -> None:
        """Hand a healthy, not-lent worker to the oldest waiter, the stack, or close it."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if waiter.got is None:  # not handed anything yet, nor gone
                self._busy.add(worker)
                waiter.hand(worker)
                return
        if self._closed or (self._total - self._closing > self._size and self._max_idle is None):
            self._spawn_dispose(worker)
            return
        if self._max_idle is not None:
            worker._idle_since = self._clock.now()
            if self._reaper is None and self._total - self._closing > self._size:
                # The scope is made here, so a second return before the reaper runs starts no second one.
                self._reaper = anyio.CancelScope()
                self._background.spawn(self._reap, self._reaper, self._max_idle)
        self._idle.append(worker)

    def _slot_freed(self) -> None:
        """``_total`` went down: let the oldest waiter create a worker in the slot."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if waiter.got is None:
                self._total += 1
                waiter.hand(_SLOT)
                return
        if self._drain is not None and not self._busy:
            self._drain.cancel()  # close() waits no longer: every lent worker is back

    def _retire(self, worker: PoolLease[Any]) -> None:
        """Close a dead or expired worker in the background; its slot frees when done."""
        self._spawn_dispose(worker)

    def _spawn_dispose(self, worker: PoolLease[Any]) -> None:
        # Counted as closing from now, so status() never shows it as in use.
        self._closing += 1
        self._background.spawn(self._closed_counted, worker)

    async def _dispose(self, worker: PoolLease[Any]) -> None:
        """Close a worker that is in neither the stack nor the lent set; free its slot."""
        self._closing += 1
        await self._closed_counted(worker)

    async def _closed_counted(self, worker: PoolLease[Any]) -> None:
        # The slot stays counted in ``_total`` until the close is done, so the
        # server never sees more than size + max_overflow connections.
        try:
            await self._factory.close(worker.conn)
        except Exception as exc:
            logger.warning("pool_worker_close_failed", pool=self._name, error=repr(exc))
        except BaseException:
            # Cancelled mid-close by a native asyncio cancellation: finish the
            # close in the background so the connection cannot leak.
            self._background.spawn(self._close_quietly, worker.conn)
            raise
        finally:
            self._closing -= 1
            self._total -= 1
            self._slot_freed()

    async def _close_quietly(self, conn: Any) -> None:
        try:
            await self._factory.close(conn)
        except Exception as exc:
            logger.warning("pool_worker_close_failed", pool=self._name, error=repr(exc))

    async def _check_in(self, worker: PoolLease[Any], raised: bool) -> None:
        """The return path that awaits (reset, check, close); shielded from cancellation."""
        with anyio.CancelScope(shield=True):
            if worker._orphaned:
                return  # close() closed it after the grace period
            try:
                dead = not self._usable(worker)
                if not dead and raised and self._check is not None:
                    try:
                        dead = not await self._check(worker.conn)
                    except Exception as exc:
                        logger.warning("pool_worker_check_failed", pool=self._name, error=repr(exc))
                        dead = True
                # Surplus (closed, so not worth a reset) when nobody still waits: the queue may
                # hold a waiter the timer has already timed out, which leaves only once its task runs.
                surplus = (
                    self._max_idle is None and self._total - self._closing > self._size and not self._someone_waits()
                )
                if not dead and not self._closed and not surplus and self._reset is not None:
                    try:
                        await self._reset(worker.conn)
                    except Exception as exc:
                        logger.warning("pool_worker_reset_failed", pool=self._name, error=repr(exc))
                        dead = True
            except BaseException:
                if not worker.closed_under_holder():
                    self._busy.discard(worker)
                    self._spawn_dispose(worker)
                raise
            if worker.closed_under_holder():
                return  # close() gave up waiting during the check or reset and closed it already
            self._busy.discard(worker)
            # Tested again: the server may have closed it while the reset ran.
            if dead or not self._usable(worker):
                await self._dispose(worker)
            else:
                self._give_back(worker)

    async def _reap(self, scope: anyio.CancelScope, max_idle: float) -> None:
        """Close idle workers beyond ``size`` once they have idled ``max_idle``; end when none is left."""
        clock = self._clock
        idle = self._idle
        try:
            with scope:
                while not self._closed:
                    now = clock.now()
                    # The stack is ordered by idle_since, oldest at the bottom.
                    while idle and self._total - self._closing > self._size and idle[0]._idle_since + max_idle <= now:
                        self._spawn_dispose(idle.pop(0))
                    if not (idle and self._total - self._closing > self._size):
                        return  # no surplus idles: the next one to come back starts a reaper again
                    await clock.sleep(idle[0]._idle_since + max_idle - now)
        finally:
            self._reaper = None


class PoolCheckout(Generic[T_co]):
    """The ``async with pool.checkout():`` context manager; single use."""

    __slots__ = ("_pool", "_started", "_timeout", "_worker")

    def __init__(self, pool: ConnectionPool[Any], timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._worker: PoolLease[Any] | None = None
        self._started: float | None = None

    async def __aenter__(self) -> T_co:
        if self._worker is not None:
            raise RuntimeError("this checkout is in use already; call pool.checkout() for another")
        pool = self._pool
        # Timestamps only when someone listens: the idle cost stays at two reads.
        self._started = pool._clock.now() if (POOL_CHECKOUT.handlers or POOL_CHECKIN.handlers) else None
        idle = pool._idle
        # Fast path: an idle worker, taken with bookkeeping only.
        if idle and not pool._closed:
            worker = idle.pop()
            if pool._fast_take or pool._usable(worker):
                pool._busy.add(worker)
            else:
                pool._retire(worker)
                worker = await pool._acquire(self._timeout)
        else:
            worker = await pool._acquire(self._timeout)
        self._worker = worker
        if self._started is not None:
            now = pool._clock.now()
            if POOL_CHECKOUT.handlers:
                wait = now - self._started
                POOL_CHECKOUT.emit({"duration": wait, "wait": wait}, {"pool": pool._name})
            self._started = now
        return cast(T_co, worker.conn)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        worker = self._worker
        if worker is None:
            raise RuntimeError("checkout exited without being entered")
        self._worker = None
        pool = self._pool
        if POOL_CHECKIN.handlers and self._started is not None:
            held = pool._clock.now() - self._started
            POOL_CHECKIN.emit({"duration": held, "held": held}, {"pool": pool._name, "raised": exc_type is not None})
        # Fast paths: nothing to await, so nothing can be cancelled halfway.
        if exc_type is None and pool._fast_return:
            # No reset, no tests, no idle clock, open (so not orphaned): checkin_nowait()'s common case.
            pool._busy.discard(worker)
            if not pool._waiters and pool._total - pool._closing <= pool._size:
                pool._idle.append(worker)
            else:
                pool._give_back(worker)
            return
        if (
            exc_type is None
            and pool._plain_return
            and not worker._orphaned
            and (pool._is_closed is None or not pool._is_closed(worker.conn))
        ):
            pool._busy.discard(worker)
            pool._give_back(worker)
            return
        await pool._check_in(worker, exc_type is not None)
