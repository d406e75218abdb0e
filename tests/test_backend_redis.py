"""RedisBackend against a real Redis: shared buckets, server-clock semantics, one command per decision, outages.

The shared server (``redis_url``) serves the behaviour tests, each under its
own key prefix and cleaned up after. Outages and command counting use a
throwaway ``redis-server`` that each such test starts on a free port and
stops (or kills, or freezes with SIGSTOP) itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.lowlevel
import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from redis_servers import Server, running, until
from seawall import (
    AsyncInfrastructure,
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    ConfigurationError,
    FakeClock,
    RateLimiter,
    RateLimiterError,
    RateLimitExceeded,
)
from seawall.backends import (
    BreakerBackend,
    BreakerPolicy,
    MemoryBreakerBackend,
    MemoryRateLimitBackend,
    RateLimitBackend,
    RateLimitRule,
    RedisBackend,
    Transition,
)
from seawall.backends._redis_scripts import FIXED_WINDOW, GCRA
from seawall.testing import capture_events

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.asyncio_only("redis-py's client runs on asyncio only")]

ALGORITHMS = ("gcra", "fixed_window")


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix unique to the test; every key under it is deleted afterwards."""
    unique = f"seawall-test-{uuid.uuid4().hex}"
    yield unique
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{unique}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def backend(redis_url: str, prefix: str) -> AsyncIterator[RedisBackend]:
    """A backend on the shared server, owning its client."""
    async with RedisBackend.from_url(redis_url, prefix=prefix, socket_timeout=5.0) as opened:
        yield opened


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client of the shared server, for looking at keys."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def server(redis_url: str, tmp_path: Path) -> Iterator[Server]:
    """Start a private redis-server on a free port (no persistence); stop only that one afterwards."""
    with running(tmp_path) as started:
        yield started


async def _admitted(limiter: RateLimiter, key: str) -> bool:
    try:
        await limiter.hit(key)
    except RateLimitExceeded:
        return False
    return True


async def _server_time(client: aioredis.Redis) -> float:
    seconds, micros = await client.time()
    return seconds + micros / 1e6


# -- configuration -----------------------------------------------------------------


async def test_bad_configuration_fails_at_construction(redis_url: str) -> None:
    """A non-client, a non-str prefix, an unknown policy or a bad socket timeout fail at once."""
    with pytest.raises(TypeError, match=r"redis\.asyncio\.Redis"):
        RedisBackend(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="prefix"):
        RedisBackend.from_url(redis_url, prefix=3, socket_timeout=5.0)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="on_error"):
        RedisBackend.from_url(redis_url, on_error="maybe", socket_timeout=5.0)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="socket_timeout"):
        RedisBackend.from_url(redis_url, socket_timeout=0)
    with pytest.raises(ConfigurationError, match="socket_timeout"):
        RedisBackend.from_url(redis_url, socket_timeout=math.inf)
    with pytest.raises(TypeError, match="socket_timeout"):
        RedisBackend.from_url(redis_url, socket_timeout=True)


async def test_it_is_a_remote_rate_limit_backend(backend: RedisBackend) -> None:
    """The backend implements the async protocol only, so the limiter asks it for every decision."""
    assert isinstance(backend, RateLimitBackend)
    limiter = RateLimiter(2, 1.0, backend=backend)
    assert limiter.resident_buckets is None
    assert "on_error='allow'" in repr(backend)


def test_importing_seawall_does_not_import_redis() -> None:
    """The redis package is imported on first use of RedisBackend, never by ``import seawall``."""
    code = "import sys, seawall, seawall.backends; assert 'redis' not in sys.modules; seawall.backends.RedisBackend"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    import seawall.backends

    with pytest.raises(AttributeError, match="Nope"):
        _ = seawall.backends.Nope


# -- shared buckets ---------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_two_clients_share_one_bucket(redis_url: str, prefix: str, algorithm: str) -> None:
    """Two limiters on two clients with the same rule admit exactly ``limit`` between them."""
    async with (
        RedisBackend.from_url(redis_url, prefix=prefix, socket_timeout=5.0) as first,
        RedisBackend.from_url(redis_url, prefix=prefix, socket_timeout=5.0) as second,
    ):
        limiters = [
            RateLimiter(7, 3600.0, algorithm=algorithm, backend=first, name="shared"),  # type: ignore[arg-type]
            RateLimiter(7, 3600.0, algorithm=algorithm, backend=second, name="shared"),  # type: ignore[arg-type]
        ]
        outcomes = [await _admitted(limiters[i % 2], "user") for i in range(20)]
        assert sum(outcomes) == 7
        assert outcomes[:7] == [True] * 7
        status = await limiters[1].status("user")
        assert status.remaining == 0
        assert not status.allowed


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_a_hundred_concurrent_hits_admit_exactly_limit(backend: RedisBackend, algorithm: str) -> None:
    """100 hits at once on one key, pipelined together, admit exactly ``limit``."""
    limiter = RateLimiter(10, 3600.0, algorithm=algorithm, backend=backend)  # type: ignore[arg-type]
    outcomes = await asyncio.gather(*(_admitted(limiter, "hot") for _ in range(100)))
    assert sum(outcomes) == 10


