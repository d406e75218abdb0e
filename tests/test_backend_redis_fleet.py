"""RedisBackend for fleets: outage versus misconfiguration, the hard timeout bound, breakers without round trips.

Every test here starts its own throwaway server (``redis_servers.py``): they
make replicas, rename commands, freeze (SIGSTOP), restart and count commands,
none of which may touch the shared server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from redis_servers import Server, free_port, running, until
from seawall import (
    AsyncInfrastructure,
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    ConfigurationError,
    RateLimiter,
    RateLimitExceeded,
)
from seawall._awaitables import DONE
from seawall.backends import BreakerPolicy, RateLimitRule, RedisBackend
from seawall.backends.redis import classify
from seawall.testing import capture_events

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.asyncio_only("redis-py's client runs on asyncio only")]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A throwaway Redis 7 primary."""
    with running(tmp_path) as started:
        yield started


async def _hit(limiter: RateLimiter, key: str = "k") -> bool:
    try:
        await limiter.hit(key)
    except RateLimitExceeded:
        return False
    return True


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


async def _calls(admin: aioredis.Redis) -> dict[str, int]:
    stats = await admin.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}
    for command in ("info", "config|resetstat", "ping", "subscribe"):
        calls.pop(command, None)
    return calls


# -- outage versus misconfiguration ------------------------------------------------


async def test_a_primary_passes_verify_and_the_coordinator_runs_it(server: Server) -> None:
    """verify() is True on a writable primary, and AsyncInfrastructure.__aenter__ runs it."""
    async with RedisBackend.from_url(server.url, prefix="ok", socket_timeout=5.0) as backend:
        assert "verified=False" in repr(backend)
        async with AsyncInfrastructure(backend=backend):
            assert "verified=True" in repr(backend)
        assert await backend.verify()


async def test_a_replica_is_a_misconfiguration(server: Server, tmp_path: Path) -> None:
    """Pointed at a read-only replica, verify(), the coordinator's entry and the first decision raise, naming it."""
    with running(tmp_path / "replica", "--replicaof", "127.0.0.1", str(server.port)) as replica:
        async with RedisBackend.from_url(replica.url, prefix="replica", socket_timeout=5.0) as backend:
            with pytest.raises(ConfigurationError, match="'replica'") as raised:
                await backend.verify()
            assert raised.value.path == "backend"
            with pytest.raises(ConfigurationError, match="read-only replica"):
                async with AsyncInfrastructure(backend=backend):
                    pass  # pragma: no cover - the entry raises
            with pytest.raises(ConfigurationError, match="'replica'"):
                await RateLimiter(5, 60.0, backend=backend).hit("k")
            with pytest.raises(ConfigurationError, match="'replica'"):
                async with CircuitBreaker("svc", backend=backend):
                    pass  # pragma: no cover - the admission raises


async def test_a_cluster_node_behind_a_plain_client_is_a_misconfiguration(tmp_path: Path) -> None:
    """A plain client on a cluster node (whose other keys would answer MOVED) fails verify with reason 'cluster'."""
    with running(tmp_path, "--cluster-enabled", "yes") as node:
        async with RedisBackend.from_url(node.url, prefix="mode", socket_timeout=5.0) as backend:
            with pytest.raises(ConfigurationError, match=r"'cluster'.*cluster=True"):
                await backend.verify()
    assert classify(ResponseError("MOVED 3999 127.0.0.1:6381")) == ("cluster", True)


async def test_a_server_without_hello_is_a_protocol_misconfiguration(tmp_path: Path) -> None:
    """RESP3 against a server without HELLO (Redis 5, or HELLO renamed away) is reason 'protocol'; RESP2 works."""
    with running(tmp_path, "--rename-command", "HELLO", "") as old:
        async with RedisBackend.from_url(old.url, prefix="proto", protocol=3, socket_timeout=5.0) as backend:
            with pytest.raises(ConfigurationError, match="'protocol'"):
                await backend.verify()
        async with RedisBackend.from_url(old.url, prefix="proto", protocol=2, socket_timeout=5.0) as backend:
            assert await backend.verify()


async def test_a_server_refusing_scripts_is_a_misconfiguration(tmp_path: Path) -> None:
    """A server whose EVALSHA is disabled (renamed away) fails verify with reason 'scripts'."""
    with running(tmp_path, "--rename-command", "EVALSHA", "") as locked:
        async with RedisBackend.from_url(locked.url, prefix="noscripts", socket_timeout=5.0) as backend:
            with pytest.raises(ConfigurationError, match="'scripts'"):
                await backend.verify()


