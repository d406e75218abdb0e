"""Breaker rate modes on Redis: the in-memory store's results step by step, successes without a round trip.

The comparisons run one sequence of outcomes against a breaker on the
in-memory store and one on :class:`~seawall.backends.RedisBackend`, both on
one :class:`~seawall.FakeClock` (the backend's ``clock=`` times its scripts
by it), and compare ``status()`` after every step. Times and durations are
multiples of 1/8 s, so both stores compute every boundary exactly. The shared
server gets a prefix unique to each test (or example); round trips are
counted with ``INFO commandstats`` on a throwaway server.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from redis_servers import Server, running, until
from seawall import BreakerState, CircuitBreaker, CircuitOpenError, ConfigurationError, FakeClock, ProtectionTimeout
from seawall.backends import MemoryBreakerBackend, RedisBackend
from seawall.backends import _redis_breaker as breaker_wire

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.asyncio_only("redis-py's client runs on asyncio only")]

WINDOW = 8.0  # buckets of 0.8 s: not a multiple of 1/8, so bucket edges fall between the steps' times
RECOVERY = 4.0
SLOW = 1.0


class Boom(Exception):
    """A failure of the dependency."""


class Step(NamedTuple):
    """One step of a sequence: wait, then (unless ``call`` is None) one call of ``duration`` s."""

    wait: float
    call: str | None  # "ok", "fail", "timeout" (a ProtectionTimeout), "reset"
    duration: float
    style: str  # "with" or "call"
    look: bool = True  # compare the status after the step (False: successes stay waiting in the process)


def _options(
    failure_rate: float | None, slow_rate: float | None, minimum: int, threshold: int | None = None
) -> dict[str, Any]:
    return {
        "failure_threshold": threshold,
        "failure_rate": failure_rate,
        "slow_call_duration": SLOW if slow_rate is not None else None,
        "slow_call_rate": slow_rate,
        "minimum_calls": minimum,
        "window": WINDOW,
        "recovery_time": RECOVERY,
    }


async def _step(breaker: CircuitBreaker, clock: FakeClock, step: Step) -> str:
    """Run one call; say how it ended ("rejected", "ok", "failed")."""
    if step.call == "reset":
        await breaker.reset()
        return "reset"

    async def body() -> None:
        clock.advance(step.duration)
        if step.call == "fail":
            raise Boom
        if step.call == "timeout":
            raise ProtectionTimeout(key="svc", timeout=step.duration)

    try:
        if step.style == "with":
            async with breaker:
                await body()
        else:
            await breaker.call(body)
    except CircuitOpenError:
        return "rejected"
    except (Boom, ProtectionTimeout):
        return "failed"
    return "ok"


def _same(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b))


async def _compare(url: str, steps: list[Step], options: dict[str, Any]) -> None:
    """Run ``steps`` against both stores on one fake clock; their status must agree after every step."""
    prefix = f"seawall-test-{uuid.uuid4().hex}"
    memory_clock, redis_clock = FakeClock(1000.0), FakeClock(1000.0)
    memory = CircuitBreaker("svc", backend=MemoryBreakerBackend(), clock=memory_clock, **options)
    async with RedisBackend.from_url(url, prefix=prefix, socket_timeout=5.0, clock=redis_clock) as backend:
        shared = CircuitBreaker("svc", backend=backend, clock=redis_clock, **options)
        try:
            for number, step in enumerate(steps):
                memory_clock.advance(step.wait)
                redis_clock.advance(step.wait)
                if step.call is not None:
                    ended = await _step(memory, memory_clock, step)
                    assert await _step(shared, redis_clock, step) == ended, (number, step)
                if not step.look:
                    continue
                expected, found = await memory.status(), await shared.status()
                where = (number, step, expected, found)
                assert found.state is expected.state, where
                assert found.calls == expected.calls, where
                assert _same(found.failure_rate, expected.failure_rate), where
                assert _same(found.slow_call_rate, expected.slow_call_rate), where
                assert found.retry_after == pytest.approx(expected.retry_after), where
        finally:
            admin = aioredis.Redis.from_url(url)
            keys = [key async for key in admin.scan_iter(match=f"{prefix}:*")]
            if keys:
                await admin.delete(*keys)
            await admin.aclose()


@pytest.fixture
def server(redis_url: str, tmp_path: Path) -> Iterator[Server]:
    """A private redis-server on a free port (no persistence), stopped by PID afterwards."""
    with running(tmp_path) as started:
        yield started


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix unique to the test; its keys are deleted afterwards."""
    unique = f"seawall-test-{uuid.uuid4().hex}"
    yield unique
    admin = aioredis.Redis.from_url(redis_url)
    keys = [key async for key in admin.scan_iter(match=f"{unique}:*")]
    if keys:
        await admin.delete(*keys)
    await admin.aclose()


