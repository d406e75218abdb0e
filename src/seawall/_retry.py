"""Retry: exponential backoff with full jitter, bounded by a deadline and by a retry budget.

A :class:`Retry` is a policy: how many attempts, how long to wait between
them, which exceptions are worth another attempt. It runs a call three ways::

    await retry.call(fn, *args)          # a call

    @retry                               # a decorated async function
    async def fetch() -> bytes: ...

    async for attempt in retry:          # a block (the form of stamina)
        with attempt:
            ...

and ``AsyncInfrastructure`` runs a key's ``"retry"`` section with it, each
attempt through the key's whole chain (see ``docs/retry.md``).

The rules, the same in every form:

* The wait before retry *n* (``n = 1`` after the first attempt failed) is
  ``min(maximum, initial * multiplier ** (n - 1))``, scaled by
  ``1 - jitter * random()``: with ``jitter=1`` (the default) a uniform draw
  from ``(0, backoff]``, the "full jitter" of Brooker's *Exponential Backoff
  and Jitter*, which spreads clients that failed together.
* A :class:`~seawall.Rejected` error (or any seawall error) with a
  ``retry_after`` waits at least that long.
* No wait ever passes the deadline: the call's own ``timeout`` (standalone)
  or the protection key's (in the coordinator), and the enclosing anyio
  deadline (``anyio.current_effective_deadline()``). When it would, the call
  gives up at once.
* A retry is made only while the :class:`RetryBudget` allows it: over the
  last 10 s, retries stay within ``budget_ratio`` x first attempts +
  ``budget_min_per_second`` x 10 (the retry budget of Finagle, gRPC and
  Envoy), so an outage never multiplies the load on what is down.
* When the call gives up, the last attempt's own exception propagates,
  unchanged (there is no "retry error"). Cancellation (a ``BaseException``)
  is never retried, nor caught.

Which exceptions are retried: ``exclude`` always wins; then ``retry_on`` when
given (exception classes, or a predicate of the exception); by default every
``Exception`` except the seawall errors that another attempt cannot change
(:class:`~seawall.ConfigurationError`, :class:`~seawall.NotFound`,
:class:`~seawall.PoolClosed`) and, in the coordinator, except what the key's
breaker excludes (business errors are no failure, so no reason to retry).

Telemetry: ``("seawall", "retry", "attempt")`` when a retry is scheduled
(``attempt``: the number of the attempt about to run, ``wait``: seconds),
``("seawall", "retry", "gave_up")`` when attempts or time ran out
(``limit``: ``"attempts"`` or ``"deadline"``), and ``("seawall", "retry",
"budget_exhausted")`` when the budget refused a retry. Metadata carries
``key`` (the retry's ``name``, or the protection key), ``kind`` and
``error_type`` of the exception and the exception itself as ``reason``.

Time comes from one :class:`~seawall.Clock` (``clock=``; a
:class:`~seawall.FakeClock` in tests, advanced with
``seawall.testing.advance``), so tests never sleep.
"""

from __future__ import annotations

import functools
import math
import random as _random
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Final, ParamSpec, TypeVar

import anyio

from seawall._checks import count, describe, number, seconds
from seawall._clock import Clock, MonotonicClock, current_clock
from seawall._errors import (
    ConfigurationError,
    ConfigurationTypeError,
    NotFound,
    PoolClosed,
    ProtectionTimeout,
    SeawallError,
)
from seawall._logging import Throttle
from seawall._telemetry import RETRY_ATTEMPT, RETRY_BUDGET_EXHAUSTED, RETRY_GAVE_UP

__all__ = ["Retry", "RetryAttempt", "RetryBudget", "RetryBudgetStatistics", "check_policy"]

P = ParamSpec("P")
T = TypeVar("T")

#: The window of the retry budget, in seconds.
BUDGET_WINDOW: Final = 10.0
#: Its buckets: a first attempt or a retry leaves the window at most a tenth of it late.
_BUDGET_BUCKETS: Final = 10

#: Seawall errors that another attempt cannot change: never retried by default.
_PERMANENT: Final = (ConfigurationError, NotFound, PoolClosed)