async def test_redis_6_with_verbatim_script_replication_still_decides(tmp_path: Path) -> None:
    """Redis 6.2 with lua-replicate-commands no: the scripts switch to effects replication and decide exactly."""
    with running(tmp_path, "--lua-replicate-commands", "no", kind="redis6") as old:
        admin = aioredis.Redis.from_url(old.url)
        try:
            # What a script that does not ask for effects replication meets there:
            with pytest.raises(ResponseError) as refused:
                await admin.eval("redis.call('TIME'); return redis.call('SET', KEYS[1], '1')", 1, "x")
            assert classify(refused.value) == ("script_replication", True)
        finally:
            await admin.aclose()
        async with RedisBackend.from_url(old.url, prefix="six", on_error="deny", socket_timeout=5.0) as backend:
            assert await backend.verify()
            limiter = RateLimiter(3, 60.0, backend=backend)
            assert [await _hit(limiter) for _ in range(5)] == [True, True, True, False, False]
            breaker = CircuitBreaker("svc", failure_threshold=1, recovery_time=30.0, backend=backend)
            await _fail(breaker)
            assert (await breaker.status()).state is BreakerState.OPEN


async def test_a_server_down_at_start_is_an_outage_checked_when_it_answers(tmp_path: Path) -> None:
    """Nothing listening at start: the coordinator starts, decisions fail open; once a server answers, it verifies."""
    port = free_port()
    backend = RedisBackend.from_url(f"redis://127.0.0.1:{port}/0", prefix="late", socket_timeout=0.5)
    async with backend, AsyncInfrastructure(backend=backend) as infra:
        await infra.configure_protection("api", {"rate_limiter": {"limit": 2, "window": 60}})
        assert "verified=False" in repr(backend)
        limiter = RateLimiter(2, 60.0, backend=backend)
        assert [await _hit(limiter) for _ in range(3)] == [True, True, True]  # on_error="allow"
        with running(tmp_path, port=port):
            assert [await _hit(limiter) for _ in range(3)] == [True, True, False]
            assert "verified=True" in repr(backend)


