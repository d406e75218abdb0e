from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from trio.testing import MockClock

from seawall import (
    AsyncInfrastructure,
    BreakerState,
    CircuitBreaker,
    CircuitBreakerNotFound,
    CircuitOpenError,
    ConfigurationError,
    PoolClosed,
    PoolNotFound,
    PoolTimeout,
    ProtectionConfig,
    ProtectionKeyNotFound,
    ProtectionTimeout,
    RateLimitExceeded,
)
from seawall.backends import MemoryBreakerBackend, MemoryRateLimitBackend
from seawall.testing import FakeClock, advance, capture_events

pytestmark = pytest.mark.anyio

SEED_TEST = {
    "circuit_breaker": {"failure_threshold": 1, "recovery_time": 1},
    "rate_limiter": {"limit": 1, "window": 1},
    "connection_pool": {"size": 1},
}


async def ok() -> str:
    return "ok"


class Factory:
    """Counts the connections it makes and closes."""

    def __init__(self) -> None:
        self.made = 0
        self.closed = 0

    async def create(self) -> dict[str, int]:
        self.made += 1
        return {"id": self.made}

    async def close(self, conn: object) -> None:
        self.closed += 1


class FailingFactory:
    async def create(self) -> object:
        raise OSError("connection refused")

    async def close(self, conn: object) -> None:  # pragma: no cover - nothing is ever made
        pass


def names(events: list[Any]) -> list[str]:
    return [event.name for event in events]


# -- the seed's own scenarios ------------------------------------------------


async def test_seed_second_call_is_rate_limited() -> None:
    """Seed: breaker 1/1 s, 1 per 1 s, pool of 1: first call succeeds, the second is rate limited."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("test", SEED_TEST)
        assert await infra.execute_protected("test", ok) == "ok"
        with pytest.raises(RateLimitExceeded) as info:
            await infra.execute_protected("test", ok)
        assert info.value.retry_after is not None
        assert info.value.retry_after > 0


async def test_seed_unknown_key_runs_fn_and_errors_propagate() -> None:
    """Seed: an unknown key runs fn; its RuntimeError propagates as itself, unwrapped."""
    boom = RuntimeError("boom")

    async def fails() -> None:
        raise boom

    async with AsyncInfrastructure() as infra:
        assert await infra.execute_protected("nobody", ok) == "ok"
        with pytest.raises(RuntimeError) as info:
            await infra.execute_protected("nobody", fails)
        assert info.value is boom


async def test_seed_fallback_chain() -> None:
    """Seed: when the primary's breaker is open it fails fast and the secondary serves."""
    primary_calls = 0

    async def primary() -> str:
        nonlocal primary_calls
        primary_calls += 1
        raise ConnectionError("primary down")

    async def secondary() -> str:
        return "secondary"

    async def fetch(infra: AsyncInfrastructure) -> str:
        try:
            return await infra.execute_protected("primary", primary)
        except (CircuitOpenError, ConnectionError):
            return await infra.execute_protected("secondary", secondary)

    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("primary", {"circuit_breaker": {"failure_threshold": 2}})
        await infra.configure_protection("secondary", {"circuit_breaker": {"failure_threshold": 2}})
        assert [await fetch(infra) for _ in range(5)] == ["secondary"] * 5
        assert primary_calls == 2  # then the open breaker kept the primary from being called


@pytest.mark.asyncio_only("asyncpg runs on asyncio only")
async def test_seed_asyncpg_full_chain(postgres_dsn: str) -> None:
    """Seed: named breaker + named asyncpg pool; a failing upstream trips the breaker, then calls fail fast."""
    from seawall.integrations.asyncpg import AsyncpgFactory

    async with AsyncInfrastructure() as infra:
        await infra.circuit_breaker.start_fuse_instance("db_breaker", failure_threshold=2, recovery_time=30)
        await infra.connection_manager.start_pool("db", AsyncpgFactory(postgres_dsn), size=2)
        await infra.configure_protection("db_query", {"rate_limiter": {"limit": 100, "window": 1}, "timeout": 5})
        async with infra.protect("db_query", circuit_breaker="db_breaker", connection_pool="db") as conn:
            assert await conn.fetchval("SELECT 41 + 1") == 42
        for _ in range(2):
            with pytest.raises(Exception, match="relation"):
                async with infra.protect("db_query", circuit_breaker="db_breaker", connection_pool="db") as conn:
                    await conn.fetchval("SELECT * FROM no_such_table_seawall")
        with capture_events() as events, pytest.raises(CircuitOpenError):
            async with infra.protect("db_query", circuit_breaker="db_breaker", connection_pool="db"):
                pytest.fail("the open breaker must not let the block run")
        assert "checkout" not in names(events)
        status = await infra.connection_manager.get_pool_status("db")
        assert status.in_use == 0
        assert (await infra.circuit_breaker.get_status("db_breaker")).state.value == "open"


# -- layer order and the timeout -----------------------------------------------


async def test_timeout_fires_at_deadline_and_counts_as_breaker_failure() -> None:
    """Expiry raises ProtectionTimeout(key, timeout), not a moment early, and counts as a breaker failure."""
    clock = FakeClock()
    started = 0

    async def hangs() -> None:
        nonlocal started
        started += 1
        await anyio.sleep_forever()

    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("slow", {"circuit_breaker": {"failure_threshold": 1}, "timeout": 2.0})
        outcome: list[BaseException] = []

        async def call() -> None:
            try:
                await infra.execute_protected("slow", hangs)
            except ProtectionTimeout as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            clock.advance(1.999)
            await anyio.wait_all_tasks_blocked()
            assert outcome == []
            clock.advance(0.001)
        assert len(outcome) == 1
        assert outcome[0].key == "slow"
        assert outcome[0].timeout == 2.0
        assert isinstance(outcome[0], TimeoutError)
        with pytest.raises(CircuitOpenError):
            await infra.execute_protected("slow", hangs)
        assert started == 1


@pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio-mockclock")]
)
async def test_a_trio_mock_clock_jumps_through_a_protected_calls_timeout() -> None:
    """Under trio's MockClock(autojump_threshold=0) a 10 s timeout passes in virtual time: ProtectionTimeout at once."""
    real_start, start = time.monotonic(), anyio.current_time()
    async with AsyncInfrastructure() as infra:  # (no clock injected: the running loop's)
        await infra.configure_protection("k", {"circuit_breaker": {"failure_threshold": 1, "recovery_time": 30}})
        with pytest.raises(ProtectionTimeout) as info:
            await infra.execute_protected("k", anyio.sleep_forever, timeout=10)
        assert info.value.timeout == 10
        assert 10 <= anyio.current_time() - start < 10.5  # the deadline fired on the loop's clock, on time
        with pytest.raises(CircuitOpenError):  # the timeout counted; the breaker's recovery is on the same clock
            await infra.execute_protected("k", anyio.sleep_forever)
        await anyio.sleep(30)
        assert await infra.execute_protected("k", anyio.lowlevel.checkpoint) is None
    assert time.monotonic() - real_start < 5.0  # 40 virtual seconds, a moment of real time


async def test_timeout_without_breaker_and_per_call_override() -> None:
    """A per-call timeout overrides the key's; without a breaker the scope's own cancel becomes the timeout."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("k", {"timeout": 100})
        with capture_events() as events:
            async with anyio.create_task_group() as tg:

                async def call() -> None:
                    with pytest.raises(ProtectionTimeout) as info:
                        await infra.execute_protected("k", anyio.sleep_forever, timeout=0.5)
                    assert info.value.timeout == 0.5

                tg.start_soon(call)
                await anyio.wait_all_tasks_blocked()
                clock.advance(0.5)
        triggered = [e for e in events if e.name == "protection_triggered"]
        assert [e.metadata["layer"] for e in triggered] == ["timeout"]


async def test_smaller_new_timeout_wakes_the_timer() -> None:
    """A call with a new, smaller timeout expires on time even while the timer sleeps for a longer one."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        results: list[str] = []

        async def call(seconds: float) -> None:
            try:
                await infra.execute_protected("k", anyio.sleep_forever, timeout=seconds)
            except ProtectionTimeout:
                results.append(f"timeout {seconds}")

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 10.0)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(call, 1.0)
            await anyio.wait_all_tasks_blocked()
            clock.advance(1.0)
            await anyio.wait_all_tasks_blocked()
            assert results == ["timeout 1.0"]
            clock.advance(9.0)
        assert results == ["timeout 1.0", "timeout 10.0"]
        assert infra.statistics().timer.pending == 0
        assert infra.statistics().timer.expired == 2


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_timer_cancels_expired_calls_from_outside_any_task() -> None:
    """On asyncio an expired call's cancellation names no task: the timer cancels from a loop callback.

    anyio's ``CancelScope.cancel()`` called from a task formats that task's
    repr into the cancellation message; from the timer task that formatting
    was the dearest part of unwinding a timeout (a burst of 10,000 timeouts
    landed later than ``anyio.fail_after``'s, which cancel from loop timers).
    """
    clock = FakeClock()
    messages: list[str] = []

    async def hangs() -> None:
        try:
            await anyio.sleep_forever()
        except asyncio.CancelledError as exc:
            messages.append(str(exc))
            raise

    async with AsyncInfrastructure(clock=clock) as infra:
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                with pytest.raises(ProtectionTimeout):
                    await infra.execute_protected("k", hangs, timeout=1.0)

            for _ in range(3):
                tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            clock.advance(1.0)
        assert infra.statistics().timer.expired == 3
    assert len(messages) == 3
    assert all(message.startswith("Cancelled via cancel scope") for message in messages)
    assert not [message for message in messages if " by <Task" in message]


