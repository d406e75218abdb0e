"""CircuitBreaker rate modes: failure rate, slow calls, minimum calls, status, options (fake clock, no sleeps)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from seawall import (
    AsyncInfrastructure,
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    ConfigurationError,
    FakeClock,
    ProtectionTimeout,
)
from seawall.backends._breaker_memory import MemoryBreakerBackend

pytestmark = pytest.mark.anyio


class Boom(Exception):
    """A failure of the dependency."""


async def run(breaker: CircuitBreaker, clock: FakeClock, *, fail: bool = False, duration: float = 0.001) -> None:
    """One call through ``async with``, lasting ``duration`` on the fake clock."""
    try:
        async with breaker:
            clock.advance(duration)
            if fail:
                raise Boom
    except Boom:
        pass


async def test_a_one_percent_failure_rate_keeps_a_rate_breaker_closed() -> None:
    """10,000 calls with 1% failures: failure_rate=0.5 stays closed where a count breaker of 5 opens."""
    clock = FakeClock()
    rated = CircuitBreaker("rated", failure_rate=0.5, failure_threshold=None, window=60.0, clock=clock)
    counting = CircuitBreaker("counting", failure_threshold=5, window=60.0, clock=clock)
    opened_at = None
    for index in range(10_000):
        fail = index % 100 == 99
        await run(rated, clock, fail=fail)
        if counting.state is BreakerState.CLOSED:
            await run(counting, clock, fail=fail)
            if counting.state is BreakerState.OPEN:
                opened_at = index
    assert rated.state is BreakerState.CLOSED
    assert opened_at is not None
    assert opened_at < 1000
    status = await rated.status()
    assert status.failure_rate == pytest.approx(0.01, abs=0.002)
    assert status.calls == 10_000  # 10 s of calls, well inside the 60 s window


async def test_an_upstream_that_turns_slow_opens_the_slow_call_breaker_before_any_call_fails() -> None:
    """Calls that all succeed but take 2 s open a slow_call_duration=1 breaker; none of them failed."""
    clock = FakeClock()
    breaker = CircuitBreaker(
        "slow", slow_call_duration=1.0, slow_call_rate=0.5, minimum_calls=10, window=60.0, clock=clock
    )
    for _ in range(50):
        await run(breaker, clock, duration=0.05)
    assert breaker.state is BreakerState.CLOSED
    calls_when_open = None
    for index in range(50):
        if breaker.state is BreakerState.OPEN:
            calls_when_open = index
            break
        await run(breaker, clock, duration=2.0)
    assert calls_when_open is not None
    status = await breaker.status()
    assert status.failure_count == 0
    assert status.slow_call_rate is not None
    assert status.slow_call_rate >= 0.5
    with pytest.raises(CircuitOpenError):
        await run(breaker, clock)


async def test_minimum_calls_hold_a_rate_back() -> None:
    """Below minimum_calls in the window no rate decides, and status() reports the rates as None."""
    clock = FakeClock()
    breaker = CircuitBreaker("min", failure_rate=0.5, failure_threshold=None, minimum_calls=5, clock=clock)
    for _ in range(4):
        await run(breaker, clock, fail=True)
    status = await breaker.status()
    assert (status.state, status.calls, status.failure_rate) == (BreakerState.CLOSED, 4, None)
    await run(breaker, clock, fail=True)
    assert breaker.state is BreakerState.OPEN


async def test_old_calls_leave_the_window() -> None:
    """Calls older than the window (at most 10% late) no longer count."""
    clock = FakeClock()
    breaker = CircuitBreaker(
        "window", failure_rate=0.5, failure_threshold=None, minimum_calls=4, window=10.0, clock=clock
    )
    for _ in range(3):
        await run(breaker, clock, fail=True)
    clock.advance(11.0)
    assert (await breaker.status()).calls == 0
    for _ in range(3):
        await run(breaker, clock)
    await run(breaker, clock, fail=True)
    assert breaker.state is BreakerState.CLOSED  # 1 of 4, the old failures gone


async def test_a_protection_timeout_counts_as_slow() -> None:
    """A call settled with ProtectionTimeout is slow whatever its measured duration."""
    clock = FakeClock()
    breaker = CircuitBreaker("timeouts", slow_call_duration=5.0, slow_call_rate=1.0, minimum_calls=2, clock=clock)
    for _ in range(2):
        permit = breaker.admit_nowait()
        breaker.settle_nowait(permit, ProtectionTimeout(key="k", timeout=0.1))
    assert breaker.state is BreakerState.OPEN


async def test_a_slow_trial_reopens_a_slow_call_breaker() -> None:
    """When half-open, a trial that succeeds but is slow opens the breaker again."""
    clock = FakeClock()
    breaker = CircuitBreaker(
        "trial", slow_call_duration=1.0, slow_call_rate=1.0, minimum_calls=1, recovery_time=5.0, clock=clock
    )
    await run(breaker, clock, duration=1.5)
    assert breaker.state is BreakerState.OPEN
    clock.advance(5.0)
    await run(breaker, clock, duration=1.5)
    assert breaker.state is BreakerState.OPEN
    clock.advance(5.0)
    await run(breaker, clock, duration=0.1)
    assert breaker.state is BreakerState.CLOSED
    assert (await breaker.status()).calls == 0  # closing empties the counters


async def test_every_style_counts_successes_once() -> None:
    """call(), @breaker, async with and admit_nowait all count each call once in a rate mode."""
    clock = FakeClock()
    breaker = CircuitBreaker("styles", failure_rate=0.9, minimum_calls=100, clock=clock)

    @breaker
    async def decorated() -> int:
        return 1

    async def plain() -> int:
        return 2

    await decorated()
    await breaker.call(plain)
    await breaker.call(decorated)
    async with breaker:
        pass
    breaker.settle_nowait(breaker.admit_nowait())
    assert (await breaker.status()).calls == 5


async def test_reset_clears_the_rates() -> None:
    """reset() empties the window's counters."""
    clock = FakeClock()
    breaker = CircuitBreaker("reset", failure_rate=0.9, minimum_calls=1, clock=clock)
    await run(breaker, clock)
    await breaker.reset()
    assert (await breaker.status()).calls == 0
    assert (await breaker.status()).to_dict()["failure_rate"] is None


