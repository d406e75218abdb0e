"""seawall.Retry on its own: backoff, deadlines, retry_after, the budget, the three forms; on a fake clock."""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from trio.testing import MockClock

from seawall import (
    CircuitOpenError,
    ConfigurationError,
    ConfigurationTypeError,
    FakeClock,
    PoolClosed,
    ProtectionKeyNotFound,
    ProtectionTimeout,
    RateLimitExceeded,
    Retry,
    RetryBudget,
)
from seawall.testing import capture_events

pytestmark = pytest.mark.anyio

RETRY_EVENTS = [("seawall", "retry", name) for name in ("attempt", "gave_up", "budget_exhausted")]


def exact(clock: FakeClock, **options: Any) -> Retry:
    """A retry on ``clock`` whose waits are the plain backoff (no jitter drawn)."""
    options.setdefault("jitter", 0.0)
    return Retry(clock=clock, **options)


class Flaky:
    """An async callable that fails its first ``failures`` calls with fresh exceptions, then returns ``"ok"``."""

    def __init__(self, failures: int, error: Callable[[int], Exception] = lambda n: ConnectionError(n)) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0
        self.raised: list[Exception] = []

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            exc = self.error(self.calls)
            self.raised.append(exc)
            raise exc
        return "ok"


async def drive(clock: FakeClock, fn: Callable[[], Awaitable[Any]], *, step: float = 0.05, steps: int = 2000) -> Any:
    """Run ``fn()`` in a task, moving ``clock`` forward by ``step`` whenever every task is blocked.

    Returns its result, or returns (not raises) the exception it raised.
    """
    outcome: list[Any] = []

    async def runner() -> None:
        try:
            outcome.append(await fn())
        except Exception as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(runner)
        for _ in range(steps):
            await anyio.wait_all_tasks_blocked()
            if outcome:
                break
            clock.advance(step)
        else:  # pragma: no cover - a hung test
            group.cancel_scope.cancel()
            raise AssertionError("the call did not finish")
    return outcome[0]


# -- backoff -----------------------------------------------------------------