async def test_timeout_fires_on_time_on_the_real_clock() -> None:
    """On the real clock a timeout fires no earlier than its deadline, and promptly on an idle loop."""
    lateness: list[float] = []
    async with AsyncInfrastructure() as infra:
        for _ in range(5):
            start = anyio.current_time()
            with pytest.raises(ProtectionTimeout):
                await infra.execute_protected("k", anyio.sleep_forever, timeout=0.02)
            lateness.append(anyio.current_time() - start - 0.02)
    assert min(lateness) >= -1e-3  # the loop clock's resolution
    # The best of five: one slow run on a loaded machine is not the timer's lateness.
    assert min(lateness) <= 0.010


async def test_calls_started_in_one_burst_expire_at_their_own_deadlines() -> None:
    """Each call's deadline is its own start plus its timeout, however late the timer task gets to run."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("k", {"timeout": 1.0})
        expired: list[float] = []

        async def call() -> None:
            with pytest.raises(ProtectionTimeout):
                await infra.execute_protected("k", anyio.sleep_forever)
            expired.append(clock.now())

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(call)
                await anyio.wait_all_tasks_blocked()
                clock.advance(0.25)  # the calls start 0.25 s apart
            assert infra.statistics().timer.pending == 3
            await advance(clock, 0.25)
            assert expired == [1.0]
            await advance(clock, 0.25)
            await advance(clock, 0.25)
        assert expired == [1.0, 1.25, 1.5]
        timer = infra.statistics().timer
        assert (timer.pending, timer.expired, timer.timeouts) == (0, 3, (1.0,))


async def test_idle_timer_sleeps_until_a_call_registers() -> None:
    """With nothing registered the timer sleeps without a deadline; the next call wakes it and still times out."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await anyio.wait_all_tasks_blocked()
        assert infra.statistics().timer.idle
        outcome: list[str] = []

        async def call() -> None:
            with pytest.raises(ProtectionTimeout):
                await infra.execute_protected("k", anyio.sleep_forever, timeout=1.0)
            outcome.append("timeout")

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await advance(clock, 1.0)
        assert outcome == ["timeout"]
        await anyio.wait_all_tasks_blocked()
        assert infra.statistics().timer.idle
        assert infra.statistics().timer.expired == 1


async def test_calls_outliving_the_infrastructure_get_their_deadline() -> None:
    """Calls still registered when the infrastructure exits get a deadline of their own, no earlier than theirs."""
    outcome: list[float] = []
    async with anyio.create_task_group() as tg:
        async with AsyncInfrastructure() as infra:

            async def call() -> None:
                start = anyio.current_time()
                try:
                    await infra.execute_protected("k", anyio.sleep_forever)
                except ProtectionTimeout:
                    outcome.append(anyio.current_time() - start)

            await infra.configure_protection("k", {"timeout": 0.3})
            tg.start_soon(call)
            tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            assert infra.statistics().timer.pending == 2
        assert infra.statistics().timer.pending == 0  # handed over, not forgotten
    assert len(outcome) == 2
    assert min(outcome) >= 0.3 - 1e-3


async def test_protect_unwinds_when_settling_a_success_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the breaker fails to record a block's success, the error surfaces and nothing stays taken."""
    from seawall import CircuitBreaker
    from seawall._telemetry import BREAKER_CALL_EXECUTED

    def refuse(self: CircuitBreaker, permit: object, exc: BaseException | None = None) -> None:
        raise RuntimeError("settle failed")

    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("k", {"circuit_breaker": {}, "connection_pool": {"size": 1}})
        pool = infra.connection_manager.get("k")
        with capture_events([BREAKER_CALL_EXECUTED.event]):  # the breaker now hands out permits
            monkeypatch.setattr(CircuitBreaker, "settle_nowait", refuse)
            with pytest.raises(RuntimeError, match="settle failed"):
                async with infra.protect("k"):
                    pass
        assert infra.statistics().timer.pending == 0
        assert pool.status().in_use == 0
        assert infra.statistics().key("k").inflight == 0


async def test_outside_async_with_calls_use_their_own_deadline() -> None:
    """Without ``async with`` there is no timer task; calls still time out, on a per-call deadline."""
    infra = AsyncInfrastructure()
    assert await infra.execute_protected("k", ok) == "ok"
    with pytest.raises(ProtectionTimeout):
        await infra.execute_protected("k", anyio.sleep_forever, timeout=0.01)
    async with infra.protect("k", timeout=0.01):
        pass


async def test_outer_cancellation_is_not_a_timeout_nor_a_failure() -> None:
    """Cancellation from outside propagates as cancellation and is not counted by the breaker."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("k", {"circuit_breaker": {"failure_threshold": 1}})
        with anyio.move_on_after(0.01) as outer:
            await infra.execute_protected("k", anyio.sleep_forever)
        assert outer.cancelled_caught
        status = await infra.get_protection_status("k")
        assert status["circuit_breaker"]["state"] == "closed"
        assert status["circuit_breaker"]["failure_count"] == 0


async def test_denial_touches_neither_breaker_nor_pool() -> None:
    """A rate-limit denial leaves the breaker and the pool untouched and fn uncalled."""
    factory = Factory()
    calls = 0

    async def counted() -> None:
        nonlocal calls
        calls += 1

    async with AsyncInfrastructure() as infra:
        await infra.configure_protection(
            "k",
            {
                "rate_limiter": {"limit": 1, "window": 60},
                "circuit_breaker": {"failure_threshold": 1},
                "connection_pool": {"size": 1, "factory": factory},
            },
        )
        await infra.execute_protected("k", counted)
        with capture_events() as events, pytest.raises(RateLimitExceeded):
            await infra.execute_protected("k", counted)
        assert calls == 1
        assert not {"checkout", "call_executed", "call_rejected"} & set(names(events))
        triggered = [e for e in events if e.name == "protection_triggered"]
        assert triggered[0].metadata["layer"] == "rate_limiter"
        assert triggered[0].metadata["error_type"] == "rate_limit_exceeded"
        status = await infra.get_protection_status("k")
        assert status["circuit_breaker"]["failure_count"] == 0
        assert status["connection_pool"]["in_use"] == 0


async def test_breaker_rejection_never_touches_the_pool() -> None:
    """An open breaker rejects before any checkout, reported with layer circuit_breaker."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("k", {"circuit_breaker": {}, "connection_pool": {"size": 1}})
        await infra.circuit_breaker.get("k").trip()
        with capture_events() as events:
            with pytest.raises(CircuitOpenError):
                await infra.execute_protected("k", ok)
            with pytest.raises(CircuitOpenError):
                async with infra.protect("k"):
                    pytest.fail("must not run")
        assert "checkout" not in names(events)
        layers = [e.metadata["layer"] for e in events if e.name == "protection_triggered"]
        assert layers == ["circuit_breaker", "circuit_breaker"]


async def test_pool_timeout_is_reported_as_connection_pool() -> None:
    """A bulkhead that stays full raises PoolTimeout, reported with layer connection_pool."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("k", {"connection_pool": {"size": 1, "timeout": 1}, "timeout": 60})
        release = anyio.Event()
        with capture_events() as events:
            async with anyio.create_task_group() as tg:

                async def holder() -> None:
                    await infra.execute_protected("k", release.wait)

                async def waiter() -> None:
                    with pytest.raises(PoolTimeout):
                        await infra.execute_protected("k", ok)
                    release.set()

                tg.start_soon(holder)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                clock.advance(1)
        layers = [e.metadata["layer"] for e in events if e.name == "protection_triggered"]
        assert layers == ["connection_pool"]
        assert (await infra.connection_manager.get_pool_status("k")).in_use == 0


async def test_pool_max_waiting_from_config_fails_a_checkout_beyond_it_at_once() -> None:
    """connection_pool.max_waiting=0: with the one slot taken, a second call fails with PoolTimeout without waiting."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("k", {"connection_pool": {"size": 1, "timeout": 60, "max_waiting": 0}})
        release = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(infra.execute_protected, "k", release.wait)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(PoolTimeout):
                await infra.execute_protected("k", ok)  # no clock.advance: it did not wait
            release.set()
        assert (await infra.connection_manager.get_pool_status("k")).in_use == 0