@pytest.mark.parametrize(
    ("options", "path"),
    [
        ({"failure_rate": 0}, "failure_rate"),
        ({"failure_rate": 1.5}, "failure_rate"),
        ({"failure_rate": "half"}, "failure_rate"),
        ({"slow_call_rate": 0.5}, "slow_call_rate"),
        ({"slow_call_duration": 1.0}, "slow_call_duration"),
        ({"slow_call_duration": -1.0, "slow_call_rate": 0.5}, "slow_call_duration"),
        ({"failure_rate": 0.5, "minimum_calls": 0}, "minimum_calls"),
        ({"failure_threshold": None}, "failure_threshold"),
    ],
)
async def test_bad_rate_options_name_the_argument(options: dict[str, Any], path: str) -> None:
    """Each bad rate option raises ConfigurationError naming it."""
    with pytest.raises(ConfigurationError) as caught:
        CircuitBreaker("bad", **options)
    assert caught.value.path == path


class CountOnlyStore(MemoryBreakerBackend):
    """A store that does not declare rate modes (as the Redis store until it implements them)."""

    supports_rate_modes = False


async def test_a_store_without_rate_modes_refuses_them() -> None:
    """Rate options on a backend that does not implement them fail at construction, never silently."""
    with pytest.raises(ConfigurationError, match="not yet supported") as caught:
        CircuitBreaker("shared", failure_rate=0.5, backend=CountOnlyStore())
    assert caught.value.path == "failure_rate"
    CircuitBreaker("shared", failure_threshold=3, backend=CountOnlyStore())  # count mode works there


async def test_a_key_on_a_store_without_rate_modes_names_the_config_path() -> None:
    """configure_protection with rate options on such a store fails with the key's full path, config untouched."""
    async with AsyncInfrastructure(backend=CountOnlyStore()) as infra:
        with pytest.raises(ConfigurationError, match="not yet supported") as caught:
            await infra.configure_protection("api", {"circuit_breaker": {"failure_rate": 0.5}})
        assert caught.value.path == "api.circuit_breaker.failure_rate"
        assert infra.list_protection_keys() == []


async def test_breakers_sharing_a_name_each_apply_their_own_minimum_calls() -> None:
    """Two breakers of one name and store, minimum_calls 10 and 4: the success that brings the window to 4 opens B."""
    clock = FakeClock()
    backend = MemoryBreakerBackend()
    common: dict[str, Any] = {"failure_rate": 0.5, "failure_threshold": None, "backend": backend, "clock": clock}
    patient = CircuitBreaker("shared", minimum_calls=10, **common)
    eager = CircuitBreaker("shared", minimum_calls=4, **common)
    for _ in range(3):
        await run(patient, clock, fail=True)  # 3 calls: below either minimum
    assert patient.state is BreakerState.CLOSED

    async def succeed() -> None:
        clock.advance(0.001)

    await eager.call(succeed)  # 4 calls, 3 failed: eager's minimum is reached and 0.75 >= 0.5
    assert eager.state is BreakerState.OPEN