def test_backoff_is_exponential_and_capped_without_jitter() -> None:
    """Without jitter the waits are initial x multiplier^(n-1), capped at maximum."""
    retry = Retry(initial=0.1, multiplier=2.0, maximum=1.0, jitter=0.0, clock=FakeClock())
    assert [retry.backoff(n) for n in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert retry.backoff(5000) == 1.0  # no overflow far down the sequence
    steep = Retry(initial=1e-9, multiplier=1e6, maximum=60.0, jitter=0.0, clock=FakeClock())
    assert steep.backoff(10_000) == 60.0


def test_full_jitter_draws_between_zero_and_the_backoff() -> None:
    """jitter=1 waits backoff x (1 - random()): a uniform draw from (0, backoff], from the injected source."""
    draws = iter([0.0, 0.5, 0.999])
    retry = Retry(initial=1.0, multiplier=1.0, clock=FakeClock(), random=lambda: next(draws))
    assert [retry.backoff(1) for _ in range(3)] == pytest.approx([1.0, 0.5, 0.001])
    seeded = Retry(initial=2.0, maximum=2.0, clock=FakeClock(), random=random.Random(3).random)
    waits = [seeded.backoff(1) for _ in range(1000)]
    assert all(0.0 < wait <= 2.0 for wait in waits)
    assert 0.8 < sum(waits) / len(waits) < 1.2  # uniform: the mean is half the backoff


def test_partial_jitter_keeps_a_floor() -> None:
    """jitter=0.25 waits between 75% and 100% of the backoff."""
    retry = Retry(initial=4.0, jitter=0.25, clock=FakeClock(), random=lambda: 0.999999)
    assert retry.backoff(1) == pytest.approx(3.0, abs=1e-5)


# -- the call form -------------------------------------------------------------


async def test_a_first_success_makes_one_attempt_and_no_event() -> None:
    """A call that succeeds at once runs once, waits nothing and emits nothing."""
    clock = FakeClock()
    flaky = Flaky(0)
    with capture_events(RETRY_EVENTS) as events:
        assert await exact(clock).call(flaky) == "ok"
    assert (flaky.calls, clock.now(), events) == (1, 0.0, [])


async def test_retries_until_success_waiting_the_backoff() -> None:
    """Two failures then a success: three attempts, waits of 0.1 s and 0.2 s on the clock, one event per retry."""
    clock = FakeClock()
    flaky = Flaky(2)
    retry = exact(clock, attempts=3, initial=0.1, multiplier=2.0)
    with capture_events(RETRY_EVENTS) as events:
        assert await drive(clock, lambda: retry.call(flaky), step=0.1) == "ok"
    assert flaky.calls == 3
    assert clock.now() == pytest.approx(0.3)
    assert [(e.name, e.measurements["attempt"]) for e in events] == [("attempt", 2), ("attempt", 3)]
    assert [e.measurements["wait"] for e in events] == pytest.approx([0.1, 0.2])
    assert events[0].metadata["reason"] is flaky.raised[0]
    assert events[0].metadata["key"] == "retry"


async def test_the_last_attempts_own_exception_propagates_unchanged() -> None:
    """When attempts run out, the third attempt's exception is raised: that very object, not chained to the others."""
    clock = FakeClock()
    flaky = Flaky(10)
    with capture_events(RETRY_EVENTS) as events:
        raised = await drive(clock, lambda: exact(clock, attempts=3, initial=0.1).call(flaky))
    assert flaky.calls == 3
    assert raised is flaky.raised[-1]
    assert raised.__context__ is None
    assert raised.__cause__ is None
    assert [e.name for e in events] == ["attempt", "attempt", "gave_up"]
    assert events[-1].metadata["limit"] == "attempts"
    assert events[-1].measurements["attempts"] == 3


async def test_arguments_are_passed_to_every_attempt() -> None:
    """call(fn, *args, **kwargs) calls fn with them each time."""
    clock = FakeClock()
    seen: list[tuple[int, str]] = []

    async def fn(a: int, *, b: str) -> int:
        seen.append((a, b))
        if len(seen) < 2:
            raise ConnectionError
        return a

    assert await drive(clock, lambda: exact(clock, initial=0.05).call(fn, 1, b="x")) == 1
    assert seen == [(1, "x"), (1, "x")]


async def test_exclude_wins_over_retry_on() -> None:
    """An exception both retry_on and exclude match is not retried: it propagates from the first attempt."""

    class BusinessError(ValueError):
        pass

    clock = FakeClock()
    flaky = Flaky(10, lambda n: BusinessError(n))
    retry = exact(clock, retry_on=ValueError, exclude=[BusinessError])
    raised = await drive(clock, lambda: retry.call(flaky))
    assert isinstance(raised, BusinessError)
    assert flaky.calls == 1
    plain = Flaky(1, lambda n: ValueError(n))
    assert await drive(clock, lambda: retry.call(plain)) == "ok"  # a plain ValueError is retried


async def test_retry_on_restricts_what_is_retried() -> None:
    """With retry_on, other exceptions propagate at once; a predicate works too."""
    clock = FakeClock()
    flaky = Flaky(10, lambda n: KeyError(n))
    raised = await drive(clock, lambda: exact(clock, retry_on=(ConnectionError, TimeoutError)).call(flaky))
    assert isinstance(raised, KeyError)
    assert flaky.calls == 1
    odd = Flaky(2, lambda n: OSError(n))
    only_odd = exact(clock, attempts=5, retry_on=lambda exc: exc.args[0] % 2 == 1)
    raised = await drive(clock, lambda: only_odd.call(odd))
    assert isinstance(raised, OSError)
    assert raised.args == (2,)
    assert odd.calls == 2


@pytest.mark.parametrize("error", [ConfigurationError("bad"), ProtectionKeyNotFound(name="k"), PoolClosed(name="p")])
async def test_errors_another_attempt_cannot_change_are_not_retried_by_default(error: Exception) -> None:
    """Misconfiguration, a missing name and a closed pool propagate from the first attempt."""
    clock = FakeClock()
    flaky = Flaky(10, lambda n: error)
    assert await drive(clock, lambda: exact(clock).call(flaky)) is error
    assert flaky.calls == 1


async def test_decorator_retries_and_keeps_the_function_s_name() -> None:
    """@retry makes a retrying function with the wrapped one's name and arguments."""
    clock = FakeClock()
    calls: list[int] = []
    retry = exact(clock, initial=0.05)

    @retry
    async def fetch(n: int) -> int:
        """Fetch n."""
        calls.append(n)
        if len(calls) < 3:
            raise ConnectionError
        return n * 2

    assert fetch.__name__ == "fetch"
    assert fetch.__doc__ == "Fetch n."
    assert await drive(clock, lambda: fetch(21)) == 42
    assert calls == [21, 21, 21]


# -- retry_after, deadlines ----------------------------------------------------------


async def test_a_rejections_retry_after_is_waited_at_least() -> None:
    """A RateLimitExceeded with retry_after=2 waits 2 s although the backoff is 0.1 s."""
    clock = FakeClock()
    flaky = Flaky(1, lambda n: RateLimitExceeded(key="k", limit=1, window=1.0, retry_after=2.0))
    assert await drive(clock, lambda: exact(clock, initial=0.1).call(flaky), step=0.1) == "ok"
    assert clock.now() == pytest.approx(2.0)
    assert flaky.calls == 2


async def test_a_retry_after_past_the_deadline_gives_up_at_once() -> None:
    """An open breaker's retry_after of 5 s with 1 s of timeout left: no wait, the rejection propagates."""
    clock = FakeClock()
    flaky = Flaky(1, lambda n: CircuitOpenError(name="db", retry_after=5.0))
    with capture_events(RETRY_EVENTS) as events:
        raised = await drive(clock, lambda: exact(clock, timeout=1.0).call(flaky))
    assert raised is flaky.raised[0]
    assert clock.now() == 0.0
    assert flaky.calls == 1
    assert [(e.name, e.metadata["limit"]) for e in events] == [("gave_up", "deadline")]


async def test_backoff_never_waits_past_the_timeout() -> None:
    """timeout=1: waits of 0.4 then 0.8 s would end at 1.2 s, so it gives up at 0.4 s, before the deadline."""
    clock = FakeClock()
    flaky = Flaky(100)
    retry = exact(clock, attempts=10, initial=0.4, multiplier=2.0, timeout=1.0)
    raised = await drive(clock, lambda: retry.call(flaky), step=0.1)
    assert raised is flaky.raised[-1]
    assert flaky.calls == 2
    assert clock.now() == pytest.approx(0.4)
    assert clock.now() <= 1.0


async def test_backoff_never_waits_past_the_enclosing_deadline() -> None:
    """Inside an anyio scope with 30 s left, a 60 s backoff is not waited: the failure propagates at once."""
    clock = FakeClock()
    flaky = Flaky(1)
    retry = exact(clock, initial=60.0, maximum=60.0)
    with anyio.CancelScope(deadline=anyio.current_time() + 30.0):
        raised = await drive(clock, lambda: retry.call(flaky))
    assert raised is flaky.raised[0]
    assert flaky.calls == 1
    assert clock.now() == 0.0
    with anyio.CancelScope(deadline=anyio.current_time() + 300.0):  # room enough: it waits and retries
        assert await drive(clock, lambda: retry.call(Flaky(1)), step=10.0) == "ok"


async def test_timedelta_durations_are_accepted() -> None:
    """initial, maximum and timeouts take a timedelta as well as seconds."""
    retry = Retry(initial=timedelta(milliseconds=250), maximum=timedelta(seconds=1), timeout=timedelta(seconds=3))
    assert retry.backoff(1) <= 0.25
    assert retry.timeout == 3.0


class LateClock:
    """A clock whose sleeps end ``late`` seconds after they should, as on a busy event loop."""

    def __init__(self, late: float) -> None:
        self.late = late
        self._now = 0.0

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        self._now += seconds + self.late
        await anyio.lowlevel.checkpoint()


async def test_a_wait_that_overruns_the_deadline_gives_up_with_the_last_exception() -> None:
    """A wait that fit but ended past the deadline starts no attempt: the previous attempt's exception propagates."""
    clock = LateClock(0.25)
    flaky = Flaky(10)
    raised = await drive_plain(Retry(timeout=1.0, initial=0.875, jitter=0.0, clock=clock).call(flaky))
    assert raised is flaky.raised[0]
    assert flaky.calls == 1

    flaky = Flaky(10)

    async def block() -> None:
        async for attempt in Retry(timeout=1.0, initial=0.875, jitter=0.0, clock=clock):
            with attempt:
                await flaky()

    assert await drive_plain(block()) is flaky.raised[0]
    assert flaky.calls == 1


async def drive_plain(call: Awaitable[Any]) -> Any:
    """Await ``call``; return its result or the exception it raised."""
    try:
        return await call
    except Exception as exc:
        return exc


# -- attempt timeouts --------------------------------------------------------------


async def test_attempt_timeout_on_a_fake_clock_cancels_and_retries_the_attempt() -> None:
    """An attempt that hangs is cancelled after attempt_timeout (fake time) and retried; the last timeout propagates."""
    clock = FakeClock()
    calls = 0

    async def hangs() -> None:
        nonlocal calls
        calls += 1
        await clock.sleep(100.0)

    retry = exact(clock, attempts=2, initial=0.5, attempt_timeout=1.0)
    raised = await drive(clock, lambda: retry.call(hangs), step=0.25)
    assert isinstance(raised, ProtectionTimeout)
    assert raised.timeout == 1.0
    assert calls == 2
    assert clock.now() == pytest.approx(2.5)  # 1 s, a 0.5 s wait, 1 s
    assert clock.sleepers == 0


async def test_attempt_timeout_lets_a_quick_attempt_return() -> None:
    """An attempt that finishes within attempt_timeout returns its result and leaves no watchdog behind."""
    clock = FakeClock()
    assert await exact(clock, attempt_timeout=1.0).call(Flaky(0)) == "ok"
    assert clock.sleepers == 0


@pytest.mark.parametrize("anyio_backend", [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}))])
async def test_attempt_timeout_on_the_loop_clock_uses_an_anyio_deadline() -> None:
    """On the loop's own clock (trio's MockClock jumps through it) each attempt gets an anyio deadline."""
    calls = 0

    async def hangs() -> None:
        nonlocal calls
        calls += 1
        await anyio.sleep_forever()

    start = anyio.current_time()
    retry = Retry(attempts=3, initial=1.0, jitter=0.0, multiplier=1.0, attempt_timeout=2.0)
    with pytest.raises(ProtectionTimeout):
        await retry.call(hangs)
    assert calls == 3
    assert anyio.current_time() - start == pytest.approx(8.0)  # 2 + 1 + 2 + 1 + 2