# -- the same results as in memory ---------------------------------------------------------


async def test_a_failure_rate_sequence_matches_memory(redis_url: str) -> None:
    """Successes, failures, buckets leaving the window, opening, a trial, closing: memory's status at every step."""
    ok, fail = Step(0.25, "ok", 0.125, "with"), Step(0.25, "fail", 0.125, "call")
    steps = [ok] * 6 + [fail] * 3 + [Step(3.0, "ok", 0.0, "call")] + [fail] * 3  # 3/10, then 6/13 >= 0.45
    steps += [Step(1.0, None, 0.0, "with"), Step(3.5, "ok", 0.125, "with")]  # open, then a trial success closes
    steps += [ok] * 3 + [Step(9.0, None, 0.0, "with"), fail, fail, Step(0.125, "ok", 0.0, "call")]
    await _compare(redis_url, steps, _options(0.45, None, 10))


async def test_a_slow_call_sequence_matches_memory(redis_url: str) -> None:
    """Slow successes and time-outs open the slow-call breaker as in memory; a slow trial re-opens it."""
    fast, slow = Step(0.125, "ok", 0.25, "with"), Step(0.125, "ok", 1.5, "call")
    steps = [fast] * 4 + [slow, Step(0.125, "timeout", 0.5, "with"), slow]  # 3 slow of 7 >= 0.4
    steps += [Step(4.0, "ok", 2.0, "with"), Step(4.5, "ok", 0.25, "call"), fast, fast]
    await _compare(redis_url, steps, _options(None, 0.4, 5))


async def test_successes_that_reach_minimum_calls_open_as_in_memory(redis_url: str) -> None:
    """Failures first, then successes: the success that brings the window to minimum_calls opens (5/10 >= 0.5)."""
    steps = [Step(0.125, "fail", 0.0, "with")] * 5 + [Step(0.125, "ok", 0.0, "with")] * 6
    await _compare(redis_url, steps, _options(0.5, None, 10))


async def test_a_batch_of_successes_across_minimum_calls_opens_as_in_memory(redis_url: str) -> None:
    """5 failures, then 5 successes sent in one batch (the next status read): opened as memory did at the 10th call."""
    steps = [Step(0.125, "fail", 0.0, "with")] * 5 + [Step(0.0, "ok", 0.0, "with", look=False)] * 5
    steps += [Step(0.0, None, 0.0, "with")]
    await _compare(redis_url, steps, _options(0.5, None, 10))


_STEPS = st.builds(
    Step,
    wait=st.sampled_from([0.0, 0.125, 0.5, 1.0, 3.0, 8.0, 20.0]),
    call=st.sampled_from(["ok", "ok", "ok", "fail", "timeout", "reset", None]),
    duration=st.sampled_from([0.0, 0.25, 0.875, 1.0, 2.5]),
    style=st.sampled_from(["with", "call"]),
    look=st.just(True),  # (successes left waiting are judged late: the lag the docs state, tested apart)
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(_STEPS, max_size=30),
    failure_rate=st.sampled_from([None, 0.25, 0.5, 1.0]),
    slow_rate=st.sampled_from([None, 0.3, 1.0]),
    minimum=st.integers(1, 6),
)
def test_any_sequence_matches_memory(
    redis_url: str, steps: list[Step], failure_rate: float | None, slow_rate: float | None, minimum: int
) -> None:
    """Hypothesis: any sequence of calls, waits and resets gives the in-memory store's status after every step."""
    if failure_rate is None and slow_rate is None:
        failure_rate = 0.5
    asyncio.run(_compare(redis_url, steps, _options(failure_rate, slow_rate, minimum)))


