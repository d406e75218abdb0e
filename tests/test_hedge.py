"""A key's ``"hedge"`` section: another concurrent attempt after ``delay``, the first success wins."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from seawall import (
    AsyncInfrastructure,
    BreakerState,
    ConfigurationError,
    FakeClock,
    HedgeConfig,
    ProtectionConfig,
    ProtectionTimeout,
)
from seawall._hedge import MIN_SAMPLES, Hedge
from seawall.testing import advance, capture_events

pytestmark = pytest.mark.anyio

HEDGE_EVENTS = [("seawall", "hedge", "started"), ("seawall", "hedge", "won")]


class Upstream:
    """An async callable whose call ``n`` (0-based) sleeps ``durations[n]`` on the fake clock, then answers ``n``.

    A call whose entry in ``errors`` is set raises it after its sleep. ``cancelled`` lists the calls cut short.
    """

    def __init__(self, clock: FakeClock, durations: list[float], errors: dict[int, Exception] | None = None) -> None:
        self.clock = clock
        self.durations = durations
        self.errors = errors or {}
        self.started: list[float] = []
        self.cancelled: list[int] = []

    async def __call__(self) -> int:
        number = len(self.started)
        self.started.append(self.clock.now())
        try:
            await self.clock.sleep(self.durations[number])
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(number)
            raise
        if number in self.errors:
            raise self.errors[number]
        return number


async def drive(clock: FakeClock, fn: Callable[[], Awaitable[Any]], *, step: float = 1 / 64) -> Any:
    """Run ``fn()`` in a task, moving ``clock`` by ``step`` whenever every task is blocked; its result or exception.

    The steps and the tests' times are binary fractions, so the clock lands on each time exactly.
    """
    outcome: list[Any] = []

    async def runner() -> None:
        try:
            outcome.append(await fn())
        except Exception as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(runner)
        for _ in range(4000):
            await anyio.wait_all_tasks_blocked()
            if outcome:
                break
            clock.advance(step)
        else:  # pragma: no cover - a hung test
            group.cancel_scope.cancel()
            raise AssertionError("the call did not finish")
    return outcome[0]


def chain(hedge: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A key with every layer (a limiter that never denies here) and ``hedge``."""
    return {
        "rate_limiter": {"limit": 1000, "window": 60, "algorithm": "fixed_window"},
        "circuit_breaker": {"failure_threshold": 100},
        "connection_pool": {"size": 1, "max_overflow": 3},
        "timeout": 4.0,
        "hedge": hedge,
        **extra,
    }


async def released(infra: AsyncInfrastructure, key: str = "api") -> None:
    """Every layer of ``key`` gave back what its attempts took: no worker out, no waiter, the breaker closed."""
    status = await infra.get_protection_status(key)
    pool = status["connection_pool"]
    assert (pool["in_use"], pool["waiting"]) == (0, 0)
    assert status["circuit_breaker"]["state"] == BreakerState.CLOSED.value


async def test_a_hedge_starts_after_the_delay_and_the_first_success_wins() -> None:
    """A slow first attempt gets a second after ``delay``; the faster one's result returns, the other is cancelled."""
    clock = FakeClock()
    upstream = Upstream(clock, [3.0, 0.5])
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", chain({"delay": 0.25}))
        with capture_events(HEDGE_EVENTS) as events:
            result = await drive(clock, lambda: infra.execute_protected("api", upstream))
        assert result == 1
        assert upstream.started == [0.0, 0.25]
        assert upstream.cancelled == [0]
        assert clock.now() == 0.75
        assert [(e.name, e.metadata["attempt"]) for e in events] == [("started", 1), ("won", 1)]
        assert events[0].metadata["key"] == "api"
        assert events[1].measurements["latency"] == 0.75
        assert events[1].metadata["hedges"] == 1
        await released(infra)


async def test_a_fast_first_attempt_starts_no_hedge() -> None:
    """An attempt done before the delay is the whole call: no hedge, no hedge telemetry."""
    clock = FakeClock()
    upstream = Upstream(clock, [0.125])
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", chain({"delay": 0.25, "max_hedges": 3}))
        tasks = len(anyio.get_running_tasks())
        with capture_events(HEDGE_EVENTS) as events:
            assert await drive(clock, lambda: infra.execute_protected("api", upstream)) == 0
        assert len(upstream.started) == 1
        assert events == []
        assert len(anyio.get_running_tasks()) == tasks  # the hedge launcher is gone too


