"""RedisBackend with on_error="local": a share of each limit decided in the process while Redis is away.

Every test that meets an outage starts its own throwaway server
(``redis_servers.py``) and kills it by PID; the shared server only serves
the configuration and error-reply tests, under a prefix of their own.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI

from redis_servers import Server, running, until
from seawall import (
    AsyncInfrastructure,
    ConfigurationError,
    MultiRateLimiter,
    RateLimiter,
    RateLimiterError,
    RateLimitExceeded,
)
from seawall.backends import RateLimitRule, RedisBackend
from seawall.integrations.fastapi import health_route
from seawall.testing import capture_events

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.asyncio_only("redis-py's client runs on asyncio only")]

#: Windows long enough that nothing drains (GCRA) and no aligned window ends (fixed window) during a test.
WINDOWS = {"gcra": 60.0, "fixed_window": 1e6}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A throwaway Redis 7 primary, killed by the tests that need an outage."""
    with running(tmp_path) as started:
        yield started


async def _burst(limiter: RateLimiter | MultiRateLimiter, key: str, hits: int) -> tuple[int, list[float]]:
    """``hits`` hits one after another: how many were admitted, and the denials' ``retry_after``."""
    admitted, waits = 0, []
    for _ in range(hits):
        try:
            await limiter.hit(key)
        except RateLimitExceeded as denied:
            waits.append(-1.0 if denied.retry_after is None else denied.retry_after)
        else:
            admitted += 1
    return admitted, waits


async def _remaining(limiter: RateLimiter, key: str) -> int:
    return (await limiter.status(key)).remaining


@pytest.mark.parametrize("algorithm", ["gcra", "fixed_window"])
async def test_an_outage_admits_the_local_share_per_key(
    server: Server, caplog: pytest.LogCaptureFixture, algorithm: Literal["gcra", "fixed_window"]
) -> None:
    """Redis killed: a limit of 10 with local_share=0.3 admits 3 per key in this process, then denies with a wait."""
    window = WINDOWS[algorithm]
    async with RedisBackend.from_url(server.url, on_error="local", local_share=0.3, socket_timeout=0.5) as backend:
        assert (backend.on_error, backend.local_share) == ("local", 0.3)
        assert "local_share=0.3" in repr(backend)
        limiter = RateLimiter(10, window, algorithm=algorithm, backend=backend, name="api")
        assert (await _burst(limiter, "warm", 1))[0] == 1  # Redis answers
        server.kill()
        with capture_events() as events, caplog.at_level(logging.WARNING, logger="seawall"):
            first, first_waits = await _burst(limiter, "a", 10)
            second, second_waits = await _burst(limiter, "b", 10)
        assert (first, second) == (3, 3)  # each key its own bucket of 0.3 x 10
        assert len(first_waits) == len(second_waits) == 7
        assert all(0.0 < wait <= window for wait in first_waits + second_waits)
        failures = [event for event in events if event.name == "rate_limiter_exception"]
        assert len(failures) == 20  # every decision asked Redis first
        assert {event.metadata["policy"] for event in failures} == {"local"}
        warnings = [
            record.getMessage() for record in caplog.records if "rate_limiter_backend_failed" in record.getMessage()
        ]
        assert len(warnings) == 1  # once a second at most
        assert "policy='local'" in warnings[0]
        status = await limiter.status("a")  # a peek decides on the local bucket too
        assert (status.allowed, status.remaining) == (False, 0)


async def test_decisions_go_back_to_redis_when_it_answers(server: Server) -> None:
    """After the restart two backends share Redis's bucket again: 10 of 20 admitted between them, not 3 each."""
    # A killed server refuses at once; the timeout only guards the decisions Redis must make after the restart.
    options: dict[str, Any] = {"prefix": "back", "on_error": "local", "local_share": 0.3, "socket_timeout": 5.0}
    async with (
        RedisBackend.from_url(server.url, **options) as one,
        RedisBackend.from_url(server.url, **options) as other,
    ):
        first = RateLimiter(10, 60.0, backend=one, name="api")
        second = RateLimiter(10, 60.0, backend=other, name="api")
        assert await _remaining(first, "k") == 10
        server.kill()
        assert (await _burst(first, "k", 5))[0] == 3  # the process's share; its local bucket is now full
        server.restart()  # empty: no persistence
        # Redis's answer (10 left), not the local bucket's (0 left), as soon as the server is back.
        await until(lambda: _remaining_is(first, "k", 10), bound=5.0)
        await until(lambda: _remaining_is(second, "k", 10), bound=5.0)
        with capture_events() as events:
            admitted = [await _burst(limiter, "k", 1) for limiter in [first, second] * 10]
        assert sum(count for count, _ in admitted) == 10  # one bucket in Redis for both
        assert [count for count, _ in admitted[:10]] == [1] * 10
        assert not [event for event in events if event.name == "rate_limiter_exception"]


async def _remaining_is(limiter: RateLimiter, key: str, expected: int) -> bool:
    return await _remaining(limiter, key) == expected


async def test_multi_rule_limiters_take_their_share_of_every_rule_or_none(server: Server) -> None:
    """take_all during an outage: every rule's local share, all or none (the constructor's local_share)."""
    client = aioredis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    backend = RedisBackend(client, prefix="multi", on_error="local", local_share=0.4)
    try:
        # local shares: 4 of 10 per minute, 2 of 5 per hour
        minute = RateLimiter(10, 60.0, backend=backend)
        hour = RateLimiter(5, 3600.0, backend=backend)
        limiter = MultiRateLimiter((minute, hour))
        assert (await _burst(limiter, "warm", 1))[0] == 1  # Redis answers
        server.kill()
        admitted, waits = await _burst(limiter, "k", 6)
        assert admitted == 2
        assert len(waits) == 4
        assert all(wait > 0.0 for wait in waits)
        minute_status, hour_status = await limiter.statuses("k")
        assert (minute_status.remaining, hour_status.remaining) == (2, 0)  # denials took nothing from the minute
        assert (await _burst(limiter, "other", 6))[0] == 2
    finally:
        await backend.aclose()
        await client.aclose()


