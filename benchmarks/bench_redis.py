"""Redis rate limiting: seawall's RedisBackend against limits' async Redis storage.

Every variant runs against the same throwaway ``redis-server`` that this
module starts on a free port (no persistence), so no other process's traffic
shows up in the timings or in the server's command counts. Peers: limits'
moving window and fixed window on its async Redis storage, through both of
its clients (coredis, its default, and redis-py). Limits are set so high
that nothing is denied: this measures the admission path.

Figures:

* sequential: one ``hit()`` at a time, per call (the harness, interleaved);
* concurrent: 100 tasks hitting one key, decisions per second, interleaved
  repeats, medians;
* round trips: ``INFO commandstats`` deltas per decision (``CONFIG
  RESETSTAT`` before each variant; ``INFO`` and ``CONFIG`` left out). These
  count the commands a script runs (``TIME``, ``GET``, ``SET``) as well as
  the script itself, so the requests clients actually sent are counted
  separately with ``MONITOR`` (lines not run by a script). Under
  concurrency seawall pipelines its requests, so its network round trips are
  fewer than its requests.

Peers also include throttled-py (GCRA and fixed window on its async Redis
store).

For fleets (issue 17), on throwaway servers of their own:

* hang: a server frozen with SIGSTOP, 50 concurrent limiter callers (plus
  50 queued behind them) and 10 failing breaker calls, p100 of the wait
  against ``socket_timeout``;
* breaker closed path: a success through a breaker on Redis against the
  in-memory breaker, per call, and ``EVALSHA`` per success (commandstats);
* breaker server time per failure (``usec_per_call`` of ``EVALSHA``) with 0
  and with 1,000 failures on record;
* state propagation: a trip in one process until another rejects (pub/sub);
* ``usec_per_call`` per decision on each shard of a local 3-primary cluster,
  and the shards a fleet of 1,000,000 decisions/s needs on that figure.

Targets: exactly one request (one ``EVALSHA``) per decision; sequential at
least the best peer's; 100-concurrent throughput at least 2.5x the best
peer's; a closed breaker's success 0 round trips and within 2x the in-memory
breaker; server time per failure flat (within 1.5x) from 0 to 1,000 failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import limits
import redis.asyncio as aioredis
from limits.aio import storage as limits_storage
from limits.aio import strategies as limits_strategies
from throttled.asyncio import RateLimiterType, RedisStore, Throttled, per_sec

from _harness import BenchContext
from _redis_fleet import fleet
from seawall import RateLimiter
from seawall.backends import RedisBackend

NAME = "redis"
HUGE = 10**9  # a limit no benchmark reaches
CONCURRENCY = 100

Op = Callable[[], Awaitable[object]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def _redis_server() -> AsyncIterator[str | None]:
    """A private redis-server on a free port; yields its URL (``None`` if there is no redis-server)."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = _free_port()
    with tempfile.TemporaryDirectory() as directory:
        arguments = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", directory]
        process = await asyncio.create_subprocess_exec(
            binary, *arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            url = f"redis://127.0.0.1:{port}/0"
            client = aioredis.Redis.from_url(url)
            for _ in range(200):
                with contextlib.suppress(Exception):
                    await client.ping()
                    break
                await asyncio.sleep(0.025)
            await client.aclose()
            yield url
        finally:
            process.terminate()
            await process.wait()


async def _commands(client: aioredis.Redis) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT (INFO and CONFIG themselves left out).

    Commands that scripts run (``redis.call``) are counted too, under their own names.
    """
    stats: dict[str, Any] = await client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if not name.startswith(("cmdstat_info", "cmdstat_config"))
    }


async def _requests(url: str, admin: aioredis.Redis, op: Op, decisions: int) -> int:
    """Commands clients sent (MONITOR lines not run by a script) while ``decisions`` decisions were made."""
    marker = f"bench-redis-end-{time.monotonic_ns()}"
    watcher = aioredis.Redis.from_url(url, decode_responses=True)
    sent = 0
    try:
        async with watcher.monitor() as monitor:

            async def listen() -> None:
                nonlocal sent
                while True:
                    command = await monitor.next_command()
                    if command["client_type"] == "lua":
                        continue
                    if marker in command["command"]:
                        return
                    sent += 1

            listener = asyncio.ensure_future(listen())
            await _throughput(op, decisions)
            await admin.echo(marker)
            await listener
    finally:
        await watcher.aclose()
    return sent


async def _throughput(op: Op, total: int) -> float:
    """Decisions per second with ``CONCURRENCY`` tasks sharing ``total`` hits on one key."""
    per_task = total // CONCURRENCY

    async def worker() -> None:
        for _ in range(per_task):
            await op()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return per_task * CONCURRENCY / (time.perf_counter() - start)


def _limits_variants(url: str) -> dict[str, Op]:
    variants: dict[str, Op] = {}
    item = limits.RateLimitItemPerSecond(HUGE)
    for implementation in ("coredis", "redispy"):
        storage = limits_storage.RedisStorage(
            "async+" + url, implementation=implementation, key_prefix=f"bench-limits-{implementation}"
        )
        moving = limits_strategies.MovingWindowRateLimiter(storage)
        fixed = limits_strategies.FixedWindowRateLimiter(storage)
        # One key per variant: the strategies keep different data types under their keys.
        variants[f"limits moving window ({implementation})"] = lambda moving=moving: moving.hit(item, "moving")
        variants[f"limits fixed window ({implementation})"] = lambda fixed=fixed: fixed.hit(item, "fixed")
    store = RedisStore(server=url)
    for using in (RateLimiterType.GCRA, RateLimiterType.FIXED_WINDOW):
        throttle = Throttled(key=f"bench-throttled-{using.value}", using=using.value, quota=per_sec(HUGE), store=store)
        variants[f"throttled-py {using.value}"] = throttle.limit
    return variants


async def run(ctx: BenchContext) -> None:
    """Sequential cost, 100-concurrent throughput and server commands per decision, against limits."""
    async with _redis_server() as url:
        if url is None:
            print("\nredis: no redis-server binary; skipped")
            return
        backend = RedisBackend.from_url(url, prefix="bench", socket_timeout=5.0)
        admin = aioredis.Redis.from_url(url)
        try:
            await _run(ctx, url, backend, admin)
        finally:
            await backend.aclose()
            await admin.aclose()
    await fleet(ctx)


async def _run(ctx: BenchContext, url: str, backend: RedisBackend, admin: aioredis.Redis) -> None:
    gcra = RateLimiter(HUGE, 1.0, backend=backend, name="bench")
    fixed = RateLimiter(HUGE, 1.0, algorithm="fixed_window", backend=backend, name="bench")
    ours: dict[str, Op] = {
        "seawall GCRA": lambda: gcra.hit("k"),
        "seawall fixed window": lambda: fixed.hit("k"),
    }
    peers = _limits_variants(url)
    variants = {**ours, **peers}

    async def bare() -> None:
        pass

    # -- sequential, per call ---------------------------------------------------------
    calls = 300 if ctx.quick else 3_000
    sequential = await ctx.per_call(
        "redis: one hit at a time", {"bare": bare, **variants}, calls=calls, warmup=min(calls, 500)
    )

    # -- requests and server commands per decision ---------------------------------------
    decisions = 200 if ctx.quick else 2_000
    requests: dict[str, float] = {}
    evalsha: dict[str, float] = {}
    for label, op in variants.items():
        await admin.config_resetstat()
        await _throughput(op, decisions)
        calls = await _commands(admin)
        evalsha[label] = calls.get("evalsha", 0) / decisions
        ctx.record(
            "redis: server commands per decision (INFO commandstats)",
            label,
            sum(calls.values()) / decisions,
            "commands",
            decisions=decisions,
            evalsha=evalsha[label],
            calls=calls,
        )
        requests[label] = await _requests(url, admin, op, decisions) / decisions
        ctx.record("redis: client requests per decision (MONITOR)", label, requests[label], "requests")

    # -- 100 concurrent, throughput ----------------------------------------------------
    total = 2_000 if ctx.quick else 20_000
    repeats = 2 if ctx.quick else 7
    samples: dict[str, list[float]] = {label: [] for label in variants}
    labels = list(variants)
    for label in labels:  # warm-up: connections for 100 tasks, scripts loaded
        await _throughput(variants[label], total // 4)
    for repeat in range(repeats):
        for label in labels[repeat % len(labels) :] + labels[: repeat % len(labels)]:
            samples[label].append(await _throughput(variants[label], total))
    case = f"redis: {CONCURRENCY} concurrent tasks, one key"
    print(f"\n{case}")
    medians = {label: statistics.median(values) for label, values in samples.items()}
    for label, values in samples.items():
        ctx.record(case, label, medians[label], "hits/s", min=min(values), max=max(values), repeats=repeats)
    best_peer = max(peers, key=medians.__getitem__)
    for label in ours:
        ctx.record(case, f"{label} / best peer ({best_peer})", medians[label] / medians[best_peer], "x")
    fastest_peer = min(peers, key=lambda peer: sequential[peer].median_ns)
    for label in ours:
        ctx.record(
            "redis: one hit at a time",
            f"{label} decisions/s / best peer ({fastest_peer})",
            sequential[fastest_peer].median_ns / sequential[label].median_ns,
            "x",
        )

    if ctx.quick:
        return  # a smoke run states no targets
    for label in ours:
        ratio = sequential[fastest_peer].median_ns / sequential[label].median_ns
        ctx.target(
            "redis: one hit at a time",
            label,
            f"{label}: sequential decisions/s at least the best peer's",
            ratio >= 1.0,
            f"{1e9 / sequential[label].median_ns:,.0f} vs {1e9 / sequential[fastest_peer].median_ns:,.0f} "
            f"decisions/s ({fastest_peer}) = {ratio:.2f}x",
        )
        ctx.target(
            "redis: client requests per decision (MONITOR)",
            label,
            f"{label}: exactly one request (one EVALSHA, at most one round trip) per decision",
            requests[label] == 1.0 and evalsha[label] == 1.0,
            f"{requests[label]:.3f} requests and {evalsha[label]:.3f} EVALSHA (commandstats) per decision "
            f"over {decisions} decisions (peers' requests: "
            f"{', '.join(f'{peer} {requests[peer]:.2f}' for peer in peers)})",
        )
        ratio = medians[label] / medians[best_peer]
        ctx.target(
            case,
            label,
            f"{label}: {CONCURRENCY}-concurrent throughput at least 2.5x the best peer's",
            ratio >= 2.5,
            f"{medians[label]:,.0f} vs {medians[best_peer]:,.0f} hits/s ({best_peer}) = {ratio:.2f}x; "
            f"sequential {sequential[label].median_ns / 1e3:,.1f} vs "
            f"{sequential[best_peer].median_ns / 1e3:,.1f} us/hit",
        )