async def test_the_first_attempt_may_still_win_and_up_to_max_hedges_start() -> None:
    """Hedges start one every ``delay`` up to ``max_hedges``; the first attempt winning cancels them all."""
    clock = FakeClock()
    upstream = Upstream(clock, [1.0, 3.0, 3.0, 3.0])
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", chain({"delay": 0.25, "max_hedges": 2}))
        with capture_events(HEDGE_EVENTS) as events:
            assert await drive(clock, lambda: infra.execute_protected("api", upstream)) == 0
        assert upstream.started == [0.0, 0.25, 0.5]
        assert sorted(upstream.cancelled) == [1, 2]
        assert [(e.name, e.metadata["attempt"]) for e in events] == [("started", 1), ("started", 2), ("won", 0)]
        await released(infra)


async def test_each_hedge_takes_its_own_token_and_pool_worker() -> None:
    """A hedge is a whole attempt: it spends a token and holds a worker of its own while it runs."""
    clock = FakeClock()
    seen: list[int] = []
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", chain({"delay": 0.25}))

        async def fn() -> str:
            seen.append((await infra.get_protection_status("api"))["connection_pool"]["in_use"])
            await clock.sleep(1.0)
            return "ok"

        assert await drive(clock, lambda: infra.execute_protected("api", fn)) == "ok"
        assert seen == [1, 2]
        status = await infra.get_protection_status("api")
        assert status["rate_limiter"]["remaining"] == 998
        await released(infra)


async def test_when_every_attempt_fails_the_first_ones_exception_propagates() -> None:
    """All attempts failed: the first attempt's own exception is raised; the breaker counted each failure."""
    clock = FakeClock()
    first, second = ConnectionError("first"), ConnectionError("second")
    upstream = Upstream(clock, [0.5, 0.5], {0: first, 1: second})
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", chain({"delay": 0.25}))
        assert await drive(clock, lambda: infra.execute_protected("api", upstream)) is first
        assert clock.now() == 0.75  # the hedge was waited for: it might have succeeded
        status = await infra.get_protection_status("api")
        assert status["circuit_breaker"]["failure_count"] == 2
        assert status["connection_pool"]["in_use"] == 0


async def test_a_failure_does_not_start_a_hedge() -> None:
    """A first attempt that fails before the delay fails the call at once (failures are retry's business)."""
    clock = FakeClock()
    upstream = Upstream(clock, [0.125], {0: ConnectionError("down")})
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", chain({"delay": 0.25, "max_hedges": 2}))
        tasks = len(anyio.get_running_tasks())
        with capture_events(HEDGE_EVENTS) as events:
            assert isinstance(await drive(clock, lambda: infra.execute_protected("api", upstream)), ConnectionError)
        assert len(upstream.started) == 1
        assert events == []
        assert len(anyio.get_running_tasks()) == tasks


async def test_a_hedge_that_succeeds_after_the_first_failed_wins() -> None:
    """A first attempt failing while a hedge runs leaves the race to the hedge."""
    clock = FakeClock()
    upstream = Upstream(clock, [0.5, 1.0], {0: ConnectionError("down")})
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", chain({"delay": 0.25}))
        assert await drive(clock, lambda: infra.execute_protected("api", upstream)) == 1
        assert clock.now() == 1.25
        await released(infra)
        status = await infra.get_protection_status("api")
        assert status["circuit_breaker"]["failure_count"] == 1


async def test_all_attempts_share_the_calls_one_timeout() -> None:
    """Hanging attempts all end at the key's deadline with ProtectionTimeout; no hedge starts past it."""
    clock = FakeClock()
    upstream = Upstream(clock, [100.0] * 4)
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", chain({"delay": 1.5, "max_hedges": 4}, timeout=2.0))
        with capture_events(HEDGE_EVENTS) as events:
            error = await drive(clock, lambda: infra.execute_protected("api", upstream))
        assert isinstance(error, ProtectionTimeout)
        assert upstream.started == [0.0, 1.5]
        assert clock.now() == 2.0
        assert [e.name for e in events] == ["started"]
        status = await infra.get_protection_status("api")
        assert status["connection_pool"]["in_use"] == 0
        assert status["circuit_breaker"]["failure_count"] == 2  # each attempt's own timeout


