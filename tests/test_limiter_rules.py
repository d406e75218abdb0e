"""Several rate rules per key: admitted only when every rule admits, atomically, consuming nothing on a denial."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from fractions import Fraction
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from seawall import (
    AsyncInfrastructure,
    ConfigurationError,
    FakeClock,
    MultiRateLimiter,
    ProtectionConfig,
    RateLimiter,
    RateLimitExceeded,
)
from seawall._config import load_toml
from seawall._limiter import _slot_key
from seawall.backends import MemoryRateLimitBackend, RateLimitRule, RedisBackend

pytestmark = pytest.mark.anyio

RULES = [{"limit": 10, "window": 1}, {"limit": 50, "window": 60}]


class Model:
    """Several GCRA rules in exact arithmetic: admit when every rule has room, then take from all."""

    def __init__(self, rules: list[tuple[int, int]]) -> None:
        self.rules = [(Fraction(window, limit), Fraction(window)) for limit, window in rules]
        self.tats = [Fraction(0)] * len(rules)

    def hit(self, now: Fraction) -> bool:
        after = [max(tat, now) + interval for tat, (interval, _) in zip(self.tats, self.rules, strict=True)]
        if any(tat - now > window for tat, (_, window) in zip(after, self.rules, strict=True)):
            return False
        self.tats = after
        return True


async def _burst(infra: AsyncInfrastructure, key: str, hits: int) -> int:
    """``hits`` concurrent calls of ``key``; how many were admitted."""
    admitted = 0

    async def one() -> None:
        nonlocal admitted
        try:
            await infra.execute_protected(key, anyio.lowlevel.checkpoint)
        except RateLimitExceeded:
            return
        admitted += 1

    async with anyio.create_task_group() as group:
        for _ in range(hits):
            group.start_soon(one)
    return admitted


async def test_a_thousand_concurrent_hits_admit_as_the_model_says() -> None:
    """1,000 concurrent hits on 10/s and 50/min, in bursts of 50 every half second: each burst as the model."""
    clock = FakeClock()
    model = Model([(10, 1), (50, 60)])
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", {"rate_limiter": RULES})
        seen, expected = [], []
        for step in range(20):
            now = Fraction(step, 2)
            clock.set(float(now))
            expected.append(sum(model.hit(now) for _ in range(50)))
            seen.append(await _burst(infra, "api", 50))
    assert seen == expected
    # The second's burst, then its drain of 5 per half second until the minute's 50 are spent, then the minute's drain.
    assert seen[:2] == [10, 5]
    assert sum(seen) == 57
    assert seen[-4:] == [0, 1, 0, 0]


async def test_a_denial_consumes_from_no_rule_and_retries_after_the_largest_wait() -> None:
    """The minute rule denies: the second's bucket is untouched, and retry_after is the minute's."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        rules = [{"limit": 10, "window": 1}, {"limit": 3, "window": 60}]
        await infra.configure_protection("api", {"rate_limiter": rules})
        assert await _burst(infra, "api", 3) == 3
        for _ in range(5):
            with pytest.raises(RateLimitExceeded) as denied:
                await infra.execute_protected("api", anyio.lowlevel.checkpoint)
        second, minute = await infra.rate_limiter.get_statuses("global", "api")
        assert (second.current_count, minute.current_count) == (3.0, 3.0)  # five denials took nothing
        assert denied.value.retry_after == pytest.approx(20.0)  # the minute rule's next unit, not the second's
        assert (denied.value.limit, denied.value.window) == (3.0, 60.0)
        clock.advance(1.0)
        second, _ = await infra.rate_limiter.get_statuses("global", "api")
        assert second.current_count == 0.0


async def test_the_longest_wait_wins_when_several_rules_deny() -> None:
    clock = FakeClock()
    limiter = MultiRateLimiter((RateLimiter(2, 1, clock=clock), RateLimiter(2, 10, clock=clock)))
    await limiter.hit("k")
    await limiter.hit("k")
    with pytest.raises(RateLimitExceeded) as denied:
        limiter.acquire_nowait("k")
    assert denied.value.retry_after == pytest.approx(5.0)  # both deny: 0.5 s and 5 s
    status = await limiter.status("k")
    assert (status.window, status.remaining) == (10.0, 0)


