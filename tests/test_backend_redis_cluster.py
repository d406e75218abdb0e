"""RedisBackend on Redis Cluster: a 3-primary cluster this module starts once (and stops by PID).

Every bucket and breaker is one key, so one hash slot; decisions are
pipelined per primary. The cluster is made with ``redis-cli --cluster
create`` from three ``redis-server --cluster-enabled yes`` on free ports.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from redis_servers import Server, cluster, until
from seawall import CircuitBreaker, CircuitOpenError, RateLimiter, RateLimitExceeded
from seawall.backends import RedisBackend

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.asyncio_only("redis-py's client runs on asyncio only")]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    """Three primaries in one cluster, for the whole module."""
    with cluster(Path(tmp_path_factory.mktemp("cluster"))) as started:
        yield started


@pytest.fixture
async def backend(nodes: list[Server]) -> AsyncIterator[RedisBackend]:
    """A backend owning a RedisCluster client, built by from_url(cluster=True)."""
    # A generous socket timeout: a cluster client's first call (slot discovery, connections,
    # script loads) takes ~0.1 s, past the default 0.5 s on a loaded machine's debug-mode loop.
    async with RedisBackend.from_url(nodes[0].url, cluster=True, prefix="fleet", socket_timeout=5.0) as opened:
        yield opened


async def _admitted(limiter: RateLimiter, key: str) -> bool:
    try:
        await limiter.hit(key)
    except RateLimitExceeded:
        return False
    return True


async def _evalsha_per_node(nodes: list[Server]) -> list[int]:
    counts = []
    for node in nodes:
        admin = aioredis.Redis.from_url(node.url)
        stats = await admin.info("commandstats")
        counts.append(int(stats.get("cmdstat_evalsha", {}).get("calls", 0)))
        await admin.aclose()
    return counts


async def _reset_stats(nodes: list[Server]) -> None:
    for node in nodes:
        admin = aioredis.Redis.from_url(node.url)
        await admin.config_resetstat()
        await admin.aclose()


async def test_from_url_builds_a_cluster_client_and_verifies(nodes: list[Server]) -> None:
    """from_url(cluster=True) and ?cluster=true build a RedisCluster (no quiet plain client); verify() passes."""
    for url, options in ((nodes[1].url, {"cluster": True}), (nodes[2].url + "?cluster=true", {})):
        # (A generous socket timeout: a first cluster call can take over 0.5 s on a slow, debug-mode loop.)
        async with RedisBackend.from_url(url, prefix="build", socket_timeout=5.0, **options) as built:  # type: ignore[arg-type]
            assert isinstance(built.client, RedisCluster)
            assert await built.verify()
            assert "cluster" in repr(built)


async def test_a_borrowed_cluster_client_shares_exact_limits(nodes: list[Server]) -> None:
    """RedisBackend(RedisCluster(...)): 100 concurrent hits on each of 12 keys over the shards admit exactly 5."""
    client = RedisCluster(host="127.0.0.1", port=nodes[0].port)
    async with RedisBackend(client, prefix="borrowed") as backend:
        assert await backend.verify()  # (its probe runs one script on each primary)
        await _reset_stats(nodes)
        limiter = RateLimiter(5, 3600.0, backend=backend)
        keys = [f"user-{number}" for number in range(12)]
        outcomes = await asyncio.gather(*(_admitted(limiter, key) for key in keys for _ in range(100)))
        assert sum(outcomes) == 5 * len(keys)
        per_node = await _evalsha_per_node(nodes)
        # One script per decision, each on the shard of its key, and every shard used.
        assert sum(per_node) == 1200
        assert all(count > 0 for count in per_node)
    assert await client.ping()  # borrowed: left open
    await client.aclose()


async def test_each_bucket_and_breaker_is_one_key(backend: RedisBackend, nodes: list[Server]) -> None:
    """A bucket is one key and a breaker one key, each on the node serving its slot."""
    limiter = RateLimiter(1, 60.0, backend=backend, name="one")
    for key in ("a", "b", "c", "d", "e", "f"):
        await limiter.hit(key)
    breaker = CircuitBreaker("db", failure_threshold=1, recovery_time=30.0, backend=backend)
    with pytest.raises(RuntimeError):
        async with breaker:
            raise RuntimeError("down")
    found = []
    for node in nodes:
        admin = aioredis.Redis.from_url(node.url, decode_responses=True)
        found += [key async for key in admin.scan_iter(match="fleet:v2:*")]
        await admin.aclose()
    assert len([key for key in found if ":rl:" in key]) == 6
    assert [key for key in found if ":cb:" in key] == ["fleet:v2:cb:db"]


async def test_a_rate_breaker_is_one_key_and_counts_across_clients(nodes: list[Server]) -> None:
    """A failure_rate breaker keeps its counters in its one key: two cluster clients' successes add up there."""
    async with (
        RedisBackend.from_url(nodes[0].url, cluster=True, prefix="rated", socket_timeout=5.0) as one,
        RedisBackend.from_url(nodes[2].url, cluster=True, prefix="rated", socket_timeout=5.0) as other,
    ):
        options: dict[str, Any] = {"failure_threshold": None, "failure_rate": 0.5, "minimum_calls": 4}
        first = CircuitBreaker("api", backend=one, **options)
        second = CircuitBreaker("api", backend=other, **options)
        for breaker in (first, second, first, second):
            async with breaker:
                pass
        await first.status()  # sends the first client's two
        status = await second.status()  # and the second's
        assert (status.calls, status.failure_rate) == (4, 0.0)
        found = []
        for node in nodes:
            admin = aioredis.Redis.from_url(node.url, decode_responses=True)
            found += [key async for key in admin.scan_iter(match="rated:v2:*")]
            await admin.aclose()
        assert found == ["rated:v2:cb:api"]
        await first.reset()


