"""``run_direct`` (the hot path's one copy) against ``ProtectedCall`` (the original), case by case.

``execute_protected`` runs a key whose layers all decide at once through
``_protected_call.run_direct`` while no telemetry handler is attached. It
must behave exactly as ``async with ProtectedCall(plan): return await fn()``:
each case below runs once through each form, on its own infrastructure and
fake clock, and the outcomes and every layer's state afterwards must agree,
and match what the case expects.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from seawall import AsyncInfrastructure
from seawall._protected_call import ProtectedCall, run_direct
from seawall.testing import FakeClock, advance

pytestmark = pytest.mark.anyio

Runner = Callable[[AsyncInfrastructure, str, Callable[[], Awaitable[Any]]], Awaitable[Any]]


async def through_object(infra: AsyncInfrastructure, key: str, fn: Callable[[], Awaitable[Any]]) -> Any:
    plan = infra.protect(key)._plan  # (the plan a call of the key runs on)
    async with ProtectedCall(plan):
        return await fn()


async def through_direct(infra: AsyncInfrastructure, key: str, fn: Callable[[], Awaitable[Any]]) -> Any:
    plan = infra.protect(key)._plan
    assert plan.direct, "the case must be one run_direct can take"
    return await run_direct(plan, fn)


RUNNERS = [pytest.param(through_object, id="ProtectedCall"), pytest.param(through_direct, id="run_direct")]


class Business(Exception):
    """An error the breaker excludes."""


class Boom(Exception):
    """An error the breaker counts."""


class Resets:
    """A pool factory with a ``reset``, so every return awaits (checkin_nowait refuses)."""

    def __init__(self) -> None:
        self.resets = 0
        self.made = 0

    async def create(self) -> int:
        self.made += 1
        return self.made

    async def close(self, worker: int) -> None:
        pass

    async def reset(self, worker: int) -> None:
        await anyio.lowlevel.checkpoint()
        self.resets += 1


@dataclass
class Seen:
    """What a case saw: its calls' outcomes and the layers' state afterwards."""

    outcomes: list[str]
    breaker: tuple[str, int] | None
    pool: tuple[int, int, int] | None
    remaining: int | None
    timer_pending: int


def _outcome(result: Any = None, exc: BaseException | None = None) -> str:
    return f"ok:{result!r}" if exc is None else f"{type(exc).__name__}"


async def _snapshot(infra: AsyncInfrastructure, key: str, outcomes: list[str]) -> Seen:
    stats = next(k for k in infra.statistics().keys if k.key == key)
    breaker = None
    if stats.breaker_state is not None:
        status = await infra.circuit_breaker.get(key).status()
        breaker = (status.state.value, status.failure_count)
    pool = None if stats.pool is None else (stats.pool.idle, stats.pool.in_use, stats.pool.waiting)
    limiter = infra.rate_limiter.for_operation(key)
    remaining = None if limiter is None else (await limiter.status(f"{key}:global")).remaining
    return Seen(outcomes, breaker, pool, remaining, infra.statistics().timer.pending)


async def _call(run: Runner, infra: AsyncInfrastructure, key: str, fn: Callable[[], Awaitable[Any]]) -> str:
    try:
        result = await run(infra, key, fn)
    except Exception as exc:
        return _outcome(exc=exc)
    return _outcome(result)


async def value() -> int:
    return 7


async def boom() -> None:
    raise Boom


async def business() -> None:
    raise Business


CONFIG: dict[str, Any] = {
    "rate_limiter": {"limit": 3, "window": 60},
    "circuit_breaker": {"failure_threshold": 2, "recovery_time": 10, "exclude": [Business]},
    "connection_pool": {"size": 1, "timeout": 1.0},
    "timeout": 5.0,
}


async def _sequential(run: Runner, calls: list[Callable[[], Awaitable[Any]]], config: dict[str, Any] = CONFIG) -> Seen:
    async with AsyncInfrastructure(clock=FakeClock()) as infra:
        await infra.configure_protection("k", config)
        outcomes = [await _call(run, infra, "k", fn) for fn in calls]
        return await _snapshot(infra, "k", outcomes)


CASES: dict[str, tuple[list[Callable[[], Awaitable[Any]]], list[str]]] = {
    "success": ([value, value], ["ok:7", "ok:7"]),
    "fn raises, counted": ([boom, value], ["Boom", "ok:7"]),
    "excluded error": ([business, business, business], ["Business"] * 3),
    "limiter denies": ([value] * 4, ["ok:7"] * 3 + ["RateLimitExceeded"]),
    "breaker opens": ([boom, boom, value], ["Boom", "Boom", "CircuitOpenError"]),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_sequential_cases_agree(case: str) -> None:
    """Successes, failures, exclusions, a denial and an open breaker: the same outcomes and state either way."""
    calls, expected = CASES[case]
    direct = await _sequential(through_direct, calls)
    general = await _sequential(through_object, calls)
    assert direct == general
    assert direct.outcomes == expected
    assert direct.pool == (1, 0, 0)  # the worker is back whatever happened
    assert direct.timer_pending == 0  # no scope left filed with the timer


@pytest.mark.parametrize("run", RUNNERS)
async def test_half_open_trial_closes_the_breaker(run: Runner) -> None:
    """A trial's success (a permit that is not the shared closed one) closes the breaker."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("k", CONFIG)
        assert [await _call(run, infra, "k", boom) for _ in range(2)] == ["Boom", "Boom"]
        clock.advance(10)
        assert await _call(run, infra, "k", value) == "ok:7"
        seen = await _snapshot(infra, "k", [])
        assert seen.breaker == ("closed", 0)


