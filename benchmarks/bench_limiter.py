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

Waiting (issue 16): N tasks queue in ``acquire()`` on one full bucket, then
are admitted one by one - seawall on asyncio, aiolimiter, seawall on trio
(in a thread of its own). The bucket drains 10**6 units per second, faster
than any engine admits, so the time per admitted waiter is the engine's own
cost per admission (wake, take, hand on), measured from the moment the last
task queued to the moment the last one is admitted. Target: from 1,000 to
50,000 queued waiters that time grows by at most 1.5x.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import statistics
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import aiolimiter
import anyio
import anyio.to_thread
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

    async def seawall_acquire_nowait() -> None:
        ours.acquire_nowait("k")  # the synchronous form: no coroutine of its own

    handle = ours.bucket("k").acquire_nowait

    async def seawall_bucket_handle() -> None:
        handle()

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
        "seawall acquire_nowait() gcra": seawall_acquire_nowait,
        "seawall bucket().acquire_nowait() gcra": seawall_bucket_handle,
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


#: The waiting benchmark's rule: a burst of 1,000, then 10**6 units per second (faster than any engine admits).
WAIT_LIMIT, WAIT_WINDOW = 1_000, 0.001


class _Held:
    """A monotonic clock held still while the waiters queue, then running on from where it stood.

    Starting N tasks takes real time, in which so fast a bucket would drain
    and let the late ones pass without queueing (aiolimiter lets a newcomer
    take free capacity ahead of its waiters). Held, every one of them queues;
    released, time flows at its normal rate again.
    """

    def __init__(self, source: Callable[[], float]) -> None:
        self._source = source
        self._held: float | None = source()
        self._shift = 0.0

    def now(self) -> float:
        held = self._held
        return held if held is not None else self._source() - self._shift

    def release(self) -> None:
        if self._held is not None:
            self._shift = self._source() - self._held
            self._held = None


class _HeldClock:
    """A seawall Clock reading a :class:`_Held` clock and sleeping on the loop's."""

    def __init__(self, held: _Held, sleep: Callable[[float], Awaitable[None]]) -> None:
        self.now = held.now
        self._sleep = sleep

    async def sleep(self, seconds: float) -> None:
        await self._sleep(seconds)


class _Seawall:
    """``acquire(cost)`` on one key of a seawall limiter (aiolimiter's has no keys)."""

    def __init__(self, held: _Held, sleep: Callable[[float], Awaitable[None]]) -> None:
        self._limiter = RateLimiter(WAIT_LIMIT, WAIT_WINDOW, clock=_HeldClock(held, sleep))

    async def acquire(self, cost: float) -> None:
        await self._limiter.acquire("k", cost)


async def _admit_queued(waiters: int, held: _Held, limiter: Any) -> float:
    """Seconds per admitted waiter: ``waiters`` tasks queue on one full bucket, then are admitted.

    Runs on whichever anyio backend runs it; ``limiter.acquire(cost)`` is
    awaited, on ``held`` time. The tasks start in one batch: the first fills
    the bucket, every one queues, the last releases the clock; timed from
    there to the last admission.
    """
    entered = admitted = 0
    queued_at = done_at = 0.0

    async def waiter() -> None:
        nonlocal entered, admitted, queued_at, done_at
        entered += 1
        if entered == 1:
            await limiter.acquire(WAIT_LIMIT)  # the bucket is empty: taken at once, and now full
        if entered == waiters:
            held.release()
            queued_at = time.perf_counter()
        await limiter.acquire(1)
        admitted += 1
        if admitted == waiters:
            done_at = time.perf_counter()

    gc.collect()
    gc.disable()
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(waiters):
                tg.start_soon(waiter)
    finally:
        gc.enable()
    return (done_at - queued_at) / waiters


async def _seawall_asyncio(waiters: int) -> float:
    held = _Held(time.monotonic)  # the default clock's source on asyncio
    return await _admit_queued(waiters, held, _Seawall(held, anyio.sleep))


async def _aiolimiter(waiters: int) -> float:
    # aiolimiter reads loop.time(); hold that (as aiolimiter's own tests patch it).
    loop = asyncio.get_running_loop()
    held = _Held(loop.time)
    loop.time = held.now  # type: ignore[method-assign]
    try:
        return await _admit_queued(waiters, held, aiolimiter.AsyncLimiter(WAIT_LIMIT, WAIT_WINDOW))
    finally:
        del loop.time  # the class's method again


async def _seawall_trio_run(waiters: int) -> float:
    import trio

    held = _Held(trio.current_time)  # what seawall's default clock reads under trio
    return await _admit_queued(waiters, held, _Seawall(held, trio.sleep))


def _seawall_trio(waiters: int) -> float:
    return anyio.run(_seawall_trio_run, waiters, backend="trio")


async def _waiting(ctx: BenchContext) -> None:
    """Time per admitted waiter at several queue lengths: seawall on asyncio, aiolimiter, seawall on trio."""
    sizes = (1_000, 2_000) if ctx.quick else (1_000, 10_000, 50_000)
    repeats = 1 if ctx.quick else 3
    variants: dict[str, Callable[[int], Awaitable[float]]] = {
        "seawall acquire(), asyncio": _seawall_asyncio,
        "aiolimiter acquire(), asyncio": _aiolimiter,
        # A thread of its own: trio cannot run inside the asyncio loop's thread.
        "seawall acquire(), trio": partial(anyio.to_thread.run_sync, _seawall_trio),
    }
    case = "limiter: waiting acquire(), time per admitted waiter"
    figures: dict[tuple[str, int], float] = {}
    print(f"\n{case}")
    for size in sizes:
        samples: dict[str, list[float]] = {label: [] for label in variants}
        for repeat in range(repeats):
            labels = list(variants)
            for label in labels[repeat % len(labels) :] + labels[: repeat % len(labels)]:
                samples[label].append(await variants[label](size))
        for label, values in samples.items():
            figures[label, size] = statistics.median(values) * 1e6
            ctx.record(case, f"{label}, {size:,} waiters", figures[label, size], "us/waiter", repeats=repeats)
    if ctx.quick:
        return
    for label in variants:
        growth = figures[label, sizes[-1]] / figures[label, sizes[0]]
        ctx.record(case, f"{label}: {sizes[-1]:,} / {sizes[0]:,} waiters", growth, "x")
        if label.startswith("seawall"):
            ctx.target(
                case,
                f"growth, {label}",
                f"{label}: time per admitted waiter grows at most 1.5x from {sizes[0]:,} to {sizes[-1]:,} waiters",
                growth <= 1.5,
                f"{figures[label, sizes[0]]:.1f} -> {figures[label, sizes[-1]]:.1f} us ({growth:.2f}x)",
            )


async def run(ctx: BenchContext) -> None:
    """Per-call cost on one hot key and on 10,000 keys; then memory; then waiting."""
    calls = 2_000 if ctx.quick else 50_000
    hot = await ctx.per_call("limiter: hit() on one hot key", _peers_hot(), calls=calls)
    many = await ctx.per_call(
        "limiter: hit() on 10,000 round-robin keys", _peers_many([f"user-{i}" for i in range(10_000)]), calls=calls
    )

    await _memory(ctx, 20_000 if ctx.quick else 1_000_000)
    await _waiting(ctx)
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
