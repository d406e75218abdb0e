"""Rate limiter: per-call cost of ``hit()`` against its peers, and memory for a million keys.

Targets (issue 3), as overhead over a bare ``await noop()``:

* ``hit()`` on one hot key no slower than aiolimiter's ``async with`` (which
  has no keys at all);
* at least 3x faster than throttled-py's GCRA (MemoryStore);
* at least 10x faster than limits' moving window (MemoryStorage).

Every variant is an ``async def`` doing one awaited operation, so the
coroutine call cancels out against the ``bare`` baseline. Limits are set so
high that nothing is ever denied: this measures the admission path.

Memory: 1,000,000 one-off keys, one hit each, on a virtual clock (the peers'
``time`` is patched the same way), then one window later one more hit lets
each store expire what it can. Peak and residual are tracemalloc's traced
bytes, so the figures count Python objects only, key strings included.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiolimiter
import limits
import limits.aio.storage.memory as limits_memory
import pyrate_limiter
import throttled.asyncio as throttled
from limits.aio import storage as limits_storage
from limits.aio import strategies as limits_strategies

from _harness import BenchContext, ratio
from seawall import FakeClock, RateLimiter

NAME = "limiter"
HUGE = 10**9  # a limit no benchmark reaches


async def noop() -> None:
    pass


def _peers_hot() -> dict[str, Callable[[], Awaitable[object]]]:
    """One variant per library, all on the key ``"k"``."""
    ours = RateLimiter(HUGE, 1.0)
    ours_fixed = RateLimiter(HUGE, 1.0, algorithm="fixed_window")
    aio = aiolimiter.AsyncLimiter(HUGE, 1.0)
    item = limits.RateLimitItemPerSecond(HUGE)
    moving = limits_strategies.MovingWindowRateLimiter(limits_storage.MemoryStorage())
    fixed = limits_strategies.FixedWindowRateLimiter(limits_storage.MemoryStorage())
    sliding = limits_strategies.SlidingWindowCounterRateLimiter(limits_storage.MemoryStorage())
    gcra = throttled.Throttled(
        using=throttled.RateLimiterType.GCRA.value, quota=throttled.per_sec(HUGE), store=throttled.MemoryStore()
    )
    pyrate = pyrate_limiter.Limiter(pyrate_limiter.Rate(HUGE, pyrate_limiter.Duration.SECOND))

    async def bare() -> None:
        await noop()

    async def seawall_gcra() -> None:
        await ours.hit("k")

    async def seawall_fixed() -> None:
        await ours_fixed.hit("k")

    async def seawall_status_read() -> None:
        # The status is built lazily: reading a field pays for computing all of them.
        _ = (await ours.hit("k")).remaining

    async def aiolimiter_async_with() -> None:
        async with aio:
            pass

    async def aiolimiter_has_capacity() -> None:
        if aio.has_capacity():
            await aio.acquire()

    async def limits_moving() -> None:
        await moving.hit(item, "k")

    async def limits_fixed() -> None:
        await fixed.hit(item, "k")

    async def limits_sliding() -> None:
        await sliding.hit(item, "k")

    async def throttled_gcra() -> None:
        await gcra.limit("k")

    async def pyrate_async() -> None:
        await pyrate.try_acquire_async("k", blocking=False)

    return {
        "bare": bare,
        "seawall hit() gcra": seawall_gcra,
        "seawall hit() fixed_window": seawall_fixed,
        "seawall hit() gcra, status read": seawall_status_read,
        "aiolimiter async with (no keys)": aiolimiter_async_with,
        "aiolimiter has_capacity()+acquire()": aiolimiter_has_capacity,
        "limits moving window": limits_moving,
        "limits fixed window": limits_fixed,
        "limits sliding window counter": limits_sliding,
        "throttled-py gcra": throttled_gcra,
        "pyrate-limiter try_acquire_async": pyrate_async,
    }


def _peers_many(keys: list[str]) -> dict[str, Callable[[], Awaitable[object]]]:
    """The keyed libraries, cycling over ``keys`` (one key per call)."""
    ours = RateLimiter(HUGE, 1.0)
    ours_fixed = RateLimiter(HUGE, 1.0, algorithm="fixed_window")
    item = limits.RateLimitItemPerSecond(HUGE)
    moving = limits_strategies.MovingWindowRateLimiter(limits_storage.MemoryStorage())
    fixed = limits_strategies.FixedWindowRateLimiter(limits_storage.MemoryStorage())
    gcra = throttled.Throttled(
        using=throttled.RateLimiterType.GCRA.value, quota=throttled.per_sec(HUGE), store=throttled.MemoryStore()
    )
    pyrate = pyrate_limiter.Limiter(pyrate_limiter.Rate(HUGE, pyrate_limiter.Duration.SECOND))

    def cycling() -> Iterator[str]:
        while True:
            yield from keys

    def variant(op: Callable[[str], Awaitable[object]]) -> Callable[[], Awaitable[object]]:
        source = cycling()
        pick = source.__next__

        async def call() -> None:
            await op(pick())

        return call

    async def bare(key: str) -> None:
        await noop()

    return {
        "bare": variant(bare),
        "seawall hit() gcra": variant(ours.hit),
        "seawall hit() fixed_window": variant(ours_fixed.hit),
        "limits moving window": variant(lambda key: moving.hit(item, key)),
        "limits fixed window": variant(lambda key: fixed.hit(item, key)),
        "throttled-py gcra": variant(gcra.limit),
        "pyrate-limiter try_acquire_async": variant(lambda key: pyrate.try_acquire_async(key, blocking=False)),
    }


class _VirtualTime:
    """Stands in for the ``time`` module of a peer, so its clock is virtual too."""

    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock

    def time(self) -> float:
        return self._clock.now()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@contextlib.contextmanager
def _traced() -> Iterator[Callable[[], tuple[int, int]]]:
    gc.collect()
    tracemalloc.start()
    try:
        yield tracemalloc.get_traced_memory
    finally:
        tracemalloc.stop()
        gc.collect()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)  # pragma: no cover - Linux has both fields


@contextlib.contextmanager
def _rss() -> Iterator[Callable[[], tuple[int, int]]]:
    """Resident set size above the start: ``(now, peak)`` in bytes (Linux only).

    The kernel's peak (VmHWM) is reset first (``clear_refs`` 5), so the peak
    is this block's. Only the peak is reported from RSS: the current RSS also
    moves with memory the allocator returns from earlier runs, so residuals
    come from tracemalloc and the bucket count.
    """
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")

    def read() -> tuple[int, int]:
        return (_status_kib("VmRSS") - base) * 1024, (_status_kib("VmHWM") - base) * 1024

    yield read
    gc.collect()


def _meter(kind: str) -> contextlib.AbstractContextManager[Callable[[], tuple[int, int]]]:
    return _traced() if kind == "traced" else _rss()


async def _memory(ctx: BenchContext, keys: int) -> None:
    """Peak and residual traced memory for ``keys`` one-off keys, ours and limits'."""
    window = 10.0
    step = window / 2 / keys  # the whole run spans half a window

    async def run_ours(algorithm: str, kind: str = "traced") -> None:
        clock = FakeClock(1_000.0)
        limiter = RateLimiter(100, window, algorithm=algorithm, clock=clock)  # type: ignore[arg-type]
        with _meter(kind) as traced:
            for i in range(keys):
                await limiter.hit(f"one-off-{i}")
                clock.advance(step)
            _, peak = traced()
            resident_peak = limiter.resident_buckets
            clock.advance(window)
            await limiter.hit("after-one-window")
            gc.collect()
            residual, _ = traced()
        label = f"seawall {algorithm}"
        if kind == "rss":
            ctx.record("limiter memory: one-off keys", f"{label} peak RSS", peak / 2**20, "MiB", keys=keys)
            return
        ctx.record("limiter memory: one-off keys", f"{label} peak", peak / 2**20, "MiB", keys=keys)
        ctx.record("limiter memory: one-off keys", f"{label} residual after one window", residual / 2**20, "MiB")
        ctx.record("limiter memory: one-off keys", f"{label} buckets at peak", resident_peak or 0, "buckets")
        after = limiter.resident_buckets or 0
        ctx.record("limiter memory: one-off keys", f"{label} buckets after one window", after, "buckets")

    async def run_limits(strategy: str, kind: str = "traced") -> None:
        clock = FakeClock(1_000.0)
        saved = limits_memory.time
        limits_memory.time = _VirtualTime(clock)  # type: ignore[assignment]
        try:
            storage = limits_storage.MemoryStorage()
            strategies = {
                "fixed": limits_strategies.FixedWindowRateLimiter,
                "moving": limits_strategies.MovingWindowRateLimiter,
            }
            limiter = strategies[strategy](storage)
            item = limits.parse(f"100/{int(window)} second")
            with _meter(kind) as traced:
                for i in range(keys):
                    await limiter.hit(item, f"one-off-{i}")
                    clock.advance(step)
                _, peak = traced()
                clock.advance(window)
                await limiter.hit(item, "after-one-window")
                if strategy == "fixed":
                    # limits expires counters in a task it starts on a hit; let it finish.
                    for _ in range(3):
                        await asyncio.sleep(0)
                    if storage.timer is not None:
                        await storage.timer
                gc.collect()
                residual, _ = traced()
            label = f"limits MemoryStorage {strategy} window"
            if kind == "rss":
                ctx.record("limiter memory: one-off keys", f"{label} peak RSS", peak / 2**20, "MiB", keys=keys)
            else:
                ctx.record("limiter memory: one-off keys", f"{label} peak", peak / 2**20, "MiB", keys=keys)
            if strategy == "fixed" and kind == "traced":
                ctx.record(
                    "limiter memory: one-off keys", f"{label} residual after one window", residual / 2**20, "MiB"
                )
            if storage.timer is not None:
                storage.timer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await storage.timer
        finally:
            limits_memory.time = saved

    await run_ours("gcra")
    await run_ours("fixed_window")
    await run_limits("fixed")
    # limits' moving window expires one key per thread hop: only its peak is measured.
    await run_limits("moving")
    if os.path.exists("/proc/self/clear_refs"):  # noqa: ASYNC240 - a procfs stat, not disk I/O
        # The same runs without tracemalloc (which inflates RSS), read off the kernel.
        await run_ours("gcra", "rss")
        await run_limits("fixed", "rss")