async def test_a_delay_as_long_as_the_timeout_never_hedges() -> None:
    """A delay that reaches the deadline makes the call a plain one."""
    clock = FakeClock()
    upstream = Upstream(clock, [100.0])
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", chain({"delay": 2.0}, timeout=2.0))
        assert isinstance(await drive(clock, lambda: infra.execute_protected("api", upstream)), ProtectionTimeout)
        assert len(upstream.started) == 1


async def test_cancelling_the_caller_cancels_every_attempt() -> None:
    """A caller cancelled mid-race cancels all its attempts; each gives back its worker and breaker admission."""
    clock = FakeClock()
    upstream = Upstream(clock, [100.0, 100.0])
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", chain({"delay": 0.25}))
        tasks = len(anyio.get_running_tasks())
        async with anyio.create_task_group() as group:
            group.start_soon(infra.execute_protected, "api", upstream)
            await advance(clock, 0.25)
            await advance(clock, 0.25)
            assert (await infra.get_protection_status("api"))["connection_pool"]["in_use"] == 2
            group.cancel_scope.cancel()
        assert sorted(upstream.cancelled) == [0, 1]
        await released(infra)
        status = await infra.get_protection_status("api")
        assert status["circuit_breaker"]["failure_count"] == 0  # a cancellation is no failure
        await anyio.wait_all_tasks_blocked()
        assert len(anyio.get_running_tasks()) == tasks


async def test_each_retry_attempt_is_hedged_and_hedges_spend_no_retry_budget() -> None:
    """With retry and hedge, every attempt is a race; only the retries count in the retry budget."""
    clock = FakeClock()
    errors: dict[int, Exception] = {0: ConnectionError("a"), 1: ConnectionError("b")}
    upstream = Upstream(clock, [0.5, 0.5, 3.0, 0.5], errors)
    config = chain({"delay": 0.25}, retry={"attempts": 2, "initial": 0.125, "jitter": 0.0})
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", config)
        with capture_events(HEDGE_EVENTS) as events:
            assert await drive(clock, lambda: infra.execute_protected("api", upstream)) == 3
        # Race 1: 0 and 1 fail at 0.5 and 0.75; the retry waits 0.125; race 2: 2 is slow, 3 wins.
        assert upstream.started == [0.0, 0.25, 0.875, 1.125]
        assert [e.name for e in events] == ["started", "started", "won"]
        budget = (await infra.get_protection_status("api"))["retry"]["budget"]
        assert (budget["first_attempts"], budget["retries"]) == (1, 1)
        await released(infra)


async def test_protect_makes_one_attempt() -> None:
    """protect() cannot run a block twice: a hedged key makes one attempt through it."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", chain({"delay": 0.25}))
        entered = 0

        async def block() -> str:
            nonlocal entered
            async with infra.protect("api"):
                entered += 1
                await clock.sleep(1.0)
            return "done"

        assert await drive(clock, block) == "done"
        assert entered == 1


async def test_call_options_keep_the_hedging_of_the_key() -> None:
    """A call with options (an entity, a timeout) of a hedged key is hedged too."""
    clock = FakeClock()
    upstream = Upstream(clock, [3.0, 0.5])
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", chain({"delay": 0.25}))
        call = lambda: infra.execute_protected("api", upstream, rate_limiter="user-1", timeout=2.0)  # noqa: E731
        assert await drive(clock, call) == 1


async def test_a_percentile_delay_follows_recent_successful_latencies() -> None:
    """``"p90"`` hedges after the 90th percentile of the successful attempts; a cold key does not hedge."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", chain({"delay": "p90"}))
        fast = Upstream(clock, [k / 64 for k in range(1, 41)])
        for _ in range(MIN_SAMPLES - 1):
            await drive(clock, lambda: infra.execute_protected("api", fast))
        assert (await infra.get_protection_status("api"))["hedge"]["delay"] is None  # still learning
        await drive(clock, lambda: infra.execute_protected("api", fast))
        hedge = (await infra.get_protection_status("api"))["hedge"]
        assert hedge["samples"] == MIN_SAMPLES
        assert hedge["delay"] == 18 / 64  # the 18th of 20 latencies, 1/64 .. 20/64
        slow = Upstream(clock, [3.0, 0.125])
        with capture_events(HEDGE_EVENTS) as events:
            assert await drive(clock, lambda: infra.execute_protected("api", slow)) == 1
        assert slow.started[1] - slow.started[0] == 18 / 64
        assert [e.name for e in events] == ["started", "won"]