# -- telemetry -----------------------------------------------------------------


async def test_execute_telemetry() -> None:
    """execute_start, execute_stop(duration, success) and execute_exception are emitted per call."""

    async def fails() -> None:
        raise ValueError("nope")

    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("k", {"circuit_breaker": {}, "connection_pool": {"size": 1}})
        with capture_events() as events:
            assert await infra.execute_protected("k", ok) == "ok"
            with pytest.raises(ValueError, match="nope"):
                await infra.execute_protected("k", fails)
        ours = [e for e in events if e.event[1] == "infrastructure"]
        assert names(ours) == ["execute_start", "execute_stop", "execute_start", "execute_exception", "execute_stop"]
        assert ours[1].metadata == {"key": "k", "success": True}
        assert ours[1].measurements["duration"] >= 0
        assert ours[3].metadata["kind"] == "ValueError"
        assert ours[4].metadata["success"] is False


async def test_telemetry_of_a_denial_and_a_timeout() -> None:
    """Denials and timeouts end in execute_exception with their error_type."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("k", {"rate_limiter": {"limit": 1, "window": 60}, "circuit_breaker": {}})
        with capture_events() as events:
            with pytest.raises(ProtectionTimeout):
                await infra.execute_protected("k", anyio.sleep_forever, timeout=0.01)
            with pytest.raises(RateLimitExceeded):
                await infra.execute_protected("k", ok)
        exceptions = [e.metadata["error_type"] for e in events if e.name == "execute_exception"]
        assert exceptions == ["timeout", "rate_limit_exceeded"]
        status = await infra.get_protection_status("k")
        assert status["circuit_breaker"]["failure_count"] == 1


# -- protect() -------------------------------------------------------------------


async def test_protect_yields_the_connection() -> None:
    """protect() yields the pool's connection, or None without a pool, and returns it afterwards."""
    factory = Factory()
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("db", {"connection_pool": {"size": 1, "factory": factory}})
        async with infra.protect("db") as conn:
            assert conn == {"id": 1}
            assert (await infra.connection_manager.get_pool_status("db")).in_use == 1
        assert (await infra.connection_manager.get_pool_status("db")).in_use == 0
        async with infra.protect("no-pool") as nothing:
            assert nothing is None
    assert factory.closed == factory.made == 1


async def test_protect_timeout_and_errors() -> None:
    """protect() turns its own expiry into ProtectionTimeout and lets block errors through."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("k", {"circuit_breaker": {"failure_threshold": 2}, "connection_pool": {}})
        with pytest.raises(ProtectionTimeout):
            async with infra.protect("k", timeout=0.01):
                await anyio.sleep_forever()
        with pytest.raises(KeyError):
            async with infra.protect("k"):
                raise KeyError("x")
        assert (await infra.circuit_breaker.get_status("k")).state.value == "open"
        protection = infra.protect("k")
        with pytest.raises(CircuitOpenError):
            await protection.__aenter__()
        with pytest.raises(RuntimeError, match="only once"):
            await protection.__aenter__()


# -- options -----------------------------------------------------------------------


async def test_entity_buckets_and_operations() -> None:
    """rate_limiter= picks a bucket per entity, or per (operation, entity) on that operation's limiter."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("api", {"rate_limiter": {"limit": 1, "window": 60}})
        await infra.execute_protected("api", ok, rate_limiter="alice")
        await infra.execute_protected("api", ok, rate_limiter="bob")
        with pytest.raises(RateLimitExceeded) as info:
            await infra.execute_protected("api", ok, rate_limiter="alice")
        assert info.value.key == "api:alice"
        await infra.rate_limiter.check_rate("carol", "search", 2, 60)
        await infra.execute_protected("api", ok, rate_limiter=("search", "carol"))
        with pytest.raises(RateLimitExceeded) as info:
            await infra.execute_protected("api", ok, rate_limiter=("search", "carol"))
        assert info.value.key == "search:carol"
        status = await infra.rate_limiter.get_status("carol", "search")
        assert status.remaining == 0


@pytest.mark.parametrize("use_protect", [False, True])
async def test_keys_with_the_same_rule_never_share_a_bucket(use_protect: bool) -> None:
    """Key "api" with entity "admin:alice" is not key "api:admin" with entity "alice" (nor any other pair)."""

    async def call(key: str, entity: str | tuple[str, str]) -> str:
        try:
            if use_protect:
                async with infra.protect(key, rate_limiter=entity):
                    return "ok"
            return await infra.execute_protected(key, ok, rate_limiter=entity)
        except RateLimitExceeded:
            return "denied"

    async with AsyncInfrastructure() as infra:
        for key in ("api", "api:admin", "api\\", "a"):
            await infra.configure_protection(key, {"rate_limiter": {"limit": 1, "window": 60}})
        pairs = [
            ("api", "admin:alice"),
            ("api:admin", "alice"),
            ("api\\", "x"),  # a backslash in the key cannot forge an escape either
            ("api", "\\:x"),
            ("a", "pi:admin:alice"),
        ]
        assert [await call(key, entity) for key, entity in pairs] == ["ok"] * len(pairs)
        assert [await call(key, entity) for key, entity in pairs] == ["denied"] * len(pairs)
        # The operation form names the same buckets: ("api:admin", "alice") is key api:admin's alice.
        assert await call("a", ("api:admin", "alice")) == "denied"


@pytest.mark.parametrize("seconds", [10**400, float("nan"), 1e308, -0.0, True])
async def test_a_bad_per_call_timeout_is_a_configuration_error(seconds: object) -> None:
    """execute_protected(timeout=) and protect(timeout=) refuse out-of-range timeouts, naming them."""
    async with AsyncInfrastructure() as infra:
        with pytest.raises(ConfigurationError) as info:
            await infra.execute_protected("api", ok, timeout=seconds)  # type: ignore[arg-type]
        assert info.value.path == "api.timeout"
        with pytest.raises(ConfigurationError):
            async with infra.protect("api", timeout=seconds):  # type: ignore[arg-type]
                pass