async def test_acquire_waits_for_every_rule_and_a_cancelled_waiter_takes_nothing() -> None:
    clock = FakeClock()
    limiter = MultiRateLimiter((RateLimiter(1, 1, clock=clock), RateLimiter(2, 10, clock=clock)))
    admitted: list[float] = []

    async def acquire() -> None:
        await limiter.acquire("k")
        admitted.append(clock.now())

    await acquire()
    async with anyio.create_task_group() as group:
        group.start_soon(acquire)  # the second's rule is full: waits a second
        await anyio.wait_all_tasks_blocked()
        assert admitted == [0.0]
        clock.advance(1.0)
    assert admitted == [0.0, 1.0]
    async with anyio.create_task_group() as group:
        group.start_soon(acquire)  # the ten-second rule is full: it waits 4 s
        await anyio.wait_all_tasks_blocked()
        group.cancel_scope.cancel()
    levels = [status.current_count for status in await limiter.statuses("k")]
    assert levels == pytest.approx([1.0, 1.8])  # nothing from the cancelled waiter
    async with anyio.create_task_group() as group:
        group.start_soon(acquire)
        await anyio.wait_all_tasks_blocked()
        clock.advance(3.0)  # at 4 s the ten-second rule is at 1.2 of 2: still full for a hit
        await anyio.wait_all_tasks_blocked()
        assert admitted == [0.0, 1.0]
        clock.advance(1.0)
    assert admitted == [0.0, 1.0, 5.0]  # when the ten-second rule had room for one again


async def test_the_plan_fast_path_and_bucket_handles_decide_as_hit() -> None:
    clock = FakeClock()
    limiter = MultiRateLimiter((RateLimiter(2, 1, clock=clock), RateLimiter(3, 60, clock=clock)))
    bucket = limiter.bucket("k")
    bucket.acquire_nowait()
    limiter.acquire_nowait("k", 1.0)
    with pytest.raises(RateLimitExceeded):
        bucket.acquire_nowait()
    clock.advance(1.0)
    async with limiter("k", wait=False):
        pass
    with pytest.raises(RateLimitExceeded):
        await limiter.hit("k")
    assert limiter.resident_buckets == 2
    await limiter.reset("k")
    assert (await limiter.hit("k")).remaining == 1
    assert "2.0/1.0s, 3.0/60.0s" in repr(limiter)
    assert (limiter.limit, limiter.window, limiter.name) == (2.0, 1.0, None)


@pytest.mark.parametrize(
    ("rules", "path", "words"),
    [
        ([], "api.rate_limiter", "at least one rule"),
        ([{"limit": 10, "window": 1}, {"limit": 10, "window": 1.0}], "api.rate_limiter[1]", "same rule as"),
        ([{"limit": 10, "window": 1}, {"limit": 0, "window": 60}], "api.rate_limiter[1].limit", "at least 1"),
        ([{"limit": 10, "window": 1}, {"limit": 5}], "api.rate_limiter[1].window", "required"),
        ([{"limit": 10, "window": 1}, "fast"], "api.rate_limiter[1]", "expected a mapping"),
    ],
)
async def test_bad_rule_lists_name_the_rule(rules: list[object], path: str, words: str) -> None:
    async with AsyncInfrastructure() as infra:
        with pytest.raises(ConfigurationError, match=words) as caught:
            await infra.configure_protection("api", {"rate_limiter": rules})
    assert caught.value.path == path


def test_one_rule_in_a_list_is_the_plain_section() -> None:
    config = ProtectionConfig.from_mapping({"rate_limiter": [{"limit": 10, "window": 1}]}, "api")
    assert config == ProtectionConfig.from_mapping({"rate_limiter": {"limit": 10, "window": 1}}, "api")
    several = ProtectionConfig.from_mapping({"rate_limiter": RULES}, "api")
    assert ProtectionConfig(rate_limiter=several.rate_limiter) == several


def test_a_multi_limiter_needs_two_distinct_rules() -> None:
    clock = FakeClock()
    with pytest.raises(ConfigurationError, match="at least two"):
        MultiRateLimiter((RateLimiter(1, 1, clock=clock),))
    with pytest.raises(ConfigurationError, match="same rule"):
        MultiRateLimiter((RateLimiter(1, 1, clock=clock), RateLimiter(1, 1, clock=clock)))


async def test_reconfiguring_from_one_rule_to_two_keeps_the_spent_budget() -> None:
    """10/s -> 10/s and 50/min: the second's bucket keeps its level; and back to one rule keeps the minute's."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        await infra.configure_protection("api", {"rate_limiter": {"limit": 10, "window": 1}})
        assert await _burst(infra, "api", 8) == 8
        await infra.configure_protection("api", {"rate_limiter": RULES})
        assert await _burst(infra, "api", 20) == 2  # not 10: the spent 8 carried over
        second, minute = await infra.rate_limiter.get_statuses("global", "api")
        assert (second.current_count, minute.current_count) == (10.0, 2.0)
        await infra.configure_protection("api", {"rate_limiter": {"limit": 50, "window": 60}})
        (only,) = await infra.rate_limiter.get_statuses("global", "api")
        assert only.current_count == pytest.approx(2.0)


# -- Redis: the same decision, one script ------------------------------------------------


@pytest.fixture
async def redis_backend(redis_url: str) -> AsyncIterator[RedisBackend]:
    """A backend on the shared server under a prefix of its own; its keys are deleted afterwards."""
    prefix = f"seawall-test-{uuid.uuid4().hex}"
    # A generous timeout (1,000 concurrent decisions on asyncio's debug loop), and "deny" so a timeout fails the test.
    async with RedisBackend.from_url(redis_url, prefix=prefix, socket_timeout=30, on_error="deny") as opened:
        yield opened
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.mark.redis
@pytest.mark.asyncio_only("redis-py's client runs on asyncio only")
async def test_redis_a_thousand_concurrent_hits_take_from_every_rule_or_none(redis_backend: RedisBackend) -> None:
    """On the server's clock, with windows long enough that nothing drains during the test: exact counts."""
    async with AsyncInfrastructure(backend=redis_backend) as infra:
        await infra.configure_protection(
            "api", {"rate_limiter": [{"limit": 10, "window": 1000}, {"limit": 50, "window": 60000}]}
        )
        assert await _burst(infra, "api", 1000) == 10
        second, minute = await infra.rate_limiter.get_statuses("global", "api")
        assert (second.remaining, minute.remaining) == (0, 40)  # 990 denials took nothing from the other rule
        assert (second.key, minute.key) == ("api:global", "api:global")