def test_the_latency_window_keeps_60_seconds_and_1000_samples() -> None:
    """Samples older than 60 s leave the window, and at most the last 1,000 count."""
    clock = FakeClock()
    hedge = Hedge("p50", clock=clock)
    for latency in range(1, 1201):
        hedge.record(latency / 1000)
    assert hedge.samples == 1000
    assert hedge.delay() == 0.7  # the median of 0.201 .. 1.2
    clock.advance(60.5)
    assert hedge.samples == 0
    assert hedge.delay() is None
    assert "p50" in repr(hedge)


def test_a_fixed_delay_learns_nothing() -> None:
    """A delay in seconds is used as it is, whatever the latencies."""
    hedge = Hedge(0.05, 2, clock=FakeClock())
    hedge.record(1.0)
    assert (hedge.delay(), hedge.samples, hedge.percentile, hedge.max_hedges) == (0.05, 0, None, 2)
    assert repr(hedge) == "Hedge(delay=0.05, max_hedges=2, samples=0)"


async def test_reconfiguring_keeps_an_unchanged_policy_and_drops_a_removed_one() -> None:
    """The same options keep the learnt latencies; a config without ``hedge`` stops hedging."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", chain({"delay": "p50"}))
        fast = Upstream(clock, [0.125] * 10)
        for _ in range(3):
            await drive(clock, lambda: infra.execute_protected("api", fast))
        await infra.configure_protection("api", chain({"delay": "p50"}))
        assert (await infra.get_protection_status("api"))["hedge"]["samples"] == 3
        await infra.configure_protection("api", chain({"delay": "p60"}))
        assert (await infra.get_protection_status("api"))["hedge"]["samples"] == 0
        await infra.configure_protection("api", {"timeout": 4.0})
        assert "hedge" not in await infra.get_protection_status("api")
        slow = Upstream(clock, [0.5])
        assert await drive(clock, lambda: infra.execute_protected("api", slow)) == 0
        await infra.configure_protection("api", chain({"delay": 0.25}))
        await infra.remove_protection("api")
        assert await drive(clock, lambda: infra.execute_protected("api", Upstream(clock, [0.5]))) == 0


@pytest.mark.parametrize(
    ("hedge", "path"),
    [
        ({"delay": 0}, "api.hedge.delay"),
        ({"delay": -0.5}, "api.hedge.delay"),
        ({"delay": math.inf}, "api.hedge.delay"),
        ({"delay": "p0"}, "api.hedge.delay"),
        ({"delay": "p100"}, "api.hedge.delay"),
        ({"delay": "p99.95"}, "api.hedge.delay"),
        ({"delay": "fast"}, "api.hedge.delay"),
        ({"delay": True}, "api.hedge.delay"),
        ({"delay": None}, "api.hedge.delay"),
        ({"max_hedges": 0}, "api.hedge.max_hedges"),
        ({"max_hedges": 11}, "api.hedge.max_hedges"),
        ({"max_hedges": 1.5}, "api.hedge.max_hedges"),
        ({"max_hedges": True}, "api.hedge.max_hedges"),
        ({"max_hedge": 2}, "api.hedge.max_hedge"),
        ("p95", "api.hedge"),
    ],
)
async def test_a_bad_hedge_section_names_its_path_and_keeps_the_old_config(hedge: Any, path: str) -> None:
    """Each bad option raises ConfigurationError with its full path; the key's config stays as it was."""
    async with AsyncInfrastructure(clock=FakeClock()) as infra:
        await infra.configure_protection("api", {"timeout": 3.0})
        with pytest.raises(ConfigurationError) as caught:
            await infra.configure_protection("api", {"hedge": hedge})
        assert caught.value.path == path
        assert path in str(caught.value)
        assert (await infra.get_protection_status("api"))["timeout"] == 3.0


def test_the_section_has_the_contracts_defaults_and_accepts_percentiles() -> None:
    """Defaults: ``"p95"``, one hedge; ``"p99.9"`` and seconds are accepted, ints become floats."""
    assert (HedgeConfig().delay, HedgeConfig().max_hedges) == ("p95", 1)
    assert HedgeConfig(delay="p99.9", max_hedges=10).delay == "p99.9"
    assert HedgeConfig(delay=1).delay == 1.0
    assert ProtectionConfig.from_mapping({"hedge": {"delay": "p1"}}, "api").hedge == HedgeConfig(delay="p1")
    with pytest.raises(ConfigurationError) as caught:
        HedgeConfig(delay="p")
    assert caught.value.path == "hedge.delay"