async def test_failure_threshold_still_opens_a_rate_breaker(redis_url: str, prefix: str) -> None:
    """A rate breaker on Redis with failure_threshold=3 opens on 3 failures, far below its minimum_calls."""
    async with RedisBackend.from_url(redis_url, prefix=prefix) as backend:
        breaker = CircuitBreaker("svc", backend=backend, **_options(0.9, None, 100, threshold=3))
        for _ in range(3):
            with pytest.raises(Boom):
                async with breaker:
                    raise Boom
        assert (await breaker.status()).state is BreakerState.OPEN


# -- successes cost no round trip ----------------------------------------------------------


async def test_a_closed_success_costs_no_round_trip(server: Server) -> None:
    """1,000 closed successes send nothing; the next round trip (status) carries them all, then a failure one."""
    admin = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        async with RedisBackend.from_url(server.url, prefix="rates", socket_timeout=5.0) as backend:
            breaker = CircuitBreaker("svc", backend=backend, **_options(0.5, None, 10))
            await breaker.status()  # scripts loaded, the view learnt
            await admin.config_resetstat()
            for _ in range(500):
                async with breaker:
                    pass

            async def succeed() -> None:
                pass

            for _ in range(500):
                await breaker.call(succeed)
            stats = await admin.info("commandstats")
            assert "cmdstat_evalsha" not in stats  # (1,000 calls take a few ms: the 100 ms flush is not due)
            assert (await breaker.status()).calls == 1000
            with pytest.raises(Boom):
                async with breaker:
                    raise Boom
            stats = await admin.info("commandstats")
            assert int(stats["cmdstat_evalsha"]["calls"]) == 2  # the status read and the failure
    finally:
        await admin.aclose()


async def test_successes_reach_other_processes_within_the_flush_interval(redis_url: str, prefix: str) -> None:
    """Successes counted by one process show in another's status once flushed (at most 100 ms, plus a round trip)."""
    async with (
        RedisBackend.from_url(redis_url, prefix=prefix, socket_timeout=5.0) as one,
        RedisBackend.from_url(redis_url, prefix=prefix, socket_timeout=5.0) as other,
    ):
        counting = CircuitBreaker("svc", backend=one, **_options(0.5, None, 10))
        watching = CircuitBreaker("svc", backend=other, **_options(0.5, None, 10))
        await counting.status()
        for _ in range(20):
            async with counting:
                pass

        async def seen() -> bool:
            return (await watching.status()).calls == 20

        took = await until(seen, bound=5.0)
        assert took < 2.0  # (generous: the flush is due 100 ms after the first success)


async def test_a_failure_carries_the_successes_before_it(redis_url: str, prefix: str) -> None:
    """9 successes then 1 failure on one process: the failure's round trip judges 1/10 >= 0.1 and opens at once."""
    async with (
        RedisBackend.from_url(redis_url, prefix=prefix, socket_timeout=5.0) as one,
        RedisBackend.from_url(redis_url, prefix=prefix, socket_timeout=5.0) as other,
    ):
        breaker = CircuitBreaker("svc", backend=one, **_options(0.1, None, 10))
        await breaker.status()
        for _ in range(9):
            async with breaker:
                pass
        with pytest.raises(Boom):
            async with breaker:
                raise Boom
        assert breaker.state is BreakerState.OPEN
        seen = await CircuitBreaker("svc", backend=other, **_options(0.1, None, 10)).status()
        assert (seen.state, seen.calls, seen.failure_rate) == (BreakerState.OPEN, 10, 0.1)


async def test_closing_the_backend_sends_the_waiting_successes(redis_url: str, prefix: str) -> None:
    """aclose() flushes: a process that stops loses none of the successes it counted."""
    async with RedisBackend.from_url(redis_url, prefix=prefix, socket_timeout=5.0) as other:
        one = RedisBackend.from_url(redis_url, prefix=prefix, socket_timeout=5.0)
        breaker = CircuitBreaker("svc", backend=one, **_options(0.5, None, 10))
        await breaker.status()
        for _ in range(7):
            async with breaker:
                pass
        await one.aclose()
        assert (await CircuitBreaker("svc", backend=other, **_options(0.5, None, 10)).status()).calls == 7