#: Budget exhaustion is logged once a second per retry at most (with the count not logged).
_LOG = Throttle(1.0)

RetryOn = type[Exception] | Iterable[type[Exception]] | Callable[[Exception], bool] | None


def _exceptions(value: object, path: str) -> tuple[type[Exception], ...]:
    """A tuple of ``Exception`` classes (one class is accepted alone)."""
    items = (value,) if isinstance(value, type) else value
    if not isinstance(items, Iterable) or isinstance(items, str | bytes):
        raise ConfigurationTypeError(
            f"{path}: expected an exception class or a list of them, got {describe(value)}", path=path
        )
    result = tuple(items)
    for index, item in enumerate(result):
        # Exception, not BaseException: cancellation is never retried, so naming it means nothing.
        if not (isinstance(item, type) and issubclass(item, Exception)):
            raise ConfigurationTypeError(
                f"{path}[{index}]: expected an Exception subclass, got {describe(item)}", path=f"{path}[{index}]"
            )
    return result


def check_policy(prefix: str = "", **options: Any) -> dict[str, Any]:
    """Validate the numeric options of a retry policy; errors name ``prefix`` + the option.

    The one rule for :class:`Retry` and the ``"retry"`` config section
    (``_config.RetryConfig``). Takes and returns any of ``attempts``,
    ``initial``, ``maximum``, ``multiplier``, ``jitter``, ``budget_ratio``,
    ``budget_min_per_second``, ``attempt_timeout``, ``timeout`` (the last two
    and ``budget_ratio`` may be ``None``).
    """
    checked: dict[str, Any] = {}
    for name, value in options.items():
        path = f"{prefix}{name}"
        if name == "attempts":
            checked[name] = count(value, path, minimum=1, maximum=10_000)
        elif name in ("initial", "maximum"):
            checked[name] = seconds(value, path, inclusive=True)
        elif name == "multiplier":
            checked[name] = number(value, path, minimum=1.0, inclusive=True, maximum=1e6)
        elif name == "jitter":
            checked[name] = number(value, path, what="a share", inclusive=True, maximum=1.0)
        elif name in ("budget_ratio", "budget_min_per_second"):
            none_ok = name == "budget_ratio"
            checked[name] = None if value is None and none_ok else number(value, path, inclusive=True, maximum=1e9)
        elif name in ("attempt_timeout", "timeout"):
            checked[name] = None if value is None else seconds(value, path)
        else:  # pragma: no cover - a caller's typo, not a user's
            raise TypeError(f"check_policy() got an unexpected option {name!r}")
    if "initial" in checked and "maximum" in checked and checked["maximum"] < checked["initial"]:
        path = f"{prefix}maximum"
        raise ConfigurationError(
            f"{path}: must be at least initial ({checked['initial']:g}), got {checked['maximum']:g}", path=path
        )
    return checked


