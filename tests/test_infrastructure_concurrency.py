"""The coordinator's ``"concurrency"`` layer: between breaker and pool, priorities, refusals, no leaks."""

from __future__ import annotations

import functools
from typing import Any

import anyio
import pytest

from seawall import (
    AsyncInfrastructure,
    BreakerState,
    CircuitOpenError,
    ConcurrencyLimitExceeded,
    ConfigurationError,
    ProtectionTimeout,
)
from seawall.testing import FakeClock, advance, capture_events

pytestmark = pytest.mark.anyio


async def ok() -> str:
    return "ok"


class Boom(Exception):
    """A failure of the dependency."""


async def limiter_status(infra: AsyncInfrastructure, key: str) -> dict[str, Any]:
    status: dict[str, Any] = (await infra.get_protection_status(key))["concurrency"]
    return status


async def test_a_full_limiter_refuses_and_the_breaker_does_not_count_it() -> None:
    """A call beyond the limit raises ConcurrencyLimitExceeded, reported as layer concurrency; no breaker failure."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection(
            "api",
            {
                "circuit_breaker": {"failure_threshold": 1},
                "concurrency": {"algorithm": "fixed", "limit": 1},
                "timeout": 60,
            },
        )
        release = anyio.Event()
        with capture_events() as events:
            async with anyio.create_task_group() as tg:
                tg.start_soon(infra.execute_protected, "api", release.wait)
                await anyio.wait_all_tasks_blocked()
                with pytest.raises(ConcurrencyLimitExceeded) as caught:
                    await infra.execute_protected("api", ok)
                release.set()
        assert caught.value.limit == 1
        layers = [e.metadata["layer"] for e in events if e.name == "protection_triggered"]
        assert layers == ["concurrency"]
        (rejected,) = [e for e in events if e.event == ("seawall", "concurrency_limiter", "call_rejected")]
        assert (rejected.metadata["name"], rejected.metadata["reason"]) == ("api", "limit")  # named after the key
        status = await infra.get_protection_status("api")
        assert status["circuit_breaker"]["state"] == "closed"
        assert status["concurrency"]["in_flight"] == 0
        assert status["concurrency"]["rejected"] == [1]
        key = infra.statistics().key("api")
        assert "concurrency" in key.layers
        assert key.concurrency is not None
        assert (key.concurrency.limit, key.concurrency.rejected) == (1, (1,))


async def test_an_open_breaker_never_reaches_the_limiter() -> None:
    """The breaker comes first: its rejection takes no concurrency slot."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection(
            "api", {"circuit_breaker": {"failure_threshold": 1}, "concurrency": {"algorithm": "fixed", "limit": 1}}
        )

        async def fails() -> None:
            raise Boom

        with pytest.raises(Boom):
            await infra.execute_protected("api", fails)
        with pytest.raises(CircuitOpenError):
            await infra.execute_protected("api", ok)
        stats = (await infra.get_protection_status("api"))["concurrency"]
        assert (stats["admitted"], stats["in_flight"], stats["rejected"]) == (1, 0, [0])


async def test_a_waiting_call_gets_the_slot_and_priority_orders_the_queue() -> None:
    """With a queue, the more important waiter of protect(priority=) is served first."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection(
            "api",
            {
                "concurrency": {"algorithm": "fixed", "limit": 1, "priorities": 2, "max_waiting": 5, "timeout": 30},
                "timeout": 60,
            },
        )
        order: list[int] = []
        first = anyio.Event()

        async def call(priority: int) -> None:
            async with infra.protect("api", priority=priority):
                order.append(priority)

        async with anyio.create_task_group() as tg:
            tg.start_soon(infra.execute_protected, "api", first.wait)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(call, 1)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(call, 0)
            await anyio.wait_all_tasks_blocked()
            first.set()
        assert order == [0, 1]
        assert (await limiter_status(infra, "api"))["in_flight"] == 0


async def test_a_waiter_cancelled_or_timed_out_takes_nothing() -> None:
    """A call cancelled while it waits for a slot, or whose deadline fires there, leaves nothing taken."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection(
            "api",
            {"concurrency": {"algorithm": "fixed", "limit": 1, "max_waiting": 5, "timeout": None}, "timeout": 5},
        )
        hold = anyio.Event()
        outcomes: list[str] = []

        async def waiter() -> None:
            try:
                await infra.execute_protected("api", ok)
            except ProtectionTimeout:
                outcomes.append("timeout")

        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(infra.execute_protected, "api", hold.wait, timeout=60))
            await anyio.wait_all_tasks_blocked()
            with anyio.CancelScope() as scope:
                scope.cancel()
                await infra.execute_protected("api", ok)  # cancelled while it waits
            tg.start_soon(waiter)
            await advance(clock, 5.0)  # its deadline fires in the queue
            assert outcomes == ["timeout"]
            assert sum((await limiter_status(infra, "api"))["waiting"]) == 0
            hold.set()
        assert (await limiter_status(infra, "api"))["in_flight"] == 0