async def through(style: str, breaker: CircuitBreaker, clock: FakeClock, *, fail: bool = False) -> None:
    """One call of 1 ms through ``style``: the permit pair, ``async with`` or ``call()`` (open: refused)."""

    async def dependency() -> None:
        clock.advance(0.001)
        if fail:
            raise Boom

    try:
        if style == "permit":
            permit = breaker.admit_nowait()
            try:
                await dependency()
            except Boom as exc:
                breaker.settle_nowait(permit, exc)
            else:
                breaker.settle_nowait(permit)
        elif style == "with":
            async with breaker:
                await dependency()
        else:
            await breaker.call(dependency)
    except (Boom, CircuitOpenError):
        pass


STYLES = ("permit", "with", "call")


@pytest.mark.parametrize(("minimum", "rate"), [(1, 0.5), (3, 0.25), (40, 0.05), (300, 0.02), (700, 0.02)])
async def test_every_closed_success_path_counts_alike(minimum: int, rate: float) -> None:
    """BreakerRecord.count (a timed permit), SuccessLane.succeed (permit, async with) and call()'s inline copy agree."""
    rng = random.Random(minimum)
    steps = []
    for _ in range(2_500):
        roll = rng.random()
        if roll < 0.004:
            steps.append(("advance", rng.choice([0.5, 1.0, 3.0, 11.0])))  # within a bucket, across, past the window
        elif roll < 0.03:
            steps.append(("failure", 0.0))
        else:
            steps.append(("success", 0.0))
    # "timed": a breaker that times its calls for a slow-call mode no call
    # reaches gets single-use permits, whose settling is BreakerRecord.count.
    variants = (*STYLES, "timed")
    clocks = {variant: FakeClock(1000.0) for variant in variants}
    breakers = {
        variant: CircuitBreaker(
            variant,
            failure_rate=rate,
            failure_threshold=None,
            minimum_calls=minimum,
            window=10.0,
            recovery_time=2.0,
            clock=clocks[variant],
            **({"slow_call_duration": 1e6, "slow_call_rate": 1.0} if variant == "timed" else {}),
        )
        for variant in variants
    }
    for index, (kind, seconds) in enumerate(steps):
        for variant in variants:
            if kind == "advance":
                clocks[variant].advance(seconds)
            else:
                style = "permit" if variant == "timed" else variant
                await through(style, breakers[variant], clocks[variant], fail=kind == "failure")
        assert len({breaker.state for breaker in breakers.values()}) == 1, (index, kind)
        if index % 397 == 0:  # (seldom: status() takes a lane's credit back, and credit is what is under test)
            statuses = [await breaker.status() for breaker in breakers.values()]
            assert len({(s.state, s.calls, s.failure_rate) for s in statuses}) == 1, (index, kind, statuses)


@pytest.mark.parametrize("style", STYLES)
async def test_the_success_that_reaches_a_large_minimum_calls_opens(style: str) -> None:
    """minimum_calls=600, 10 failures first: the 600th call, a success, opens (10/600 >= 0.016), not the 599th."""
    clock = FakeClock()
    breaker = CircuitBreaker(
        "large", failure_rate=0.016, failure_threshold=None, minimum_calls=600, window=60.0, clock=clock
    )
    for _ in range(10):
        await through(style, breaker, clock, fail=True)
    for _ in range(589):
        await through(style, breaker, clock)
    assert breaker.state is BreakerState.CLOSED  # (not status(): it would take a lane's credit back)
    await through(style, breaker, clock)
    assert breaker.state is BreakerState.OPEN
    assert (await breaker.status()).calls == 600


async def test_a_clock_reading_below_zero_counts_like_any_other() -> None:
    """The clock's epoch is arbitrary: at -1000 s, calls in two buckets all count (they were dropped)."""
    clock = FakeClock(-1000.0)
    breaker = CircuitBreaker(
        "negative", failure_rate=0.5, failure_threshold=None, minimum_calls=4, window=10.0, clock=clock
    )
    await run(breaker, clock, fail=True)
    await run(breaker, clock, fail=True)
    clock.advance(1.5)  # the next bucket (each 1 s wide)
    await run(breaker, clock)
    status = await breaker.status()
    assert (status.calls, status.failure_rate) == (3, None)
    await run(breaker, clock)  # 2 of 4 failed
    assert breaker.state is BreakerState.OPEN


async def test_a_rated_closed_permit_is_shared_and_settled_on_success() -> None:
    """Rate mode: admit_nowait() gives the shared permit, not plain (a success counts); a stale one counts nothing."""
    clock = FakeClock()
    breaker = CircuitBreaker("shared", failure_rate=0.5, failure_threshold=None, minimum_calls=100, clock=clock)
    permit = breaker.admit_nowait()
    assert breaker.admit_nowait() is permit
    assert not permit.plain
    breaker.settle_nowait(permit)
    breaker.settle_nowait(permit)
    assert (await breaker.status()).calls == 2
    await breaker.reset()
    breaker.settle_nowait(permit)  # admitted before reset(): it decides nothing
    breaker.settle_nowait(permit, Boom())
    assert (await breaker.status()).calls == 0