@pytest.mark.parametrize("use_protect", [False, True])
async def test_entity_plans_follow_the_key(use_protect: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each entity keeps its own bucket, however many entities call, and a reconfigured key's limit applies at once.

    An operation's bucket for the same entity is another bucket.
    """
    import seawall._infrastructure

    monkeypatch.setattr(seawall._infrastructure, "_MAX_ENTITY_PLANS", 2)  # entity plans are dropped and rebuilt

    async def call(rate_limiter: str | tuple[str, str]) -> str:
        try:
            if use_protect:
                async with infra.protect("api", rate_limiter=rate_limiter):
                    return "ok"
            return await infra.execute_protected("api", ok, rate_limiter=rate_limiter)
        except RateLimitExceeded as exc:
            return f"denied {exc.key}"

    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("api", {"rate_limiter": {"limit": 1, "window": 60}})
        await infra.rate_limiter.check_rate("nobody", "search", 1, 60)  # registers the operation's limiter
        entities = ["alice", "bob", "carol", "dave", "erin"]
        assert [await call(entity) for entity in entities] == ["ok"] * 5
        assert await call(("search", "alice")) == "ok"  # the same entity on an operation: its own bucket
        assert [await call(entity) for entity in entities] == [f"denied api:{entity}" for entity in entities]
        assert await call(("search", "alice")) == "denied search:alice"
        assert infra.statistics().key("api").entity_plans <= 2  # bounded, however many entities call

        await infra.configure_protection("api", {"rate_limiter": {"limit": 3, "window": 60}})
        # The entities' buckets keep their level (full stays full); the new limit applies to every bucket.
        assert [await call(entity) for entity in entities] == [f"denied api:{entity}" for entity in entities]
        assert [await call("frank") for _ in range(4)] == ["ok"] * 3 + ["denied api:frank"]


@pytest.mark.parametrize("configured", [True, False])
async def test_per_call_timeouts_keep_their_plans_and_each_its_own_deadline(configured: bool) -> None:
    """A per-call timeout's plan is kept on the key (an unconfigured key's too); each value times out at its own."""
    clock = FakeClock()
    timed_out: list[float] = []

    async def call(seconds: float, entity: str | None = None) -> None:
        try:
            await infra.execute_protected("api", anyio.sleep_forever, timeout=seconds, rate_limiter=entity)
        except ProtectionTimeout as exc:
            timed_out.append(exc.timeout)

    async with AsyncInfrastructure(clock=clock) as infra:
        if configured:
            await infra.configure_protection("api", {"rate_limiter": {"limit": 100, "window": 60}})
        for _ in range(2):  # the second round finds the kept plans
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, 1.0)
                tg.start_soon(call, 3.0)
                if configured:
                    tg.start_soon(call, 2.0, "alice")
                await anyio.wait_all_tasks_blocked()
                clock.advance(0.999)
                await anyio.wait_all_tasks_blocked()
                assert timed_out == []
                for _ in range(3):
                    clock.advance(1.0)
                    await anyio.wait_all_tasks_blocked()
            assert timed_out == ([1.0, 2.0, 3.0] if configured else [1.0, 3.0])
            timed_out.clear()
        if configured:
            assert infra.statistics().key("api").entity_plans == 3  # (None, 1.0), (None, 3.0), ("alice", 2.0)


async def test_an_unconfigured_keys_per_call_timeouts_keep_few_plans() -> None:
    """Unconfigured keys and timeouts both taken from requests cannot pile up plans: each such key keeps a few."""
    import seawall._infrastructure

    async with AsyncInfrastructure() as infra:
        for index in range(200):
            assert await infra.execute_protected("tenant-1", ok, timeout=1.0 + index / 1000) == "ok"
        # (White-box: no statistic counts an unconfigured key's plans.)
        kept = infra._adhoc["tenant-1"].entities
        assert 0 < len(kept) <= seawall._infrastructure._MAX_ADHOC_TIMEOUTS
        assert (None, 1.199) in kept  # the latest timeout is kept


async def test_bad_call_options() -> None:
    """Invalid options and unknown names raise at once, naming the problem."""
    async with AsyncInfrastructure() as infra:
        with pytest.raises(ConfigurationError, match="no rate limit"):
            await infra.execute_protected("k", ok, rate_limiter="alice")
        with pytest.raises(ConfigurationError, match="entity id"):
            await infra.execute_protected("k", ok, rate_limiter=("a", "b", "c"))  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match=r"k\.timeout"):
            await infra.execute_protected("k", ok, timeout=-1)
        with pytest.raises(CircuitBreakerNotFound):
            await infra.execute_protected("k", ok, circuit_breaker="nope")
        with pytest.raises(PoolNotFound):
            await infra.execute_protected("k", ok, connection_pool="nope")


async def test_named_breaker_from_registry() -> None:
    """A breaker started with start_fuse_instance can be named in execute_protected."""
    async with AsyncInfrastructure() as infra:
        breaker = await infra.circuit_breaker.start_fuse_instance("api_breaker", failure_threshold=1)
        await infra.configure_protection("k", {"timeout": 1})

        async def fails() -> None:
            raise ConnectionError

        with pytest.raises(ConnectionError):
            await infra.execute_protected("k", fails, circuit_breaker="api_breaker")
        assert breaker.state.value == "open"
        with pytest.raises(CircuitOpenError):
            await infra.execute_protected("k", ok, circuit_breaker="api_breaker")
        assert await infra.execute_protected("k", ok) == "ok"  # the key itself has no breaker
        assert await infra.execute_protected("k", ok, timeout=1) == "ok"  # same plan as the key's


async def test_timedelta_timeout() -> None:
    """A per-call timeout may be a timedelta."""
    from datetime import timedelta

    async with AsyncInfrastructure() as infra:
        assert await infra.execute_protected("k", ok, timeout=timedelta(seconds=1)) == "ok"


# -- configuration -------------------------------------------------------------------


async def test_failed_reconfiguration_keeps_the_old_config() -> None:
    """An invalid config, or a pool that fails to start, leaves the earlier configuration in force."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("k", {"rate_limiter": {"limit": 5, "window": 1}})
        with pytest.raises(ConfigurationError) as info:
            await infra.configure_protection("k", {"rate_limiter": {"limt": 5, "window": 1}})
        assert info.value.path == "k.rate_limiter.limt"
        with pytest.raises(OSError, match="refused"):
            await infra.configure_protection("k", {"connection_pool": {"factory": FailingFactory()}})
        status = await infra.get_protection_status("k")
        assert status["rate_limiter"]["limit"] == 5
        assert "connection_pool" not in status
        assert infra.list_protection_keys() == ["k"]
        with pytest.raises(ConfigurationError, match="key"):
            await infra.configure_protection("", {})


async def test_reconfiguring_swaps_the_pool_without_dropping_calls() -> None:
    """Calls in flight finish on the old pool, which closes after them; new calls use the new pool."""
    old_factory, new_factory = Factory(), Factory()
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("db", {"connection_pool": {"size": 1, "factory": old_factory}})
        release = anyio.Event()
        seen: list[object] = []
        async with anyio.create_task_group() as tg:

            async def in_flight() -> None:
                async with infra.protect("db") as conn:
                    await release.wait()
                    seen.append(conn)

            tg.start_soon(in_flight)
            await anyio.wait_all_tasks_blocked()
            old_pool = infra.connection_manager.get("db")
            await infra.configure_protection("db", {"connection_pool": {"size": 1, "factory": new_factory}})
            await anyio.wait_all_tasks_blocked()
            # The old pool may already refuse new checkouts, but the worker lent to the call stays open.
            assert old_factory.closed == 0
            async with infra.protect("db") as conn:
                assert conn == {"id": 1}
                assert infra.connection_manager.get("db") is not old_pool
            release.set()
        await anyio.wait_all_tasks_blocked()
        assert seen == [{"id": 1}]
        assert old_pool.closed
        assert old_factory.closed == 1
        with pytest.raises(PoolClosed):
            async with old_pool.checkout():
                pass


async def test_reconfiguring_keeps_the_old_pool_for_a_call_waiting_for_its_worker() -> None:
    """A block that waits for a checkout when the pool is swapped still gets the old pool's worker."""
    old_factory, new_factory = Factory(), Factory()
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("db", {"connection_pool": {"size": 1, "factory": old_factory}})
        release = anyio.Event()
        seen: list[object] = []
        async with anyio.create_task_group() as tg:

            async def holder() -> None:
                async with infra.protect("db") as conn:
                    seen.append(conn)
                    await release.wait()

            async def waiter() -> None:
                async with infra.protect("db") as conn:
                    seen.append(conn)

            tg.start_soon(holder)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(waiter)  # no idle worker: it waits in the old pool's queue
            await anyio.wait_all_tasks_blocked()
            old_pool = infra.connection_manager.get("db")
            await infra.configure_protection("db", {"connection_pool": {"size": 1, "factory": new_factory}})
            await anyio.wait_all_tasks_blocked()
            assert not old_pool.closed  # the retirement waits for the waiting call
            release.set()
        await anyio.wait_all_tasks_blocked()
        assert seen == [{"id": 1}, {"id": 1}]  # both on the old pool's one worker
        assert old_pool.closed
        assert old_factory.closed == 1
        assert new_factory.made == 1


async def test_remove_protection() -> None:
    """remove_protection forgets a key and closes its pool."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection(
            "k", {"rate_limiter": {"limit": 1, "window": 1}, "circuit_breaker": {}, "connection_pool": {}}
        )
        pool = infra.connection_manager.get("k")
        await infra.remove_protection("k")
        await anyio.wait_all_tasks_blocked()
        assert infra.list_protection_keys() == []
        assert pool.closed
        assert infra.connection_manager.list_pools() == []
        assert infra.circuit_breaker.names() == []
        with pytest.raises(ProtectionKeyNotFound):
            await infra.remove_protection("k")


async def test_configure_from_mapping_is_all_or_nothing() -> None:
    """configure_from_mapping validates every key before applying any."""
    async with AsyncInfrastructure() as infra:
        with pytest.raises(ConfigurationError) as info:
            await infra.configure_from_mapping({"a": {"timeout": 1}, "b": {"timeout": "x"}})
        assert info.value.path == "b.timeout"
        assert infra.list_protection_keys() == []
        configs = await infra.configure_from_mapping({"a": {"timeout": 1}, "b": ProtectionConfig(timeout=2)})
        assert configs["b"].timeout == 2.0
        assert infra.list_protection_keys() == ["a", "b"]
        with pytest.raises(ConfigurationError):
            await infra.configure_from_mapping([])  # type: ignore[arg-type]


FACTORY_MODULE = """
class Factory:
    async def create(self):
        return {"id": 1}

    async def close(self, conn):
        pass


