"""CircuitBreaker: stop calling a dependency that keeps failing, probe it carefully.

States and rules (the full contract is in ``docs/circuit-breaker.md``):

* CLOSED: calls run. ``failure_threshold`` failures within the last
  ``window`` seconds open the breaker; successes do not erase them.
* OPEN: calls are rejected with :class:`~seawall.CircuitOpenError` without
  running; after ``recovery_time`` the breaker is HALF_OPEN.
* HALF_OPEN: at most ``half_open_max_calls`` trials run at once; a trial
  success closes the breaker, a trial failure opens it afresh. A trial that
  has held its slot for ``recovery_time`` no longer blocks a new one.

Cancellation and other ``BaseException``s are neither success nor failure.

Rate modes (``failure_rate``, ``slow_call_rate`` with ``slow_call_duration``,
over at least ``minimum_calls`` calls in the ``window``) count every
closed-state outcome, successes included, in time-bucketed counters (O(1) per
call; the rules are in ``backends/_breaker_protocol.py``). A call is slow
when it took ``slow_call_duration`` or longer, or ended in a
:class:`~seawall.ProtectionTimeout` (the coordinator's deadline). A rated
breaker takes the tracked path for every call: its closed path reads the
clock and settles successes too. On a shared store that counts successes
in the process (Redis, :class:`~seawall.backends._breaker_protocol.LocalSuccess`)
a closed success that was not slow is handed to it synchronously, with no
round trip; a failure or a slow call is settled as usual.

Two rules keep one call from deciding twice:

* Generations. An outcome counts only in the period it started in: every
  admission carries the record's ``generation``, which moves on each state
  change and on ``reset()``/``trip()``; a call that ends in a later
  generation decides nothing.
* Nesting. A function this breaker guards (``@breaker``) is one layer: passed
  to :meth:`CircuitBreaker.call` or decorated again it is not guarded twice.
  While a task holds a half-open trial, every layer of the same breaker it
  enters inside that call runs without a slot and decides nothing: the
  trial's outcome is the call's.

Performance shapes the code. The closed path with no failures to record
reads no clock, allocates nothing and does no per-task bookkeeping:
``call()`` and ``@breaker`` keep the generation in a local variable,
``__aenter__`` checks the in-memory record and counts the block in
``_blocks``, and ``__aexit__`` uncounts it and returns on success. All
blocks counted there were admitted in one generation (``_blocks_generation``):
a block arriving after a state change while older ones still run takes the
tracked path instead, until they are done. (Finding the current task costs
more than the whole closed path on Python 3.11, whose
``asyncio.current_task()`` makes a ``getpid()`` system call; so only calls
off the closed path - trials, timed calls, that catch-up - are kept per task,
and closed-state layers nested in other ways than the two above each count
a failure.) The clock is read only on a failure, when not closed, or when a
``call_executed`` handler wants a duration.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, ParamSpec, Protocol, TypeVar, runtime_checkable

import anyio
from anyio import WouldBlock

from seawall._awaitables import DONE
from seawall._checks import MAX_COUNT, count, number, seconds
from seawall._clock import Clock, current_clock
from seawall._errors import CircuitOpenError, ConfigurationError, ConfigurationTypeError, ProtectionTimeout
from seawall._logging import logger
from seawall._telemetry import (
    BREAKER_CALL_EXECUTED,
    BREAKER_CALL_REJECTED,
    BREAKER_FUSE_INSTALLED,
    BREAKER_STATE_CHANGED,
)
from seawall.backends._breaker_memory import BreakerRecord, MemoryBreakerBackend, SuccessLane
from seawall.backends._breaker_protocol import (
    BreakerBackend,
    BreakerPolicy,
    BreakerState,
    LocalAdmission,
    LocalSuccess,
    Outcome,
    Ticket,
    Transition,
)

__all__ = [
    "GUARDED_BY",
    "BreakerLike",
    "BreakerPermit",
    "BreakerState",
    "BreakerStatus",
    "CircuitBreaker",
    "Unjudged",
    "check_policy",
    "guarded_by",
    "unguarded",
]

P = ParamSpec("P")
T = TypeVar("T")

_CLOSED = BreakerState.CLOSED
_OPEN = BreakerState.OPEN
_HALF_OPEN = BreakerState.HALF_OPEN


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    """A snapshot of a circuit breaker, from ``await breaker.status()``."""

    name: str
    state: BreakerState
    failure_count: int
    """Failures within the rolling window."""
    failure_threshold: int | None
    """Failures within the window that open the breaker (``None``: only the rates do)."""
    recovery_time: float
    retry_after: float
    """Seconds until a call would be admitted; ``0.0`` when one would be now."""
    window: float | None = None
    """The rolling window failures are counted in (``None``: an engine counting consecutive failures)."""
    half_open_max_calls: int | None = None
    """Trials allowed at once when half-open (``None``: an engine with no limit)."""
    trials_in_flight: int = 0
    """Half-open trial slots in use."""
    calls: int = 0
    """Calls counted in the window (rate modes; ``0`` in count mode)."""
    failure_rate: float | None = None
    """Failures / calls in the window (``None``: no rate mode, or fewer than ``minimum_calls`` calls)."""
    slow_call_rate: float | None = None
    """Slow calls / calls in the window (``None``: no slow-call mode, or fewer than ``minimum_calls`` calls)."""
    reachable: bool = True
    """``False``: the shared store (Redis) could not be read; the state is this process's own view of it
    (what its calls meet under ``on_error``), and the counts are not known (``0``)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (the state as its string value)."""
        return {
            "name": self.name,
            "state": self.state.value,
            "failure_count": self.failure_count,
            "failure_threshold": self.failure_threshold,
            "recovery_time": self.recovery_time,
            "retry_after": self.retry_after,
            "window": self.window,
            "half_open_max_calls": self.half_open_max_calls,
            "trials_in_flight": self.trials_in_flight,
            "calls": self.calls,
            "failure_rate": self.failure_rate,
            "slow_call_rate": self.slow_call_rate,
            "reachable": self.reachable,
        }


@runtime_checkable
class BreakerLike(Protocol):
    """What the coordinator needs of a breaker: ours, or an adapted third-party one."""

    @property
    def name(self) -> str: ...

    @property
    def state(self) -> BreakerState: ...

    async def call(self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T: ...

    async def status(self) -> BreakerStatus: ...

    async def reset(self) -> None: ...

    async def trip(self) -> None: ...

    def __aenter__(self) -> Awaitable[None]: ...

    def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Awaitable[bool | None]: ...


class Unjudged(BaseException):
    """An ending that says nothing about the dependency: a breaker hears neither a success nor a failure.

    Every breaker treats a ``BaseException`` that is not an ``Exception`` as
    it treats cancellation: no outcome, and a half-open trial slot is freed.
    Layers above raise this one where that is the truth: the coordinator for a
    call its concurrency limiter shed (counting an overload would let it open
    the breaker), the FastAPI dependency for a request that failed as the
    client's fault (a 4xx, a validation error) and catches it as it leaves.
    """


def _exclusions(exclude: object) -> tuple[type[Exception], ...]:
    items: Iterable[object]
    if isinstance(exclude, type):
        items = (exclude,)
    elif isinstance(exclude, Iterable) and not isinstance(exclude, str | bytes):
        items = tuple(exclude)
    else:
        raise ConfigurationTypeError(
            f"exclude: expected an exception class or a tuple of them, got {exclude!r}", path="exclude"
        )
    checked: list[type[Exception]] = []
    for item in items:
        if not (isinstance(item, type) and issubclass(item, Exception)):
            # BaseExceptions (cancellation, KeyboardInterrupt) are never failures
            # anyway; listing one is a mistake worth reporting.
            raise ConfigurationTypeError(f"exclude: must hold Exception subclasses only, got {item!r}", path="exclude")
        checked.append(item)
    return tuple(checked)


_new_error = CircuitOpenError.__new__


def _open_error(name: str, retry_after: float) -> CircuitOpenError:
    """``CircuitOpenError(name=name, retry_after=retry_after)``, built in a third of the time.

    A rejection must cost well under a microsecond, and the generic
    constructor chain (keyword arguments through two ``__init__`` levels) is
    most of that. This sets the same attributes the constructor sets; a test
    compares the two field by field, so a change in ``_errors`` shows.
    """
    error = _new_error(CircuitOpenError)
    # One dict assignment is faster than three attribute stores.
    error.__dict__ = {"_message": None, "retry_after": retry_after, "name": name}
    return error


def _task_key() -> object:
    # ``async with`` enters and exits in the same task; the task identifies
    # the block. asyncio.current_task() is a C call; other anyio backends
    # fall back to anyio's task id.
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    return task if task is not None else anyio.get_current_task().id


#: The attribute ``@breaker`` sets on the function it returns: the breaker guarding it.
GUARDED_BY = "__seawall_breaker__"


def guarded_by(fn: object) -> CircuitBreaker | None:
    """The breaker whose ``@breaker`` made ``fn``, if any.

    A layer of that breaker (or of one sharing its state) that is handed
    ``fn`` runs it as it is: ``fn`` is guarded already, and guarding it
    twice would count each failure twice.
    """
    breaker = getattr(fn, GUARDED_BY, None)
    return breaker if isinstance(breaker, CircuitBreaker) else None


def unguarded(breaker: object, fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """``fn`` without its ``@breaker`` layer when ``breaker`` is (or shares state with) that breaker.

    For a caller that runs ``fn`` inside ``breaker`` already (the coordinator):
    the outer layer then counts the call once, timeouts included.
    """
    if isinstance(breaker, CircuitBreaker) and breaker.guards(fn):
        inner: Callable[P, Awaitable[T]] = getattr(fn, "__wrapped__")  # noqa: B009 - set by functools.wraps
        return inner
    return fn


class _Inflight:
    """Bookkeeping of one call that left the closed fast path, kept per task.

    ``async with`` blocks need it to find their ticket and start time at the
    exit; trials of every form register one so that layers of the same
    breaker entered inside them can see they are covered.
    """

    __slots__ = ("outer", "permit", "start", "ticket")

    def __init__(
        self, ticket: Ticket | None, start: float | None, outer: _Inflight | None, *, permit: bool = False
    ) -> None:
        # ``None``: a layer nested inside a trial, which decides nothing.
        self.ticket = ticket
        self.start = start
        # The same task may nest calls of one breaker: a stack per task.
        self.outer = outer
        # Made by admit_nowait(): it has no extent of its own (see _covers).
        self.permit = permit


class BreakerPermit:
    """An admitted call's pass from :meth:`CircuitBreaker.admit_nowait`, for :meth:`~CircuitBreaker.settle_nowait`.

    Opaque. It carries what the breaker must know when the call ends: the
    generation the call was admitted in, a half-open trial's slot, the start
    time for telemetry. A closed call nobody times gets the breaker's shared
    permit of the current generation: made once per generation, settled any
    number of times, and (:attr:`plain`, unless a rate mode counts
    successes) a success need not be settled at all. Any other permit is
    single use.
    """

    __slots__ = ("_entry", "_generation", "_key", "_settled", "_start", "_ticket", "plain")

    def __init__(
        self,
        ticket: Ticket | None,
        start: float | None = None,
        *,
        shared: bool = False,
        counts_successes: bool = False,
        key: object = None,
        entry: _Inflight | None = None,
    ) -> None:
        # ``None``: admitted inside a trial of the same breaker; it decides nothing.
        self._ticket = ticket
        self._generation = -1 if ticket is None else ticket.generation
        self._start = start
        # ``None`` marks the shared permit, which is never used up.
        self._settled: bool | None = None if shared else False
        #: Whether this is a closed call's shared permit whose success changes nothing and needs no
        #: settling (not under a rate mode: it counts successes). (An attribute, not a property: hot
        #: paths read it on every success.)
        self.plain: bool = shared and not counts_successes
        # Where a trial's registration lives (see CircuitBreaker._register).
        self._key = key
        self._entry = entry

    @property
    def trial(self) -> bool:
        """Whether the call holds a half-open trial slot."""
        return self._ticket is not None and self._ticket.trial is not None

    def __repr__(self) -> str:
        if self._settled is None:
            return f"<BreakerPermit plain generation={self._generation}>"
        state = "settled" if self._settled else "open"
        return f"<BreakerPermit trial={self.trial} {state}>"


def _share(value: object, path: str) -> float | None:
    """``None``, or a share above 0 and at most 1."""
    return None if value is None else number(value, path, what="a share", maximum=1.0)


def check_policy(
    prefix: str = "",
    *,
    failure_threshold: object = 5,
    window: object = 60.0,
    recovery_time: object = 30.0,
    half_open_max_calls: object = 1,
    failure_rate: object = None,
    slow_call_duration: object = None,
    slow_call_rate: object = None,
    minimum_calls: object = 10,
) -> BreakerPolicy:
    """Check a breaker's options and make its policy; each error's path is ``prefix`` plus the option's name.

    Shared by :class:`CircuitBreaker` (``prefix=""``) and the coordinator's
    ``"circuit_breaker"`` config section (``prefix="key.circuit_breaker."``),
    so both hold the same rules. A disabled ``failure_threshold`` (``None``)
    is :data:`~seawall._checks.MAX_COUNT` in the policy: never reached.
    """
    rate = _share(failure_rate, f"{prefix}failure_rate")
    slow_rate = _share(slow_call_rate, f"{prefix}slow_call_rate")
    slow_after = None if slow_call_duration is None else seconds(slow_call_duration, f"{prefix}slow_call_duration")
    if slow_rate is not None and slow_after is None:
        raise ConfigurationError(
            f"{prefix}slow_call_rate: needs slow_call_duration (when is a call slow?)", path=f"{prefix}slow_call_rate"
        )
    if slow_after is not None and slow_rate is None:
        raise ConfigurationError(
            f"{prefix}slow_call_duration: needs slow_call_rate (the share of slow calls that opens the breaker)",
            path=f"{prefix}slow_call_duration",
        )
    if failure_threshold is None:
        if rate is None and slow_rate is None:
            raise ConfigurationError(
                f"{prefix}failure_threshold: None needs failure_rate or slow_call_rate, or the breaker never opens",
                path=f"{prefix}failure_threshold",
            )
        threshold = MAX_COUNT  # never reached: only the rates open the breaker
    else:
        threshold = count(failure_threshold, f"{prefix}failure_threshold", minimum=1)
    return BreakerPolicy(
        threshold,
        seconds(window, f"{prefix}window"),
        seconds(recovery_time, f"{prefix}recovery_time"),
        count(half_open_max_calls, f"{prefix}half_open_max_calls", minimum=1),
        rate,
        slow_after,
        slow_rate,
        count(minimum_calls, f"{prefix}minimum_calls", minimum=1),
    )


class CircuitBreaker:
    """A circuit breaker guarding calls to one dependency.

    Args:
        name: Identifies the breaker in errors, logs, telemetry and its backend.
        failure_threshold: Failures within ``window`` that open the breaker;
            ``None`` when only a rate should (``failure_rate`` or ``slow_call_rate``).
        window: The rolling window failures are counted in, in seconds.
        recovery_time: How long the breaker stays open before admitting
            trials; also how long a trial may hold its slot before it no
            longer blocks another.
        half_open_max_calls: Trials allowed to run at once when half-open.
        exclude: Exception classes that are not failures (business errors):
            they propagate and count as a success.
        failure_rate: Open when failures / calls over the window reaches
            this share (0 < rate <= 1), once the window holds ``minimum_calls``.
        slow_call_duration: Seconds from which a call counts as slow (a
            ``ProtectionTimeout`` is slow too); needs ``slow_call_rate``.
        slow_call_rate: Open when slow calls / calls over the window reaches
            this share, once the window holds ``minimum_calls``.
        minimum_calls: Calls the window must hold before a rate decides.
        backend: Where the state lives; a private in-memory store by default.
            Breakers sharing a backend and a name share one state.
        clock: The monotonic clock (``seawall.FakeClock`` in tests); by default
            the running loop's, found when the breaker is built (``seawall._clock``).

    Raises:
        TypeError: a parameter has the wrong type.
        ValueError: (``ConfigurationError``) a number is not finite and
            positive, or a count is below 1.

    Use it as ``async with breaker:``, ``await breaker.call(fn, *args)``, or
    as a decorator ``@breaker`` on an async function; code that cannot await
    (or saves the frames) pairs :meth:`admit_nowait` with :meth:`settle_nowait`. The
    ``("seawall", "circuit_breaker", "fuse_installed")`` event is emitted once,
    when the breaker is constructed.
    """

    __slots__ = (
        "__weakref__",
        "_admit_local",
        "_backend",
        "_blocks",
        "_blocks_generation",
        "_blocks_ticket",
        "_clock",
        "_exclude",
        "_inflight",
        "_lane",
        "_last_state",
        "_name",
        "_now",
        "_plain",
        "_policy",
        "_rated",
        "_record",
        "_recovery_time",
        "_slow_after",
        "_succeed_local",
        "_threshold",
        "_unguarded_fn",
    )

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int | None = 5,
        window: float | timedelta = 60.0,
        recovery_time: float | timedelta = 30.0,
        half_open_max_calls: int = 1,
        exclude: type[Exception] | Iterable[type[Exception]] = (),
        failure_rate: float | None = None,
        slow_call_duration: float | timedelta | None = None,
        slow_call_rate: float | None = None,
        minimum_calls: int = 10,
        backend: BreakerBackend | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationTypeError(f"name must be a non-empty str, got {name!r}", path="name")
        self._name = name
        self._policy = check_policy(
            failure_threshold=failure_threshold,
            window=window,
            recovery_time=recovery_time,
            half_open_max_calls=half_open_max_calls,
            failure_rate=failure_rate,
            slow_call_duration=slow_call_duration,
            slow_call_rate=slow_call_rate,
            minimum_calls=minimum_calls,
        )
        self._threshold = None if failure_threshold is None else self._policy.failure_threshold
        # The last function call() found unguarded, with no slow-call mode (see call()).
        self._unguarded_fn: object = None
        self._rated = self._policy.rated
        self._slow_after = self._policy.slow_call_duration
        self._recovery_time = self._policy.recovery_time
        self._exclude = _exclusions(exclude)
        if clock is None:
            clock = current_clock()
        elif not isinstance(clock, Clock):
            raise ConfigurationTypeError(f"clock must provide now() and sleep(), got {clock!r}", path="clock")
        self._clock = clock
        self._now = clock.now
        if backend is None:
            backend = MemoryBreakerBackend()
        elif not isinstance(backend, BreakerBackend):
            raise ConfigurationTypeError(f"backend must implement BreakerBackend, got {backend!r}", path="backend")
        if self._rated and not getattr(backend, "supports_rate_modes", False):
            option = "failure_rate" if failure_rate is not None else "slow_call_rate"
            raise ConfigurationError(
                f"{option}: rate modes (failure_rate, slow_call_duration, slow_call_rate) are not yet supported "
                f"on {type(backend).__name__}; use failure_threshold there, or the in-memory backend",
                path=option,
            )
        self._backend = backend
        # The in-memory store is read synchronously (the fast paths); any
        # other store is asked through its async protocol on every call.
        self._record: BreakerRecord | None = backend.record(name) if isinstance(backend, MemoryBreakerBackend) else None
        # A rated breaker's fast path for its closed successes into its record
        # (set exactly when both are: the in-memory paths test it for "rated").
        self._lane: SuccessLane | None = (
            self._record.lane(self._policy) if self._record is not None and self._rated else None
        )
        # A shared store that admits a closed call from its own view (Redis):
        # the breaker's synchronous path for it. A rate counts successes, so
        # in the rate modes only on a store that counts them without an await.
        self._succeed_local = (
            backend.breaker_succeed_local
            if self._record is None and self._rated and isinstance(backend, LocalSuccess)
            else None
        )
        self._admit_local = (
            backend.breaker_admit_local
            if self._record is None
            and isinstance(backend, LocalAdmission)
            and (not self._rated or self._succeed_local is not None)
            else None
        )
        self._last_state = _CLOSED
        self._inflight: dict[object, _Inflight] = {}
        # ``async with`` blocks on the closed fast path: how many run, and the
        # generation they were all admitted in (see the module docstring).
        self._blocks = 0
        self._blocks_generation = 0
        self._blocks_ticket = Ticket(-1, None)  # (a shared store's: the ticket the counted blocks were admitted with)
        self._plain = BreakerPermit(Ticket(-1, None), shared=True, counts_successes=self._rated)
        if BREAKER_FUSE_INSTALLED.handlers:
            BREAKER_FUSE_INSTALLED.emit(
                {},
                {
                    "name": name,
                    "failure_threshold": self._policy.failure_threshold,
                    "window": self._policy.window,
                    "recovery_time": self._policy.recovery_time,
                    "half_open_max_calls": self._policy.half_open_max_calls,
                },
            )

    # -- configuration -------------------------------------------------

    @property
    def name(self) -> str:
        """Identifies the breaker in errors, logs, telemetry and its backend."""
        return self._name

    @property
    def half_open_max_calls(self) -> int:
        """Trials allowed to run at once when half-open."""
        return self._policy.half_open_max_calls

    @property
    def failure_threshold(self) -> int | None:
        """Failures within ``window`` that open the breaker (``None``: only the rates do)."""
        return self._threshold

    @property
    def failure_rate(self) -> float | None:
        """The failure share over the window that opens the breaker, if that mode is on."""
        return self._policy.failure_rate

    @property
    def slow_call_duration(self) -> float | None:
        """Seconds from which a call counts as slow, if that mode is on."""
        return self._policy.slow_call_duration

    @property
    def slow_call_rate(self) -> float | None:
        """The slow-call share over the window that opens the breaker, if that mode is on."""
        return self._policy.slow_call_rate

    @property
    def minimum_calls(self) -> int:
        """Calls the window must hold before a rate decides."""
        return self._policy.minimum_calls

    @property
    def window(self) -> float:
        """The rolling window failures are counted in, in seconds."""
        return self._policy.window

    @property
    def recovery_time(self) -> float:
        """Seconds the breaker stays open before admitting trials."""
        return self._recovery_time

    @property
    def exclude(self) -> tuple[type[Exception], ...]:
        """Exception classes that count as success."""
        return self._exclude

    @property
    def backend(self) -> BreakerBackend:
        """The state store."""
        return self._backend

    @property
    def decides_locally(self) -> bool:
        """Whether :meth:`admit_nowait`/:meth:`settle_nowait` decide (the state is in this process).

        ``False`` with a shared store (Redis): they raise :class:`anyio.WouldBlock`
        there, and ``async with breaker`` (or :meth:`call`) is the way in.
        """
        return self._record is not None

    # -- state -----------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The state a call arriving now would meet.

        With a shared (non-memory) backend this is the state seen by the
        last operation of this instance; ``await status()`` asks the backend.
        """
        record = self._record
        if record is None:
            return self._last_state
        return record.effective_state(self._policy, self._now())

    async def status(self) -> BreakerStatus:
        """A snapshot of the breaker's state and counts."""
        now = self._now()
        record = self._record
        if record is not None:
            snapshot = record.snapshot(self._policy, now)
        else:
            snapshot = await self._backend.breaker_snapshot(self._name, self._policy, now)
            self._last_state = snapshot.state
        policy = self._policy
        return BreakerStatus(
            name=self._name,
            state=snapshot.state,
            failure_count=snapshot.failure_count,
            failure_threshold=self._threshold,
            recovery_time=policy.recovery_time,
            retry_after=snapshot.retry_after,
            window=policy.window,
            half_open_max_calls=policy.half_open_max_calls,
            trials_in_flight=snapshot.trials,
            calls=snapshot.calls,
            failure_rate=snapshot.failure_rate,
            slow_call_rate=snapshot.slow_call_rate,
            reachable=snapshot.reachable,
        )

    async def reset(self) -> None:
        """Close the breaker and forget its failures; trials in flight decide nothing more."""
        await self._force(_CLOSED)

    async def trip(self) -> None:
        """Open the breaker now, for a fresh ``recovery_time``."""
        await self._force(_OPEN)

    async def _force(self, state: BreakerState) -> None:
        now = self._now()
        record = self._record
        if record is not None:
            transition = record.force(self._policy, now, state)
        else:
            transition = await self._backend.breaker_force(self._name, self._policy, now, state)
            self._last_state = state
        if transition is not None:
            self._changed(transition)

    # -- the non-waiting form -------------------------------------------

    def admit_nowait(self) -> BreakerPermit:
        """Admit one call now, synchronously, or raise: what entering ``async with breaker`` decides.

        Pair it with :meth:`settle_nowait` once the call has ended. It needs
        the breaker's state in this process (the default in-memory backend);
        with a shared backend (Redis) admission is a round trip, and it raises
        :class:`anyio.WouldBlock` having done nothing: use ``async with
        breaker`` or :meth:`call` then.

        Returns:
            A :class:`BreakerPermit` naming the generation the call was
            admitted in. When the breaker is closed and nobody listens to
            ``call_executed`` (nor times calls for ``slow_call_duration``)
            it is the breaker's shared permit of the current generation
            (nothing is allocated): a failure must be settled, and a success
            too under a rate mode (otherwise :attr:`BreakerPermit.plain`: a
            success need not be).
            Any other permit - a half-open trial, a call timed for telemetry,
            a call made inside a trial of this breaker - must be settled
            exactly once, whatever the outcome, in the task that admitted it,
            or a trial slot stays taken until ``recovery_time`` passes.

        Raises:
            CircuitOpenError: The breaker is open, or its trial slots are taken.
            anyio.WouldBlock: The state lives in a shared backend; nothing was done.
        """
        record = self._record
        if record is None:
            raise WouldBlock
        state = record.state
        if state is _CLOSED and not BREAKER_CALL_EXECUTED.handlers and self._slow_after is None:
            permit = self._plain
            if permit._generation != record.generation:
                # The first closed call of a new generation: the only allocation.
                permit = self._plain = BreakerPermit(
                    Ticket(record.generation, None), shared=True, counts_successes=self._rated
                )
            return permit
        if state is _OPEN:
            self._reject_while_open(record)
        if self._covered(record, scoped=True):
            return BreakerPermit(None)
        ticket = self._admit(record)
        start = self._now() if BREAKER_CALL_EXECUTED.handlers or self._rated else None
        if ticket.trial is None:
            return BreakerPermit(ticket, start)
        key = _task_key()
        return BreakerPermit(ticket, start, key=key, entry=self._register(key, ticket, start, permit=True))

    def settle_nowait(self, permit: BreakerPermit | None, exc: BaseException | None = None) -> None:
        """Record how a call admitted by :meth:`admit_nowait` ended; what leaving ``async with breaker`` records.

        Args:
            permit: What :meth:`admit_nowait` returned for the call. ``None``
                still means a closed call admitted without a permit: with no
                generation to check, its failure counts in the current period.
            exc: The exception the call raised, or ``None`` for a success. An
                ``Exception`` is a failure unless it is one of ``exclude``;
                cancellation and other ``BaseException`` are neither.

        Raises:
            RuntimeError: ``permit`` (other than a shared one) was settled already.
            anyio.WouldBlock: The state lives in a shared backend (no permit
                can come from such a breaker).
        """
        shared = permit is None or permit._settled is None
        if exc is None and shared and not self._rated:
            return  # a closed call's success changes nothing
        record = self._record
        if record is None:
            raise WouldBlock
        if permit is None or shared:
            if self._rated:
                self._settle_shared_rated(record, -1 if permit is None else permit._generation, exc)
            elif self._outcome(exc) == "failure":
                self._fail_plain(record, -1 if permit is None else permit._generation)
            return
        if permit._settled:
            raise RuntimeError("this BreakerPermit was settled already")
        permit._settled = True
        if permit._entry is not None:
            self._unregister(permit._key, permit._entry)
        if permit._ticket is not None:
            self._settle(record, permit._ticket, self._outcome(exc), permit._start, exc)

    # -- the guarded call ------------------------------------------------

    # ``__aenter__``/``__aexit__`` are plain methods returning an awaitable:
    # ``async with`` only needs that, and it lets the in-memory paths skip
    # creating a coroutine - they return the finished ``DONE`` (see
    # _awaitables), and a rejection is raised before anything is awaited.
    # Only a shared store's round trip needs a real coroutine.

    def __aenter__(self) -> Awaitable[None]:
        record = self._record
        if record is None:
            if self._slow_after is not None and self._admit_local is not None:
                return self._aenter_timed()
            ticket = self._local_ticket()
            if ticket is None:
                return self._aenter_remote()
            # Closed, decided by the store's view: counted like the in-memory fast path.
            if not self._blocks:
                self._blocks_generation = ticket.generation
                self._blocks_ticket = ticket
                self._blocks = 1
            elif self._blocks_generation == ticket.generation:
                self._blocks += 1
            else:
                self._inflight[_task_key()] = _Inflight(ticket, None, None)  # blocks of an older generation run
            return DONE
        state = record.state
        if state is _CLOSED and not BREAKER_CALL_EXECUTED.handlers and not self._inflight and self._slow_after is None:
            # The fast path: the block is counted, not tracked. Every counted
            # block was admitted in _blocks_generation, so its exit knows the
            # generation without finding its task.
            blocks = self._blocks
            if not blocks:
                self._blocks_generation = record.generation
                self._blocks = 1
                return DONE
            if self._blocks_generation == record.generation:
                self._blocks = blocks + 1
                return DONE
            # Blocks of an older generation still run: track this one until they are done.
        elif state is _OPEN:
            self._reject_while_open(record)
        self._enter_tracked(record)
        return DONE

    def _enter_tracked(self, record: BreakerRecord) -> None:
        key = _task_key()
        inflight = self._inflight
        outer = inflight.get(key)
        if self._covers(outer, record):
            inflight[key] = _Inflight(None, None, outer)
            return
        ticket = self._admit(record)
        timed = BREAKER_CALL_EXECUTED.handlers or self._rated
        inflight[key] = _Inflight(ticket, self._now() if timed else None, outer)

    def _local_ticket(self) -> Ticket | None:
        """A shared store's in-process admission of a plain closed call (see :class:`LocalAdmission`), or ``None``.

        Only with nothing tracked (no trial in any task could cover the call)
        and nobody timing calls for ``call_executed``.
        """
        local = self._admit_local
        if local is None or self._inflight or BREAKER_CALL_EXECUTED.handlers:
            return None
        ticket = local(self._name, self._policy)
        if ticket is not None:
            self._last_state = _CLOSED
        return ticket

    def _aenter_timed(self) -> Awaitable[None]:
        """``__aenter__`` of a slow-call breaker on a shared store: timed, admitted locally when closed."""
        key = _task_key()
        inflight = self._inflight
        outer = inflight.get(key)
        if self._covers(outer, None):
            inflight[key] = _Inflight(None, None, outer)
            return DONE
        local = self._admit_local
        ticket = None if local is None else local(self._name, self._policy)
        if ticket is None:
            return self._aenter_remote()
        self._last_state = _CLOSED
        inflight[key] = _Inflight(ticket, self._now(), outer)
        return DONE

    async def _aenter_remote(self) -> None:
        key = _task_key()
        inflight = self._inflight
        outer = inflight.get(key)
        if self._covers(outer, None):
            inflight[key] = _Inflight(None, None, outer)
            return
        ticket = await self._admit_remote()
        # The task's stack cannot have changed while this task awaited.
        timed = BREAKER_CALL_EXECUTED.handlers or self._rated
        inflight[key] = _Inflight(ticket, self._now() if timed else None, outer)

    def _pop(self) -> _Inflight | None:
        """Take the current task's innermost tracked block off its stack (``None``: it has none).

        Entries of permits are passed over: a permit admitted inside the
        block may be settled after it ends.
        """
        key = _task_key()
        entry = self._inflight.get(key)
        while entry is not None and entry.permit:
            entry = entry.outer
        if entry is not None:
            self._unregister(key, entry)
        return entry

    def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Awaitable[None]:
        record = self._record
        if record is None:
            return self._aexit_shared(exc)
        if self._inflight:
            # A block entered while anything is tracked is tracked too, so a
            # task's tracked blocks are inside its counted ones: a task with
            # a block entry is leaving a tracked block.
            entry = self._pop()
            if entry is not None:
                if entry.ticket is not None:
                    self._settle(record, entry.ticket, self._outcome(exc), entry.start, exc)
                return DONE
        self._blocks -= 1
        if exc_type is None:
            if self._lane is not None and self._blocks_generation == record.generation:
                # A rate counts successes too (a counted block is never timed: no slow-call mode here).
                transition = self._lane.succeed(self._now())
                if transition is not None:
                    self._changed(transition)
        elif self._outcome(exc) == "failure":
            self._fail_plain(record, self._blocks_generation)
        return DONE

    def _aexit_shared(self, exc: BaseException | None) -> Awaitable[None]:
        """``__aexit__`` on a shared store: awaits only what the store must hear (see :class:`LocalAdmission`)."""
        # As in memory, a block entered while anything is tracked is tracked
        # too: a task with no tracked entry is leaving a counted block.
        entry = self._pop() if self._inflight else None
        if entry is None:
            if not self._blocks:
                return DONE  # (no counted block: a tracked entry of another form ended it)
            self._blocks -= 1
            succeed = self._succeed_local
            if succeed is not None:
                if exc is None:
                    succeed(self._name, self._policy, self._blocks_ticket)  # (_end_local's common case)
                    return DONE
                return self._end_local(self._blocks_ticket, None, exc)
            if exc is None or self._outcome(exc) != "failure":
                return DONE  # a closed call's success or cancellation changes nothing
            return self._aexit_remote(Ticket(self._blocks_generation, None), None, exc)
        ticket = entry.ticket
        if ticket is None:
            return DONE  # a block inside a trial of this breaker decides nothing
        if self._succeed_local is not None and ticket.trial is None:
            return self._end_local(ticket, entry.start, exc)
        if (
            self._admit_local is not None
            and ticket.trial is None
            and entry.start is None
            and (exc is None or self._outcome(exc) != "failure")
        ):
            return DONE  # a plain success the store need not hear of
        return self._aexit_remote(ticket, entry.start, exc)

    def _end_local(self, ticket: Ticket, start: float | None, exc: BaseException | None) -> Awaitable[None]:
        """A plain call of a rated breaker on a store that counts successes locally ended.

        A success that was not slow is counted by the store without an await
        (no round trip, see :class:`LocalSuccess`); a failure or a slow call
        is settled, so the rates are judged when it arrives.
        """
        outcome = "success" if exc is None else self._outcome(exc)
        if outcome == "cancelled" and start is None:
            return DONE  # neither success nor failure, and nobody times it
        if outcome == "success":
            now = self._now() if start is not None else 0.0
            if not self._slow(start, now, exc):
                succeed = self._succeed_local
                assert succeed is not None
                succeed(self._name, self._policy, ticket)
                if start is not None:
                    self._executed(ticket, outcome, now - start)
                return DONE
        return self._aexit_remote(ticket, start, exc)

    async def _aexit_remote(self, ticket: Ticket, start: float | None, exc: BaseException | None) -> None:
        # The block may be ending because its scope was cancelled; the store
        # must still hear of it, or a trial slot stays taken.
        with anyio.CancelScope(shield=True):
            await self._settle_remote(ticket, self._outcome(exc), start, exc)

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``await fn(*args, **kwargs)`` through the breaker and return its result.

        A function this breaker guards already (``@breaker``) runs as it is:
        its own layer decides.

        Raises:
            CircuitOpenError: the breaker is open (or its trial slots are
                taken); ``fn`` was not called.
        """
        record = self._record
        if record is not None:
            state = record.state
            if state is _CLOSED and not BREAKER_CALL_EXECUTED.handlers:
                generation = record.generation
                if self._lane is not None:  # rated
                    if fn is not self._unguarded_fn:
                        if self._slow_after is not None or getattr(fn, GUARDED_BY, None) is not None:
                            # Timed, or guarded by a layer that counts it itself (successes too).
                            return await self._call_rated(record, generation, fn, args, kwargs)
                        self._unguarded_fn = fn  # (a one-entry cache: the check costs more than the call)
                    try:
                        result = await fn(*args, **kwargs)
                    except Exception as exc:
                        self._settle_rated(record, generation, exc)
                        raise
                    if generation == record.generation:
                        # SuccessLane.succeed's common case, inline: its frame would
                        # cost a fifth of what counting the success adds (see there).
                        lane = self._lane
                        now = self._now()
                        if now < lane.until and lane.left > 1:
                            lane.left -= 1
                        else:
                            transition = lane.succeed(now)
                            if transition is not None:
                                self._changed(transition)
                    return result
                try:
                    return await fn(*args, **kwargs)
                except Exception as exc:
                    # A guarded ``fn`` counted its failure itself (a failure path, so the lookup is free).
                    if not isinstance(exc, self._exclude) and not self.guards(fn):
                        self._fail_plain(record, generation)
                    raise
            if state is _OPEN:
                self._reject_while_open(record)
        elif (ticket := self._local_ticket()) is not None:
            return await self._call_local(ticket, fn, args, kwargs)
        if self.guards(fn) or self._covered(record):
            return await fn(*args, **kwargs)
        return await self._call_tracked(record, fn, args, kwargs)

    async def _call_local(self, ticket: Ticket, fn: Callable[..., Awaitable[T]], args: Any, kwargs: Any) -> T:
        """call() of a closed breaker on a shared store that admitted it locally: only a failure is settled."""
        if self._succeed_local is not None:
            return await self._call_local_rated(ticket, fn, args, kwargs)
        try:
            return await fn(*args, **kwargs)
        except Exception as exc:
            # A guarded ``fn`` counted its failure itself (a failure path, so the lookup is free).
            if not isinstance(exc, self._exclude) and not self.guards(fn):
                with anyio.CancelScope(shield=True):
                    await self._settle_remote(ticket, "failure", None, exc)
            raise

    async def _call_local_rated(self, ticket: Ticket, fn: Callable[..., Awaitable[T]], args: Any, kwargs: Any) -> T:
        """_call_local() in the rate modes: a success is counted too, by the store, without a round trip."""
        if fn is not self._unguarded_fn:
            if self.guards(fn):
                return await fn(*args, **kwargs)  # its own layer counts it, successes too
            self._unguarded_fn = fn  # (a one-entry cache: the check costs more than the call)
        start = self._now() if self._slow_after is not None else None
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            await self._end_local(ticket, start, exc)
            raise
        await self._end_local(ticket, start, None)
        return result

    def _settle_shared_rated(self, record: BreakerRecord, generation: int, exc: BaseException | None) -> None:
        """A rated breaker's shared permit of ``generation`` (negative: unknown) was settled with ``exc``."""
        if generation >= 0 and generation != record.generation:
            return  # admitted before the breaker last changed state: it decides nothing
        if exc is None and self._lane is not None:
            transition = self._lane.succeed(self._now())  # (a closed state is the lane's to check)
            if transition is not None:
                self._changed(transition)
        else:
            self._settle(record, None, self._outcome(exc), None, exc)

    def _settle_rated(self, record: BreakerRecord, generation: int, exc: Exception) -> None:
        """A plain call of a rated breaker, admitted in ``generation``, raised ``exc`` (untimed)."""
        if generation == record.generation:
            self._settle(record, None, self._outcome(exc), None, exc)

    async def _call_rated(
        self, record: BreakerRecord, generation: int, fn: Callable[..., Awaitable[T]], args: Any, kwargs: Any
    ) -> T:
        """call()'s closed path under a rate mode, timed (slow calls count) or of a guarded ``fn``."""
        if self.guards(fn):
            return await fn(*args, **kwargs)  # its own layer counts it, successes too
        now = self._now
        slow_after = self._slow_after
        start = now() if slow_after is not None else 0.0
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            if generation == record.generation:
                self._settle(record, None, self._outcome(exc), start if slow_after is not None else None, exc)
            raise
        if generation == record.generation:
            end = now()
            if slow_after is not None and end - start >= slow_after:
                self._settle(record, None, "success", start)
            elif self._lane is not None:  # (always: the closed in-memory path of a rated breaker)
                transition = self._lane.succeed(end)
                if transition is not None:
                    self._changed(transition)
        return result

    async def _call_tracked(
        self, record: BreakerRecord | None, fn: Callable[..., Awaitable[T]], args: Any, kwargs: Any
    ) -> T:
        """A call off the closed fast path: admitted with a ticket, and registered by task while it is a trial."""
        ticket = self._admit(record) if record is not None else await self._admit_remote()
        start = self._now() if BREAKER_CALL_EXECUTED.handlers or self._rated else None
        key = entry = None
        if ticket.trial is not None:
            # Layers of this breaker inside the trial must see it (see _covered).
            key = _task_key()
            entry = self._register(key, ticket, start)
        outcome: Outcome = "cancelled"
        error: BaseException | None = None
        try:
            result = await fn(*args, **kwargs)
            outcome = "success"
            return result
        except Exception as exc:
            outcome = "success" if isinstance(exc, self._exclude) else "failure"
            error = exc
            raise
        finally:
            if entry is not None:
                self._unregister(key, entry)
            if record is not None:
                self._settle(record, ticket, outcome, start, error)
            else:
                # Settling a shared store awaits; shield it so a cancelled
                # call still frees its trial slot.
                with anyio.CancelScope(shield=True):
                    await self._settle_remote(ticket, outcome, start, error)

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an async function so every call goes through the breaker.

        A function this breaker guards already is returned as it is: one
        layer, not two.
        """
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@{type(self).__name__} decorates async functions, got {fn!r}")
        if self.guards(fn):
            return fn  # guarded already: one layer, not two
        call = self.call
        record = None if self._rated else self._record  # (a rated breaker has no inline closed path)
        breaker = self

        @functools.wraps(fn)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            # call()'s closed fast path, inlined: one coroutine fewer per call.
            if record is not None and record.state is _CLOSED and not BREAKER_CALL_EXECUTED.handlers:
                generation = record.generation
                try:
                    return await fn(*args, **kwargs)
                except Exception as exc:
                    if not isinstance(exc, breaker._exclude):
                        breaker._fail_plain(record, generation)
                    raise
            return await call(fn, *args, **kwargs)

        setattr(guarded, GUARDED_BY, self)
        return guarded

    # -- nesting ---------------------------------------------------------

    def guards(self, fn: object) -> bool:
        """Whether ``fn`` came from ``@breaker`` of this breaker or of one sharing its state."""
        other = guarded_by(fn)
        return other is not None and (other is self or (other._backend is self._backend and other._name == self._name))

    @staticmethod
    def _covers(entry: _Inflight | None, record: BreakerRecord | None, *, scoped: bool = False) -> bool:
        """Whether a task whose innermost tracked call is ``entry`` is inside a current trial.

        ``async with``, :meth:`call` and ``@breaker`` have an extent: what the
        task runs before they end runs inside them. A permit has none - one
        task may hold several for separate calls - so another
        :meth:`admit_nowait` (``scoped=True``) is covered only by a layer
        with an extent, while those layers are covered by a permit's trial
        too (the caller is running the permitted call).
        """
        while entry is not None and (entry.ticket is None or (scoped and entry.permit)):
            entry = entry.outer
        if entry is None or entry.ticket is None or entry.ticket.trial is None:
            return False
        # A trial of an older generation decides nothing, so it covers nothing:
        # what runs inside it now is a call of the new period. (A shared store's
        # generation is not known here; its trials are taken as current.)
        return record is None or entry.ticket.generation == record.generation

    def _covered(self, record: BreakerRecord | None, *, scoped: bool = False) -> bool:
        """Whether the current task is inside a current trial of this breaker (see :meth:`_covers`)."""
        inflight = self._inflight
        return bool(inflight) and self._covers(inflight.get(_task_key()), record, scoped=scoped)

    def _register(self, key: object, ticket: Ticket, start: float | None, *, permit: bool = False) -> _Inflight:
        inflight = self._inflight
        entry = inflight[key] = _Inflight(ticket, start, inflight.get(key), permit=permit)
        return entry

    def _unregister(self, key: object, entry: _Inflight) -> None:
        inflight = self._inflight
        top = inflight.get(key)
        if top is entry:
            if entry.outer is None:
                del inflight[key]
            else:
                inflight[key] = entry.outer
            return
        # Out of order (a permit settled after a later block or permit ended): unlink it.
        while top is not None and top.outer is not entry:
            top = top.outer
        if top is not None:
            top.outer = entry.outer

    # -- decisions -------------------------------------------------------

    def _outcome(self, exc: BaseException | None) -> Outcome:
        if exc is None:
            return "success"
        if not isinstance(exc, Exception):
            return "cancelled"
        return "success" if isinstance(exc, self._exclude) else "failure"

    def _fail_plain(self, record: BreakerRecord, generation: int) -> None:
        """A plain call admitted in ``generation`` failed (negative: its generation is unknown)."""
        if generation >= 0 and generation != record.generation:
            return  # admitted before the breaker last changed state: it decides nothing
        if self._rated:
            transition = record.count(self._policy, self._now(), True, False)
        else:
            transition = record.fail(self._policy, self._now())
        if transition is not None:
            self._changed(transition)

    def _admit(self, record: BreakerRecord) -> Ticket:
        admission = record.admit(self._policy, self._now())
        if admission.transition is not None:
            self._changed(admission.transition)
        if admission.ticket is None:
            raise self._rejected(admission.state, admission.retry_after)
        return admission.ticket

    async def _admit_remote(self) -> Ticket:
        admission = await self._backend.breaker_admit(self._name, self._policy, self._now())
        self._last_state = admission.state
        if admission.transition is not None:
            self._changed(admission.transition)
        if admission.ticket is None:
            raise self._rejected(admission.state, admission.retry_after)
        return admission.ticket

    def _reject_while_open(self, record: BreakerRecord) -> None:
        """Raise :class:`CircuitOpenError` while the open ``record`` is within its ``recovery_time``."""
        remaining = record.opened_at + self._recovery_time - self._now()
        if remaining > 0:
            if BREAKER_CALL_REJECTED.handlers:
                self._emit_rejected(_OPEN, remaining)
            raise _open_error(self._name, remaining)

    def _rejected(self, state: BreakerState, retry_after: float) -> CircuitOpenError:
        if BREAKER_CALL_REJECTED.handlers:
            self._emit_rejected(state, retry_after)
        return _open_error(self._name, retry_after)

    def _emit_rejected(self, state: BreakerState, retry_after: float) -> None:
        BREAKER_CALL_REJECTED.emit({"retry_after": retry_after}, {"name": self._name, "state": state.value})

    def _slow(self, start: float | None, now: float, exc: BaseException | None) -> bool:
        """Whether a call of a rated breaker was slow: it took ``slow_call_duration``, or timed out."""
        if isinstance(exc, ProtectionTimeout):
            return True
        limit = self._slow_after
        return limit is not None and start is not None and now - start >= limit

    def _settle(
        self,
        record: BreakerRecord,
        ticket: Ticket | None,
        outcome: Outcome,
        start: float | None,
        exc: BaseException | None = None,
    ) -> None:
        now = self._now()
        if self._rated:
            if ticket is not None or outcome != "cancelled":
                transition = record.settle(self._policy, now, ticket, outcome, self._slow(start, now, exc))
                if transition is not None:
                    self._changed(transition)
        elif ticket is not None or outcome == "failure":
            transition = record.settle(self._policy, now, ticket, outcome)
            if transition is not None:
                self._changed(transition)
        if start is not None:
            self._executed(ticket, outcome, now - start)

    async def _settle_remote(
        self, ticket: Ticket | None, outcome: Outcome, start: float | None, exc: BaseException | None = None
    ) -> None:
        now = self._now()
        if self._rated:  # (only on a store that declares supports_rate_modes)
            slow = self._slow(start, now, exc)
            transition = await self._backend.breaker_settle(self._name, self._policy, now, ticket, outcome, slow=slow)
        else:
            transition = await self._backend.breaker_settle(self._name, self._policy, now, ticket, outcome)
        if transition is not None:
            self._last_state = transition.new
            self._changed(transition)
        if start is not None:
            self._executed(ticket, outcome, now - start)

    def _executed(self, ticket: Ticket | None, outcome: Outcome, duration: float) -> None:
        if BREAKER_CALL_EXECUTED.handlers:
            BREAKER_CALL_EXECUTED.emit(
                {"duration": duration},
                {
                    "name": self._name,
                    "success": outcome == "success" if outcome != "cancelled" else None,
                    "outcome": outcome,
                    "trial": ticket is not None and ticket.trial is not None,
                },
            )

    def _changed(self, transition: Transition) -> None:
        old, new = transition
        if new is _OPEN:
            logger.warning(
                "circuit_breaker_opened", name=self._name, previous=old.value, recovery_time=self._recovery_time
            )
        elif new is _CLOSED:
            logger.info("circuit_breaker_closed", name=self._name, previous=old.value)
        else:
            logger.info("circuit_breaker_half_open", name=self._name, previous=old.value)
        if BREAKER_STATE_CHANGED.handlers:
            BREAKER_STATE_CHANGED.emit({}, {"name": self._name, "from": old.value, "to": new.value})

    def __repr__(self) -> str:
        record = self._record
        if record is None:
            return f"<CircuitBreaker {self._name!r} state={self._last_state.value} backend={self._backend!r}>"
        snapshot = record.snapshot(self._policy, self._now())
        policy = self._policy
        return (
            f"<CircuitBreaker {self._name!r} state={snapshot.state.value} "
            f"failures={snapshot.failure_count}/{self._threshold} "
            f"trials={snapshot.trials}/{policy.half_open_max_calls}>"
        )
