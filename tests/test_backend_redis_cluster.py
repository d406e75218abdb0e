"""RedisBackend on Redis Cluster: a 3-primary cluster this module starts once (and stops by PID).

Every bucket and breaker is one key, so one hash slot; decisions are
pipelined per primary. The cluster is made with ``redis-cli --cluster
create`` from three ``redis-server --cluster-enabled yes`` on free ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError

from redis_servers import Server, cluster, running, until
from seawall import BreakerState, CircuitBreaker, CircuitOpenError, MultiRateLimiter, RateLimiter, RateLimitExceeded
from seawall.backends import RedisBackend
from seawall.testing import capture_events

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


async def _admitted(limiter: RateLimiter | MultiRateLimiter, key: str) -> bool:
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


class _Resharding:
    """Moves one slot from ``source`` to ``target`` the way ``redis-cli --cluster reshard`` does, step by step."""

    def __init__(self, nodes: list[Server], source: int, target: int, slot: int) -> None:
        """Between ``nodes[source]`` and ``nodes[target]``; ``close()`` gives the slot back to the source."""
        self.nodes, self.source, self.target, self.slot = nodes, source, target, slot
        self.admins = [aioredis.Redis.from_url(node.url, decode_responses=True) for node in nodes]
        self.ids: list[str] = []

    async def open(self) -> None:
        self.ids = [await admin.execute_command("CLUSTER", "MYID") for admin in self.admins]
        for admin in self.admins:
            await admin.config_resetstat()

    async def start(self) -> None:
        """IMPORTING on the target, then MIGRATING on the source: the source answers ASK for keys it lacks."""
        await self.admins[self.target].execute_command(
            "CLUSTER", "SETSLOT", self.slot, "IMPORTING", self.ids[self.source]
        )
        await self.admins[self.source].execute_command(
            "CLUSTER", "SETSLOT", self.slot, "MIGRATING", self.ids[self.target]
        )

    async def keys(self, number: int) -> list[str]:
        found: list[str] = await self.admins[number].execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 1000)
        return found

    async def migrate(self, keys: list[str]) -> None:
        port = self.nodes[self.target].port
        await self.admins[self.source].execute_command("MIGRATE", "127.0.0.1", port, "", 0, 5000, "KEYS", *keys)

    async def finish(self, owner: int) -> None:
        """Give the slot to ``owner`` on every node (the target and the source first): from now on, MOVED."""
        others = [n for n in range(len(self.nodes)) if n not in (self.source, self.target)]
        for number in (self.target, self.source, *others):
            await self.admins[number].execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", self.ids[owner])

    async def errors(self, number: int, kind: str) -> int:
        stats = await self.admins[number].info("errorstats")
        return int(stats.get(f"errorstat_{kind}", {}).get("count", 0))

    async def close(self) -> None:
        """Put the slot back on the source, empty (best effort after a failure: that failure is the one reported)."""
        with contextlib.suppress(RedisError):
            for number in (self.source, self.target):
                await self.admins[number].execute_command("CLUSTER", "SETSLOT", self.slot, "STABLE")
                keys = await self.keys(number)
                if keys:
                    await self.admins[number].delete(*keys)  # (on the slot's owner: a passed test's target)
            await self.finish(self.source)
        for admin in self.admins:
            await admin.aclose()


async def _fail(breaker: CircuitBreaker) -> None:
    with pytest.raises(RuntimeError):
        async with breaker:
            raise RuntimeError("down")


async def _hits(limiter: RateLimiter | MultiRateLimiter, key: str, count: int = 40) -> int:
    return sum(await asyncio.gather(*(_admitted(limiter, key) for _ in range(count))))


async def test_a_slot_migrated_under_load_keeps_limits_exact(nodes: list[Server]) -> None:
    """A resharding moves the slot of three buckets and a breaker while decisions run: every one is Redis's.

    Before MIGRATE (ASK for the keys already moved or new), during it (TRYAGAIN
    for a multi-rule bucket whose keys are split between the two nodes) and
    after the hand-over (MOVED): exactly the limit admitted, the breaker's
    failures all counted in Redis, no backend error, and a process verifying
    meanwhile (its probe key in that slot) gets no ConfigurationError.
    """
    async with (
        RedisBackend.from_url(nodes[0].url, cluster=True, prefix="reshard", socket_timeout=5.0) as backend,
        RedisBackend.from_url(nodes[1].url, cluster=True, prefix="reshard", socket_timeout=5.0) as newcomer,
    ):
        assert await backend.verify()
        client = backend.client
        assert isinstance(client, RedisCluster)
        source = 0
        # The slot of the source's probe key (verify() writes and deletes <prefix>:v2:probe:<n> on each primary),
        # and a tag in it for the buckets and the breaker: a MultiRateLimiter's key k is tagged {~k}.
        probe = next(
            key
            for n in itertools.count()
            if client.nodes_manager.get_node_from_slot(key_slot(key := f"reshard:v2:probe:{n}".encode())).port
            == nodes[source].port
        )
        slot = key_slot(probe)
        tag = next(f"r{n}" for n in itertools.count() if key_slot(f"~r{n}".encode()) == slot)
        gcra = RateLimiter(100, 3600.0, backend=backend, name="a")
        fixed = RateLimiter(25, 3600.0, algorithm="fixed_window", backend=backend, name="c")
        multi = MultiRateLimiter(
            (
                RateLimiter(30, 3600.0, backend=backend, name="m1"),
                RateLimiter(1000, 3600.0, algorithm="fixed_window", backend=backend, name="m2"),
            )
        )
        one, other, both = f"{{~{tag}}}a", f"{{~{tag}}}c", tag
        breaker = CircuitBreaker(f"{{~{tag}}}db", failure_threshold=3, recovery_time=3600.0, backend=backend)
        reshard = _Resharding(nodes, source, 1, slot)
        await reshard.open()
        try:
            with capture_events() as events:
                # Before: every key on the source.
                assert await _hits(gcra, one) == 40
                assert await _hits(multi, both, 10) == 10
                await _fail(breaker)
                await reshard.start()
                # ASK window, nothing moved yet: the source's keys are served there, a new one on the target.
                assert await newcomer.verify()
                assert await _hits(gcra, one) == 40
                assert await _hits(fixed, other) == 25
                # The bucket and the breaker moved (the multi-rule bucket not yet): ASK for both.
                keys = await reshard.keys(source)
                await reshard.migrate([key for key in keys if key.endswith((one, f"{{~{tag}}}db"))])
                assert await _hits(gcra, one) == 20
                await _fail(breaker)
                status = await breaker.status()
                assert (status.state, status.failure_count, status.reachable) == (BreakerState.CLOSED, 2, True)
                # One key of the multi-rule bucket moved, one not: TRYAGAIN until MIGRATE moves the other.
                split = [key for key in keys if key.endswith(both)]
                assert len(split) == 2
                await reshard.migrate(split[:1])
                burst = asyncio.ensure_future(_hits(multi, both))

                async def refused() -> bool:
                    return await reshard.errors(source, "TRYAGAIN") > 0

                await until(refused)
                await reshard.migrate(split[1:])
                assert await burst == 20
                assert await reshard.keys(source) == []
                # Handed over: MOVED, then the new slot map.
                await reshard.finish(reshard.target)
                assert await _hits(gcra, one) == 0
                moved = await reshard.errors(source, "MOVED")
                assert moved > 0
                assert await _hits(fixed, other) == 0
                assert await _hits(multi, both) == 0
                await _fail(breaker)
                # The slot map was refreshed once: no decision goes to the old owner any more.
                assert await reshard.errors(source, "MOVED") == moved
                assert (await breaker.status()).state is BreakerState.OPEN
                assert (await CircuitBreaker(breaker.name, backend=newcomer).status()).state is BreakerState.OPEN
            assert [event.event for event in events if event.event[1] == "backend"] == []
            # Every kind of redirect was met on the way.
            assert [await reshard.errors(source, kind) > 0 for kind in ("ASK", "TRYAGAIN", "MOVED")] == [True] * 3
            # All on the target: the three buckets (the multi-rule one is two keys) and the breaker.
            assert len(await reshard.keys(reshard.target)) == 5
        finally:
            await reshard.close()


async def test_a_slot_migrated_to_a_new_node_is_followed(nodes: list[Server], tmp_path: Path) -> None:
    """Scaling out: a slot moves to a primary that joined after the client mapped the cluster (ASK, then MOVED)."""
    async with RedisBackend.from_url(nodes[0].url, cluster=True, prefix="grow", socket_timeout=5.0) as backend:
        limiter = RateLimiter(50, 3600.0, backend=backend, name="g")
        assert await _hits(limiter, "k") == 40  # the slot map is known now, without the new node
        client = backend.client
        assert isinstance(client, RedisCluster)
        slot = key_slot(b"grow:v2:rl:gcra:50.0:3600.0:1:g:k")
        source = next(
            number
            for number, node in enumerate(nodes)
            if node.port == client.nodes_manager.get_node_from_slot(slot).port
        )
        with running(tmp_path / "joined", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf") as joined:
            everyone = [*nodes, joined]
            reshard = _Resharding(everyone, source, len(nodes), slot)
            newcomer = aioredis.Redis.from_url(joined.url, decode_responses=True)
            try:
                await newcomer.execute_command("CLUSTER", "MEET", "127.0.0.1", nodes[0].port)

                async def joined_all() -> bool:
                    for server in everyone:
                        admin = aioredis.Redis.from_url(server.url, decode_responses=True)
                        known = await admin.execute_command("CLUSTER", "NODES")
                        await admin.aclose()
                        if len(str(known).strip().splitlines()) != len(everyone):
                            return False
                    # (and the new node has learned the slots: until then it answers CLUSTERDOWN)
                    return "cluster_state:ok" in str(await newcomer.execute_command("CLUSTER", "INFO"))

                await until(joined_all, 20.0)
                await reshard.open()
                await reshard.start()
                await reshard.migrate(await reshard.keys(source))
                with capture_events() as events:
                    assert await _hits(limiter, "k") == 10  # ASK: to a node the client did not know
                    await reshard.finish(reshard.target)
                    assert await _hits(limiter, "k") == 0  # MOVED: the new slot map has the new node
                    moved = await reshard.errors(source, "MOVED")
                    assert await _hits(limiter, "k") == 0
                    assert await reshard.errors(source, "MOVED") == moved  # (refreshed: no more redirects)
                assert [event.event for event in events if event.event[1] == "backend"] == []
                assert await reshard.errors(source, "ASK") > 0
                assert await reshard.errors(source, "MOVED") > 0
            finally:
                await reshard.close()
                await newcomer.aclose()
        # The joined node is stopped: the others forget it (before gossip could bring it back).
        ids = [await _cluster_id(node) for node in nodes]
        for node in nodes:
            admin = aioredis.Redis.from_url(node.url, decode_responses=True)
            known = str(await admin.execute_command("CLUSTER", "NODES")).strip().splitlines()
            for line in known:
                if line.split()[0] not in ids:
                    await admin.execute_command("CLUSTER", "FORGET", line.split()[0])
            await admin.aclose()


async def _cluster_id(node: Server) -> str:
    admin = aioredis.Redis.from_url(node.url, decode_responses=True)
    found: str = await admin.execute_command("CLUSTER", "MYID")
    await admin.aclose()
    return found