async def test_error_replies_are_errors_with_a_reason_never_silent(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """At run time an error reply follows on_error, logs at error level (one line a second per reason) and emits it."""
    admin = aioredis.Redis.from_url(server.url)
    async with RedisBackend.from_url(server.url, prefix="err", socket_timeout=5.0) as backend:
        rule = RateLimitRule(5, 60.0, "gcra", "wrong")
        assert (await backend.take("probe", 1, rule)).admitted
        [key] = [key async for key in admin.scan_iter(match="err:*")]
        await admin.delete(key)
        await admin.lpush(key, "not a bucket")
        with capture_events() as events, caplog.at_level(logging.WARNING, logger="seawall"):
            outcomes = [(await backend.take("probe", 1, rule)).admitted for _ in range(5)]
        assert outcomes == [True] * 5
        failures = [event for event in events if event.name == "error" and event.event[1] == "backend"]
        assert [event.metadata["reason"] for event in failures] == ["wrong_type"] * 5
        assert all(event.metadata["error_reply"] for event in failures)
        limiter_events = [event for event in events if event.name == "rate_limiter_exception"]
        assert {event.metadata["reason"] for event in limiter_events} == {"wrong_type"}
        errors = [record for record in caplog.records if "redis_error_reply" in record.getMessage()]
        assert len(errors) == 1
        assert errors[0].levelno == logging.ERROR
        assert "reason='wrong_type'" in errors[0].getMessage()
        # A failover that turns the primary into a replica: READONLY replies, reason "replica", at error level.
        await admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        with capture_events() as events, caplog.at_level(logging.WARNING, logger="seawall"):
            assert (await backend.take("fresh", 1, RateLimitRule(5, 60.0))).admitted
        [failure] = [event for event in events if event.event == ("seawall", "backend", "error")]
        assert failure.metadata["reason"] == "replica"
    await admin.aclose()


# -- the hard timeout bound ---------------------------------------------------------

TIMEOUT = 1.0
#: The contract's bound is socket_timeout + 50 ms; the test allows more on a loaded shared machine
#: (the benchmark reports the real figure; a coverage run beside a busy core took 0.5 s + 0.302),
#: yet less than the 1.5x to 3x of the defect it guards against (a queued caller waiting out the
#: batch ahead of it, then its own).
BOUND = TIMEOUT + 0.45


async def _timed(coroutine: Any) -> float:
    start = time.monotonic()
    try:
        await coroutine
    except Exception:
        pass
    return time.monotonic() - start


@pytest.mark.parametrize("policy", ["allow", "deny"])
async def test_every_caller_returns_within_the_socket_timeout_during_a_hang(server: Server, policy: str) -> None:
    """Frozen server: 50 concurrent callers, and callers queued later behind them, each return within the bound."""
    async with RedisBackend.from_url(server.url, prefix="hang", on_error=policy, socket_timeout=TIMEOUT) as backend:  # type: ignore[arg-type]
        limiter = RateLimiter(10**6, 60.0, backend=backend)
        breaker = CircuitBreaker("svc", failure_threshold=10**6, recovery_time=30.0, backend=backend)
        await limiter.hit("warm")
        assert await _admits(breaker)  # the breaker's view is known
        server.freeze()
        first = [asyncio.ensure_future(_timed(limiter.hit(f"k{i}"))) for i in range(50)]
        await asyncio.sleep(TIMEOUT / 2)  # these queue behind a batch that will time out
        later = [asyncio.ensure_future(_timed(limiter.hit(f"j{i}"))) for i in range(50)]
        failing = [asyncio.ensure_future(_timed(_fail(breaker))) for _ in range(10)]
        waits = await asyncio.gather(*first, *later, *failing)
        server.thaw()
        assert max(waits) < BOUND, sorted(waits)[-5:]
        # And once the server answers again, decisions go through.
        assert await _hit(limiter, "after")


async def test_a_decision_outliving_an_earlier_deadline_is_not_cut_short(server: Server) -> None:
    """A link's one timer fires at an earlier decision's deadline, and lets the one on the wire run to its own."""
    async with RedisBackend.from_url(server.url, prefix="watch", on_error="deny", socket_timeout=TIMEOUT) as backend:
        limiter = RateLimiter(10**6, 60.0, backend=backend)
        await limiter.hit("warm")
        first = time.monotonic()
        await limiter.hit("first")  # the timer is set for its deadline, TIMEOUT from now
        await asyncio.sleep(TIMEOUT / 2)
        server.freeze()
        slow = asyncio.ensure_future(limiter.hit("slow"))  # its deadline: 1.5 TIMEOUT from the first
        await asyncio.sleep(first + TIMEOUT + 0.05 - time.monotonic())  # just past the first one's deadline
        server.thaw()
        await slow  # (a timeout would raise RateLimiterError under "deny")


async def test_the_first_decision_on_a_frozen_server_is_bounded_too(server: Server) -> None:
    """The first use verifies, reconnects and decides, all under the caller's one deadline."""
    async with RedisBackend.from_url(server.url, prefix="hang", socket_timeout=TIMEOUT) as backend:
        server.freeze()
        limiter = RateLimiter(5, 60.0, backend=backend)
        waits = await asyncio.gather(*(_timed(limiter.hit(f"k{i}")) for i in range(20)))
        server.thaw()
        assert max(waits) < BOUND


# -- breakers: round trips, propagation, restore ---------------------------------


async def test_a_closed_breaker_costs_no_round_trip_per_success_one_per_failure(server: Server) -> None:
    """Counted with INFO commandstats: successes 0 scripts, a failure 1, rejections while open 0, a trial 1."""
    admin = aioredis.Redis.from_url(server.url, decode_responses=True)
    async with RedisBackend.from_url(server.url, prefix="rt", socket_timeout=5.0) as backend:
        breaker = CircuitBreaker("svc", failure_threshold=3, recovery_time=0.3, backend=backend)
        assert await _admits(breaker)  # learns the state (one admit) and subscribes
        await until(lambda: _subscribed(admin))
        assert await _admits(breaker)  # learns it again, now that changes made elsewhere will be heard
        await admin.config_resetstat()
        for _ in range(100):
            assert await _admits(breaker)
        assert (await _calls(admin)).get("evalsha", 0) == 0
        await _fail(breaker)
        assert (await _calls(admin))["evalsha"] == 1
        await _fail(breaker)
        await _fail(breaker)  # opens it: three failures, three scripts
        assert (await _calls(admin))["evalsha"] == 3
        for _ in range(20):
            assert not await _admits(breaker)
        assert (await _calls(admin))["evalsha"] == 3
        await asyncio.sleep(0.31)  # recovery_time on the real clock
        assert await _admits(breaker)  # the trial: one admission, one settle; it closes the breaker
        assert (await _calls(admin))["evalsha"] == 5
    await admin.aclose()


async def test_closed_calls_on_redis_are_decided_in_process_and_failures_still_reach_it(server: Server) -> None:
    """A closed success (async with, call()) awaits nothing and costs no script; a failure of either is counted."""
    admin = aioredis.Redis.from_url(server.url, decode_responses=True)
    async with RedisBackend.from_url(server.url, prefix="rt", socket_timeout=5.0) as backend:
        breaker = CircuitBreaker("svc", failure_threshold=4, recovery_time=30.0, backend=backend)
        assert await _admits(breaker)
        await until(lambda: _subscribed(admin))
        assert await _admits(breaker)
        await admin.config_resetstat()
        entered = breaker.__aenter__()
        exited = breaker.__aexit__(None, None, None)
        # Nothing to await: the finished awaitable of the in-memory path, no coroutine, no shielded settle.
        assert entered is DONE
        assert exited is DONE
        await entered
        await exited

        async def ok() -> int:
            return 1

        async def boom() -> None:
            raise RuntimeError("down")

        for _ in range(50):
            assert await breaker.call(ok) == 1
        with anyio.CancelScope() as scope:  # a cancelled block decides nothing, and costs nothing
            async with breaker:
                scope.cancel()
                await anyio.sleep(1)
        assert (await _calls(admin)).get("evalsha", 0) == 0
        with pytest.raises(RuntimeError):
            await breaker.call(boom)
        await _fail(breaker)
        assert (await _calls(admin))["evalsha"] == 2
        assert (await breaker.status()).failure_count == 2
        with anyio.CancelScope() as scope:  # a failure inside a cancelled scope still reaches Redis (shielded)
            scope.cancel()
            with pytest.raises(RuntimeError):
                await breaker.call(boom)
        await _fail(breaker)  # the fourth failure opens it
        assert breaker.state is BreakerState.OPEN
        assert not await _admits(breaker)
    await admin.aclose()


async def test_a_closed_block_admitted_before_a_trip_elsewhere_decides_nothing(server: Server) -> None:
    """A failure of a block admitted in the old period is not counted in the one a trip started (generations)."""
    admin = aioredis.Redis.from_url(server.url, decode_responses=True)
    async with (
        RedisBackend.from_url(server.url, prefix="rt", socket_timeout=5.0) as one,
        RedisBackend.from_url(server.url, prefix="rt", socket_timeout=5.0) as other,
    ):
        first = CircuitBreaker("gen", failure_threshold=1, recovery_time=30.0, backend=one)
        second = CircuitBreaker("gen", failure_threshold=1, recovery_time=30.0, backend=other)
        assert await _admits(first)

        async def late() -> None:
            async with first:  # admitted while closed, in process
                await second.trip()
                await second.reset()  # a new closed period began meanwhile
                raise RuntimeError("late")

        with pytest.raises(RuntimeError):
            await late()
        snapshot = await first.status()
        assert snapshot.state is BreakerState.CLOSED
        assert snapshot.failure_count == 0
    await admin.aclose()


async def test_blocks_of_two_periods_on_redis_each_count_in_their_own(server: Server) -> None:
    """A block still running from before a reset decides nothing; one entered after it counts (both in process)."""
    async with RedisBackend.from_url(server.url, prefix="rt", socket_timeout=5.0) as backend:
        breaker = CircuitBreaker("periods", failure_threshold=5, recovery_time=30.0, backend=backend)
        assert await _admits(breaker)

        async def old_period() -> None:
            async with breaker:  # admitted in the first closed period
                await breaker.trip()
                await breaker.reset()  # a new period: the reply tells this process at once
                async with breaker:  # admitted in the new period while the old block runs
                    pass
                await _fail(breaker)  # counts: it is of the current period
                raise RuntimeError("old")

        with pytest.raises(RuntimeError, match="old"):
            await old_period()
        assert (await breaker.status()).failure_count == 1  # the old block's failure decided nothing
        await _fail(breaker)
        assert (await breaker.status()).failure_count == 2


async def _subscribed(admin: aioredis.Redis) -> bool:
    return bool(await admin.pubsub_numsub("rt:v2:cb") == [("rt:v2:cb", 1)])


async def test_failure_accounting_is_bounded_per_call(server: Server) -> None:
    """1,000 failures on record leave at most ten time buckets in the hash: each call reads O(1) of them."""
    admin = aioredis.Redis.from_url(server.url, decode_responses=True)
    async with RedisBackend.from_url(server.url, prefix="o1", socket_timeout=5.0) as backend:
        policy = BreakerPolicy(failure_threshold=10**6, window=60.0, recovery_time=1.0, half_open_max_calls=1)
        for _ in range(1000):
            await backend.breaker_settle("svc", policy, 0.0, None, "failure")
        buckets = (await admin.hget("o1:v2:cb:svc", "c") or "").split()
        assert len(buckets) <= 20  # (bucket, count) pairs
        assert sum(int(count) for count in buckets[1::2]) == 1000
        assert (await backend.breaker_snapshot("svc", policy, 0.0)).failure_count == 1000
    await admin.aclose()


async def test_state_changes_reach_another_process_by_pub_sub(server: Server) -> None:
    """A trip in one process rejects in another within the bound, without that one asking the server."""
    async with (
        RedisBackend.from_url(server.url, prefix="ps", socket_timeout=5.0) as one,
        RedisBackend.from_url(server.url, prefix="ps", socket_timeout=5.0) as other,
    ):
        first = CircuitBreaker("db", recovery_time=30.0, backend=one)
        second = CircuitBreaker("db", recovery_time=30.0, backend=other)
        assert await _admits(first)
        assert await _admits(second)
        admin = aioredis.Redis.from_url(server.url)
        await until(lambda: _numsub(admin, b"ps:v2:cb", 2))
        await first.trip()
        took = await until(lambda: _rejects(second), bound=1.0)
        assert took < 0.5  # contract: 50 ms; the benchmark reports the figure
        await first.reset()
        await until(lambda: _admits(second), bound=1.0)
        await admin.aclose()


async def _numsub(admin: aioredis.Redis, channel: bytes, count: int) -> bool:
    return bool(await admin.pubsub_numsub(channel) == [(channel, count)])


async def _rejects(breaker: CircuitBreaker) -> bool:
    return not await _admits(breaker)


async def test_an_open_state_lost_in_a_restart_is_published_again(server: Server) -> None:
    """A non-persistent server restarts empty: the process that knew the breaker OPEN writes it back."""
    async with RedisBackend.from_url(server.url, prefix="lost", socket_timeout=0.5) as knower:
        breaker = CircuitBreaker("db", recovery_time=60.0, backend=knower)
        await breaker.trip()
        admin = aioredis.Redis.from_url(server.url)
        await until(lambda: _numsub(admin, b"lost:v2:cb", 1))
        await admin.aclose()
        server.restart()
        async with RedisBackend.from_url(server.url, prefix="lost", socket_timeout=5.0) as newcomer:
            fresh = CircuitBreaker("db", recovery_time=60.0, backend=newcomer)
            await until(lambda: _open(fresh), bound=5.0)
            status = await fresh.status()
            assert 50.0 < status.retry_after <= 60.0


async def _open(breaker: CircuitBreaker) -> bool:
    return (await breaker.status()).state is BreakerState.OPEN


@pytest.mark.parametrize("policy", ["allow", "local", "deny"])
async def test_breakers_during_an_outage_follow_the_policy(server: Server, policy: str) -> None:
    """Redis down: "allow"/"local" decide on the process's view, "deny" rejects once the outage is seen; all recover."""
    async with RedisBackend.from_url(server.url, prefix="out", on_error=policy, socket_timeout=0.5) as backend:  # type: ignore[arg-type]
        breaker = CircuitBreaker("svc", failure_threshold=100, recovery_time=30.0, backend=backend)
        assert await _admits(breaker)  # the view: closed
        server.kill()
        await _fail(breaker)  # admitted by the view; its failure cannot be recorded (a warning, never raised)
        assert await _admits(breaker) is (policy != "deny")
        server.restart()
        await until(lambda: _admits(breaker), bound=5.0)
