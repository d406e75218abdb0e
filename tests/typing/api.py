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