@pytest.mark.redis
@pytest.mark.asyncio_only("redis-py's client runs on asyncio only")
async def test_redis_the_issues_limits_admit_within_the_drain(redis_backend: RedisBackend) -> None:
    """10/s and 50/min: 1,000 concurrent hits admit the burst of 10 plus what drained while they ran."""
    async with AsyncInfrastructure(backend=redis_backend) as infra:
        await infra.configure_protection("api", {"rate_limiter": RULES})
        started = anyio.current_time()
        admitted = await _burst(infra, "api", 1000)
        elapsed = anyio.current_time() - started
        assert 10 <= admitted <= 10 + 10 * elapsed + 1
        _, minute = await infra.rate_limiter.get_statuses("global", "api")
        assert minute.current_count <= admitted  # the minute counted the admitted hits, never the denied ones
        assert minute.current_count >= admitted - 50 / 60 * elapsed - 1e-6


@pytest.mark.redis
@pytest.mark.asyncio_only("redis-py's client runs on asyncio only")
async def test_redis_denial_retry_after_is_the_largest_and_mixed_algorithms_work(redis_backend: RedisBackend) -> None:
    limiter = MultiRateLimiter(
        (
            RateLimiter(5, 1000, backend=redis_backend),
            RateLimiter(2, 500, algorithm="fixed_window", backend=redis_backend),
        )
    )
    with pytest.raises(anyio.WouldBlock):
        limiter.acquire_nowait("k")
    await limiter.hit("k")
    await limiter.acquire("k")
    with pytest.raises(RateLimitExceeded) as denied:
        await limiter.hit("k")
    assert denied.value.window == 500.0  # the fixed window denies (until its end); the GCRA rule has room
    assert 0 < denied.value.retry_after <= 500
    gcra, fixed = await limiter.statuses("k")
    assert gcra.current_count == pytest.approx(2.0, abs=0.01)  # (drained by the server's clock meanwhile)
    assert fixed.current_count == 2.0
    await limiter.reset("k")
    assert [status.current_count for status in await limiter.statuses("k")] == [0.0, 0.0]
    assert limiter.resident_buckets is None


def test_toml_arrays_of_tables_are_several_rules(tmp_path: Path) -> None:
    path = tmp_path / "seawall.toml"
    path.write_text(
        "[[protection.api.rate_limiter]]\nlimit = 10\nwindow = 1\n"
        "[[protection.api.rate_limiter]]\nlimit = 50\nwindow = 60\n"
    )
    (rules,) = [config.rate_limiter for config in load_toml(path).values()]
    assert isinstance(rules, tuple)
    assert [(rule.limit, rule.window) for rule in rules] == [(10, 1.0), (50, 60.0)]


@pytest.mark.parametrize("bucket", ["api:global", "", "}", "api:{team}", "a}b{c"])
def test_every_rules_key_of_a_bucket_is_in_one_cluster_slot(bucket: str) -> None:
    """The hash tag of the bucket: Redis Cluster runs the one script over every rule's key."""
    backend = RedisBackend(aioredis.Redis(), prefix="p")
    rules = [RateLimitRule(10, 1), RateLimitRule(50, 60, "fixed_window"), RateLimitRule(5, 3600, name="n")]
    names = [backend._rule(rule).key(_slot_key(bucket)) for rule in rules]
    assert len({key_slot(name) for name in names}) == 1
    assert len(set(names)) == 3


async def test_the_memory_backend_decides_several_rules_as_the_protocol_says() -> None:
    """MemoryRateLimitBackend.take_all: all or nothing; a rule that would admit reads admitted with no wait."""
    clock = FakeClock()
    backend = MemoryRateLimitBackend(clock=clock)
    rules = (RateLimitRule(2, 1), RateLimitRule(1, 60, "fixed_window"))
    admitted, _ = await backend.take_all("k", 1, rules)
    assert admitted
    admitted, (second, minute) = await backend.take_all("k", 1, rules)
    assert not admitted
    assert (second.admitted, second.retry_after, second.current_count) == (True, 0.0, 1.0)  # nothing taken
    assert (minute.admitted, minute.retry_after) == (False, 60.0)