async def test_a_share_below_one_hit_still_admits_one(server: Server) -> None:
    """A share smaller than one hit's worth holds one hit: a bucket of 0.1 x 3 would deny every hit of the outage."""
    async with RedisBackend.from_url(server.url, on_error="local", local_share=0.1, socket_timeout=0.5) as backend:
        limiter = RateLimiter(3, 60.0, backend=backend)
        server.kill()
        assert (await _burst(limiter, "k", 3))[0] == 1


async def test_an_error_reply_decides_on_the_local_share(redis_url: str) -> None:
    """An error reply at run time (WRONGTYPE on a key another program wrote) follows "local" as an outage does."""
    prefix = f"seawall-test-{uuid.uuid4().hex}"
    admin = aioredis.Redis.from_url(redis_url)
    try:
        async with RedisBackend.from_url(
            redis_url, prefix=prefix, on_error="local", local_share=0.5, socket_timeout=5.0
        ) as backend:
            rule = RateLimitRule(4, 60.0, "gcra", "wrong")
            assert (await backend.take("k", 1, rule)).admitted
            [key] = [key async for key in admin.scan_iter(match=f"{prefix}:*")]
            await admin.delete(key)
            await admin.lpush(key, "not a bucket")
            with capture_events() as events:
                outcomes = [(await backend.take("k", 1, rule)).admitted for _ in range(4)]
            assert outcomes == [True, True, False, False]
            failures = [event for event in events if event.name == "rate_limiter_exception"]
            assert [(event.metadata["reason"], event.metadata["policy"]) for event in failures] == [
                ("wrong_type", "local")
            ] * 4
    finally:
        keys = [key async for key in admin.scan_iter(match=f"{prefix}:*")]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()


@pytest.mark.parametrize("share", [0, 0.0, -0.5, 1.5, math.nan, math.inf, "0.5", True, None])
async def test_a_bad_local_share_is_refused(redis_url: str, share: object) -> None:
    """local_share must be a finite number in (0, 1]: ConfigurationError naming it, from both constructors."""
    with pytest.raises(ConfigurationError, match="local_share") as raised:
        RedisBackend.from_url(redis_url, on_error="local", local_share=share)  # type: ignore[arg-type]
    assert raised.value.path == "local_share"
    client = aioredis.Redis.from_url(redis_url)
    try:
        with pytest.raises(ConfigurationError, match="local_share"):
            RedisBackend(client, on_error="local", local_share=share)  # type: ignore[arg-type]
    finally:
        await client.aclose()


@pytest.mark.parametrize("policy", ["allow", "deny"])
async def test_a_local_share_under_another_policy_is_refused(redis_url: str, policy: Literal["allow", "deny"]) -> None:
    """A share that "allow" or "deny" would ignore is refused: the policy was most likely left at its default."""
    with pytest.raises(ConfigurationError, match="local_share") as raised:
        RedisBackend.from_url(redis_url, on_error=policy, local_share=0.5)
    assert raised.value.path == "local_share"
    async with RedisBackend.from_url(redis_url, on_error=policy, local_share=1.0, socket_timeout=5.0) as backend:
        assert backend.local_share == 1.0  # the default, spelled out


async def test_local_in_from_url_defaults_to_the_whole_limit(server: Server) -> None:
    """on_error="local" without a share decides on the whole limit in each process; reset() clears that bucket too."""
    async with RedisBackend.from_url(server.url, on_error="local", socket_timeout=0.5) as backend:
        assert backend.local_share == 1.0
        limiter = RateLimiter(4, 60.0, backend=backend)
        server.kill()
        assert (await _burst(limiter, "k", 6))[0] == 4
        with pytest.raises(RateLimiterError):
            await limiter.reset("k")  # never silent, whatever the policy
        assert (await _burst(limiter, "k", 6))[0] == 4


@pytest.mark.parametrize(
    ("policy", "code", "health"), [("allow", 200, "degraded"), ("local", 200, "degraded"), ("deny", 503, "unhealthy")]
)
async def test_the_health_route_during_an_outage(
    server: Server, policy: Literal["allow", "deny", "local"], code: int, health: str
) -> None:
    """Redis down: the coordinator decides by the policy; /health is degraded (allow, local) or unhealthy (deny)."""
    share = 0.3 if policy == "local" else 1.0
    backend = RedisBackend.from_url(server.url, prefix="health", on_error=policy, local_share=share, socket_timeout=0.5)
    app = FastAPI()
    async with AsyncInfrastructure(backend=backend) as infra:
        await infra.configure_protection(
            "svc", {"circuit_breaker": {"failure_threshold": 3}, "rate_limiter": {"limit": 10, "window": 60}}
        )
        health_route(app, infra)
        server.kill()
        admitted = 0
        for _ in range(10):
            try:
                await infra.execute_protected("svc", _noop)
            except RateLimitExceeded:
                pass
            except Exception:  # "deny": the limiter (or the breaker) refuses every call
                assert policy == "deny"
            else:
                admitted += 1
        assert admitted == {"allow": 10, "local": 3, "deny": 0}[policy]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            response = await client.get("/health")
        assert response.status_code == code
        assert response.json()["status"] == health
        assert response.json()["circuit_breakers"]["svc"]["reachable"] is False
    await backend.aclose()


async def _noop() -> None:
    return None
