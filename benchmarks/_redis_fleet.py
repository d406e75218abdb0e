"""The fleet figures of bench_redis.py: hangs, breakers on Redis, propagation, per-shard server CPU.

Each section starts its own throwaway server(s) on free ports (never the
shared one), and stops them by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from _harness import BenchContext
from seawall import CircuitBreaker, CircuitOpenError, RateLimiter
from seawall.backends import BreakerPolicy, RedisBackend

#: socket_timeout of the hang section; the contract bounds every wait by it plus 50 ms.
HANG_TIMEOUT = 0.25


def _free_port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 < 65536:
            return port


@contextlib.contextmanager
def _cluster(directory: Path) -> Iterator[list[int]]:
    """Three primaries made into one cluster by redis-cli; yields their ports."""
    cli = shutil.which("redis-cli")
    assert cli is not None
    with contextlib.ExitStack() as stack:
        ports = []
        for number in range(3):
            home = directory / f"node{number}"
            config = str(home / "nodes.conf")
            ports.append(
                stack.enter_context(_server(home, "--cluster-enabled", "yes", "--cluster-config-file", config))[1]
            )
        addresses = [f"127.0.0.1:{port}" for port in ports]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            check=True,
            timeout=60,
        )
        for port in ports:  # every node must see the cluster up, not only the first
            for _ in range(400):
                info = subprocess.run(
                    [cli, "-p", str(port), "cluster", "info"], capture_output=True, text=True, check=False
                )
                if "cluster_state:ok" in info.stdout:
                    break
                time.sleep(0.05)
        yield ports


@contextlib.contextmanager
def _server(directory: Path, *arguments: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    binary = shutil.which("redis-server")
    assert binary is not None
    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(
        [*command, "--dir", str(directory), *arguments], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(400):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.1):
                break
            time.sleep(0.025)
        yield process, port
    finally:
        os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        process.wait(timeout=10)


@contextlib.asynccontextmanager
async def _admin(port: int) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0", decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def _evalsha(admin: aioredis.Redis) -> tuple[int, float]:
    stats: dict[str, Any] = await admin.info("commandstats")
    found = stats.get("cmdstat_evalsha", {"calls": 0, "usec_per_call": 0.0})
    return int(found["calls"]), float(found["usec_per_call"])


async def fleet(ctx: BenchContext) -> None:
    """Every fleet section, each on its own servers."""
    if shutil.which("redis-server") is None:
        print("\nredis fleet: no redis-server binary; skipped")
        return
    with tempfile.TemporaryDirectory() as directory:
        home = Path(directory)
        await _hang(ctx, home / "hang")
        await _breakers(ctx, home / "breakers")
        await _shards(ctx, home / "shards")


async def _timed(coroutine: Any) -> float:
    start = time.perf_counter()
    with contextlib.suppress(Exception):
        await coroutine
    return time.perf_counter() - start


async def _failing(breaker: CircuitBreaker) -> None:
    async with breaker:
        raise RuntimeError("down")


async def _hang(ctx: BenchContext, directory: Path) -> None:
    """p100 of every wait while the server is frozen (SIGSTOP): limiter callers, queued ones, breaker calls."""
    case = f"redis: frozen server, socket_timeout {HANG_TIMEOUT * 1e3:.0f} ms"
    print(f"\n{case}")
    rounds = 2 if ctx.quick else 5
    worst: dict[str, list[float]] = {"limiter, 50 concurrent": [], "limiter, queued behind": [], "breaker call": []}
    with _server(directory) as (process, port):
        url = f"redis://127.0.0.1:{port}/0"
        for _ in range(rounds):
            async with RedisBackend.from_url(url, prefix="hang", socket_timeout=HANG_TIMEOUT) as backend:
                limiter = RateLimiter(10**9, 60.0, backend=backend)
                breaker = CircuitBreaker("svc", failure_threshold=10**6, backend=backend)
                await limiter.hit("warm")
                async with breaker:
                    pass
                os.kill(process.pid, signal.SIGSTOP)
                first = [asyncio.ensure_future(_timed(limiter.hit(f"k{i}"))) for i in range(50)]
                await asyncio.sleep(HANG_TIMEOUT / 2)
                later = [asyncio.ensure_future(_timed(limiter.hit(f"j{i}"))) for i in range(50)]
                calls = [asyncio.ensure_future(_timed(_failing(breaker))) for _ in range(10)]
                worst["limiter, 50 concurrent"].append(max(await asyncio.gather(*first)))
                worst["limiter, queued behind"].append(max(await asyncio.gather(*later)))
                worst["breaker call"].append(max(await asyncio.gather(*calls)))
                os.kill(process.pid, signal.SIGCONT)
    for label, values in worst.items():
        ctx.record(case, f"{label}: p100 wait", statistics.median(values) * 1e3, "ms", max=max(values) * 1e3)
    if not ctx.quick:
        p100 = max(max(values) for values in worst.values())
        ctx.target(
            case,
            "seawall",
            "every decision and breaker call returns within socket_timeout + 50 ms during a hang",
            p100 <= HANG_TIMEOUT + 0.05,
            f"p100 {p100 * 1e3:.0f} ms over {rounds} rounds of 50 + 50 limiter callers and 10 breaker calls "
            f"(socket_timeout {HANG_TIMEOUT * 1e3:.0f} ms)",
        )


async def _breakers(ctx: BenchContext, directory: Path) -> None:
    with _server(directory) as (_, port):
        url = f"redis://127.0.0.1:{port}/0"
        async with (
            RedisBackend.from_url(url, prefix="cb", socket_timeout=5.0) as backend,
            RedisBackend.from_url(url, prefix="cb", socket_timeout=5.0) as other,
            _admin(port) as admin,
        ):
            await _closed_path(ctx, backend, admin)
            await _closed_path_rated(ctx, backend, admin)
            await _failure_cost(ctx, backend, admin)
            await _rated_failure_cost(ctx, backend, admin)
            await _propagation(ctx, backend, other)


async def _through(breaker: CircuitBreaker) -> None:
    async with breaker:
        pass


async def _bare() -> None:
    pass


async def _subscribed(remote: CircuitBreaker, admin: aioredis.Redis) -> None:
    """Let ``remote``'s backend subscribe (its view decides from then on); then zero the server's counts."""
    await _through(remote)
    await asyncio.sleep(0.1)
    await _through(remote)
    await admin.config_resetstat()


async def _closed_path(ctx: BenchContext, backend: RedisBackend, admin: aioredis.Redis) -> None:
    remote = CircuitBreaker("closed", backend=backend)
    memory = CircuitBreaker("closed")

    await _subscribed(remote, admin)
    calls = 2_000 if ctx.quick else 20_000
    results = await ctx.per_call(
        "redis: breaker, a success while closed",
        {"bare": _bare, "in-memory breaker": lambda: _through(memory), "breaker on Redis": lambda: _through(remote)},
        calls=calls,
    )
    done = sum(result.calls * (result.repeats + 1) for label, result in results.items() if label == "breaker on Redis")
    evalsha = (await _evalsha(admin))[0]
    ctx.record("redis: breaker, a success while closed", "EVALSHA per success", evalsha / done, "round trips")
    if not ctx.quick:
        ratio = results["breaker on Redis"].median_ns / results["in-memory breaker"].median_ns
        ctx.target(
            "redis: breaker, a success while closed",
            "seawall",
            "a closed breaker's success on Redis: 0 round trips, and within 2x the in-memory breaker",
            evalsha == 0 and ratio <= 2.0,
            f"{evalsha} EVALSHA over {done:,} successes; {results['breaker on Redis'].median_ns:,.0f} vs "
            f"{results['in-memory breaker'].median_ns:,.0f} ns per call = {ratio:.2f}x",
        )


async def _closed_path_rated(ctx: BenchContext, backend: RedisBackend, admin: aioredis.Redis) -> None:
    """A rate-mode breaker's closed success on Redis: counted in the process, sent in one batch per 100 ms."""
    case = "redis: rate breaker, a success while closed"
    rated: dict[str, Any] = {"failure_rate": 0.5, "failure_threshold": None, "minimum_calls": 20}
    remote = CircuitBreaker("closed-rated", backend=backend, **rated)
    memory = CircuitBreaker("closed-rated", **rated)
    counting = CircuitBreaker("closed-counting")

    await _subscribed(remote, admin)
    started = time.monotonic()
    calls = 2_000 if ctx.quick else 20_000
    results = await ctx.per_call(
        case,
        {
            "bare": _bare,
            "in-memory breaker, count mode": lambda: _through(counting),
            "in-memory breaker, failure_rate": lambda: _through(memory),
            "breaker on Redis, failure_rate": lambda: _through(remote),
        },
        calls=calls,
    )
    elapsed = time.monotonic() - started
    label = "breaker on Redis, failure_rate"
    done = sum(result.calls * (result.repeats + 1) for name, result in results.items() if name == label)
    # A loop that never yields runs no timer: the batch goes out once the event loop runs again.
    evalsha = (await _evalsha(admin))[0]
    await asyncio.sleep(0.25)
    flushed = (await _evalsha(admin))[0]
    waiting = (await remote.status()).calls
    ctx.record(case, "EVALSHA per success (before the loop yields)", evalsha / done, "round trips")
    ctx.record(case, "EVALSHA once the loop ran 250 ms (the batches)", flushed, "round trips")
    ctx.record(case, "successes Redis counted (the window's calls)", waiting, "calls")
    if not ctx.quick:
        ratio = results[label].median_ns / results["in-memory breaker, failure_rate"].median_ns
        ctx.target(
            case,
            "seawall",
            "a rate breaker's closed success on Redis: no round trip of its own, within 2x the in-memory one",
            evalsha / done < 0.01 and ratio <= 2.0,
            f"{evalsha} EVALSHA over {done:,} successes in {elapsed:.1f} s ({flushed} once the loop ran); "
            f"{results[label].median_ns:,.0f} vs {results['in-memory breaker, failure_rate'].median_ns:,.0f} ns "
            f"per call = {ratio:.2f}x",
        )