class FailingFactory:
    async def create(self):
        raise OSError("connection refused")

    async def close(self, conn):
        pass
"""


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module of factories, as a user's TOML file would name them."""
    package = tmp_path / "importable"
    package.mkdir()
    (package / "toml_factories.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(package))
    return "toml_factories"


async def test_from_toml(tmp_path: Path, factory_module: str) -> None:
    """from_toml validates the file at once and configures its keys on entry."""
    file = tmp_path / "seawall.toml"
    file.write_text(
        "[api]\ntimeout = 1.5\n[api.rate_limiter]\nlimit = 1\nwindow = 60\n"
        f'[pool.connection_pool]\nsize = 1\nfactory = "{factory_module}:Factory"\n'
    )
    async with AsyncInfrastructure.from_toml(file) as infra:
        assert infra.list_protection_keys() == ["api", "pool"]
        await infra.execute_protected("api", ok)
        with pytest.raises(RateLimitExceeded):
            await infra.execute_protected("api", ok)
        async with infra.protect("pool") as conn:
            assert conn == {"id": 1}
        (tmp_path / "more.toml").write_text("[extra]\ntimeout = 3\n")
        await infra.configure_from_toml(tmp_path / "more.toml")
        assert (await infra.get_protection_status("extra"))["timeout"] == 3.0
    file.write_text("[api.circuit_breaker]\nrecovery_tme = 3\n")
    with pytest.raises(ConfigurationError) as info:
        AsyncInfrastructure.from_toml(file)
    assert str(file) in info.value.message
    assert "recovery_time" in info.value.message


# -- lifecycle -------------------------------------------------------------------------


async def test_exit_closes_pools_and_stops_the_timer_even_on_error() -> None:
    """Leaving async with closes every pool and stops the timer, also when the body raised."""
    factory = Factory()
    infra = AsyncInfrastructure()

    async def body() -> None:
        async with infra:
            await infra.configure_protection("k", {"connection_pool": {"size": 2, "factory": factory}})
            await infra.connection_manager.start_pool("extra", factory, size=1)
            assert infra.statistics().timer.running
            _ = 1 / 0

    with pytest.raises(ZeroDivisionError):
        await body()
    assert factory.made == 3
    assert factory.closed == 3
    assert not infra.statistics().timer.running
    # Nothing of ours is left running (the test runner's own task is not ours).
    leftovers = [task for task in anyio.get_running_tasks() if (task.name or "").startswith("seawall")]
    assert leftovers == []
    with pytest.raises(RuntimeError, match="only once"):
        async with infra:
            pass


async def test_exit_on_cancellation_closes_pools() -> None:
    """A cancelled body still closes every pool."""
    factory = Factory()
    with anyio.move_on_after(0.01):
        async with AsyncInfrastructure() as infra:
            await infra.configure_protection("k", {"connection_pool": {"size": 1, "factory": factory}})
            await anyio.sleep_forever()
    assert factory.closed == 1
    assert not infra.statistics().timer.running


async def test_failed_entry_cleans_up(tmp_path: Path, factory_module: str) -> None:
    """If a pool of a TOML file cannot start, entry fails and nothing is left running."""
    file = tmp_path / "s.toml"
    file.write_text(f'[k.connection_pool]\nfactory = "{factory_module}:FailingFactory"\n')
    infra = AsyncInfrastructure.from_toml(file)
    with pytest.raises(OSError, match="refused"):
        async with infra:
            pass  # pragma: no cover
    assert not infra.statistics().timer.running


async def test_aclose_and_repr() -> None:
    """aclose() does what leaving async with does; repr shows keys and state."""
    infra = AsyncInfrastructure()
    await infra.__aenter__()
    await infra.configure_protection("k", {})
    assert "keys=['k']" in repr(infra)
    assert "running=True" in repr(infra)
    await infra.aclose()
    assert "running=False" in repr(infra)


# -- status and registries ----------------------------------------------------------------


async def test_protection_status_and_health_serialise_to_json() -> None:
    """Status and health are plain JSON-ready dicts; an open breaker makes health degraded."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("test", SEED_TEST)
        status = await infra.get_protection_status("test")
        assert set(status) == {"key", "timeout", "rate_limiter", "circuit_breaker", "connection_pool"}
        json.dumps(status)
        health = await infra.health()
        assert health["status"] == "healthy"
        assert health["keys"] == 1
        assert health["pools"]["test"]["healthy"] is True
        assert health["circuit_breakers"]["test"]["state"] == "closed"
        await infra.circuit_breaker.get("test").trip()
        health = await infra.get_infrastructure_status()
        json.dumps(health)
        assert health["status"] == "degraded"
        assert health["circuit_breakers"]["test"]["healthy"] is False
        with pytest.raises(ProtectionKeyNotFound):
            await infra.get_protection_status("missing")


async def test_health_skips_a_breaker_removed_while_it_reports() -> None:
    """A breaker removed while health() awaits another breaker's status is left out, not reported broken."""
    from seawall import CircuitBreaker

    answer = anyio.Event()

    class SlowStatus(CircuitBreaker):
        async def status(self) -> Any:
            await answer.wait()
            return await super().status()

    async with AsyncInfrastructure() as infra:
        infra.circuit_breaker.register("a-slow", SlowStatus("a-slow"))
        await infra.configure_protection("b", {"circuit_breaker": {}})
        reports: list[dict[str, Any]] = []

        async def report() -> None:
            reports.append(await infra.health())

        async with anyio.create_task_group() as tg:
            tg.start_soon(report)
            await anyio.wait_all_tasks_blocked()
            await infra.remove_protection("b")
            answer.set()
        assert reports[0]["status"] == "healthy"
        assert list(reports[0]["circuit_breakers"]) == ["a-slow"]


async def test_rate_limiter_registry() -> None:
    """check_rate, execute_with_limit, get_status and reset work on per-entity buckets."""
    async with AsyncInfrastructure() as infra:
        registry = infra.rate_limiter
        status = await registry.check_rate("u1", "login", 2, 60)
        assert status.remaining == 1
        assert await registry.execute_with_limit("u1", "login", 2, 60, ok) == "ok"
        with capture_events() as events, pytest.raises(RateLimitExceeded):
            await registry.execute_with_limit("u1", "login", 2, 60, ok, metadata={"ip": "1.2.3.4"})
        triggered = [e for e in events if e.name == "protection_triggered"]
        assert triggered[0].metadata["metadata"] == {"ip": "1.2.3.4"}
        assert (await registry.get_status("u1", "login")).allowed is False
        await registry.reset("u1", "login")
        assert (await registry.get_status("u1", "login")).allowed is True
        await registry.check_rate("u1", "login", 5, 60)  # a new rule for the operation
        with pytest.raises(ProtectionKeyNotFound):
            await registry.get_status("u1", "never")
        with pytest.raises(ConfigurationError, match=r"login\.limit"):
            await registry.check_rate("u1", "login", 0, 60)
        assert "login" in repr(registry)


async def test_circuit_breaker_registry() -> None:
    """start_fuse_instance, execute, get_status, reset and get share one breaker by name."""
    async with AsyncInfrastructure() as infra:
        registry = infra.circuit_breaker
        breaker = await registry.start_fuse_instance("fuse", failure_threshold=1, recovery_time=10)
        assert registry.get("fuse") is breaker
        assert await registry.execute("fuse", ok) == "ok"

        async def fails() -> None:
            raise ConnectionError

        with pytest.raises(ConnectionError):
            await registry.execute("fuse", fails)
        with capture_events() as events, pytest.raises(CircuitOpenError):
            await registry.execute("fuse", ok)
        assert [e.metadata["layer"] for e in events if e.name == "protection_triggered"] == ["circuit_breaker"]
        assert (await registry.get_status("fuse")).state.value == "open"
        await registry.reset("fuse")
        assert (await registry.get_status("fuse")).state.value == "closed"
        with pytest.raises(CircuitBreakerNotFound):
            registry.get("nope")
        with pytest.raises(ConfigurationError, match="did you mean 'failure_threshold'"):
            await registry.start_fuse_instance("x", failure_treshold=1)
        with pytest.raises(ConfigurationError):
            await registry.start_fuse_instance("")
        own = CircuitBreaker("mine")
        assert registry.register("mine", own) is own
        with pytest.raises(TypeError):
            registry.register("bad", object())
        assert registry.names() == ["fuse", "mine"]
        assert "fuse" in repr(registry)


async def test_registered_aiobreaker_is_usable_by_name() -> None:
    """An existing aiobreaker.CircuitBreaker registered by name guards execute_protected."""
    aiobreaker = pytest.importorskip("aiobreaker")
    pytest.importorskip("seawall.integrations.aiobreaker")
    async with AsyncInfrastructure() as infra:
        infra.circuit_breaker.register("legacy", aiobreaker.CircuitBreaker(fail_max=1))
        assert await infra.execute_protected("k", ok, circuit_breaker="legacy") == "ok"


async def test_connection_manager() -> None:
    """start_pool, with_connection, get_pool_status, list_pools and stop_pool manage named pools."""
    factory = Factory()
    async with AsyncInfrastructure() as infra:
        manager = infra.connection_manager
        await manager.start_pool("db", factory, size=1, max_overflow=1)

        async def use(conn: dict[str, int]) -> int:
            return conn["id"]

        assert await manager.with_connection("db", use) == 1
        assert (await manager.get_pool_status("db")).size == 1
        assert manager.list_pools() == ["db"]
        old = manager.get("db")
        await manager.start_pool("db", factory, size=1)  # replaces; the old one closes
        await anyio.wait_all_tasks_blocked()
        assert old.closed
        await manager.stop_pool("db")
        assert manager.list_pools() == []
        with pytest.raises(PoolNotFound):
            await manager.stop_pool("db")
        with pytest.raises(PoolNotFound):
            await manager.with_connection("db", use)
        with pytest.raises(ConfigurationError, match=r"db\.sise"):
            await manager.start_pool("db", sise=1)
        with pytest.raises(ConfigurationError):
            await manager.start_pool("")
        assert "ConnectionManager" in repr(manager)
    assert factory.closed == factory.made


async def test_key_pool_shared_with_connection_manager() -> None:
    """A key's pool is visible to the connection manager and usable by name from other keys."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("db", {"connection_pool": {"size": 1}})
        assert infra.connection_manager.list_pools() == ["db"]
        async with infra.protect("other", connection_pool="db") as conn:
            assert conn is None
            assert (await infra.connection_manager.get_pool_status("db")).in_use == 1


async def test_many_distinct_timeouts_are_forgotten() -> None:
    """Idle groups of one-off timeout values are dropped so the timer stays small."""
    async with AsyncInfrastructure() as infra:
        for i in range(80):
            await infra.execute_protected("k", ok, timeout=1 + i / 1000)
        with pytest.raises(ProtectionTimeout):  # the timer runs: more than 64 values, the idle ones go
            await infra.execute_protected("k", anyio.sleep_forever, timeout=0.005)
        assert len(infra.statistics().timer.timeouts) <= 64
        # (Which values remain depends on when the timer last ran; a forgotten one is filed again.)
        with pytest.raises(ProtectionTimeout):
            await infra.execute_protected("k", anyio.sleep_forever, timeout=0.005)
        assert "DeadlineTimer" in repr(infra)


async def test_testing_advance_fires_fake_clock_timeouts() -> None:
    """seawall.testing.advance moves a FakeClock and lets the expired call finish before returning."""
    from seawall.testing import advance

    clock = FakeClock()
    outcome: list[str] = []
    async with AsyncInfrastructure(clock=clock) as infra:

        async def call() -> None:
            try:
                await infra.execute_protected("k", anyio.sleep_forever, timeout=3)
            except ProtectionTimeout:
                outcome.append("timeout")

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await advance(clock, 2.5)
            assert outcome == []
            await advance(clock, 0.5)
            assert outcome == ["timeout"]


# -- fast and slow paths behave alike ----------------------------------------------------


class ResettingFactory(Factory):
    """A factory with a reset hook: the pool's return path awaits (checkin_nowait would block)."""

    async def reset(self, conn: object) -> None:
        pass


@pytest.mark.parametrize("factory_class", [Factory, ResettingFactory])
@pytest.mark.parametrize("use_protect", [False, True])
async def test_failures_and_timeouts_return_the_connection(factory_class: type[Factory], use_protect: bool) -> None:
    """Errors and timeouts inside the block count as breaker failures and return the worker, on every path."""
    factory = factory_class()

    async def run(infra: AsyncInfrastructure, fn: Any, **options: Any) -> Any:
        if use_protect:
            async with infra.protect("db", **options):
                return await fn()
        return await infra.execute_protected("db", fn, **options)

    async def fails() -> None:
        raise ConnectionResetError

    async with AsyncInfrastructure() as infra:
        await infra.configure_protection(
            "db", {"circuit_breaker": {"failure_threshold": 3}, "connection_pool": {"size": 1, "factory": factory}}
        )
        assert await run(infra, ok) == "ok"
        with pytest.raises(ConnectionResetError):
            await run(infra, fails)
        with pytest.raises(ProtectionTimeout):
            await run(infra, anyio.sleep_forever, timeout=0.01)
        status = await infra.get_protection_status("db")
        assert status["connection_pool"]["in_use"] == 0
        assert status["circuit_breaker"]["failure_count"] == 2
        assert await run(infra, ok) == "ok"
        assert (await infra.get_protection_status("db"))["circuit_breaker"]["state"] == "closed"


@pytest.mark.parametrize("use_protect", [False, True])
async def test_returns_serve_waiters_first_and_close_the_overflow(use_protect: bool) -> None:
    """A worker given back goes to a waiting call first; with nobody waiting, a worker beyond the size is closed."""
    factory = Factory()
    entered: list[str] = []
    releases: dict[str, anyio.Event] = {}

    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("one", {"connection_pool": {"size": 1, "factory": factory}})
        await infra.configure_protection(
            "overflow", {"connection_pool": {"size": 1, "max_overflow": 1, "factory": factory}}
        )

        async def counts(key: str) -> tuple[int, int, int]:
            await anyio.wait_all_tasks_blocked()
            status = (await infra.get_protection_status(key))["connection_pool"]
            return status["in_use"], status["idle"], status["waiting"]

        async def hold(key: str, name: str) -> None:
            release = releases[name] = anyio.Event()

            async def body() -> None:
                entered.append(name)
                await release.wait()

            if use_protect:
                async with infra.protect(key, timeout=60):
                    await body()
            else:
                await infra.execute_protected(key, body, timeout=60)

        async with anyio.create_task_group() as tg:
            # One worker: "a" takes the idle one, "b" waits for it.
            for name in ("a", "b"):
                tg.start_soon(hold, "one", name)
                await anyio.wait_all_tasks_blocked()
            assert await counts("one") == (1, 0, 1)
            releases["a"].set()  # handed to "b", not put back idle
            assert await counts("one") == (1, 0, 0)
            assert entered == ["a", "b"]
            releases["b"].set()
            assert await counts("one") == (0, 1, 0)

            # "c" takes the idle worker, "d" gets an overflow one; the first given back is the surplus.
            for name in ("c", "d"):
                tg.start_soon(hold, "overflow", name)
                await anyio.wait_all_tasks_blocked()
            assert await counts("overflow") == (2, 0, 0)
            releases["c"].set()
            assert await counts("overflow") == (1, 0, 0)
            assert factory.closed == 1
            releases["d"].set()
            assert await counts("overflow") == (0, 1, 0)
        assert entered == ["a", "b", "c", "d"]
        assert (factory.made, factory.closed) == (3, 1)


@pytest.mark.parametrize("use_protect", [False, True])
async def test_listened_to_layers_report_every_call(use_protect: bool) -> None:
    """With listeners, the key's closed breaker reports how each call ended and its pool each checkout and return."""
    from seawall._telemetry import BREAKER_CALL_EXECUTED, POOL_CHECKIN, POOL_CHECKOUT

    async def fails() -> None:
        raise ConnectionResetError

    async def run(infra: AsyncInfrastructure, fn: Any) -> Any:
        if use_protect:
            async with infra.protect("k"):
                return await fn()
        return await infra.execute_protected("k", fn)

    async with AsyncInfrastructure() as infra:
        await infra.configure_protection(
            "k", {"circuit_breaker": {"failure_threshold": 5}, "connection_pool": {"size": 1}}
        )
        await run(infra, ok)  # unobserved: nothing to report
        listened = [BREAKER_CALL_EXECUTED.event, POOL_CHECKOUT.event, POOL_CHECKIN.event]
        with capture_events(listened) as events:
            assert await run(infra, ok) == "ok"
            with pytest.raises(ConnectionResetError):
                await run(infra, fails)
        assert [(e.name, e.metadata.get("outcome", e.metadata.get("raised"))) for e in events] == [
            ("checkout", None),
            ("checkin", False),
            ("call_executed", "success"),
            ("checkout", None),
            ("checkin", True),
            ("call_executed", "failure"),
        ]


@pytest.mark.parametrize("use_protect", [False, True])
async def test_half_open_trial_goes_through_the_breaker(use_protect: bool) -> None:
    """A half-open breaker admits one trial through its slow path; the trial's success closes it."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("k", {"circuit_breaker": {"failure_threshold": 1, "recovery_time": 5}})
        await infra.circuit_breaker.get("k").trip()
        clock.advance(5)
        if use_protect:
            async with infra.protect("k"):
                pass
        else:
            assert await infra.execute_protected("k", ok) == "ok"
        assert (await infra.circuit_breaker.get_status("k")).state.value == "closed"


@pytest.mark.parametrize("use_protect", [False, True])
async def test_waiting_acquirers_go_first(use_protect: bool) -> None:
    """With a task waiting in the key's limiter, a protected call is denied rather than jumping the queue."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("k", {"rate_limiter": {"limit": 1, "window": 60}})
        await infra.execute_protected("k", ok)
        limiter = infra.rate_limiter.for_operation("k")
        assert limiter is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(limiter.acquire, "k:global")
            await anyio.wait_all_tasks_blocked()
            clock.advance(59)

            async def call() -> None:
                if use_protect:
                    async with infra.protect("k"):
                        pytest.fail("must not run")  # pragma: no cover
                else:
                    await infra.execute_protected("k", ok)

            with pytest.raises(RateLimitExceeded):
                await call()
            clock.advance(1)


@pytest.mark.parametrize("use_protect", [False, True])
async def test_worker_orphaned_by_a_closing_pool(use_protect: bool) -> None:
    """A worker a stopped pool gave up on after its grace period is not handed back to it."""
    clock = FakeClock()
    factory = Factory()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.connection_manager.start_pool("shared", factory, size=1)
        release = anyio.Event()

        async def hold() -> None:
            if use_protect:
                async with infra.protect("k", connection_pool="shared", timeout=1000):
                    await release.wait()
            else:
                await infra.execute_protected("k", release.wait, connection_pool="shared", timeout=1000)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(infra.connection_manager.stop_pool, "shared")
            await anyio.wait_all_tasks_blocked()
            clock.advance(10)  # the pool's close grace
            await anyio.wait_all_tasks_blocked()
            release.set()
        assert factory.closed == factory.made == 1


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_many_concurrent_deadlines_fire_exactly_when_due(seed: int) -> None:
    """Calls with mixed timeouts and durations time out exactly when their duration reaches their timeout."""
    import random

    rng = random.Random(seed)
    clock = FakeClock()
    calls = [(rng.choice([1.0, 2.0, 3.5, 0.5]), rng.choice([0.25, 0.75, 1.5, 2.5, 4.0])) for _ in range(40)]
    outcomes: dict[int, str] = {}
    async with AsyncInfrastructure(clock=clock) as infra:

        async def call(index: int, limit: float, duration: float) -> None:
            try:
                await infra.execute_protected("k", lambda: clock.sleep(duration), timeout=limit)
                outcomes[index] = "done"
            except ProtectionTimeout:
                outcomes[index] = "timeout"

        async with anyio.create_task_group() as tg:
            for index, (timeout, duration) in enumerate(calls):
                tg.start_soon(call, index, timeout, duration)
            for _ in range(20):  # 0.25 s steps: every timeout and duration is a multiple
                await anyio.wait_all_tasks_blocked()
                clock.advance(0.25)
        expected = {i: "timeout" if duration >= timeout else "done" for i, (timeout, duration) in enumerate(calls)}
        # A duration equal to the timeout races the timer; both outcomes are right then.
        for index, (timeout, duration) in enumerate(calls):
            if duration != timeout:
                assert outcomes[index] == expected[index], (timeout, duration)
        assert infra.statistics().timer.pending == 0


async def test_swap_waits_for_holders_and_waiters_of_execute_protected() -> None:
    """A swapped pool serves its holder and its queued waiter to the end, then closes."""
    old_factory, new_factory = Factory(), Factory()
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("db", {"connection_pool": {"size": 1, "factory": old_factory}})
        old_pool = infra.connection_manager.get("db")
        release = anyio.Event()
        finished: list[str] = []

        async def holder() -> None:
            await infra.execute_protected("db", release.wait)  # the fast path: holds the only worker
            finished.append("holder")

        async def waiter() -> None:
            await infra.execute_protected("db", ok)  # queues in the old pool's checkout
            finished.append("waiter")

        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            await infra.configure_protection("db", {"connection_pool": {"size": 1, "factory": new_factory}})
            await anyio.wait_all_tasks_blocked()
            assert not old_pool.closed
            release.set()
        await anyio.wait_all_tasks_blocked()
        assert sorted(finished) == ["holder", "waiter"]
        assert old_pool.closed
        assert old_factory.closed == old_factory.made == 1


async def test_calls_outliving_the_infrastructure_still_time_out() -> None:
    """A call still running when its infrastructure exits keeps its deadline."""
    outcome: list[str] = []
    async with anyio.create_task_group() as tg:
        async with AsyncInfrastructure() as infra:

            async def call() -> None:
                try:
                    await infra.execute_protected("k", anyio.sleep_forever, timeout=0.05)
                except ProtectionTimeout:
                    outcome.append("timeout")

            tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
        assert infra.statistics().timer.pending == 0  # handed over, not forgotten
    assert outcome == ["timeout"]


# -- layers that cannot decide without awaiting -----------------------------------------


class SharedBackend:
    """A rate-limit and breaker store known only by its async protocols (as Redis is), kept in memory."""

    def __init__(self) -> None:
        self.limits = MemoryRateLimitBackend()
        self.breakers = MemoryBreakerBackend()
        self.calls: list[str] = []

    async def take(self, key: str, cost: float, rule: Any) -> Any:
        self.calls.append("take")
        return await self.limits.take(key, cost, rule)

    async def peek(self, key: str, rule: Any) -> Any:
        return await self.limits.peek(key, rule)

    async def reset(self, key: str, rule: Any) -> None:
        await self.limits.reset(key, rule)

    async def breaker_admit(self, name: str, policy: Any, now: float) -> Any:
        self.calls.append("admit")
        return await self.breakers.breaker_admit(name, policy, now)

    async def breaker_settle(self, name: str, policy: Any, now: float, ticket: Any, outcome: Any) -> Any:
        self.calls.append(f"settle:{outcome}")
        return await self.breakers.breaker_settle(name, policy, now, ticket, outcome)

    async def breaker_force(self, name: str, policy: Any, now: float, state: Any) -> Any:
        return await self.breakers.breaker_force(name, policy, now, state)

    async def breaker_snapshot(self, name: str, policy: Any, now: float) -> Any:
        return await self.breakers.breaker_snapshot(name, policy, now)


@pytest.mark.parametrize("use_protect", [False, True])
async def test_a_shared_backend_is_awaited_on_every_layer(use_protect: bool) -> None:
    """With a shared store the limiter and breaker are awaited: admissions, failures and timeouts all reach it."""
    backend = SharedBackend()

    async def run(infra: AsyncInfrastructure, fn: Any, **options: Any) -> Any:
        if use_protect:
            async with infra.protect("api", **options):
                return await fn()
        return await infra.execute_protected("api", fn, **options)

    async def fails() -> None:
        raise ConnectionResetError

    async with AsyncInfrastructure(backend=backend) as infra:
        await infra.configure_protection(
            "api",
            {
                "rate_limiter": {"limit": 3, "window": 60},
                "circuit_breaker": {"failure_threshold": 5},
                "connection_pool": {"size": 1},
            },
        )
        assert await run(infra, ok) == "ok"
        with pytest.raises(ConnectionResetError):
            await run(infra, fails)
        with pytest.raises(ProtectionTimeout):
            await run(infra, anyio.sleep_forever, timeout=0.01)
        with pytest.raises(RateLimitExceeded):
            await run(infra, ok)
        assert backend.calls == [
            "take",
            "admit",
            "settle:success",
            "take",
            "admit",
            "settle:failure",
            "take",
            "admit",
            "settle:failure",
            "take",
        ]
        assert (await infra.get_protection_status("api"))["connection_pool"]["in_use"] == 0


@pytest.mark.parametrize("use_protect", [False, True])
async def test_a_call_queued_for_the_worker_then_failing_returns_it(use_protect: bool) -> None:
    """A call that waits for the only worker (no idle one to take at once) and then fails gives the worker back."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("db", {"connection_pool": {"size": 1, "factory": Factory()}})
        release = anyio.Event()

        async def fails() -> None:
            raise ConnectionResetError

        async def call() -> None:
            if use_protect:
                async with infra.protect("db"):
                    await fails()
            else:
                await infra.execute_protected("db", fails)

        async def queued() -> None:
            with pytest.raises(ConnectionResetError):
                await call()

        async with anyio.create_task_group() as tg:
            tg.start_soon(infra.execute_protected, "db", release.wait)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(queued)
            await anyio.wait_all_tasks_blocked()
            assert (await infra.get_protection_status("db"))["connection_pool"]["waiting"] == 1
            release.set()
        status = (await infra.get_protection_status("db"))["connection_pool"]
        assert (status["idle"], status["in_use"], status["waiting"]) == (1, 0, 0)


@pytest.mark.parametrize("use_protect", [False, True])
async def test_a_closed_pool_is_reported_as_triggered(use_protect: bool) -> None:
    """A key whose pool was closed under it raises PoolClosed, reported as the pool layer's protection."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("db", {"connection_pool": {"size": 1}})
        await infra.connection_manager.get("db").close()

        async def call() -> None:
            if use_protect:
                async with infra.protect("db"):
                    pytest.fail("must not run")  # pragma: no cover
            else:
                await infra.execute_protected("db", ok)

        # Only this event: listening to execute_* would take the observed path.
        with (
            capture_events([("seawall", "infrastructure", "protection_triggered")]) as events,
            pytest.raises(PoolClosed),
        ):
            await call()
        assert [event.metadata["layer"] for event in events] == ["connection_pool"]


@pytest.mark.parametrize("use_protect", [False, True])
async def test_a_call_timing_out_in_the_pool_queue_is_reported(use_protect: bool) -> None:
    """A call that waits for a worker longer than the pool's timeout raises PoolTimeout, reported as the pool's."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("db", {"connection_pool": {"size": 1, "timeout": 1}, "timeout": 60})
        release = anyio.Event()
        errors: list[BaseException] = []

        async def call() -> None:
            if use_protect:
                async with infra.protect("db"):
                    pytest.fail("must not run")  # pragma: no cover
            else:
                await infra.execute_protected("db", ok)

        async def queued() -> None:
            try:
                await call()
            except PoolTimeout as exc:
                errors.append(exc)

        with capture_events([("seawall", "infrastructure", "protection_triggered")]) as events:
            async with anyio.create_task_group() as tg:
                tg.start_soon(infra.execute_protected, "db", release.wait)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(queued)
                await anyio.wait_all_tasks_blocked()
                clock.advance(1)
                await anyio.wait_all_tasks_blocked()
                release.set()
        assert len(errors) == 1
        assert [event.metadata["layer"] for event in events] == ["connection_pool"]
        assert (await infra.get_protection_status("db"))["connection_pool"]["in_use"] == 0


# -- cancellation versus the call's own deadline --------------------------------


@pytest.mark.parametrize("use_protect", [False, True])
@pytest.mark.parametrize(
    "outer",
    [
        "anyio_scope",
        pytest.param("task_cancel", marks=pytest.mark.asyncio_only("a native asyncio Task.cancel() from outside")),
    ],
)
async def test_a_cancellation_in_the_deadlines_own_iteration_stays_a_cancellation(
    use_protect: bool, outer: str
) -> None:
    """An outside cancel landing in the same loop iteration as the deadline propagates as cancellation.

    It is never turned into ProtectionTimeout (which used to leave the task
    running) and is no breaker failure; 300 times on each path.
    """
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("k", {"circuit_breaker": {"failure_threshold": 1}, "timeout": 1.0})
        outcomes: list[str] = []

        async def call(scope: anyio.CancelScope) -> None:
            with scope:
                try:
                    if use_protect:
                        async with infra.protect("k"):
                            await anyio.sleep_forever()
                    else:
                        await infra.execute_protected("k", anyio.sleep_forever)
                except ProtectionTimeout:
                    outcomes.append("timeout")
                    return
            outcomes.append("cancelled" if scope.cancelled_caught else "ran on")

        for _ in range(300):
            scope = anyio.CancelScope()
            task: asyncio.Task[None] | None = None
            if outer == "task_cancel":
                task = asyncio.get_running_loop().create_task(call(scope))
            else:
                task_group = anyio.create_task_group()
                await task_group.__aenter__()
                task_group.start_soon(call, scope)
            with anyio.fail_after(5):  # (wait_all_tasks_blocked() would poll every 0.1 s here)
                while infra.statistics().timer.pending == 0:
                    await anyio.lowlevel.checkpoint()
            await anyio.lowlevel.checkpoint()  # the call reaches its sleep
            clock.advance(1.0)  # the timer cancels the call's scope in the next iteration...
            if task is not None:
                task.cancel()  # ...and so does its caller
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                assert task.cancelled() or outcomes[-1] == "cancelled"
                if task.cancelled():
                    outcomes.append("cancelled")
            else:
                scope.cancel()
                await task_group.__aexit__(None, None, None)
        assert set(outcomes) == {"cancelled"}
        status = await infra.circuit_breaker.get_status("k")
        assert (status.state, status.failure_count) == (BreakerState.CLOSED, 0)
        assert infra.statistics().timer.pending == 0


async def test_a_call_that_overruns_its_deadline_returns_and_counts_as_a_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A call whose code could not be cancelled returns its result, counts as a timeout failure, and is logged."""
    clock = FakeClock()
    # Overruns are logged once a second per key, process-wide: a key of its own (the other backend's run was just now).
    key = f"overrun-{uuid.uuid4().hex}"

    async def blocks_the_loop() -> str:
        clock.advance(2.0)  # as if synchronous code ran past the deadline without a checkpoint
        return "done"

    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection(key, {"circuit_breaker": {"failure_threshold": 2}, "timeout": 1.0})
        with capture_events() as events, caplog.at_level(logging.WARNING, logger="seawall"):
            assert await infra.execute_protected(key, blocks_the_loop) == "done"
            async with infra.protect(key):
                clock.advance(2.0)
        triggered = [e.metadata["layer"] for e in events if e.name == "protection_triggered"]
        assert triggered == ["timeout", "timeout"]
        assert (await infra.circuit_breaker.get_status(key)).state is BreakerState.OPEN
    overruns = [record.getMessage() for record in caplog.records if "protection_overran" in record.getMessage()]
    assert len(overruns) == 1  # a burst of them is logged once a second per key (telemetry saw both)
    assert f"key='{key}'" in overruns[0]


async def test_a_function_guarded_by_the_keys_breaker_is_counted_once() -> None:
    """execute_protected(key, fn) with fn decorated by key's own breaker counts each failure once, timeouts too."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("db", {"circuit_breaker": {"failure_threshold": 3}, "timeout": 1.0})
        breaker = infra.circuit_breaker.get("db")
        assert isinstance(breaker, CircuitBreaker)

        @breaker
        async def query() -> str:
            raise ConnectionError("db down")

        @breaker
        async def hangs() -> None:
            await anyio.sleep_forever()

        for _ in range(2):
            with pytest.raises(ConnectionError):
                await infra.execute_protected("db", query)
        assert (await breaker.status()).failure_count == 2
        async with anyio.create_task_group() as tg:

            async def times_out() -> None:
                with pytest.raises(ProtectionTimeout):
                    await infra.execute_protected("db", hangs)

            tg.start_soon(times_out)
            await advance(clock, 1.0)
        status = await breaker.status()
        assert (status.failure_count, status.state) == (3, BreakerState.OPEN)


@pytest.mark.parametrize("algorithm", ["gcra", "fixed_window"])
async def test_reconfiguring_a_rule_keeps_each_buckets_level_scaled(algorithm: str) -> None:
    """A key whose limit changes keeps its buckets' levels as a share of the limit; other keys are untouched."""
    clock = FakeClock(100.0)
    async with AsyncInfrastructure(clock=clock) as infra:
        rule = {"limit": 4, "window": 60, "algorithm": algorithm}
        await infra.configure_protection("api", {"rate_limiter": rule})
        await infra.configure_protection("other", {"rate_limiter": rule})
        for _ in range(4):
            await infra.execute_protected("api", ok, rate_limiter="alice")  # alice: full
        for _ in range(2):
            await infra.execute_protected("api", ok, rate_limiter="bob")  # bob: half full
        await infra.execute_protected("other", ok, rate_limiter="alice")
        await infra.configure_protection("api", {"rate_limiter": {**rule, "limit": 10}})
        with pytest.raises(RateLimitExceeded):
            await infra.execute_protected("api", ok, rate_limiter="alice")  # still full, under the new rule
        for _ in range(5):
            await infra.execute_protected("api", ok, rate_limiter="bob")  # half of 10 left
        with pytest.raises(RateLimitExceeded):
            await infra.execute_protected("api", ok, rate_limiter="bob")
        assert (await infra.rate_limiter.get_status("alice", "other")).current_count == 1