# -- outages and configuration ----------------------------------------------------------------


async def test_an_outage_judges_the_rates_on_the_process_own_calls(server: Server) -> None:
    """With Redis down under "allow", the process's own calls of the outage open its view at the failure rate."""
    async with RedisBackend.from_url(server.url, prefix="out", socket_timeout=0.5) as backend:
        breaker = CircuitBreaker("svc", backend=backend, **_options(0.5, None, 4))
        await breaker.status()
        server.kill()
        with pytest.raises(Boom):
            async with breaker:
                raise Boom  # the round trip fails: counted in the process (1 call, 1 failure)
        for _ in range(2):
            async with breaker:
                pass
        assert breaker.state is BreakerState.CLOSED  # 3 calls: below minimum_calls
        with pytest.raises(Boom):
            async with breaker:
                raise Boom  # 4 calls, 2 failed: 0.5 >= 0.5
        assert breaker.state is BreakerState.OPEN
        with pytest.raises(CircuitOpenError):
            async with breaker:
                pass


async def test_the_redis_store_takes_every_rate_option(redis_url: str, prefix: str) -> None:
    """failure_rate, slow_call_duration, slow_call_rate and minimum_calls build on Redis (the refusal is gone)."""
    async with RedisBackend.from_url(redis_url, prefix=prefix) as backend:
        breaker = CircuitBreaker("svc", backend=backend, **_options(0.5, 0.5, 3))
        status = await breaker.status()
        assert (status.calls, status.failure_rate, status.slow_call_rate) == (0, None, None)


def test_a_policy_field_the_script_does_not_know_is_refused() -> None:
    """A policy with a field the Redis script does not implement raises ConfigurationError naming it."""

    class Future(NamedTuple):
        failure_threshold: int = 5
        window: float = 60.0
        recovery_time: float = 30.0
        half_open_max_calls: int = 1
        jitter: float | None = 0.5

    with pytest.raises(ConfigurationError, match="jitter") as caught:
        breaker_wire.arguments(Future())  # type: ignore[arg-type]
    assert caught.value.path == "circuit_breaker.jitter"


async def test_waiting_successes_of_an_earlier_period_count_nothing(redis_url: str, prefix: str) -> None:
    """Successes waiting in one process when another resets the breaker decide nothing in the new period."""
    async with (
        RedisBackend.from_url(redis_url, prefix=prefix, socket_timeout=5.0) as one,
        RedisBackend.from_url(redis_url, prefix=prefix, socket_timeout=5.0) as other,
    ):
        counting = CircuitBreaker("svc", backend=one, **_options(0.5, None, 10))
        resetting = CircuitBreaker("svc", backend=other, **_options(0.5, None, 10))
        await counting.status()
        for _ in range(5):
            async with counting:
                pass
        await resetting.reset()  # before the 5 successes are sent
        assert (await counting.status()).calls == 0


async def test_slow_calls_cost_one_round_trip_and_fast_ones_none(server: Server) -> None:
    """A slow-call breaker on Redis: fast successes send nothing, a slow one is judged at once (one EVALSHA)."""
    clock = FakeClock(1000.0)
    admin = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        async with RedisBackend.from_url(server.url, prefix="slow", socket_timeout=5.0, clock=clock) as backend:
            breaker = CircuitBreaker("svc", backend=backend, clock=clock, **_options(None, 0.5, 4))
            await breaker.status()
            await admin.config_resetstat()
            for duration in (0.25, 0.5, 0.25):
                async with breaker:
                    clock.advance(duration)
            assert "cmdstat_evalsha" not in await admin.info("commandstats")
            async with breaker:
                clock.advance(1.5)  # slow: 1 of 4 calls, below 0.5
            async with breaker:
                clock.advance(2.0)  # slow: 2 of 5 calls, below 0.5
            stats = await admin.info("commandstats")
            assert int(stats["cmdstat_evalsha"]["calls"]) == 2
            async with breaker:
                clock.advance(2.0)  # 3 of 6 >= 0.5: open
            assert breaker.state is BreakerState.OPEN
            assert (await breaker.status()).slow_call_rate == 0.5
    finally:
        await admin.aclose()