async def test_rules_and_names_never_share_buckets(backend: RedisBackend, admin: aioredis.Redis, prefix: str) -> None:
    """Buckets are namespaced by prefix, the whole rule and the name; each key carries a TTL."""
    limiters = [
        RateLimiter(1, 60.0, backend=backend),
        RateLimiter(1, 60.0, backend=backend, name="a"),
        RateLimiter(1, 60.0, backend=backend, name="a:b"),
        RateLimiter(1, 30.0, backend=backend, name="a"),
        RateLimiter(2, 60.0, backend=backend, name="a"),
        RateLimiter(1, 60.0, algorithm="fixed_window", backend=backend, name="a"),
    ]
    for limiter in limiters:
        assert await _admitted(limiter, "k")
    keys = sorted([key async for key in admin.scan_iter(match=f"{prefix}:*")])
    assert len(keys) == len(limiters)
    assert all(key.startswith(f"{prefix}:v2:rl:") and key.endswith(":k") for key in keys)
    for key in keys:
        assert 0 < await admin.pttl(key) <= 60_001
    # The same rule written with an int or a float limit is the same rule.
    assert not await _admitted(RateLimiter(1.0, 60, backend=backend, name="a"), "k")


async def test_reset_forgets_the_bucket(backend: RedisBackend, admin: aioredis.Redis, prefix: str) -> None:
    """reset() deletes the bucket's key, so the next hit finds it empty."""
    limiter = RateLimiter(1, 60.0, backend=backend)
    await limiter.hit("k")
    assert not await _admitted(limiter, "k")
    await limiter.reset("k")
    assert [key async for key in admin.scan_iter(match=f"{prefix}:*")] == []
    assert await _admitted(limiter, "k")


async def test_idle_buckets_vanish(backend: RedisBackend, admin: aioredis.Redis, prefix: str) -> None:
    """A bucket's key expires once the bucket is back to empty (PEXPIRE), for both algorithms."""
    # A 1 s window: a slow machine must find both keys before they expire.
    await RateLimiter(1, 1.0, backend=backend).hit("k")
    await RateLimiter(1, 1.0, algorithm="fixed_window", backend=backend).hit("k")
    keys = [key async for key in admin.scan_iter(match=f"{prefix}:*")]
    assert len(keys) == 2
    for key in keys:
        ttl = await admin.pttl(key)
        # -2: already gone (a very slow machine); -1 (no expiry) or more than the window fails.
        assert ttl == -2 or 0 < ttl <= 1001
    await anyio.sleep(1.05)  # the server's expiry runs on its own clock
    assert [key for key in keys if await admin.exists(key)] == []


# -- semantics: the server's clock, the memory backend's arithmetic ------------------


async def test_gcra_retry_after_is_exact_on_the_server_clock(backend: RedisBackend) -> None:
    """A denied GCRA hit reports when it would pass, counting down on the server's clock; then it passes."""
    limiter = RateLimiter(2, 0.4, backend=backend)
    start = time.monotonic()
    await limiter.hit("k")
    await limiter.hit("k")
    with pytest.raises(RateLimitExceeded) as denied:
        await limiter.hit("k")
    elapsed = time.monotonic() - start
    retry_after = denied.value.retry_after
    assert retry_after is not None
    # One unit drains in 0.2 s; what drained since the burst is at most the time the three hits took.
    assert 0.2 - elapsed - 0.005 <= retry_after <= 0.2
    between = time.monotonic()
    with pytest.raises(RateLimitExceeded) as again:
        await limiter.hit("k")
    assert again.value.retry_after is not None
    assert again.value.retry_after <= retry_after
    assert again.value.retry_after >= retry_after - (time.monotonic() - between) - 0.005
    await anyio.sleep(again.value.retry_after + 0.005)
    assert await _admitted(limiter, "k")