# -- cancellation ------------------------------------------------------------------


async def test_cancellation_during_an_attempt_is_not_retried() -> None:
    """Cancelling the caller while an attempt runs ends the call: no further attempt, no wait left behind."""
    clock = FakeClock()
    calls = 0

    async def hangs() -> None:
        nonlocal calls
        calls += 1
        await anyio.sleep_forever()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(exact(clock, attempts=5).call, hangs)
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
    assert scope.cancelled_caught
    assert calls == 1
    assert clock.sleepers == 0


async def test_cancellation_during_the_wait_makes_no_further_attempt() -> None:
    """Cancelled while waiting between attempts: the wait ends and nothing else runs."""
    clock = FakeClock()
    flaky = Flaky(10)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(exact(clock, attempts=5, initial=1.0).call, flaky)
            await anyio.wait_all_tasks_blocked()
            assert clock.sleepers == 1  # waiting before attempt 2
            scope.cancel()
    assert flaky.calls == 1
    assert clock.sleepers == 0


async def test_a_cancellation_raised_by_the_attempt_propagates_at_once() -> None:
    """An attempt that raises the backend's cancellation exception is not retried (it is no Exception)."""
    clock = FakeClock()
    calls = 0

    async def cancelled_inside() -> None:
        nonlocal calls
        calls += 1
        with anyio.CancelScope() as inner:
            inner.cancel()
            await anyio.sleep(1)
        raise KeyboardInterrupt  # a BaseException: never caught

    with pytest.raises(KeyboardInterrupt):
        await exact(clock, attempts=5).call(cancelled_inside)
    assert calls == 1


