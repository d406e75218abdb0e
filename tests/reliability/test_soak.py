"""Soak (stress run only): 10,000 concurrent tasks through one AsyncInfrastructure for a minute.

Each task loops over protected calls, with a think time between them
(``execute_protected`` and ``protect()`` alternately, over 5,000 entity
buckets, more than the coordinator keeps plans for), through a rate limiter,
a breaker, a bulkhead and a timeout; one call in twenty outlives the timeout,
one in fifty raises, one in a hundred is cancelled from outside.

``tracemalloc`` traces the whole minute (so nothing allocated before it started
can make the traced size creep up as it is replaced). After a warm-up, a window
records the chain's overhead per call (time in the call minus time in ``fn``)
and how late timeouts fire (both under tracemalloc, which slows Python: read
them as upper bounds); the last window samples the traced memory after a
collection, which must stay flat. Figures are printed and written to
``benchmarks/results/reliability-soak.json``.

The loop runs without asyncio's debug mode: its bookkeeping would dominate the
figures. ``SEAWALL_SOAK_SECONDS`` shortens the run.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import statistics
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from seawall import AsyncInfrastructure, ProtectionTimeout

pytestmark = [pytest.mark.anyio, pytest.mark.stress]

TASKS = 10_000
SECONDS = float(os.environ.get("SEAWALL_SOAK_SECONDS", "60"))
WARM_UP = SECONDS / 6  # then latencies are recorded until MEMORY_FROM
MEMORY_FROM = SECONDS * 7 / 12  # then the traced memory is sampled once a second
TIMEOUT = 0.1
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "reliability-soak.json"


class Boom(Exception):
    """A failing call."""


@pytest.fixture
def anyio_backend() -> str:
    """Plain asyncio: the soak measures the chain, not debug mode's bookkeeping."""
    return "asyncio"


def _percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


class Soak:
    def __init__(self, infra: AsyncInfrastructure) -> None:
        self.infra = infra
        self.outcomes: Counter[str] = Counter()
        self.overhead: list[float] = []
        self.lateness: list[float] = []
        self.stop = anyio.Event()
        self.recording = False

    async def call(self, rng: random.Random, index: int) -> None:
        entity = f"client-{rng.randrange(5000)}"
        roll = rng.random()
        hang = roll < 0.05  # one call in twenty outlives the timeout
        inside = [0.0]

        async def fn() -> str:
            began = time.perf_counter()
            try:
                if roll < 0.07 and not hang:
                    raise Boom
                await anyio.sleep(10 * TIMEOUT if hang else rng.uniform(0, 0.05))
                return "ok"
            finally:
                inside[0] = time.perf_counter() - began

        began = time.perf_counter()
        try:
            if index % 2:
                await self.infra.execute_protected("soak", fn, rate_limiter=entity)
            else:
                async with self.infra.protect("soak", rate_limiter=entity):
                    await fn()
        except ProtectionTimeout:
            self.outcomes["timeout"] += 1
            if self.recording:
                self.lateness.append(time.perf_counter() - began - TIMEOUT)
            return
        except Boom:
            self.outcomes["failure"] += 1
            return
        took = time.perf_counter() - began
        self.outcomes["ok"] += 1
        if self.recording:
            self.overhead.append(took - inside[0])

    async def worker(self, index: int) -> None:
        rng = random.Random(index)
        await anyio.sleep(rng.uniform(0, 4.0))  # the tasks start spread out, not in one loop iteration
        while not self.stop.is_set():
            if rng.random() < 0.01:
                task = asyncio.create_task(self.call(rng, index))
                await asyncio.sleep(rng.uniform(0, 0.01))
                if task.cancel():
                    self.outcomes["cancelled"] += 1
                with anyio.CancelScope(shield=True):
                    await asyncio.wait([task])
                continue
            await self.call(rng, index)
            await anyio.sleep(rng.uniform(3.0, 9.0))  # think time: about 1,700 calls a second in all


@pytest.mark.timeout(600)
async def test_soak() -> None:
    """10,000 tasks for a minute: memory flat after warm-up, nothing stuck; overhead and lateness reported."""
    samples: list[tuple[float, int]] = []
    tracemalloc.start()
    try:
        async with AsyncInfrastructure() as infra:
            await infra.configure_protection(
                "soak",
                {
                    "rate_limiter": {"limit": 10**9, "window": 1.0},
                    "circuit_breaker": {"failure_threshold": 10**9, "window": 10.0},
                    "connection_pool": {"size": TASKS},
                    "timeout": TIMEOUT,
                },
            )
            soak = Soak(infra)
            started = time.monotonic()
            async with anyio.create_task_group() as group:
                for index in range(TASKS):
                    group.start_soon(soak.worker, index)
                while (elapsed := time.monotonic() - started) < SECONDS:
                    await anyio.sleep(1.0)
                    soak.recording = WARM_UP <= elapsed < MEMORY_FROM
                    if elapsed >= MEMORY_FROM:
                        # Cyclic garbage (a raised exception's traceback and frames) waits for the
                        # collector's own schedule: collected first, what is left is what is held.
                        gc.collect()
                        samples.append((elapsed, tracemalloc.get_traced_memory()[0]))
                soak.stop.set()
            status = await infra.get_protection_status("soak")
    finally:
        tracemalloc.stop()
    assert status["connection_pool"]["in_use"] == 0
    assert status["connection_pool"]["waiting"] == 0
    assert status["circuit_breaker"]["state"] == "closed"
    memory = [size for _, size in samples]
    assert len(memory) >= 4, f"too few memory samples: {samples}"
    half = len(memory) // 2
    early, late = statistics.median(memory[:half]), statistics.median(memory[half:])
    report: dict[str, Any] = {
        "tasks": TASKS,
        "seconds": SECONDS,
        "calls": sum(soak.outcomes.values()) - soak.outcomes["cancelled"],
        "outcomes": dict(soak.outcomes),
        "overhead_us": {
            "p50": _percentile(soak.overhead, 0.5) * 1e6,
            "p99": _percentile(soak.overhead, 0.99) * 1e6,
        },
        "timeout_lateness_ms": {
            "p50": _percentile(soak.lateness, 0.5) * 1e3,
            "p99": _percentile(soak.lateness, 0.99) * 1e3,
            "max": max(soak.lateness, default=float("nan")) * 1e3,
        },
        "traced_memory_mb": {
            "first_half": early / 2**20,
            "second_half": late / 2**20,
            "samples": [round(size / 2**20, 2) for size in memory],
        },
    }
    print("\nsoak:", json.dumps(report, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    assert soak.outcomes["ok"] > 0
    assert soak.outcomes["timeout"] > 0
    assert late <= early * 1.05 + 2 * 2**20, f"traced memory grew from {early / 2**20:.1f} MB to {late / 2**20:.1f} MB"
    assert report["timeout_lateness_ms"]["max"] < 2000, "a timeout fired seconds late"