async def test_breaker_state_crosses_shards_and_processes(nodes: list[Server]) -> None:
    """A breaker tripped through one cluster client rejects in another (pub/sub reaches every node's subscribers)."""
    # A generous socket timeout: a cluster client's first call (slot discovery, connections, script
    # loads) takes ~0.1 s, several times that on the suite's debug-mode loop, past the default 0.5 s.
    async with (
        RedisBackend.from_url(nodes[0].url, cluster=True, prefix="cross", socket_timeout=5.0) as one,
        RedisBackend.from_url(nodes[2].url, cluster=True, prefix="cross", socket_timeout=5.0) as other,
    ):
        first = CircuitBreaker("api", recovery_time=30.0, backend=one)
        second = CircuitBreaker("api", recovery_time=30.0, backend=other)
        async with second:
            pass
        await first.trip()

        async def rejected() -> bool:
            try:
                async with second:
                    return False
            except CircuitOpenError:
                return True

        await until(rejected)


async def test_a_moved_slot_is_followed(backend: RedisBackend, nodes: list[Server]) -> None:
    """After a slot moves to another primary, the next decision meets MOVED, learns the layout and decides there."""
    limiter = RateLimiter(1, 60.0, backend=backend, name="moved")
    assert await _admitted(limiter, "warm")  # the slot layout is known now
    bucket = b"fleet:v2:rl:gcra:1.0:60.0:5:moved:mover"
    slot = key_slot(bucket)
    admins = [aioredis.Redis.from_url(node.url, decode_responses=True) for node in nodes]
    try:
        ids = [await admin.execute_command("CLUSTER", "MYID") for admin in admins]
        client = backend.client
        assert isinstance(client, RedisCluster)
        serving = client.nodes_manager.get_node_from_slot(slot)
        owner = next(number for number, node in enumerate(nodes) if node.port == serving.port)
        target = (owner + 1) % len(nodes)
        for number in (target, owner, *(n for n in range(len(nodes)) if n not in (owner, target))):
            await admins[number].execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
        assert await _admitted(limiter, "mover")
        assert not await _admitted(limiter, "mover")
        assert await admins[target].exists(bucket.decode()) == 1
    finally:
        await admins[target].delete(bucket.decode())
        for number in (owner, target, *(n for n in range(len(nodes)) if n not in (owner, target))):
            await admins[number].execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[owner])
        for admin in admins:
            await admin.aclose()