# -- the async-for form --------------------------------------------------------------


async def test_async_for_form_retries_the_block_until_it_succeeds() -> None:
    """The ``async for attempt in retry: with attempt:`` form runs the block again after a retryable failure."""
    clock = FakeClock()
    flaky = Flaky(2)
    numbers: list[int] = []
    retry = exact(clock, attempts=5, initial=0.1)

    async def block() -> str:
        async for attempt in retry:
            with attempt:
                numbers.append(attempt.number)
                return await flaky()
        raise AssertionError("unreachable")  # pragma: no cover

    assert await drive(clock, block, step=0.1) == "ok"
    assert numbers == [1, 2, 3]
    assert clock.now() == pytest.approx(0.3)


async def test_async_for_form_propagates_the_last_exception() -> None:
    """When attempts run out, the block's last exception leaves the loop, unchanged."""
    clock = FakeClock()
    flaky = Flaky(10)

    async def block() -> None:
        async for attempt in exact(clock, attempts=2):
            with attempt:
                await flaky()

    raised = await drive(clock, block)
    assert raised is flaky.raised[-1]
    assert flaky.calls == 2


async def test_async_for_form_stops_after_a_success_and_skips_non_retryable_errors() -> None:
    """A successful block ends the loop; a non-retryable exception leaves it from the first attempt."""
    clock = FakeClock()
    rounds = 0
    async for attempt in exact(clock):
        with attempt:
            rounds += 1
    assert rounds == 1

    async def not_retried() -> None:
        nonlocal rounds
        async for attempt in exact(clock, retry_on=ConnectionError):
            with attempt:
                rounds += 1
                raise KeyError("x")

    with pytest.raises(KeyError):
        await not_retried()
    assert rounds == 2