@dataclass(frozen=True, slots=True)
class RetryBudgetStatistics:
    """A snapshot of a :class:`RetryBudget` (``budget.statistics()``).

    Attributes:
        first_attempts: First attempts over the last ``window`` seconds.
        retries: Retries made over the same window.
        allowance: Retries the window allows in all (``ratio`` x first attempts + the floor).
        refused: Retries the budget has refused since it was made.
        window: The window in seconds.
    """

    first_attempts: int
    retries: int
    allowance: float
    refused: int
    window: float

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as a JSON-ready dict (``available`` included)."""
        return {
            "first_attempts": self.first_attempts,
            "retries": self.retries,
            "allowance": self.allowance,
            "available": self.available,
            "refused": self.refused,
            "window": self.window,
        }

    @property
    def available(self) -> float:
        """How many more retries the budget would allow now."""
        return max(self.allowance - self.retries, 0.0)


class RetryBudget:
    """Retries allowed over a sliding window: ``ratio`` x first attempts + ``min_per_second`` x ``window``.

    Args:
        ratio: Retries allowed per first attempt (0.2: one retry per five calls).
        min_per_second: Retries allowed per second of the window whatever the
            traffic (so a quiet service still retries its few failures).
        window: The window in seconds (10 s).
        clock: The clock the window follows.

    O(1) per call: the window is ten buckets of ``window / 10`` seconds in a
    ring, with running totals; a call records into the current bucket, and
    moving time forward zeroes at most ten expired buckets.
    """

    __slots__ = (
        "_first_now",
        "_first_total",
        "_firsts",
        "_next",
        "_now",
        "_retries",
        "_retry_now",
        "_retry_total",
        "_tick",
        "_width",
        "floor",
        "ratio",
        "refused",
        "window",
    )

    def __init__(self, ratio: float, min_per_second: float, *, window: float = BUDGET_WINDOW, clock: Clock) -> None:
        checked = check_policy(budget_ratio=ratio, budget_min_per_second=min_per_second)
        self.ratio: float = checked["budget_ratio"]
        self.window = seconds(window, "window")
        self.floor: float = checked["budget_min_per_second"] * self.window
        self.refused = 0
        self._now = clock.now
        self._width = self.window / _BUDGET_BUCKETS
        self._firsts = [0] * _BUDGET_BUCKETS  # closed buckets of the window (the current one is *_now)
        self._retries = [0] * _BUDGET_BUCKETS
        self._first_total = self._retry_total = 0  # sums of the closed buckets
        self._first_now = self._retry_now = 0  # the current bucket
        self._tick = math.floor(self._now() / self._width)
        self._next = (self._tick + 1) * self._width  # when the current bucket closes

    def _advance(self, now: float) -> None:
        """Close the current bucket and drop those that left the window (at most all ten)."""
        tick = math.floor(now / self._width)
        if tick <= self._tick:  # (float rounding at a bucket's edge)
            self._next = (self._tick + 1) * self._width
            return
        firsts, retries = self._firsts, self._retries
        slot = self._tick % _BUDGET_BUCKETS
        # The current bucket becomes a closed one...
        self._first_total += self._first_now - firsts[slot]
        self._retry_total += self._retry_now - retries[slot]
        firsts[slot], retries[slot] = self._first_now, self._retry_now
        self._first_now = self._retry_now = 0
        # ...and the buckets that fell out of the window are emptied.
        for step in range(1, min(tick - self._tick, _BUDGET_BUCKETS) + 1):
            slot = (self._tick + step) % _BUDGET_BUCKETS
            self._first_total -= firsts[slot]
            self._retry_total -= retries[slot]
            firsts[slot] = retries[slot] = 0
        self._tick = tick
        self._next = (tick + 1) * self._width

    def record_first(self) -> float:
        """Count a first attempt (a call that starts); return the clock's reading."""
        now = self._now()
        if now >= self._next:
            self._advance(now)
        self._first_now += 1
        return now

    def try_retry(self) -> bool:
        """Spend one retry if the window allows it; return whether it did."""
        now = self._now()
        if now >= self._next:
            self._advance(now)
        firsts = self._first_total + self._first_now
        retries = self._retry_total + self._retry_now
        if retries + 1 > self.ratio * firsts + self.floor:
            self.refused += 1
            return False
        self._retry_now += 1
        return True

    def statistics(self) -> RetryBudgetStatistics:
        """The counts of the window as of now."""
        now = self._now()
        if now >= self._next:
            self._advance(now)
        firsts = self._first_total + self._first_now
        return RetryBudgetStatistics(
            first_attempts=firsts,
            retries=self._retry_total + self._retry_now,
            allowance=self.ratio * firsts + self.floor,
            refused=self.refused,
            window=self.window,
        )

    def __repr__(self) -> str:
        stats = self.statistics()
        return (
            f"RetryBudget(ratio={self.ratio!r}, floor={self.floor!r}, first_attempts={stats.first_attempts}, "
            f"retries={stats.retries}, refused={stats.refused})"
        )


def _enclosing_remaining() -> float:
    """Seconds until the enclosing anyio deadline (``inf`` without one)."""
    deadline = anyio.current_effective_deadline()
    return math.inf if deadline == math.inf else deadline - anyio.current_time()


