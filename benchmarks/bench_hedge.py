"""Hedging: the tail latency of a long-tailed upstream with and without a key's ``"hedge"`` section.

Targets (issue 19, "Pipeline layers"), measured in the same run: against an
upstream where a fixed 5% of calls (every 20th) take 1 s and the rest 10 ms,
with ``delay=0.05`` and with ``delay="p90"``, p99 latency falls below 0.2 s
(about 1 s without hedging).

Also: what a hedged key costs per call when its first attempt succeeds at
once (no hedge starts: the task group and the launcher are the cost).
"""

from __future__ import annotations

import math

import anyio

from _harness import BenchContext
from seawall import AsyncInfrastructure

NAME = "hedge"

CHAIN = {"circuit_breaker": {"failure_threshold": 1000}, "connection_pool": {"size": 64}, "timeout": 5.0}
CASE = "hedge: p99 of a 5%-at-1-s upstream"
VARIANTS: dict[str, dict[str, object] | None] = {
    "no hedging": None,
    "hedge delay=0.05": {"delay": 0.05},
    "hedge delay='p90'": {"delay": "p90"},
}


class LongTail:
    """A fixed 5% of calls (every 20th) take 1 s, the rest 10 ms."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        await anyio.sleep(1.0 if self.calls % 20 == 10 else 0.01)


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(math.ceil(share * len(ordered)) - 1, 0)]


async def _latencies(infra: AsyncInfrastructure, key: str, calls: int, workers: int) -> list[float]:
    upstream = LongTail()
    latencies: list[float] = []

    async def worker() -> None:
        for _ in range(calls // workers):
            started = anyio.current_time()
            await infra.execute_protected(key, upstream)
            latencies.append(anyio.current_time() - started)

    async with anyio.create_task_group() as group:
        for _ in range(workers):
            group.start_soon(worker)
    return latencies


async def run(ctx: BenchContext) -> None:
    """p50/p99 of each variant over the same calls, and the per-call cost of a hedged key that never hedges."""
    calls = 200 if ctx.quick else 1000
    async with AsyncInfrastructure() as infra:
        p99: dict[str, float] = {}
        for label, hedge in VARIANTS.items():
            key = label.replace(" ", "_")
            await infra.configure_protection(key, {**CHAIN, **({"hedge": hedge} if hedge else {})})
            if hedge is not None and hedge["delay"] == "p90":
                await _latencies(infra, key, 40, 4)  # the percentile learns first (no hedge until 20 samples)
            latencies = await _latencies(infra, key, calls, 10)
            p99[label] = _percentile(latencies, 0.99)
            ctx.record(CASE, f"{label}: p50", _percentile(latencies, 0.5) * 1e3, "ms")
            ctx.record(CASE, f"{label}: p99", p99[label] * 1e3, "ms", max=max(latencies) * 1e3, calls=len(latencies))
        for label in ("hedge delay=0.05", "hedge delay='p90'"):
            ctx.target(
                "hedge",
                label,
                f"{label}: p99 below 0.2 s against a 5%-at-1-s upstream",
                p99[label] < 0.2,
                f"p99 {p99[label] * 1e3:.0f} ms vs {p99['no hedging'] * 1e3:.0f} ms without hedging",
            )
        await _overhead(ctx, infra)


async def _overhead(ctx: BenchContext, infra: AsyncInfrastructure) -> None:
    await infra.configure_protection("plain", CHAIN)
    await infra.configure_protection("hedged", {**CHAIN, "hedge": {"delay": 0.05}})

    async def noop() -> int:
        return 1

    async def bare() -> None:
        await infra.execute_protected("plain", noop)

    async def hedged() -> None:
        await infra.execute_protected("hedged", noop)

    await ctx.per_call(
        "hedge: the chain, first attempt succeeds at once",
        {"seawall key without hedge": bare, "seawall key with hedge (none starts)": hedged},
        baseline="seawall key without hedge",
        calls=500 if ctx.quick else 2_000,
        repeats=5,
        warmup=500,
    )