async def run(ctx: BenchContext) -> None:
    """Per-call cost on one hot key and on 10,000 keys; then memory."""
    calls = 2_000 if ctx.quick else 50_000
    hot = await ctx.per_call("limiter: hit() on one hot key", _peers_hot(), calls=calls)
    many = await ctx.per_call(
        "limiter: hit() on 10,000 round-robin keys", _peers_many([f"user-{i}" for i in range(10_000)]), calls=calls
    )

    await _memory(ctx, 20_000 if ctx.quick else 1_000_000)
    if ctx.quick:
        # The smoke run checks that everything runs, never how fast; limits' moving window in
        # particular only gets slow as its event list fills, which a short run never does.
        return

    ours = hot["seawall hit() gcra"].overhead_ns or 0.0
    aio = hot["aiolimiter async with (no keys)"].overhead_ns or 0.0
    throttled_gcra = hot["throttled-py gcra"].overhead_ns or 0.0
    moving = hot["limits moving window"].overhead_ns or 0.0
    ctx.target(
        "limiter",
        "vs aiolimiter",
        "hit() overhead <= aiolimiter async with (1.0x)",
        ours <= aio,
        f"{ours:.0f} ns vs {aio:.0f} ns ({ratio(ours, aio):.2f}x)",
    )
    ctx.target(
        "limiter",
        "vs throttled-py",
        "hit() >= 3x faster than throttled-py gcra",
        ratio(ours, throttled_gcra) >= 3,
        f"{ours:.0f} ns vs {throttled_gcra:.0f} ns ({ratio(ours, throttled_gcra):.1f}x)",
    )
    ctx.target(
        "limiter",
        "vs limits moving",
        "hit() >= 10x faster than limits moving window",
        ratio(ours, moving) >= 10,
        f"{ours:.0f} ns vs {moving:.0f} ns ({ratio(ours, moving):.1f}x)",
    )
    many_ours = many["seawall hit() gcra"].overhead_ns or 0.0
    many_throttled = many["throttled-py gcra"].overhead_ns or 0.0
    ctx.record(
        "limiter: hit() on 10,000 round-robin keys",
        "throttled-py gcra / seawall gcra",
        ratio(many_ours, many_throttled),
        "x",
    )