class Retry:
    """A retry policy: exponential backoff with full jitter, a deadline and a retry budget.

    Args:
        attempts: Attempts in all, the first included (``1``: no retry).
        initial: Seconds of backoff before the first retry (before jitter).
        maximum: The longest backoff, in seconds (before jitter).
        multiplier: Growth of the backoff from one retry to the next.
        jitter: Share of the backoff drawn at random: ``1.0`` waits a uniform
            draw from ``(0, backoff]`` (full jitter), ``0.0`` exactly the backoff.
        retry_on: The exceptions to retry: a class, classes, or a predicate
            ``(exc) -> bool``; ``None`` for the default (see the module doc).
        exclude: Exception classes never retried (this wins over ``retry_on``).
        budget_ratio: Retries allowed per first attempt over the last 10 s
            (``None``: no budget).
        budget_min_per_second: Retries allowed per second whatever the traffic.
        attempt_timeout: Seconds one attempt may take; an attempt that takes
            longer is cancelled and fails with :class:`~seawall.ProtectionTimeout`
            (which is retried by default). ``None``: no limit of its own.
        timeout: Seconds all attempts and waits may take together; a wait that
            would pass it gives up instead. ``None``: only the enclosing anyio
            deadline bounds them. (In the coordinator the key's timeout is it.)
        name: Names the retry in telemetry (``key``) and logs.
        clock: Where waits and the budget's window take their time; by default
            the running loop's, found when the retry is built (a
            :class:`~seawall.FakeClock` in tests).
        random: A function returning a float in ``[0, 1)``, for the jitter
            (``random.Random(seed).random`` in tests).

    Raises:
        ConfigurationError: An argument is invalid; ``path`` names it.

    Durations accept a ``timedelta`` as well as seconds.
    """

    __slots__ = (
        "_attempt_timeout",
        "_attempts",
        "_budget",
        "_clock",
        "_exclude",
        "_initial",
        "_jitter",
        "_loop_clock",
        "_maximum",
        "_multiplier",
        "_name",
        "_predicate",
        "_random",
        "_retry_on",
        "_timeout",
    )

    def __init__(
        self,
        *,
        attempts: int = 3,
        initial: float | timedelta = 0.1,
        maximum: float | timedelta = 5.0,
        multiplier: float = 2.0,
        jitter: float = 1.0,
        retry_on: RetryOn = None,
        exclude: type[Exception] | Iterable[type[Exception]] = (),
        budget_ratio: float | None = 0.2,
        budget_min_per_second: float = 1.0,
        attempt_timeout: float | timedelta | None = None,
        timeout: float | timedelta | None = None,
        name: str = "retry",
        clock: Clock | None = None,
        random: Callable[[], float] | None = None,
    ) -> None:
        checked = check_policy(
            attempts=attempts,
            initial=initial,
            maximum=maximum,
            multiplier=multiplier,
            jitter=jitter,
            budget_ratio=budget_ratio,
            budget_min_per_second=budget_min_per_second,
            attempt_timeout=attempt_timeout,
            timeout=timeout,
        )
        self._attempts: int = checked["attempts"]
        self._initial: float = checked["initial"]
        self._maximum: float = checked["maximum"]
        self._multiplier: float = checked["multiplier"]
        self._jitter: float = checked["jitter"]
        self._attempt_timeout: float | None = checked["attempt_timeout"]
        self._timeout: float | None = checked["timeout"]
        self._exclude = _exceptions(exclude, "exclude")
        self._predicate: Callable[[Exception], bool] | None = None
        self._retry_on: tuple[type[Exception], ...] | None = None
        if retry_on is not None:
            if callable(retry_on) and not isinstance(retry_on, type):
                self._predicate = retry_on
            else:
                self._retry_on = _exceptions(retry_on, "retry_on")
        if not isinstance(name, str):
            raise ConfigurationTypeError(f"name: expected a str, got {describe(name)}", path="name")
        self._name = name
        if clock is not None and not isinstance(clock, Clock):
            raise ConfigurationTypeError(f"clock: expected a seawall Clock, got {describe(clock)}", path="clock")
        if random is not None and not callable(random):
            raise ConfigurationTypeError(f"random: expected a callable, got {describe(random)}", path="random")
        # The loop's own clock: an attempt's timeout can be an anyio deadline (else a watchdog on the clock).
        self._loop_clock = clock is None or isinstance(clock, MonotonicClock)
        self._clock: Clock = clock if clock is not None else current_clock()
        self._random: Callable[[], float] = random if random is not None else _random.random
        ratio = checked["budget_ratio"]
        self._budget = (
            None
            if ratio is None
            else RetryBudget(ratio, checked["budget_min_per_second"], clock=self._clock)  # (validated above)
        )

    # -- the policy ------------------------------------------------------------

    @property
    def attempts(self) -> int:
        """Attempts in all, the first included."""
        return self._attempts

    @property
    def attempt_timeout(self) -> float | None:
        """Seconds one attempt may take (``None``: no limit of its own)."""
        return self._attempt_timeout

    @property
    def timeout(self) -> float | None:
        """Seconds all attempts and waits may take (``None``: no limit of its own)."""
        return self._timeout

    @property
    def name(self) -> str:
        """The retry's name in telemetry and logs."""
        return self._name

    @property
    def budget(self) -> RetryBudget | None:
        """The retry budget (``None``: retries are not budgeted)."""
        return self._budget

    @property
    def clock(self) -> Clock:
        """The clock waits and the budget follow."""
        return self._clock

    def backoff(self, retry: int) -> float:
        """The wait in seconds before retry number ``retry`` (1: after the first attempt failed), jitter drawn."""
        try:
            base = min(self._initial * self._multiplier ** (retry - 1), self._maximum)
        except OverflowError:  # far down a steep sequence: long past the cap
            base = self._maximum
        if self._jitter:
            return base * (1.0 - self._jitter * self._random())
        return base

    def retryable(self, exc: Exception, not_failures: tuple[type[Exception], ...] = ()) -> bool:
        """Whether ``exc`` is worth another attempt (``exclude``, then ``retry_on`` or the default).

        Args:
            exc: The exception of the attempt.
            not_failures: What the caller's breaker excludes from its failures;
                by default those are not retried either.
        """
        if isinstance(exc, self._exclude):
            return False
        if self._predicate is not None:
            return bool(self._predicate(exc))
        if self._retry_on is not None:
            return isinstance(exc, self._retry_on)
        return not isinstance(exc, _PERMANENT) and not isinstance(exc, not_failures)

    def start(self) -> float:
        """A call starts: count its first attempt in the budget; return the clock's reading."""
        budget = self._budget
        return budget.record_first() if budget is not None else self._clock.now()

    def schedule(
        self,
        exc: Exception,
        attempt: int,
        remaining: float = math.inf,
        *,
        not_failures: tuple[type[Exception], ...] = (),
        key: str | None = None,
    ) -> float | None:
        """The wait before the next attempt, after attempt number ``attempt`` failed with ``exc``.

        Returns ``None`` when the call must give up and ``exc`` propagate:
        ``exc`` is not retryable, the attempts are used up, the wait would pass
        the deadline (``remaining`` seconds, or the enclosing anyio deadline if
        sooner), or the budget refuses. Emits the telemetry of the decision.

        Args:
            exc: The exception of the failed attempt.
            attempt: Its number (1 for the first).
            remaining: Seconds left of the call's own deadline.
            not_failures: See :meth:`retryable`.
            key: Names the call in telemetry (default: the retry's ``name``).
        """
        if not self.retryable(exc, not_failures):
            return None
        if attempt >= self._attempts:
            self._gave_up(exc, attempt, "attempts", key)
            return None
        wait = self.backoff(attempt)
        retry_after = exc.retry_after if isinstance(exc, SeawallError) else None
        if retry_after is not None and retry_after > wait:
            wait = retry_after
        if wait >= min(remaining, _enclosing_remaining()):
            self._gave_up(exc, attempt, "deadline", key)
            return None
        budget = self._budget
        if budget is not None and not budget.try_retry():
            self._exhausted(exc, attempt, key)
            return None
        if RETRY_ATTEMPT.handlers:
            RETRY_ATTEMPT.emit({"attempt": attempt + 1, "wait": wait}, self._metadata(exc, key))
        return wait

    def _metadata(self, exc: Exception, key: str | None) -> dict[str, Any]:
        return {
            "key": self.name if key is None else key,
            "kind": type(exc).__name__,
            "error_type": getattr(exc, "error_type", None),
            "reason": exc,
        }

    def _gave_up(self, exc: Exception, attempt: int, limit: str, key: str | None) -> None:
        if RETRY_GAVE_UP.handlers:
            RETRY_GAVE_UP.emit({"attempts": attempt}, {**self._metadata(exc, key), "limit": limit})

    def _exhausted(self, exc: Exception, attempt: int, key: str | None) -> None:
        name = self.name if key is None else key
        _LOG.warning(
            "retry_budget_exhausted",
            ("budget", name),
            key=name,
            hint="retries are refused while they exceed the budget (an outage must not multiply the load)",
        )
        if RETRY_BUDGET_EXHAUSTED.handlers:
            RETRY_BUDGET_EXHAUSTED.emit({"attempts": attempt}, self._metadata(exc, key))

    # -- the forms -------------------------------------------------------------

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Await ``fn(*args, **kwargs)``, retrying as the policy says; return its result.

        Raises:
            Exception: The last attempt's own exception, unchanged.
        """
        start = self.start()
        deadline = start + self.timeout if self.timeout is not None else math.inf
        clock = self._clock
        attempt = 1
        limit = self.timeout if self.attempt_timeout is None else self.attempt_timeout
        if limit is not None and self.timeout is not None and self.timeout < limit:
            limit = self.timeout
        while True:
            try:
                if limit is None:
                    return await fn(*args, **kwargs)
                return await self._timed(fn(*args, **kwargs), limit)
            except Exception as exc:
                wait = self.schedule(exc, attempt, deadline - clock.now())
                if wait is None:
                    raise
                failed = exc
            await clock.sleep(wait)
            attempt += 1
            limit = self._limit(deadline - clock.now())
            if limit is not None and limit <= 0.0:
                raise failed  # the wait overran into the deadline (a real clock): no time for an attempt

    def _limit(self, remaining: float) -> float | None:
        """Seconds the next attempt may take, with ``remaining`` seconds of the call left (``None``: no limit)."""
        timeout = self.attempt_timeout
        if remaining == math.inf:
            return timeout
        return remaining if timeout is None or remaining < timeout else timeout

    async def _timed(self, attempt: Awaitable[T], limit: float) -> T:
        """Await one attempt for at most ``limit`` seconds of the clock, else raise ``ProtectionTimeout``."""
        if self._loop_clock:
            with anyio.CancelScope(deadline=anyio.current_time() + limit) as scope:
                return await attempt
            raise self._timed_out(limit)
        # An injected clock (a FakeClock): a watchdog sleeping on it cancels the attempt.
        scope = anyio.CancelScope()
        failed: Exception | None = None
        result: T | None = None
        async with anyio.create_task_group() as group:
            group.start_soon(_watchdog, self._clock, scope, limit)
            try:
                with scope:
                    result = await attempt
            except Exception as exc:
                failed = exc  # raised below, outside the group (which would wrap it)
            group.cancel_scope.cancel()
        if failed is not None:
            raise failed
        if scope.cancelled_caught:
            raise self._timed_out(limit)
        return result  # type: ignore[return-value]  # (set: the attempt neither failed nor timed out)

    def _timed_out(self, limit: float) -> ProtectionTimeout:
        message = f"an attempt of {self.name!r} did not finish within {limit:.3f}s"
        return ProtectionTimeout(message, key=self.name, timeout=limit)

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """``@retry`` makes an async function retry as the policy says."""

        @functools.wraps(fn)
        async def retrying(*args: P.args, **kwargs: P.kwargs) -> T:
            return await self.call(fn, *args, **kwargs)

        return retrying

    def __aiter__(self) -> AsyncIterator[RetryAttempt]:
        """``async for attempt in retry: with attempt: ...`` runs the block until it succeeds or gives up."""
        return _Attempts(self)

    def __repr__(self) -> str:
        return (
            f"Retry(name={self.name!r}, attempts={self._attempts}, initial={self._initial!r}, "
            f"maximum={self._maximum!r}, multiplier={self._multiplier!r}, jitter={self._jitter!r}, "
            f"budget={self._budget!r})"
        )


async def _watchdog(clock: Clock, scope: anyio.CancelScope, limit: float) -> None:
    await clock.sleep(limit)
    scope.cancel()


class RetryAttempt:
    """One attempt of ``async for attempt in retry:``; ``with attempt:`` guards its block.

    A retryable exception leaving the block is swallowed (the loop goes on to
    the next attempt, after the wait); any other, and the last attempt's, goes
    on. With ``attempt_timeout`` (or the retry's ``timeout``) the block runs
    under an anyio deadline of the event loop's clock.

    Attributes:
        number: The attempt's number, 1 for the first.
    """

    __slots__ = ("_attempts", "_limit", "_scope", "number")

    def __init__(self, attempts: _Attempts, number: int) -> None:
        self._attempts = attempts
        self.number = number
        self._scope: anyio.CancelScope | None = None
        self._limit = math.inf

    def __enter__(self) -> RetryAttempt:
        limit = self._limit = self._attempts.limit()
        if limit != math.inf:
            self._scope = anyio.CancelScope(deadline=anyio.current_time() + limit)
            self._scope.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        scope, self._scope = self._scope, None
        if scope is not None:
            swallowed = scope.__exit__(exc_type, exc, tb)
            if swallowed and scope.cancelled_caught:
                # The attempt's own deadline fired: a timeout of this attempt.
                timeout = self._attempts.retry._timed_out(self._limit)
                if not self._attempts.failed(timeout, self.number):
                    raise timeout
                return True
        if exc is None:
            self._attempts.succeeded()
            return False
        if not isinstance(exc, Exception):
            return False  # cancellation (and exits) are never retried
        return self._attempts.failed(exc, self.number)

    def __repr__(self) -> str:
        return f"<RetryAttempt {self.number} of {self._attempts.retry.name!r}>"


class _Attempts:
    """The iterator of ``async for attempt in retry``: one call's attempts."""

    __slots__ = ("_deadline", "_done", "_failed", "_number", "_wait", "retry")

    def __init__(self, retry: Retry) -> None:
        self.retry = retry
        self._number = 0
        self._wait: float | None = None  # the wait before the next attempt, once one failed
        self._failed: Exception | None = None  # the exception of the attempt that failed last
        self._done = False
        self._deadline = math.inf

    def __aiter__(self) -> _Attempts:
        return self

    async def __anext__(self) -> RetryAttempt:
        retry = self.retry
        if self._number == 0:
            start = retry.start()
            if retry.timeout is not None:
                self._deadline = start + retry.timeout
        elif self._done or self._wait is None:
            # The block succeeded (or the loop body did not enter the attempt): no more attempts.
            raise StopAsyncIteration
        else:
            wait, self._wait = self._wait, None
            await retry.clock.sleep(wait)
            if self._failed is not None and self._deadline - retry.clock.now() <= 0.0:
                raise self._failed  # the wait overran into the deadline (a real clock): no time for an attempt
        self._number += 1
        return RetryAttempt(self, self._number)

    def limit(self) -> float:
        """Seconds the current attempt may take (``inf``: no limit)."""
        remaining = self._deadline - self.retry.clock.now() if self._deadline != math.inf else math.inf
        timeout = self.retry.attempt_timeout
        return remaining if timeout is None else min(timeout, remaining)

    def succeeded(self) -> None:
        self._done = True

    def failed(self, exc: Exception, number: int) -> bool:
        """RetryAttempt ``number`` failed: schedule the next one (swallow ``exc``), or not (it propagates)."""
        remaining = self._deadline - self.retry.clock.now() if self._deadline != math.inf else math.inf
        self._wait = self.retry.schedule(exc, number, remaining)
        self._failed = exc if self._wait is not None else None
        return self._wait is not None
