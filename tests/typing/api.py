"""Typing checks of the public API: mypy checks this file, pytest never runs it."""

from __future__ import annotations

from typing import Any, assert_type

import seawall
from seawall import telemetry


def errors_are_typed() -> None:
    error = seawall.RateLimitExceeded(key="k", limit=1, window=1.0, retry_after=0.5)
    assert_type(error.retry_after, float | None)
    assert_type(error.error_type, str)
    assert_type(error.message, str)
    assert_type(seawall.CircuitOpenError(name="x").name, str | None)


def telemetry_is_typed() -> None:
    def handler(event: tuple[str, ...], measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        pass

    telemetry.attach("id", ("seawall", "rate_limiter", "request_allowed"), handler)
    assert_type(telemetry.detach("id"), bool)


def clock_is_typed() -> None:
    clock: seawall.Clock = seawall.FakeClock()
    assert_type(clock.now(), float)


async def limiter_is_typed() -> None:
    limiter = seawall.RateLimiter(10, 1.0)
    assert_type(await limiter.hit("user:1"), seawall.RateLimitStatus)
    assert_type((await limiter.status("user:1")).remaining, int)
    assert_type(limiter.limit, float)
    assert_type(limiter.window, float)
    async with limiter("user:1", wait=False):
        pass
    assert_type(limiter.hit_nowait("user:1", cost=2), seawall.RateLimitStatus)
    assert_type(limiter.acquire_nowait("user:1"), None)
    bucket = limiter.bucket("user:1", cost=2)
    assert_type(bucket.key, str)
    assert_type(bucket.acquire_nowait(), None)


async def breaker_is_typed() -> None:
    breaker = seawall.CircuitBreaker("db", failure_threshold=3)

    async def fetch(user_id: int, *, fresh: bool = False) -> str:
        return f"{user_id}:{fresh}"

    assert_type(await breaker.call(fetch, 1, fresh=True), str)
    guarded = breaker(fetch)
    assert_type(await guarded(2), str)
    assert_type(breaker.state, seawall.BreakerState)
    assert_type(await breaker.status(), seawall.BreakerStatus)
    permit = breaker.admit_nowait()
    assert_type(permit, seawall.BreakerPermit)
    assert_type(permit.trial, bool)
    assert_type(permit.plain, bool)
    breaker.settle_nowait(permit)
    breaker.settle_nowait(permit, ValueError("failed"))


async def pool_is_typed() -> None:
    class Factory:
        async def create(self) -> list[int]:
            return []

        async def close(self, conn: list[int]) -> None:
            conn.clear()

    async with seawall.ConnectionPool(Factory(), size=2) as pool, pool.checkout() as conn:
        assert_type(conn, list[int])
        lease = pool.checkout_nowait()
        assert_type(lease, seawall.PoolLease[list[int]])
        assert_type(lease.conn, list[int])
        pool.checkin_nowait(lease, raised=False)
        await pool.checkin(lease, raised=True)
    assert_type(pool.status(), seawall.PoolStatus)


async def infrastructure_is_typed() -> None:
    async with seawall.AsyncInfrastructure() as infra:

        async def work() -> int:
            return 1

        assert_type(await infra.execute_protected("api", work), int)
        assert_type(infra.list_protection_keys(), list[str])


async def retry_is_typed() -> None:
    retry = seawall.Retry(attempts=3, initial=0.1, retry_on=ConnectionError)

    async def fetch(n: int) -> str:
        return str(n)

    assert_type(await retry.call(fetch, 1), str)
    assert_type(await retry(fetch)(1), str)
    async for attempt in retry:
        with attempt:
            assert_type(attempt.number, int)
    budget = retry.budget
    if budget is not None:
        assert_type(budget.statistics().available, float)
    async with seawall.AsyncInfrastructure() as infra:

        async def fallback(exc: Exception) -> str:
            return "cached"

        assert_type(await infra.execute_protected("k", lambda: fetch(1), fallback=fallback), str)


async def concurrency_is_typed() -> None:
    limiter = seawall.ConcurrencyLimiter(algorithm="vegas", initial_limit=10, priorities=2, max_waiting=5, timeout=1.0)
    ticket = limiter.acquire_nowait(1)
    assert_type(ticket, float)
    limiter.release(ticket, dropped=False)
    assert_type(await limiter.acquire(0), float)
    limiter.release(None)
    async with limiter(priority=1):
        pass
    assert_type(limiter.limit, int)
    stats = limiter.statistics()
    assert_type(stats, seawall.ConcurrencyLimiterStatistics)
    assert_type(stats.waiting, tuple[int, ...])
    error = seawall.ConcurrencyLimitExceeded(limit=3, priority=1)
    assert_type(error.limit, int | None)
    breaker = seawall.CircuitBreaker("rated", failure_threshold=None, failure_rate=0.5, minimum_calls=20)
    status = await breaker.status()
    assert_type(status.failure_rate, float | None)
    assert_type(status.calls, int)
    async with seawall.AsyncInfrastructure() as infra:

        async def fetch() -> str:
            return "x"

        assert_type(await infra.execute_protected("k", fetch, priority=1), str)
        async with infra.protect("k", priority=0):
            pass
