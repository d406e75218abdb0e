"""ConnectionPool vs asyncpg.create_pool, on the real PostgreSQL server, in one run.

Targets (issue 5):

* Uncontended checkout + return bookkeeping (no reset on either side) at most
  0.2x asyncpg.Pool's acquire + release.
* Throughput of 200 tasks x 50 ``SELECT 1`` through a pool of the same size at
  least asyncpg.Pool's, once with asyncpg's default reset on release (ours:
  ``AsyncpgFactory()``, the same ``Connection.reset()``), once with reset
  disabled on both sides (asyncpg: a no-op ``reset=`` callback; ours:
  ``AsyncpgFactory(reset=False)``).

Throughput runs are interleaved (ours, asyncpg, asyncpg, ours, ...) and the
median of the repeats is reported, so load from other processes on the shared
machine hits both sides alike.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from _harness import BenchContext, ratio
from seawall import ConnectionPool
from seawall.integrations.asyncpg import AsyncpgFactory

NAME = "pool"
HOST = os.environ.get("SEAWALL_TEST_PG_HOST", "127.0.0.1")
PORT = int(os.environ.get("SEAWALL_TEST_PG_PORT", "5432"))
DSN = os.environ.get("SEAWALL_TEST_POSTGRES_DSN", f"postgresql://postgres@{HOST}:{PORT}/test")
SIZE = 10
SETTINGS = {"application_name": "seawall-bench-pool"}


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Asyncpg's ``reset=`` hook doing nothing: its pool then only rolls back open transactions."""


def _postgres_answers() -> bool:
    try:
        with socket.create_connection((HOST, PORT), timeout=1.0):
            return True
    except OSError:
        return False


async def _throughput(acquire: Callable[[], Any], tasks: int, queries: int) -> tuple[float, float]:
    """SELECT 1 per second, and this process's CPU microseconds per SELECT.

    ``tasks`` tasks each run ``queries`` checkouts. The CPU figure shows what
    the pool can change: the server's work and the socket round trips are the
    same for both pools.
    """

    async def worker() -> None:
        for _ in range(queries):
            async with acquire() as conn:
                await conn.fetchval("SELECT 1")

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    done = tasks * queries
    return done / (time.perf_counter() - start), (time.process_time() - cpu) / done * 1e6


async def _pools(reset: bool) -> tuple[ConnectionPool[Any], Any]:
    ours: ConnectionPool[Any] = ConnectionPool(
        AsyncpgFactory(DSN, reset=reset, server_settings=SETTINGS), size=SIZE, timeout=60.0
    )
    await ours.start()
    extra = {} if reset else {"reset": _no_reset}
    theirs = await asyncpg.create_pool(DSN, min_size=SIZE, max_size=SIZE, server_settings=SETTINGS, **extra)
    return ours, theirs


async def _bookkeeping(ctx: BenchContext) -> None:
    ours, theirs = await _pools(reset=False)
    bulkhead: ConnectionPool[None] = ConnectionPool(None, size=SIZE)
    await bulkhead.start()
    try:

        async def bare() -> None:
            pass

        async def seawall_pool() -> None:
            async with ours.checkout():
                pass

        async def seawall_bulkhead() -> None:
            async with bulkhead.checkout():
                pass

        async def asyncpg_pool() -> None:
            async with theirs.acquire():
                pass

        results = await ctx.per_call(
            "pool: uncontended checkout+return, no reset",
            {
                "bare": bare,
                "seawall ConnectionPool (asyncpg, reset=False)": seawall_pool,
                "seawall bulkhead (factory=None)": seawall_bulkhead,
                "asyncpg.Pool acquire+release (no-op reset)": asyncpg_pool,
            },
            calls=2_000 if ctx.quick else 20_000,
        )
    finally:
        await ours.close()
        await bulkhead.close()
        await theirs.close()
    our_ns = results["seawall ConnectionPool (asyncpg, reset=False)"].overhead_ns or 0.0
    their_ns = results["asyncpg.Pool acquire+release (no-op reset)"].overhead_ns or 0.0
    ctx.record("pool: bookkeeping", "asyncpg.Pool / seawall", ratio(our_ns, their_ns), "x")
    ctx.target(
        "pool: bookkeeping",
        "checkout+return",
        "uncontended bookkeeping at most 0.2x asyncpg.Pool's",
        our_ns <= 0.2 * their_ns,
        f"{our_ns / 1000:.2f} us vs {their_ns / 1000:.2f} us = {our_ns / their_ns if their_ns else 0:.3f}x",
    )


async def _with_reset_per_call(ctx: BenchContext) -> None:
    ours, theirs = await _pools(reset=True)
    try:

        async def bare() -> None:
            pass

        async def seawall_pool() -> None:
            async with ours.checkout():
                pass

        async def asyncpg_pool() -> None:
            async with theirs.acquire():
                pass

        await ctx.per_call(
            "pool: uncontended checkout+return, default reset (1 round trip)",
            {"bare": bare, "seawall ConnectionPool (asyncpg)": seawall_pool, "asyncpg.Pool": asyncpg_pool},
            calls=200 if ctx.quick else 2_000,
            warmup=200,
        )
    finally:
        await ours.close()
        await theirs.close()


async def _throughput_case(ctx: BenchContext, reset: bool) -> None:
    tasks, queries = (200, 5) if ctx.quick else (200, 50)
    repeats = 2 if ctx.quick else 7
    label = "default reset" if reset else "reset disabled"
    case = f"pool: {tasks} tasks x {queries} SELECT 1, size {SIZE}, {label}"
    ours, theirs = await _pools(reset=reset)
    samples: dict[str, list[float]] = {"seawall": [], "asyncpg": []}
    cpu: dict[str, list[float]] = {"seawall": [], "asyncpg": []}
    runs: dict[str, Callable[[], Awaitable[tuple[float, float]]]] = {
        "seawall": lambda: _throughput(ours.checkout, tasks, queries),
        "asyncpg": lambda: _throughput(theirs.acquire, tasks, queries),
    }
    try:
        for name in runs:  # warm-up: statement caches, server backends
            await runs[name]()
        for repeat in range(repeats):
            order = ["seawall", "asyncpg"] if repeat % 2 == 0 else ["asyncpg", "seawall"]
            for name in order:
                rate, cpu_us = await runs[name]()
                samples[name].append(rate)
                cpu[name].append(cpu_us)
    finally:
        await ours.close()
        await theirs.close()
    print(f"\n{case}")
    medians = {}
    for name, values in samples.items():
        medians[name] = statistics.median(values)
        ctx.record(case, name, medians[name], "SELECT/s", min=min(values), max=max(values), repeats=repeats)
        ctx.record(case, f"{name} client CPU", statistics.median(cpu[name]), "us/SELECT")
    ctx.record(case, "seawall / asyncpg", medians["seawall"] / medians["asyncpg"], "x")
    ctx.target(
        case,
        "throughput",
        f"throughput at least asyncpg.Pool's ({label})",
        medians["seawall"] >= medians["asyncpg"],
        f"{medians['seawall']:,.0f} vs {medians['asyncpg']:,.0f} SELECT/s = "
        f"{medians['seawall'] / medians['asyncpg']:.2f}x",
    )


async def run(ctx: BenchContext) -> None:
    """Bookkeeping per call, then throughput under contention, both against asyncpg.Pool."""
    if not _postgres_answers():
        print(f"\npool: PostgreSQL is not answering on {HOST}:{PORT}; skipped")
        return
    await _bookkeeping(ctx)
    await _with_reset_per_call(ctx)
    await _throughput_case(ctx, reset=True)
    await _throughput_case(ctx, reset=False)