@pytest.mark.parametrize("anyio_backend", [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}))])
async def test_async_for_form_times_out_each_attempt() -> None:
    """With attempt_timeout, an attempt of the block that hangs becomes a ProtectionTimeout and is retried."""
    numbers: list[int] = []

    async def hangs() -> None:
        async for attempt in Retry(attempts=2, initial=0.5, jitter=0.0, attempt_timeout=1.0):
            with attempt:
                numbers.append(attempt.number)
                await anyio.sleep_forever()

    with pytest.raises(ProtectionTimeout):
        await hangs()
    assert numbers == [1, 2]


# -- the retry budget ------------------------------------------------------------------


def test_budget_allows_ratio_times_first_attempts_plus_the_floor() -> None:
    """Ratio 0.5, floor 2 (0.2/s x 10 s): after 10 first attempts, 7 retries are allowed and the 8th refused."""
    clock = FakeClock()
    budget = RetryBudget(0.5, 0.2, clock=clock)
    for _ in range(10):
        budget.record_first()
    assert [budget.try_retry() for _ in range(8)] == [True] * 7 + [False]
    stats = budget.statistics()
    assert (stats.first_attempts, stats.retries, stats.refused) == (10, 7, 1)
    assert stats.allowance == pytest.approx(7.0)
    assert stats.available == 0.0