@pytest.mark.parametrize("run", RUNNERS)
async def test_deadline_fires_counts_once_and_frees_everything(run: Runner) -> None:
    """The call's own deadline: ProtectionTimeout, one breaker failure, the worker back, the scope unfiled."""
    clock = FakeClock()
    outcomes: list[str] = []
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("k", CONFIG)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _append(outcomes, run, infra, "k", anyio.sleep_forever))
            await advance(clock, 5.0)
        seen = await _snapshot(infra, "k", outcomes)
    assert seen.outcomes == ["ProtectionTimeout"]
    assert seen.breaker == ("closed", 1)
    assert seen.pool == (1, 0, 0)
    assert seen.timer_pending == 0


async def _append(outcomes: list[str], run: Runner, infra: AsyncInfrastructure, key: str, fn: Any) -> None:
    outcomes.append(await _call(run, infra, key, fn))


@pytest.mark.parametrize("run", RUNNERS)
async def test_outside_cancellation_propagates_and_is_no_failure(run: Runner) -> None:
    """Cancelled by its caller: cancellation propagates, the breaker hears nothing, the worker is back."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("k", CONFIG)
        reached = False
        with anyio.CancelScope() as outer:

            async def hang() -> None:
                nonlocal reached
                reached = True
                outer.cancel()
                await anyio.sleep_forever()

            await run(infra, "k", hang)
        assert reached
        assert outer.cancelled_caught
        seen = await _snapshot(infra, "k", [])
    assert seen.breaker == ("closed", 0)
    assert seen.pool == (1, 0, 0)
    assert seen.timer_pending == 0


@pytest.mark.parametrize("run", RUNNERS)
async def test_an_overrun_returns_its_result_and_counts_a_timeout(run: Runner) -> None:
    """A block that could not be cancelled and finished late: its result stands, the breaker counts a timeout."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("k", CONFIG)

        async def blocks_the_loop() -> int:
            clock.advance(6.0)  # time passes with no await: nothing could cancel it
            return 3

        assert await run(infra, "k", blocks_the_loop) == 3
        seen = await _snapshot(infra, "k", [])
    assert seen.breaker == ("closed", 1)
    assert seen.pool == (1, 0, 0)


@pytest.mark.parametrize("run", RUNNERS)
async def test_a_checkout_that_must_wait_then_times_out_or_gets_the_worker(run: Runner) -> None:
    """With the one worker held: a second call waits for it; a third times out after the pool's timeout."""
    clock = FakeClock()
    outcomes: list[str] = []
    release = anyio.Event()

    async def hold() -> str:
        await release.wait()
        return "held"

    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("k", CONFIG)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _append(outcomes, run, infra, "k", hold))
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(lambda: _append(outcomes, run, infra, "k", value))
            await advance(clock, 1.0)  # the waiter's pool timeout passes
            assert outcomes == ["PoolTimeout"]
            tg.start_soon(lambda: _append(outcomes, run, infra, "k", value))
            await anyio.wait_all_tasks_blocked()
            release.set()
        seen = await _snapshot(infra, "k", outcomes)
    assert seen.outcomes == ["PoolTimeout", "ok:'held'", "ok:7"]
    assert seen.pool == (1, 0, 0)
    assert seen.breaker == ("closed", 1)  # the breaker wraps the checkout: its timeout counts once


@pytest.mark.parametrize("run", RUNNERS)
async def test_a_return_that_awaits_the_reset(run: Runner) -> None:
    """A factory with ``reset``: the return awaits it (the direct form hands over), the worker is reused."""
    factory = Resets()
    config = {**CONFIG, "connection_pool": {"size": 1, "factory": factory}}
    async with AsyncInfrastructure(clock=FakeClock()) as infra:
        await infra.configure_protection("k", config)

        async def conn_used() -> str:
            return "used"

        assert [await _call(run, infra, "k", conn_used) for _ in range(2)] == ["ok:'used'", "ok:'used'"]
        seen = await _snapshot(infra, "k", [])
    assert factory.resets == 2
    assert factory.made == 1
    assert seen.pool == (1, 0, 0)


async def test_a_plan_with_a_concurrency_layer_is_not_direct() -> None:
    """run_direct has no concurrency stage: a key with one takes ProtectedCall, which holds and frees the slot."""
    async with AsyncInfrastructure(clock=FakeClock()) as infra:
        await infra.configure_protection(
            "k",
            {"circuit_breaker": {}, "concurrency": {"algorithm": "fixed", "limit": 1}, "connection_pool": {"size": 1}},
        )
        plan = infra.protect("k")._plan
        assert not plan.direct
        assert await infra.execute_protected("k", _ok) == "ok"
        assert (await infra.get_protection_status("k"))["concurrency"]["in_flight"] == 0


async def _ok() -> str:
    return "ok"