async def _failure_cost(ctx: BenchContext, backend: RedisBackend, admin: aioredis.Redis) -> None:
    """Server time of one failure's script, with 0 and 1,000 failures already on record."""
    case = "redis: breaker, server time per failure"
    policy = BreakerPolicy(failure_threshold=10**9, window=600.0, recovery_time=30.0, half_open_max_calls=1)
    measured = 200 if ctx.quick else 2_000
    figures: dict[int, float] = {}
    for on_record in (0, 100, 1_000):
        name = f"failures-{on_record}"
        for _ in range(on_record):
            await backend.breaker_settle(name, policy, 0.0, None, "failure")
        samples = []
        for _ in range(3):
            await admin.config_resetstat()
            # A fresh breaker for "0 on record" each time, so its record stays near zero while measured.
            target = f"{name}-{len(samples)}" if on_record == 0 else name
            for _ in range(measured // 10 if on_record == 0 else measured):
                await backend.breaker_settle(target, policy, 0.0, None, "failure")
            samples.append((await _evalsha(admin))[1])
        figures[on_record] = statistics.median(samples)
        ctx.record(case, f"{on_record:,} failures on record", figures[on_record], "usec/call (commandstats)")
    if not ctx.quick:
        ratio = figures[1_000] / figures[0]
        ctx.target(
            case,
            "seawall",
            "server time per failure flat (within 1.5x) from 0 to 1,000 failures on record",
            ratio <= 1.5,
            f"{figures[0]:.2f} / {figures[100]:.2f} / {figures[1_000]:.2f} usec per call with 0 / 100 / 1,000 "
            f"on record = {ratio:.2f}x (the failure list it replaces: 7 / 46 / 443 usec)",
        )


async def _rated_failure_cost(ctx: BenchContext, backend: RedisBackend, admin: aioredis.Redis) -> None:
    """A rate breaker's failure (with the successes waiting before it): server time with 0 and 100,000 calls counted."""
    case = "redis: rate breaker, server time per failure"
    policy = BreakerPolicy(10**9, 600.0, 30.0, 1, failure_rate=1.0, minimum_calls=10**9)
    measured = 200 if ctx.quick else 2_000
    figures: dict[int, float] = {}
    for counted in (0, 100_000):
        name = f"rated-{counted}"
        for _ in range(counted):
            backend.breaker_succeed_local(name, policy, None)
        await backend.breaker_settle(name, policy, 0.0, None, "failure")  # sends them
        await admin.config_resetstat()
        for _ in range(measured):
            backend.breaker_succeed_local(name, policy, None)  # one waiting success rides on each failure
            await backend.breaker_settle(name, policy, 0.0, None, "failure")
        figures[counted] = (await _evalsha(admin))[1]
        ctx.record(case, f"{counted:,} calls counted in the window", figures[counted], "usec/call (commandstats)")
    if not ctx.quick:
        ratio = figures[100_000] / figures[0]
        ctx.target(
            case,
            "seawall",
            "a rate breaker's server time per failure flat (within 1.5x) from 0 to 100,000 calls in the window",
            ratio <= 1.5,
            f"{figures[0]:.2f} / {figures[100_000]:.2f} usec per call = {ratio:.2f}x",
        )


async def _propagation(ctx: BenchContext, backend: RedisBackend, other: RedisBackend) -> None:
    """A trip in one process until another rejects on its own view (no round trip of its own)."""
    case = "redis: breaker state change reaches another process"
    one = CircuitBreaker("spread", recovery_time=60.0, backend=backend)
    two = CircuitBreaker("spread", recovery_time=60.0, backend=other)
    async with one:
        pass
    async with two:
        pass
    await asyncio.sleep(0.1)
    async with two:
        pass  # a view confirmed under the subscription
    samples = []
    for _ in range(5 if ctx.quick else 30):
        await one.reset()
        await _until(two, admitting=True)
        start = time.perf_counter()
        await one.trip()
        await _until(two, admitting=False)
        samples.append(time.perf_counter() - start)
    ctx.record(
        case, "trip -> rejected elsewhere, median", statistics.median(samples) * 1e3, "ms", max=max(samples) * 1e3
    )
    if not ctx.quick:
        ctx.target(
            case,
            "seawall",
            "a state change reaches the other processes within 50 ms (pub/sub)",
            max(samples) <= 0.05,
            f"median {statistics.median(samples) * 1e3:.2f} ms, max {max(samples) * 1e3:.2f} ms over {len(samples)}",
        )


async def _until(breaker: CircuitBreaker, *, admitting: bool) -> None:
    for _ in range(1_000_000):
        if await _admits(breaker) == admitting:
            return
        await asyncio.sleep(0)


async def _admits(breaker: CircuitBreaker) -> bool:
    try:
        async with breaker:
            return True
    except CircuitOpenError:
        return False


async def _shards(ctx: BenchContext, directory: Path) -> None:
    """usec_per_call of each decision on each primary of a local 3-primary cluster."""
    if shutil.which("redis-cli") is None:
        return
    case = "redis: server CPU per decision, 3-shard cluster"
    print(f"\n{case}")
    with _cluster(directory) as ports:
        url = f"redis://127.0.0.1:{ports[0]}/0"
        async with RedisBackend.from_url(url, cluster=True, prefix="shard", socket_timeout=5.0) as backend:
            limiter = RateLimiter(10**9, 1.0, backend=backend)
            assert await backend.verify()
            for port in ports:
                async with _admin(port) as admin:
                    await admin.config_resetstat()
            total = 3_000 if ctx.quick else 30_000
            keys = [f"user-{number}" for number in range(300)]

            async def worker(offset: int) -> None:
                for number in range(total // 100):
                    await limiter.hit(keys[(offset + number * 7) % len(keys)])

            start = time.perf_counter()
            await asyncio.gather(*(worker(offset) for offset in range(100)))
            elapsed = time.perf_counter() - start
            per_shard = []
            for number, port in enumerate(ports):
                async with _admin(port) as admin:
                    calls, usec = await _evalsha(admin)
                per_shard.append(usec)
                ctx.record(case, f"shard {number + 1}: EVALSHA usec_per_call", usec, "usec", decisions=calls)
            usec = statistics.median(per_shard)
            ctx.record(
                case, "client throughput on this machine (the client saturates first)", total / elapsed, "decisions/s"
            )
            # One core per shard spends usec_per_call of script time per decision, plus its network I/O; at
            # 70% busy on script time alone a shard carries 0.7e6 / usec decisions/s.
            shards = math.ceil(1_000_000 * usec / 1e6 / 0.7)
            ctx.record(case, "shards for 1,000,000 decisions/s (script time, 70% busy)", shards, "shards")