async def test_the_slot_comes_back_after_an_error_and_a_timeout() -> None:
    """A raising fn, or the call's deadline firing, gives the slot back (a timeout as a drop)."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection(
            "api", {"concurrency": {"algorithm": "aimd", "initial_limit": 2}, "timeout": 1}
        )

        async def fails() -> None:
            raise Boom

        with pytest.raises(Boom):
            await infra.execute_protected("api", fails)
        async with anyio.create_task_group() as tg:

            async def slow() -> None:
                with pytest.raises(ProtectionTimeout):
                    await infra.execute_protected("api", anyio.sleep_forever)

            tg.start_soon(slow)
            await advance(clock, 1.0)
        assert (await limiter_status(infra, "api"))["in_flight"] == 0
        assert await infra.execute_protected("api", ok) == "ok"


async def test_priority_is_checked() -> None:
    """A priority the key's limiter does not have, or of the wrong type, raises ConfigurationError."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("api", {"concurrency": {"algorithm": "fixed", "limit": 1}})
        with pytest.raises(ConfigurationError) as caught:
            await infra.execute_protected("api", ok, priority=3)
        assert caught.value.path == "priority"
        with pytest.raises(ConfigurationError):
            await infra.execute_protected("other", ok, priority="high")  # type: ignore[arg-type]
        assert (await limiter_status(infra, "api"))["in_flight"] == 0


async def test_reconfiguring_with_the_same_options_keeps_the_limiter() -> None:
    """Unchanged concurrency options keep the limiter (its adapted limit); changed ones make a new one."""
    async with AsyncInfrastructure() as infra:
        config = {"concurrency": {"algorithm": "vegas", "initial_limit": 7}}
        await infra.configure_protection("api", config)
        await infra.execute_protected("api", ok)
        await infra.configure_protection("api", config)
        assert (await limiter_status(infra, "api"))["admitted"] == 1  # the same limiter
        await infra.configure_protection("api", {"concurrency": {"algorithm": "vegas", "initial_limit": 8}})
        assert (await limiter_status(infra, "api"))["admitted"] == 0


async def test_bad_concurrency_options_name_the_path() -> None:
    """An invalid concurrency option raises ConfigurationError with the key's full path."""
    async with AsyncInfrastructure() as infra:
        with pytest.raises(ConfigurationError) as caught:
            await infra.configure_protection("api", {"concurrency": {"algorithm": "fixed"}})
        assert caught.value.path == "api.concurrency.limit"
        with pytest.raises(ConfigurationError) as caught:
            await infra.configure_protection("api", {"concurrency": {"priorites": 2}})
        assert caught.value.path == "api.concurrency.priorites"


async def test_a_coordinator_timeout_counts_as_slow_for_a_rate_breaker() -> None:
    """The coordinator's ProtectionTimeout is a slow call: a slow-call breaker opens on timeouts alone."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection(
            "api",
            {
                "circuit_breaker": {
                    "failure_threshold": None,
                    "slow_call_duration": 30.0,
                    "slow_call_rate": 0.5,
                    "minimum_calls": 2,
                },
                "timeout": 1,
            },
        )
        async with anyio.create_task_group() as tg:
            for _ in range(2):

                async def slow() -> None:
                    with pytest.raises(ProtectionTimeout):
                        await infra.execute_protected("api", anyio.sleep_forever)

                tg.start_soon(slow)
            await advance(clock, 1.0)
        assert infra.circuit_breaker.get("api").state is BreakerState.OPEN


async def test_a_call_cancelled_while_it_holds_a_slot_gives_it_back() -> None:
    """An outside cancellation during fn propagates, frees the slot and the worker, and is no breaker outcome."""
    async with AsyncInfrastructure(clock=FakeClock()) as infra:
        await infra.configure_protection(
            "api",
            {
                "circuit_breaker": {"failure_threshold": 1},
                "concurrency": {"algorithm": "gradient2", "initial_limit": 2},
                "connection_pool": {"size": 1},
                "timeout": 60,
            },
        )
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(infra.execute_protected, "api", anyio.sleep_forever)
                await anyio.wait_all_tasks_blocked()
                assert (await limiter_status(infra, "api"))["in_flight"] == 1
                scope.cancel()
        status = await infra.get_protection_status("api")
        assert status["concurrency"]["in_flight"] == 0
        assert status["connection_pool"]["in_use"] == 0
        assert status["circuit_breaker"]["state"] == "closed"