async def test_fixed_window_is_aligned_on_the_server_clock(backend: RedisBackend, admin: aioredis.Redis) -> None:
    """A full fixed window reports the seconds to the next multiple of ``window`` on the server's clock."""
    window = 0.5
    limiter = RateLimiter(1, window, algorithm="fixed_window", backend=backend)
    while True:
        await limiter.reset("k")
        await limiter.hit("k")
        before = await _server_time(admin)
        with pytest.raises(RateLimitExceeded) as denied:
            await limiter.hit("k")
        after = await _server_time(admin)
        if math.floor(before / window) == math.floor(after / window):
            break  # not across a boundary between the reads: comparable
    end = (math.floor(before / window) + 1) * window
    retry_after = denied.value.retry_after
    assert retry_after is not None
    assert end - after - 1e-6 <= retry_after <= end - before + 1e-6
    await anyio.sleep(retry_after + 0.005)
    assert await _admitted(limiter, "k")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_decisions_match_the_memory_backend(backend: RedisBackend, algorithm: str) -> None:
    """The same sequence of costs gets the same decisions and numbers from Redis as from memory."""
    rule = RateLimitRule(5, 10_000.0, algorithm, "same")  # type: ignore[arg-type]
    memory = MemoryRateLimitBackend(clock=FakeClock())  # time stands still; the server's drains 5e-4/s
    costs = [1, 2, 0.5, 1.5, 1, 3, 0.5, 0.25, 1, 0.25]
    for cost in costs:
        ours, theirs = await backend.take("k", cost, rule), await memory.take("k", cost, rule)
        assert ours.admitted == theirs.admitted, cost
        assert ours.remaining == theirs.remaining
        assert ours.current_count == pytest.approx(theirs.current_count, abs=0.01)
        if algorithm == "gcra":
            assert ours.retry_after == pytest.approx(theirs.retry_after, abs=5.0)  # seconds of a 2,000 s interval
            assert ours.next_after == pytest.approx(theirs.next_after, abs=5.0)
            assert ours.reset_after == pytest.approx(theirs.reset_after, abs=5.0)
        else:  # windows are aligned on different clocks: the same times are zero, the others the window's end
            assert (ours.retry_after > 0, ours.next_after > 0) == (theirs.retry_after > 0, theirs.next_after > 0)
            assert ours.retry_after in (0.0, ours.reset_after)
    ours, theirs = await backend.peek("k", rule), await memory.peek("k", rule)
    assert (ours.admitted, ours.remaining, ours.retry_after) == (theirs.admitted, theirs.remaining, 0.0)
    assert ours.current_count == pytest.approx(theirs.current_count, abs=0.01)
    await backend.reset("k", rule)
    empty = await backend.peek("k", rule)
    assert (empty.admitted, empty.current_count, empty.remaining, empty.reset_after) == (True, 0.0, 5, 0.0)


async def test_status_and_acquire_go_through_the_server(backend: RedisBackend) -> None:
    """status() reads the bucket without taking; acquire() waits the reported retry time."""
    limiter = RateLimiter(1, 0.3, backend=backend)
    await limiter.acquire("k")
    status = await limiter.status("k")
    assert (status.allowed, status.remaining) == (False, 0)
    assert 0.0 < status.current_count <= 1.0
    start = time.monotonic()
    await limiter.acquire("k")
    assert time.monotonic() - start >= status.retry_after - 0.05  # less what passed since status()
    async with limiter("other", wait=False):
        pass


async def test_lost_scripts_are_loaded_again(server: Server) -> None:
    """After SCRIPT FLUSH (or a restart) the next decision loads the scripts and still decides.

    On a throwaway server: SCRIPT FLUSH on the shared one would drop every other client's scripts.
    """
    admin = aioredis.Redis.from_url(server.url)
    try:
        async with RedisBackend.from_url(server.url, prefix="flush", socket_timeout=5.0) as backend:
            limiter = RateLimiter(1, 60.0, backend=backend)
            await limiter.hit("k")
            await admin.script_flush()
            assert await admin.script_exists(GCRA.sha) == [False]
            assert not await _admitted(limiter, "k")
            assert await admin.script_exists(GCRA.sha, FIXED_WINDOW.sha) == [True, True]
    finally:
        await admin.aclose()


# -- one command per decision --------------------------------------------------------


async def test_one_command_per_decision(server: Server) -> None:
    """Each decision is one EVALSHA (TIME, GET, SET inside it), alone or 100 at once."""
    admin = aioredis.Redis.from_url(server.url, decode_responses=True)
    async with RedisBackend.from_url(server.url, prefix="count", socket_timeout=5.0) as backend:
        gcra = RateLimiter(50, 60.0, backend=backend)
        fixed = RateLimiter(50, 60.0, algorithm="fixed_window", backend=backend)
        await gcra.hit("warm")
        await fixed.hit("warm")  # scripts loaded (NOSCRIPT, SCRIPT LOAD) before counting
        await admin.config_resetstat()
        for _ in range(10):
            await gcra.hit("k")
        await asyncio.gather(*(_admitted(fixed, "k") for _ in range(100)))
        stats = await admin.info("commandstats")
    await admin.aclose()
    calls = {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}
    calls.pop("info", None)
    calls.pop("config|resetstat", None)
    # 110 decisions, 110 scripts run, each reads the server clock once; 60 were admitted and wrote.
    assert calls == {"evalsha": 110, "time": 110, "get": 110, "set": 60}


# -- outages --------------------------------------------------------------------------


