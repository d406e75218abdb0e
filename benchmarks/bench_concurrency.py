"""Concurrency limiting and the rate-mode breaker: admission cost against the peers, in one run.

Targets (issue 20), as overhead over a bare ``await noop()`` in the same run:

* ``ConcurrencyLimiter(algorithm="fixed")`` admission + release at most 1.2x
  ``anyio.CapacityLimiter``'s and at most seawall's own bulkhead
  (``checkout_nowait``/``checkin_nowait``) + 300 ns;
* an adaptive algorithm at most 1 µs more than ``fixed`` (its update runs per
  window, not per sample: a sample is a clock read and three additions);
* a rate-mode breaker's closed path (it counts successes, in time buckets)
  within 2x the count mode's.

Also, in virtual time (a ``FakeClock`` discrete-event simulation, the same
model as ``tests/test_concurrency.py``): an upstream with a true capacity of
``C = 50`` concurrent calls (20 ms each, the rest queued FIFO, so latency
grows with its queue) under 3x overload. Reported: the adaptive limit's
convergence from ``initial_limit=5`` and from 500, and the p99 latency of the
admitted calls over the unloaded latency (goal: within 3x, where a fixed limit
of 500 lets it pass 10x). Outside ``--quick`` the curves are drawn to
``docs/benchmarks/concurrency-convergence.png``.

Peers: ``anyio.CapacityLimiter`` (``acquire_nowait``/``release``, and ``async
with``), ``asyncio.Semaphore``. Every variant is an ``async def`` doing one
operation, so the variant's own coroutine cancels out against ``bare``.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import statistics
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from _harness import BenchContext
from seawall import CircuitBreaker, ConcurrencyLimiter, ConcurrencyLimitExceeded, ConnectionPool, FakeClock

NAME = "concurrency"


async def noop() -> None:
    pass


def _admission_variants(bulkhead: ConnectionPool[None]) -> dict[str, Callable[[], Awaitable[object]]]:
    fixed = ConcurrencyLimiter(algorithm="fixed", limit=1000)
    gradient2 = ConcurrencyLimiter(algorithm="gradient2", initial_limit=100)
    vegas = ConcurrencyLimiter(algorithm="vegas", initial_limit=100)
    aimd = ConcurrencyLimiter(algorithm="aimd", initial_limit=100)
    capacity = anyio.CapacityLimiter(1000)
    semaphore = asyncio.Semaphore(1000)

    async def bare() -> None:
        await noop()

    def limiter_op(limiter: ConcurrencyLimiter) -> Callable[[], Awaitable[object]]:
        acquire, release = limiter.acquire_nowait, limiter.release

        async def op() -> None:
            ticket = acquire()
            await noop()
            release(ticket)

        return op

    async def bulkhead_op() -> None:
        lease = bulkhead.checkout_nowait()
        await noop()
        bulkhead.checkin_nowait(lease)

    async def capacity_op() -> None:
        capacity.acquire_nowait()
        await noop()
        capacity.release()

    async def semaphore_op() -> None:
        await semaphore.acquire()
        await noop()
        semaphore.release()

    return {
        "bare": bare,
        "seawall ConcurrencyLimiter fixed": limiter_op(fixed),
        "seawall ConcurrencyLimiter gradient2": limiter_op(gradient2),
        "seawall ConcurrencyLimiter vegas": limiter_op(vegas),
        "seawall ConcurrencyLimiter aimd": limiter_op(aimd),
        "seawall bulkhead checkout_nowait": bulkhead_op,
        "anyio.CapacityLimiter acquire_nowait": capacity_op,
        "asyncio.Semaphore acquire": semaphore_op,
    }


def _block_variants() -> dict[str, Callable[[], Awaitable[object]]]:
    fixed = ConcurrencyLimiter(algorithm="fixed", limit=1000)
    gradient2 = ConcurrencyLimiter(algorithm="gradient2", initial_limit=100)
    capacity = anyio.CapacityLimiter(1000)
    semaphore = asyncio.Semaphore(1000)

    async def bare() -> None:
        await noop()

    async def fixed_with() -> None:
        async with fixed():
            await noop()

    async def gradient2_with() -> None:
        async with gradient2():
            await noop()

    async def capacity_with() -> None:
        async with capacity:
            await noop()

    async def semaphore_with() -> None:
        async with semaphore:
            await noop()

    return {
        "bare": bare,
        "seawall async with limiter() fixed": fixed_with,
        "seawall async with limiter() gradient2": gradient2_with,
        "anyio.CapacityLimiter async with": capacity_with,
        "asyncio.Semaphore async with": semaphore_with,
    }


def _breaker_variants() -> dict[str, Callable[[], Awaitable[object]]]:
    counting = CircuitBreaker("count-mode", failure_threshold=5)
    rated = CircuitBreaker("rate-mode", failure_rate=0.5, failure_threshold=None)
    slow = CircuitBreaker("slow-mode", failure_rate=0.5, slow_call_duration=1.0, slow_call_rate=0.5)

    async def bare() -> None:
        await noop()

    def with_op(breaker: CircuitBreaker) -> Callable[[], Awaitable[object]]:
        async def op() -> None:
            async with breaker:
                await noop()

        return op

    def call_op(breaker: CircuitBreaker) -> Callable[[], Awaitable[object]]:
        async def op() -> None:
            await breaker.call(noop)

        return op

    def permit_op(breaker: CircuitBreaker) -> Callable[[], Awaitable[object]]:
        # The coordinator's form: a plain permit's success needs no settling (count mode only).
        async def op() -> None:
            permit = breaker.admit_nowait()
            await noop()
            if not permit.plain:
                breaker.settle_nowait(permit)

        return op

    return {
        "bare": bare,
        "seawall count mode (async with)": with_op(counting),
        "seawall rate mode (async with)": with_op(rated),
        "seawall rate + slow-call mode (async with)": with_op(slow),
        "seawall count mode (call)": call_op(counting),
        "seawall rate mode (call)": call_op(rated),
        "seawall count mode (admit_nowait/settle_nowait)": permit_op(counting),
        "seawall rate mode (admit_nowait/settle_nowait)": permit_op(rated),
    }


CAPACITY = 50
SERVICE = 0.02
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


def simulate(limiter: ConcurrencyLimiter, clock: FakeClock, seconds: float) -> tuple[list[float], list[float]]:
    """The limit every 0.5 s of virtual time, and the latencies of the calls of the last half."""
    gap = SERVICE / CAPACITY / 3.0
    workers = [0.0] * CAPACITY
    done: list[tuple[float, int, float, float]] = []  # (end, seq, ticket, arrival)
    arrivals = int(seconds / gap)
    curve: list[float] = []
    latencies: list[float] = []
    seq = index = 0
    while index < arrivals or done:
        arrival = index * gap if index < arrivals else math.inf
        if done and done[0][0] <= arrival:
            end, _, ticket, started = heapq.heappop(done)
            clock.set(end)
            limiter.release(ticket)
            if started >= seconds / 2:
                latencies.append(end - started)
        else:
            clock.set(arrival)
            index += 1
            try:
                ticket = limiter.acquire_nowait()
            except ConcurrencyLimitExceeded:
                continue
            begin = max(arrival, heapq.heappop(workers))
            heapq.heappush(workers, begin + SERVICE)
            seq += 1
            heapq.heappush(done, (begin + SERVICE, seq, ticket, arrival))
        while len(curve) <= int(clock.now() * 2):
            curve.append(limiter.limit)
    return curve, latencies


def _p99(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else math.nan


def convergence(ctx: BenchContext) -> None:
    """The adaptive limit against the simulated upstream; p99 against a fixed limit of 500."""
    seconds = 10.0 if ctx.quick else 30.0
    curves: dict[str, list[float]] = {}
    for algorithm in ("gradient2", "vegas"):
        for start in (5, 500):
            clock = FakeClock()
            limiter = ConcurrencyLimiter(algorithm=algorithm, initial_limit=start, window=0.5, clock=clock)  # type: ignore[arg-type]
            curve, latencies = simulate(limiter, clock, seconds)
            label = f"{algorithm} from {start}"
            curves[label] = curve
            settled = curve[len(curve) // 2 :]
            p99 = _p99(latencies) / SERVICE
            ctx.record("concurrency: convergence (virtual time)", f"{label}: final limit", curve[-1], "calls")
            ctx.record("concurrency: convergence (virtual time)", f"{label}: p99 / unloaded latency", p99, "x")
            ctx.target(
                "concurrency: convergence (virtual time)",
                label,
                f"{label}: settles within [C/2, 2C] (C={CAPACITY}), p99 within 3x the unloaded latency",
                all(CAPACITY / 2 <= limit <= 2 * CAPACITY for limit in settled) and p99 <= 3.0,
                f"limit {min(settled):.0f}..{max(settled):.0f}, p99 {p99:.1f}x",
            )
    clock = FakeClock()
    fixed = ConcurrencyLimiter(algorithm="fixed", limit=500, clock=clock)
    _, latencies = simulate(fixed, clock, seconds)
    p99 = _p99(latencies) / SERVICE
    ctx.record("concurrency: convergence (virtual time)", "fixed limit 500: p99 / unloaded latency", p99, "x")
    if not ctx.quick:
        _chart(curves)


def _chart(curves: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for label, curve in curves.items():
        ax.plot([i / 2 for i in range(len(curve))], curve, label=label)
    ax.axhspan(CAPACITY / 2, 2 * CAPACITY, color="0.9", label="[C/2, 2C]")
    ax.axhline(CAPACITY, color="0.5", linestyle="--", linewidth=1, label=f"true capacity C={CAPACITY}")
    ax.set_yscale("log")
    ax.set_xlabel("seconds of load (virtual time, 3x overload)")
    ax.set_ylabel("concurrency limit")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    DOCS.mkdir(parents=True, exist_ok=True)
    fig.savefig(DOCS / "concurrency-convergence.png", dpi=100)
    plt.close(fig)


async def run(ctx: BenchContext) -> None:
    convergence(ctx)
    bulkhead: ConnectionPool[None] = ConnectionPool(None, size=1000)
    await bulkhead.start()
    try:
        admission = await ctx.per_call("concurrency: admission + release (non-waiting)", _admission_variants(bulkhead))
    finally:
        await bulkhead.close()
    await ctx.per_call("concurrency: async with (uncontended)", _block_variants())
    breaker = await ctx.per_call("breaker: closed path, rate mode vs count mode", _breaker_variants())

    def over(results: dict[str, object], label: str) -> float:
        overhead = getattr(results[label], "overhead_ns", None)
        return float(overhead or 0.0)

    fixed = over(admission, "seawall ConcurrencyLimiter fixed")
    anyio_cost = over(admission, "anyio.CapacityLimiter acquire_nowait")
    bulkhead_cost = over(admission, "seawall bulkhead checkout_nowait")
    ctx.target(
        "concurrency: admission + release (non-waiting)",
        "fixed vs anyio.CapacityLimiter",
        "fixed admission + release at most 1.2x anyio.CapacityLimiter's",
        fixed <= 1.2 * anyio_cost,
        f"{fixed:.0f} ns vs {anyio_cost:.0f} ns ({fixed / anyio_cost:.2f}x)" if anyio_cost else f"{fixed:.0f} ns",
    )
    ctx.target(
        "concurrency: admission + release (non-waiting)",
        "fixed vs bulkhead",
        "fixed admission + release at most the bulkhead's + 300 ns",
        fixed <= bulkhead_cost + 300.0,
        f"{fixed:.0f} ns vs {bulkhead_cost:.0f} ns ({fixed - bulkhead_cost:+.0f} ns)",
    )
    for algorithm in ("gradient2", "vegas", "aimd"):
        adaptive = over(admission, f"seawall ConcurrencyLimiter {algorithm}")
        ctx.target(
            "concurrency: admission + release (non-waiting)",
            f"{algorithm} vs fixed",
            f"{algorithm} at most fixed + 1 us",
            adaptive <= fixed + 1000.0,
            f"{adaptive:.0f} ns vs {fixed:.0f} ns ({adaptive - fixed:+.0f} ns)",
        )
    for form in ("async with", "call"):
        counting = over(breaker, f"seawall count mode ({form})")
        rated = over(breaker, f"seawall rate mode ({form})")
        ctx.target(
            "breaker: closed path, rate mode vs count mode",
            f"rate mode ({form})",
            f"rate-mode closed path ({form}) within 2x the count mode's",
            rated <= 2.0 * counting,
            f"{rated:.0f} ns vs {counting:.0f} ns ({rated / counting:.2f}x)" if counting else f"{rated:.0f} ns",
        )
