"""Real faults, injected from outside: killed database sessions, a frozen and killed Redis, hostile upstreams.

* PostgreSQL: the suite's own sessions (found by a unique ``application_name``)
  are terminated with ``pg_terminate_backend`` while calls run; the pool
  replaces the dead connections and calls succeed again; at the end the pool's
  counts are exact and no session is left.
* Redis: a throwaway ``redis-server`` is frozen (SIGSTOP), thawed, killed and
  restarted under limiters with ``on_error="allow"`` and ``"deny"``: every
  decision returns within the socket timeout (plus a generous bound) following
  the policy, and decisions come from Redis again once it answers.
* HTTP (``ProtectedTransport``): an upstream that accepts and never answers, one
  that resets every connection, and a slow loris that trickles its body: the
  timeout fires (or the transport error propagates), the breaker opens, and
  then requests are refused without reaching the upstream.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from reliability_support import (
    RedisServer,
    application_name,
    never_answers,
    pg_sessions,
    pg_terminate,
    resets,
    trickles,
    upstream,
    wait_until,
)

from seawall import (
    AsyncInfrastructure,
    CircuitOpenError,
    ProtectionTimeout,
    RateLimiter,
    RateLimiterError,
    RateLimitExceeded,
)
from seawall.backends import RedisBackend
from seawall.integrations.asyncpg import AsyncpgFactory
from seawall.integrations.httpx import ProtectedTransport

pytestmark = pytest.mark.anyio

#: How much later than its socket timeout a decision may come back, on a shared 2-core machine.
SLACK = 1.0


# -- PostgreSQL: sessions killed mid-run --------------------------------------------------


async def _pg_calls(infra: AsyncInfrastructure, stop: anyio.Event, tally: Counter[str], errors: list[str]) -> None:
    while not stop.is_set():
        try:
            async with infra.protect("db") as conn:
                assert await conn.fetchval("SELECT 1") == 1
        except ProtectionTimeout:
            tally["timeout"] += 1
        except Exception as exc:  # the connection a call held was terminated under it
            tally[type(exc).__name__] += 1
            errors.append(repr(exc))
        else:
            tally["ok"] += 1
        await asyncio.sleep(0)


@pytest.mark.postgres
async def test_the_pool_heals_after_its_sessions_are_killed(postgres_dsn: str) -> None:
    """Sessions terminated mid-run (three times) are replaced; calls succeed again; nothing is left after close."""
    name = application_name("seawall-faults")
    factory = AsyncpgFactory(postgres_dsn, server_settings={"application_name": name}, close_timeout=2.0)
    killed = 0
    tally: Counter[str] = Counter()
    errors: list[str] = []
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection(
            "db",
            {
                "circuit_breaker": {"failure_threshold": 10**6, "window": 600.0},
                "connection_pool": {"size": 3, "max_overflow": 1, "timeout": 5.0, "factory": factory},
                "timeout": 5.0,
            },
        )
        pool = infra.connection_manager.get("db")
        stop = anyio.Event()
        async with anyio.create_task_group() as group:
            for _ in range(6):
                group.start_soon(_pg_calls, infra, stop, tally, errors)
            for _ in range(3):
                await anyio.sleep(0.3)
                killed += await pg_terminate(postgres_dsn, name)
            await anyio.sleep(0.3)
            before = tally["ok"]
            await anyio.sleep(0.5)
            healed = tally["ok"] - before
            stop.set()
        assert killed >= 3
        assert healed > 0, f"no call succeeded after the last kill: {tally}"
        failures = sum(count for outcome, count in tally.items() if outcome != "ok")
        assert (await infra.get_protection_status("db"))["circuit_breaker"]["failure_count"] == failures
        assert (pool.status().in_use, pool.status().waiting) == (0, 0)
        # Every call after the heal works, on as many sessions as the pool has workers.
        for _ in range(20):
            async with infra.protect("db") as conn:
                assert await conn.fetchval("SELECT 1") == 1

        async def sessions_match() -> bool:
            return await pg_sessions(postgres_dsn, name) == pool.status().idle

        assert await wait_until(sessions_match, 10.0)

    async def none_left() -> bool:
        return await pg_sessions(postgres_dsn, name) == 0

    assert await wait_until(none_left, 10.0)
    print(f"\npostgres faults: {killed} sessions killed; calls {dict(tally)}; errors {sorted(set(errors))}")


# -- Redis: frozen, killed, restarted --------------------------------------------------------


@pytest.fixture
def redis_server(redis_url: str, tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server for destructive faults (the shared one is only used to know Redis is there)."""
    server = RedisServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


async def _timed(decide: Callable[[], Any]) -> tuple[str, float]:
    started = time.monotonic()
    try:
        await decide()
    except RateLimiterError:
        outcome = "error"
    except RateLimitExceeded:
        outcome = "denied"
    else:
        outcome = "admitted"
    return outcome, time.monotonic() - started


async def _decisions(limiter: RateLimiter, key: str, count: int) -> list[tuple[str, float]]:
    """``count`` concurrent hits (the later ones queue behind the first on the backend's connection)."""
    results: list[tuple[str, float]] = []

    async def one() -> None:
        results.append(await _timed(lambda: limiter.hit(key)))

    async with anyio.create_task_group() as group:
        for _ in range(count):
            group.start_soon(one)
    return results