async def test_allow_policy_admits_when_redis_is_down(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    """With Redis killed, "allow" admits, emits rate_limiter_exception and warns (at most once a second)."""
    async with RedisBackend.from_url(server.url, prefix="down", socket_timeout=0.5) as backend:
        limiter = RateLimiter(1, 60.0, backend=backend, name="api")
        await limiter.hit("k")
        server.kill()
        with capture_events() as events, caplog.at_level(logging.WARNING, logger="seawall"):
            start = time.monotonic()
            first = await limiter.hit("k")
            second = await limiter.hit("k")
            status = await limiter.status("k")
            elapsed = time.monotonic() - start
        assert elapsed < 1.5
        assert [first.allowed, second.allowed, status.allowed] == [True, True, True]
        failures = [event for event in events if event.name == "rate_limiter_exception"]
        assert len(failures) == 3
        assert failures[0].metadata["key"] == "k"
        assert failures[0].metadata["name"] == "api"
        assert failures[0].metadata["policy"] == "allow"
        assert isinstance(failures[0].metadata["error"], RedisError)
        assert [event.name for event in events].count("request_allowed") == 2
        messages = [record.getMessage() for record in caplog.records]
        warnings = [message for message in messages if "rate_limiter_backend_failed" in message]
        assert len(warnings) == 1
        # reset() never passes silently, whatever the policy.
        with pytest.raises(RateLimiterError) as failed:
            await limiter.reset("k")
        assert isinstance(failed.value.__cause__, RedisError)


async def test_deny_policy_raises_when_redis_is_down(server: Server) -> None:
    """With Redis killed, "deny" raises RateLimiterError from the Redis error, for hits and status."""
    async with RedisBackend.from_url(server.url, prefix="down", on_error="deny", socket_timeout=0.5) as backend:
        limiter = RateLimiter(1, 60.0, backend=backend)
        server.kill()
        with pytest.raises(RateLimiterError) as failed:
            await limiter.hit("k")
        assert failed.value.key == "k"
        assert failed.value.error_type == "rate_limiter_exception"
        assert isinstance(failed.value.__cause__, RedisError)
        with pytest.raises(RateLimiterError):
            await limiter.status("k")


@pytest.mark.parametrize("policy", ["allow", "local", "deny"])
async def test_a_frozen_server_costs_at_most_the_socket_timeout(server: Server, policy: str) -> None:
    """A server that accepts but never answers (SIGSTOP) delays a decision by the socket timeout, no more."""
    timeout = 0.5
    async with RedisBackend.from_url(server.url, on_error=policy, socket_timeout=timeout) as backend:  # type: ignore[arg-type]
        limiter = RateLimiter(1, 60.0, backend=backend)
        await limiter.hit("warm")
        server.freeze()
        start = time.monotonic()
        outcomes = await asyncio.gather(*(limiter.hit(f"k{i}") for i in range(10)), return_exceptions=True)
        elapsed = time.monotonic() - start
        server.thaw()
        # One timeout for the batch on the wire and one for the next batch at most, plus slack for
        # a loaded machine: still far below the 10 timeouts of decisions that wait one by one.
        assert elapsed < timeout * 4
        if policy != "deny":  # ("local": each key's own bucket in the process holds its one hit)
            assert all(not isinstance(outcome, BaseException) for outcome in outcomes)
        else:
            assert all(isinstance(outcome, RateLimiterError) for outcome in outcomes)
        # The server is back: the backend reconnects and decides again.
        assert await _admitted(limiter, "after")


async def test_a_redis_error_reply_follows_the_policy(backend: RedisBackend, admin: aioredis.Redis) -> None:
    """An error reply (here WRONGTYPE from the script) is a backend failure too."""
    rule = RateLimitRule(1, 60.0)
    await backend.take("probe", 1, rule)
    key = next(iter([key async for key in admin.scan_iter(match=f"{backend.prefix}:*")]))
    wrong = key.removesuffix("probe") + "wrong"
    await admin.lpush(wrong, "x")
    assert (await backend.take("wrong", 1, rule)).admitted
    deny = RedisBackend(backend.client, prefix=backend.prefix, on_error="deny")
    with pytest.raises(RateLimiterError) as failed:
        await deny.take("wrong", 1, rule)
    assert isinstance(failed.value.__cause__, ResponseError)
    await deny.aclose()


# -- lifetime and cancellation ----------------------------------------------------


async def test_a_borrowed_client_stays_open(redis_url: str, prefix: str) -> None:
    """aclose() closes only what the backend owns; a closed backend refuses work."""
    client = aioredis.Redis.from_url(redis_url)
    backend = RedisBackend(client, prefix=prefix)
    await backend.take("k", 1, RateLimitRule(1, 60.0))
    await backend.aclose()
    await backend.aclose()  # idempotent
    assert "closed" in repr(backend)
    assert await client.ping()
    with pytest.raises(RuntimeError, match="closed"):
        await backend.take("k", 1, RateLimitRule(1, 60.0))
    await client.aclose()


async def test_a_client_decoding_responses_works_too(redis_url: str, prefix: str) -> None:
    """Replies arrive as str from a client with decode_responses=True; decisions are the same."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    async with RedisBackend(client, prefix=prefix) as backend:
        limiter = RateLimiter(1, 60.0, algorithm="fixed_window", backend=backend)
        assert await _admitted(limiter, "k")
        assert not await _admitted(limiter, "k")
        breaker = CircuitBreaker("svc", failure_threshold=1, backend=backend)
        await _fail(breaker)
        assert (await breaker.status()).state is BreakerState.OPEN
    await client.aclose()


async def test_a_decision_cancelled_before_it_is_sent_takes_nothing(server: Server) -> None:
    """A caller cancelled while its decision waits for the batch ahead takes nothing; aclose() waits for that batch."""
    backend = RedisBackend.from_url(server.url, prefix="cancel", socket_timeout=5.0)
    limiter = RateLimiter(5, 60.0, backend=backend)
    await limiter.hit("warm")
    server.freeze()
    first = asyncio.ensure_future(limiter.hit("k"))
    await anyio.wait_all_tasks_blocked()  # the first decision is on the wire
    second = asyncio.ensure_future(limiter.hit("k"))
    await anyio.wait_all_tasks_blocked()  # the second is queued behind it
    second.cancel()
    server.thaw()
    await first
    with pytest.raises(asyncio.CancelledError):
        await second
    assert (await limiter.status("k")).current_count == pytest.approx(1.0, abs=0.01)
    third = asyncio.ensure_future(limiter.hit("k"))
    await asyncio.sleep(0)  # queued and sent by the backend's task
    await backend.aclose()
    assert third.done()
    assert not third.cancelled()


async def test_a_cancelled_caller_leaves_the_others_answered(backend: RedisBackend) -> None:
    """Cancelling some of many concurrent callers neither breaks the batch nor the backend."""
    limiter = RateLimiter(1000, 3600.0, backend=backend)  # (a long window: the count barely drains meanwhile)
    tasks = [asyncio.ensure_future(limiter.hit("k")) for _ in range(50)]
    await asyncio.sleep(0)
    for task in tasks[::2]:
        task.cancel()
    outcomes: list[Any] = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(not isinstance(outcome, BaseException) for outcome in outcomes[1::2])
    assert await _admitted(limiter, "k")
    count = (await limiter.status("k")).current_count
    assert 26 <= round(count) <= 51


# -- circuit breaker state ----------------------------------------------------------

POLICY = BreakerPolicy(failure_threshold=2, window=60.0, recovery_time=0.2, half_open_max_calls=1)


async def _fail(breaker: CircuitBreaker) -> None:
    with pytest.raises(RuntimeError):
        async with breaker:
            raise RuntimeError("down")


async def _admits(breaker: CircuitBreaker) -> bool:
    try:
        async with breaker:
            return True
    except CircuitOpenError:
        return False


async def _rejects(breaker: CircuitBreaker) -> bool:
    return not await _admits(breaker)


async def test_breakers_on_two_clients_share_one_state(redis_url: str, prefix: str) -> None:
    """Failures seen by two processes add up; the breaker one opens rejects in the other."""
    async with (
        RedisBackend.from_url(redis_url, prefix=prefix, socket_timeout=5.0) as one,
        RedisBackend.from_url(redis_url, prefix=prefix, socket_timeout=5.0) as other,
    ):
        assert isinstance(one, BreakerBackend)
        first = CircuitBreaker("db", failure_threshold=2, recovery_time=30.0, backend=one)
        second = CircuitBreaker("db", failure_threshold=2, recovery_time=30.0, backend=other)
        await _fail(first)
        assert (await second.status()).failure_count == 1
        await _fail(second)
        # The other process hears of the change by pub/sub (within 50 ms; a generous bound here).
        await until(lambda: _rejects(first))
        with pytest.raises(CircuitOpenError) as rejected:
            async with first:
                pass
        assert rejected.value.retry_after == pytest.approx(30.0, abs=1.0)
        status = await second.status()
        assert (status.state, status.failure_count) == (BreakerState.OPEN, 2)
        await second.reset()
        # The reset reaches the other process by pub/sub (within 50 ms; a generous bound here).
        await until(lambda: _admits(first))
        await first.trip()
        assert (await second.status()).state is BreakerState.OPEN


async def test_breaker_recovery_follows_the_memory_rules(backend: RedisBackend) -> None:
    """OPEN turns HALF_OPEN after recovery_time; trial slots are bounded; trials close or re-open it."""
    memory = MemoryBreakerBackend()
    for store in (backend, memory):
        await store.breaker_force("svc", POLICY, 0.0, BreakerState.OPEN)
    rejected = await backend.breaker_admit("svc", POLICY, 0.0)
    assert (rejected.ticket, rejected.state) == (None, BreakerState.OPEN)
    assert 0.0 < rejected.retry_after <= 0.2
    await anyio.sleep(0.21)
    trial = await backend.breaker_admit("svc", POLICY, 0.0)
    expected = await memory.breaker_admit("svc", POLICY, 0.21)
    assert (trial.state, trial.transition) == (expected.state, expected.transition)
    assert trial.ticket is not None
    assert trial.ticket.trial == 1
    busy = await backend.breaker_admit("svc", POLICY, 0.0)
    assert busy.ticket is None
    assert 0.0 < busy.retry_after <= 0.2
    snapshot = await backend.breaker_snapshot("svc", POLICY, 0.0)
    assert (snapshot.state, snapshot.trials) == (BreakerState.HALF_OPEN, 1)
    assert snapshot.retry_after > 0.0
    # A cancelled trial frees its slot and decides nothing.
    assert await backend.breaker_settle("svc", POLICY, 0.0, trial.ticket, "cancelled") is None
    second = await backend.breaker_admit("svc", POLICY, 0.0)
    assert second.ticket is not None
    reopened = await backend.breaker_settle("svc", POLICY, 0.0, second.ticket, "failure")
    assert reopened == Transition(BreakerState.HALF_OPEN, BreakerState.OPEN)
    await anyio.sleep(0.21)
    third = await backend.breaker_admit("svc", POLICY, 0.0)
    assert third.ticket is not None
    closed = await backend.breaker_settle("svc", POLICY, 0.0, third.ticket, "success")
    assert closed == Transition(BreakerState.HALF_OPEN, BreakerState.CLOSED)
    # The old trial's ticket belongs to an old generation: it is a plain call now.
    assert await backend.breaker_settle("svc", POLICY, 0.0, second.ticket, "success") is None
    assert (await backend.breaker_snapshot("svc", POLICY, 0.0)).failure_count == 0


async def test_a_hung_trial_stops_blocking_after_recovery_time(backend: RedisBackend) -> None:
    """A trial that never settles frees its slot after recovery_time."""
    await backend.breaker_force("svc", POLICY, 0.0, BreakerState.OPEN)
    await anyio.sleep(0.21)
    hung = await backend.breaker_admit("svc", POLICY, 0.0)
    assert hung.ticket is not None
    assert (await backend.breaker_admit("svc", POLICY, 0.0)).ticket is None
    await anyio.sleep(0.21)
    assert (await backend.breaker_snapshot("svc", POLICY, 0.0)).retry_after == 0.0
    assert (await backend.breaker_admit("svc", POLICY, 0.0)).ticket is not None


async def test_breaker_failures_count_within_the_window(backend: RedisBackend, admin: aioredis.Redis) -> None:
    """Only failures in the last ``window`` seconds count; a closed breaker's hash expires after the window."""
    policy = POLICY._replace(failure_threshold=3, window=0.2)
    for store_now in (0.0, 0.0):
        assert await backend.breaker_settle("svc", policy, store_now, None, "failure") is None
    assert (await backend.breaker_snapshot("svc", policy, 0.0)).failure_count == 2
    assert 0 < await admin.pttl(f"{backend.prefix}:v2:cb:svc") <= 201
    await anyio.sleep(0.21)
    assert (await backend.breaker_snapshot("svc", policy, 0.0)).failure_count == 0
    assert await backend.breaker_settle("svc", policy, 0.0, None, "success") is None
    assert await backend.breaker_settle("svc", policy, 0.0, None, "failure") is None
    ticket = (await backend.breaker_admit("svc", policy, 0.0)).ticket
    assert await backend.breaker_settle("svc", policy, 0.0, ticket, "failure") is None
    opened = await backend.breaker_settle("svc", policy, 0.0, None, "failure")
    assert opened == Transition(BreakerState.CLOSED, BreakerState.OPEN)
    assert await admin.pttl(f"{backend.prefix}:v2:cb:svc") == -1  # an open breaker does not expire
    assert await backend.breaker_force("svc", policy, 0.0, BreakerState.OPEN) is None
    assert await backend.breaker_force("svc", policy, 0.0, BreakerState.CLOSED) is not None
    assert await backend.breaker_force("svc", policy, 0.0, BreakerState.CLOSED) is None
    with pytest.raises(ValueError, match="half_open"):
        await backend.breaker_force("svc", policy, 0.0, BreakerState.HALF_OPEN)


async def test_breaker_follows_the_policy_when_redis_is_down(server: Server) -> None:
    """With Redis down, "allow" runs calls as if closed, "deny" rejects; settling never raises."""
    allow = RedisBackend.from_url(server.url, prefix="down", socket_timeout=0.5)
    deny = RedisBackend.from_url(server.url, prefix="down", on_error="deny", socket_timeout=0.5)
    server.kill()
    breaker = CircuitBreaker("svc", failure_threshold=2, backend=allow)
    await _fail(breaker)  # admitted, and its failure counted on this process only, with a warning
    async with breaker:
        pass
    with pytest.raises(CircuitOpenError) as rejected:
        async with CircuitBreaker("svc", backend=deny):
            pass
    assert isinstance(rejected.value.__cause__, RedisError)
    with pytest.raises(RedisError):
        await breaker.trip()
    await allow.aclose()
    await deny.aclose()


@pytest.mark.parametrize("on_error", ["allow", "local"])
async def test_failures_during_an_outage_open_the_process_breaker_under_allow(
    server: Server, on_error: Literal["allow", "local"]
) -> None:
    """With Redis down, failure_threshold failures on this process open its breaker (no Redis to ask)."""
    async with RedisBackend.from_url(server.url, prefix="lo", on_error=on_error, socket_timeout=0.5) as backend:
        breaker = CircuitBreaker("svc", failure_threshold=3, recovery_time=60.0, backend=backend)
        await _fail(breaker)  # one failure in Redis, then the outage: Redis's count is not carried
        server.kill()
        await _fail(breaker)
        await _fail(breaker)
        assert breaker.state is BreakerState.CLOSED
        with capture_events() as events:
            await _fail(breaker)  # the third failure this process saw during the outage
        assert breaker.state is BreakerState.OPEN
        assert [e.metadata["to"] for e in events if e.name == "state_changed"] == ["open"]
        with pytest.raises(CircuitOpenError):
            async with breaker:
                pass
        status = await breaker.status()
        assert status.state is BreakerState.OPEN
        assert status.reachable is False


@pytest.mark.parametrize("on_error", ["allow", "local", "deny"])
async def test_breaker_status_during_an_outage_is_the_process_view(
    server: Server, on_error: Literal["allow", "local", "deny"]
) -> None:
    """status() with Redis stopped raises nothing: the process's view (open, time left; else closed), unreachable."""
    async with RedisBackend.from_url(server.url, prefix="st", on_error=on_error, socket_timeout=0.5) as backend:
        opened = CircuitBreaker("opened", failure_threshold=1, recovery_time=60.0, backend=backend)
        closed = CircuitBreaker("closed", failure_threshold=5, backend=backend)
        await _fail(opened)
        await _fail(closed)
        assert (await closed.status()).failure_count == 1
        server.kill()
        with capture_events() as events:
            seen = await opened.status()
            other = await closed.status()
        assert seen.reachable is False
        assert seen.state is BreakerState.OPEN
        assert 0.0 < seen.retry_after <= 60.0
        assert other.reachable is False
        assert other.state is BreakerState.CLOSED
        assert other.failure_count == 0  # the counts live in Redis
        assert other.to_dict()["reachable"] is False
        failures = [event.metadata["operation"] for event in events if event.event[1:] == ("backend", "error")]
        assert failures == ["breaker_snapshot"] * 2  # logged and emitted, as a call's failure is


async def test_health_is_unhealthy_when_a_deny_store_is_down(server: Server) -> None:
    """Under on_error="deny" a breaker store that cannot be read makes the report unhealthy (calls are refused)."""
    backend = RedisBackend.from_url(server.url, prefix="health", on_error="deny", socket_timeout=0.5)
    async with AsyncInfrastructure(backend=backend) as infra:
        await infra.configure_protection("svc", {"circuit_breaker": {"failure_threshold": 3}})
        server.kill()
        report = await infra.health()
        assert report["status"] == "unhealthy"
        assert report["circuit_breakers"]["svc"]["reachable"] is False
    await backend.aclose()


async def test_health_reports_a_breaker_whose_store_is_down(server: Server) -> None:
    """With the breakers' Redis down, health() still answers: degraded, the breaker unreachable."""
    backend = RedisBackend.from_url(server.url, prefix="health", socket_timeout=0.5)
    async with AsyncInfrastructure(backend=backend) as infra:
        await infra.configure_protection("svc", {"circuit_breaker": {"failure_threshold": 3}})
        assert (await infra.health())["status"] == "healthy"
        server.kill()
        report = await infra.health()
        assert report["status"] == "degraded"
        assert report["circuit_breakers"]["svc"]["healthy"] is False
        assert report["circuit_breakers"]["svc"]["reachable"] is False
        assert report["circuit_breakers"]["svc"]["state"] == "closed"  # this process's own view
        json.dumps(report)
    await backend.aclose()


async def test_the_coordinator_keeps_limits_and_breakers_in_redis(backend: RedisBackend, prefix: str) -> None:
    """AsyncInfrastructure(backend=RedisBackend) puts both the buckets and the breaker state in Redis."""
    async with AsyncInfrastructure(backend=backend) as infra:
        await infra.configure_protection(
            "api", {"rate_limiter": {"limit": 2, "window": 60}, "circuit_breaker": {"failure_threshold": 1}}
        )

        async def work() -> str:
            return "done"

        assert await infra.execute_protected("api", work) == "done"
        assert await infra.execute_protected("api", work) == "done"
        with pytest.raises(RateLimitExceeded):
            await infra.execute_protected("api", work)
        status = await infra.get_protection_status("api")
        assert status["rate_limiter"]["remaining"] == 0
        assert status["circuit_breaker"]["state"] == "closed"
    keys = [key async for key in backend.client.scan_iter(match=f"{prefix}:*")]
    assert any(b":rl:" in key for key in keys)


LONE_SURROGATES = ["\ud800", "a\udfffb", "\udc80:\ud83d", "\x00nul", "é" * 3]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_any_str_is_a_bucket_on_redis(backend: RedisBackend, algorithm: str) -> None:
    """Entity ids with lone surrogates, NUL or accents are buckets of their own on Redis, as in memory."""
    limiter = RateLimiter(1, 60.0, algorithm=algorithm, backend=backend)  # type: ignore[arg-type]
    for key in LONE_SURROGATES:
        await limiter.hit(key)
        with pytest.raises(RateLimitExceeded):
            await limiter.hit(key)
        assert (await limiter.status(key)).remaining == 0
    # "\ud83d\ude00" as two lone code points is not the emoji it would encode to as a pair.
    await limiter.hit("\ud83d\ude00")
    await limiter.hit("\U0001f600")
    await limiter.reset("\ud800")
    await limiter.hit("\ud800")


@pytest.mark.parametrize("policy", ["allow", "deny"])
async def test_any_str_names_a_breaker_on_redis(redis_url: str, prefix: str, policy: str) -> None:
    """A breaker named with a lone surrogate keeps its state on Redis under either policy (no UnicodeEncodeError)."""
    async with RedisBackend.from_url(redis_url, prefix=prefix, on_error=policy, socket_timeout=5.0) as backend:  # type: ignore[arg-type]
        breaker = CircuitBreaker("db-\ud800", failure_threshold=1, recovery_time=30.0, backend=backend)
        await _fail(breaker)
        with pytest.raises(CircuitOpenError):
            async with breaker:
                pass
        assert (await breaker.status()).state is BreakerState.OPEN


@pytest.mark.parametrize(("algorithm", "limit"), [("gcra", 10**9), ("gcra", 10**10), ("fixed_window", 10**12)])
async def test_huge_limits_are_exact_on_redis(backend: RedisBackend, algorithm: str, limit: int) -> None:
    """The server admits exactly ``limit`` units for the largest accepted limits, never one more.

    The longest window keeps the real server clock from draining a unit
    between the hits (GCRA drains one every 0.1 s at 10**10 per 1e9 s).
    """
    limiter = RateLimiter(limit, 1e9, algorithm=algorithm, backend=backend)  # type: ignore[arg-type]
    await limiter.hit("k", limit)
    with pytest.raises(RateLimitExceeded):
        await limiter.hit("k", 1)
    await limiter.hit("j", limit - 1)
    await limiter.hit("j", 1)
    with pytest.raises(RateLimitExceeded):
        await limiter.hit("j", 1)


@pytest.mark.parametrize(
    ("limit", "window", "algorithm"),
    [(5, 1e15, "gcra"), (5, 1e-9, "fixed_window"), (10**13, 1.0, "gcra"), (5, 10**400, "fixed_window")],
)
async def test_rules_the_server_cannot_evaluate_are_refused(
    backend: RedisBackend, limit: float, window: float, algorithm: str
) -> None:
    """Rules that made every Redis decision a server error (and so admitted under "allow") fail at construction."""
    with pytest.raises(ConfigurationError):
        RateLimiter(limit, window, algorithm=algorithm, backend=backend)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        await backend.take("k", 1, RateLimitRule(limit, window, algorithm))  # type: ignore[arg-type]


async def test_keys_never_share_buckets_on_redis(backend: RedisBackend) -> None:
    """Key "api" with entity "admin:alice" and key "api:admin" with entity "alice" count apart on Redis too."""
    async with AsyncInfrastructure(backend=backend) as infra:
        for key in ("api", "api:admin"):
            await infra.configure_protection(key, {"rate_limiter": {"limit": 1, "window": 60}})

        async def work() -> str:
            return "done"

        assert await infra.execute_protected("api", work, rate_limiter="admin:alice") == "done"
        assert await infra.execute_protected("api:admin", work, rate_limiter="alice") == "done"
        with pytest.raises(RateLimitExceeded):
            await infra.execute_protected("api:admin", work, rate_limiter="alice")


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_under_trio_building_a_backend_fails_at_once_saying_so() -> None:
    """Under trio, RedisBackend() and from_url() raise a ConfigurationError saying it is asyncio-only (no server)."""
    with pytest.raises(ConfigurationError, match="RedisBackend runs on asyncio only") as info:
        RedisBackend.from_url("redis://127.0.0.1:1/0", socket_timeout=5.0)
    assert info.value.path == "backend"
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0")  # (makes no connection)
    with pytest.raises(ConfigurationError, match=r"RedisBackend\(\) was called under trio"):
        RedisBackend(client)


def test_a_backend_built_outside_any_loop_fails_at_its_first_decision_under_trio() -> None:
    """Built outside any loop, a RedisBackend's first use under trio (limiter, breaker, coordinator entry) raises it."""
    backend = RedisBackend.from_url("redis://127.0.0.1:1/0", socket_timeout=5.0)
    limiter = RateLimiter(5, 1.0, backend=backend)
    breaker = CircuitBreaker("b", backend=backend)

    async def main() -> None:
        with pytest.raises(ConfigurationError, match="a decision was called under trio"):
            await limiter.hit("k")
        with pytest.raises(ConfigurationError, match="RedisBackend runs on asyncio only"):
            async with breaker:
                pass
        with pytest.raises(ConfigurationError, match="RedisBackend runs on asyncio only"):
            async with AsyncInfrastructure(backend=backend):  # its __aenter__ verifies the backend
                pass

    anyio.run(main, backend="trio")
    asyncio.run(backend.aclose())  # (it made no connection; closed where redis-py runs)