def test_budget_forgets_what_left_the_ten_second_window() -> None:
    """Counts older than the window stop counting; buckets expire one second at a time."""
    clock = FakeClock()
    budget = RetryBudget(1.0, 0.0, clock=clock)
    for _ in range(5):
        budget.record_first()
    clock.advance(5.0)
    for _ in range(3):
        budget.record_first()
    assert budget.statistics().first_attempts == 8
    clock.advance(5.5)  # the first five (t=0) are out, the three (t=5) still in
    assert budget.statistics().first_attempts == 3
    assert [budget.try_retry() for _ in range(4)] == [True, True, True, False]
    clock.advance(100.0)  # everything expired in one step
    stats = budget.statistics()
    assert (stats.first_attempts, stats.retries) == (0, 0)


async def test_budget_holds_under_a_full_outage() -> None:
    """Every call fails: total attempts stay within (1 + ratio) x first attempts + the floor, and refusals are told."""
    clock = FakeClock()
    ratio, per_second = 0.2, 0.5
    retry = exact(clock, attempts=5, initial=0.0, budget_ratio=ratio, budget_min_per_second=per_second)
    down = Flaky(10**9)
    firsts = 200
    with capture_events(RETRY_EVENTS) as events:
        for _ in range(firsts):
            with pytest.raises(ConnectionError):
                await retry.call(down)
    floor = per_second * 10
    assert firsts < down.calls <= (1 + ratio) * firsts + floor
    assert down.calls == firsts + int(ratio * firsts + floor)  # the budget is used, not wasted
    exhausted = [e for e in events if e.name == "budget_exhausted"]
    assert exhausted
    assert exhausted[0].metadata["key"] == "retry"
    assert retry.budget is not None
    assert retry.budget.statistics().refused == len(exhausted)


async def test_without_a_budget_every_attempt_is_made() -> None:
    """budget_ratio=None: retries are not budgeted."""
    clock = FakeClock()
    retry = exact(clock, attempts=3, initial=0.0, budget_ratio=None)
    down = Flaky(10**9)
    for _ in range(50):
        with pytest.raises(ConnectionError):
            await retry.call(down)
    assert down.calls == 150
    assert retry.budget is None


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "path"),
    [
        ({"attempts": 0}, "attempts"),
        ({"attempts": 2.5}, "attempts"),
        ({"initial": -1}, "initial"),
        ({"initial": math.nan}, "initial"),
        ({"maximum": 0.05, "initial": 0.1}, "maximum"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"jitter": 1.5}, "jitter"),
        ({"budget_ratio": -0.1}, "budget_ratio"),
        ({"budget_min_per_second": math.inf}, "budget_min_per_second"),
        ({"attempt_timeout": 0}, "attempt_timeout"),
        ({"timeout": 10**400}, "timeout"),
        ({"retry_on": "ValueError"}, "retry_on"),
        ({"retry_on": [ValueError, 3]}, "retry_on[1]"),
        ({"exclude": [KeyboardInterrupt]}, "exclude[0]"),
        ({"name": 7}, "name"),
        ({"clock": object()}, "clock"),
        ({"random": 0.5}, "random"),
    ],
)
def test_bad_arguments_raise_configuration_error_naming_them(options: dict[str, Any], path: str) -> None:
    """Each invalid argument raises ConfigurationError whose path names it."""
    with pytest.raises(ConfigurationError) as caught:
        Retry(**options)
    assert caught.value.path == path
    assert path.split("[")[0] in caught.value.message


def test_a_wrong_type_is_also_a_type_error() -> None:
    """A value of the wrong type raises ConfigurationTypeError, a TypeError too."""
    with pytest.raises(ConfigurationTypeError):
        Retry(attempts="3")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Retry(exclude=[1])  # type: ignore[list-item]


def test_repr_shows_the_policy_and_the_budget() -> None:
    """The repr names the retry, its attempts and its budget's live counts."""
    text = repr(Retry(name="api", attempts=4, clock=FakeClock()))
    assert "name='api'" in text
    assert "attempts=4" in text
    assert "RetryBudget(" in text