@pytest.fixture
async def redis_limiters(redis_server: RedisServer) -> AsyncIterator[dict[str, RateLimiter]]:
    """A limiter of 5 per hour per policy, each on its own backend of the throwaway server."""
    prefix = f"seawall-faults-{uuid.uuid4().hex}"
    backends = {
        policy: RedisBackend.from_url(
            redis_server.url, prefix=f"{prefix}-{policy}", on_error=policy, socket_timeout=0.2
        )
        for policy in ("allow", "deny")
    }
    try:
        yield {policy: RateLimiter(5, 3600.0, backend=backend) for policy, backend in backends.items()}
    finally:
        for backend in backends.values():
            await backend.aclose()


EXPECTED = {"allow": "admitted", "deny": "error"}


@pytest.mark.redis
async def test_limiters_follow_on_error_when_redis_freezes_dies_and_returns(
    redis_server: RedisServer, redis_limiters: dict[str, RateLimiter]
) -> None:
    """SIGSTOP, SIGKILL and a restart: decisions follow on_error within the timeout, then come from Redis again."""
    faults = 0
    bound = 0.2 + SLACK
    for limiter in redis_limiters.values():
        assert [outcome for outcome, _ in await _decisions(limiter, "k", 3)] == ["admitted"] * 3

    redis_server.freeze()
    faults += 1
    try:
        for policy, limiter in redis_limiters.items():
            results = await _decisions(limiter, "k", 5)
            assert {outcome for outcome, _ in results} == {EXPECTED[policy]}, (policy, results)
            assert max(took for _, took in results) < bound, (policy, results)
    finally:
        redis_server.thaw()
    for limiter in redis_limiters.values():
        # Redis decides again: at most two more fit (hits sent while it was frozen may have been
        # taken when it read them after the thaw), and then it denies.
        outcomes = [outcome for outcome, _ in await _decisions(limiter, "k", 3)]
        assert set(outcomes) <= {"admitted", "denied"}, outcomes
        assert outcomes.count("admitted") <= 2, outcomes
        assert "denied" in outcomes, outcomes

    redis_server.kill()
    faults += 1
    for policy, limiter in redis_limiters.items():
        results = await _decisions(limiter, "k", 5)
        assert {outcome for outcome, _ in results} == {EXPECTED[policy]}, (policy, results)
        assert max(took for _, took in results) < bound, (policy, results)

    redis_server.start()  # the same port, nothing remembered
    faults += 1
    for limiter in redis_limiters.values():

        async def decides_again(limiter: RateLimiter = limiter) -> bool:
            outcome, _ = await _timed(lambda: limiter.hit("fresh"))
            return outcome == "admitted" and (await limiter.status("fresh")).current_count >= 1

        assert await wait_until(decides_again, 10.0, every=0.1), "the limiter never used Redis again"
        outcomes = [outcome for outcome, _ in await _decisions(limiter, "fresh", 6)]
        assert outcomes.count("denied") >= 2, outcomes  # 5 per hour: Redis counts again
    print(f"\nredis faults survived: {faults} (freeze, kill, restart) per policy")


# -- HTTP upstreams that misbehave ----------------------------------------------------------


async def _protected_client(infra: AsyncInfrastructure) -> httpx.AsyncClient:
    await infra.configure_protection(
        "up",
        {
            "circuit_breaker": {"failure_threshold": 3, "window": 60.0, "recovery_time": 600.0},
            "connection_pool": {"size": 4},
            "timeout": 0.2,
        },
    )
    return httpx.AsyncClient(transport=ProtectedTransport(infra, "up"))


@pytest.mark.parametrize("kind", ["never answers", "resets", "slow loris"])
async def test_hostile_upstreams_time_out_and_open_the_breaker(kind: str) -> None:
    """A silent, a resetting and a trickling upstream: each request fails in bounded time; then the breaker refuses."""
    accepted: list[int] = []
    handler = {"never answers": never_answers, "resets": resets, "slow loris": lambda a: trickles(a, 0.02)}[kind]
    async with upstream(handler(accepted)) as base, AsyncInfrastructure() as infra:
        client = await _protected_client(infra)
        async with client:
            errors = []
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises(Exception) as caught:  # noqa: PT011 - which error depends on the fault
                    await client.get(f"{base}/")
                errors.append(caught.value)
                assert time.monotonic() - started < 0.2 + SLACK
            if kind == "resets":
                assert all(isinstance(error, httpx.TransportError) for error in errors), errors
            else:
                assert all(isinstance(error, ProtectionTimeout) for error in errors), errors
            status = await infra.get_protection_status("up")
            assert status["circuit_breaker"]["state"] == "open"
            reached = len(accepted)
            with pytest.raises(CircuitOpenError):
                await client.get(f"{base}/")
            assert len(accepted) == reached, "an open breaker let a request through to the upstream"
            assert (await infra.get_protection_status("up"))["connection_pool"]["in_use"] == 0
