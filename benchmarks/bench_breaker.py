"""Circuit breaker: closed-path overhead, open-rejection cost and memory, against the peers.

Targets (issue 4), as overhead over a bare ``await noop()`` in the same run:

* closed path (``async with breaker`` and ``breaker.call(noop)``) at least as
  fast as purgatory's ``async with`` (its breaker fetched once), and at least
  2x faster than aiobreaker's ``call_async``;
* an open rejection (raise + catch ``CircuitOpenError``) under 1 µs;
* memory flat over 100,000 rejections (no exception or traceback retained).

Peers: aiobreaker (``call_async``), pybreaker (its ``calling()`` context
manager: its ``call_async`` needs tornado), purgatory (``AsyncCircuitBreakerFactory``,
in-memory). Every variant is an ``async def`` doing one operation, so the
variant's own coroutine cancels out against the ``bare`` baseline.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Awaitable, Callable
from datetime import timedelta

import aiobreaker
import purgatory
import pybreaker

from _harness import BenchContext, ratio
from seawall import CircuitBreaker, CircuitOpenError

NAME = "breaker"
LONG = 3600  # seconds an open peer stays open: longer than any run


async def noop() -> None:
    pass


async def boom() -> None:
    raise RuntimeError("down")


def _closed_variants(purgatory_breaker: object) -> dict[str, Callable[[], Awaitable[object]]]:
    ours = CircuitBreaker("closed")
    with_failures = CircuitBreaker("closed-with-failures", failure_threshold=10**9)
    aio = aiobreaker.CircuitBreaker(fail_max=5)
    py = pybreaker.CircuitBreaker(fail_max=5)
    purg = purgatory_breaker

    @ours
    async def decorated() -> None:
        pass

    async def bare() -> None:
        await noop()

    async def seawall_with() -> None:
        async with ours:
            await noop()

    async def seawall_call() -> None:
        await ours.call(noop)

    async def seawall_decorated() -> None:
        await decorated()

    async def seawall_with_failures() -> None:
        async with with_failures:
            await noop()

    async def aiobreaker_call_async() -> None:
        await aio.call_async(noop)

    async def pybreaker_calling() -> None:
        with py.calling():
            await noop()

    async def purgatory_with() -> None:
        async with purg:  # type: ignore[attr-defined]
            await noop()

    return {
        "bare": bare,
        "seawall async with": seawall_with,
        "seawall call(noop)": seawall_call,
        "seawall @breaker": seawall_decorated,
        "seawall async with (failures recorded)": seawall_with_failures,
        "aiobreaker call_async": aiobreaker_call_async,
        "pybreaker calling()": pybreaker_calling,
        "purgatory async with (fetched once)": purgatory_with,
    }


async def _open_variants(purgatory_breaker: object) -> dict[str, Callable[[], Awaitable[object]]]:
    ours = CircuitBreaker("open", recovery_time=LONG)
    await ours.trip()
    aio = aiobreaker.CircuitBreaker(fail_max=1, timeout_duration=timedelta(seconds=LONG))
    aio.open()
    py = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=LONG)
    py.open()
    purg = purgatory_breaker

    async def bare() -> None:
        await noop()

    async def seawall_with() -> None:
        try:
            async with ours:
                await noop()
        except CircuitOpenError:
            pass

    async def seawall_call() -> None:
        try:
            await ours.call(noop)
        except CircuitOpenError:
            pass

    async def aiobreaker_call_async() -> None:
        try:
            await aio.call_async(noop)
        except aiobreaker.CircuitBreakerError:
            pass

    async def pybreaker_calling() -> None:
        try:
            with py.calling():
                await noop()
        except pybreaker.CircuitBreakerError:
            pass

    async def purgatory_with() -> None:
        try:
            async with purg:  # type: ignore[attr-defined]
                await noop()
        except purgatory.domain.model.OpenedState:
            pass

    return {
        "bare": bare,
        "seawall async with": seawall_with,
        "seawall call(noop)": seawall_call,
        "aiobreaker call_async": aiobreaker_call_async,
        "pybreaker calling()": pybreaker_calling,
        "purgatory async with": purgatory_with,
    }


async def _retained_after(op: Callable[[], Awaitable[object]], rejections: int) -> float:
    """Bytes still allocated after ``rejections`` calls of ``op`` (after a warm-up and a full GC)."""
    for _ in range(1_000):
        await op()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(rejections):
            await op()
        gc.collect()
        return float(tracemalloc.get_traced_memory()[0] - before)
    finally:
        tracemalloc.stop()


async def run(ctx: BenchContext) -> None:
    factory = purgatory.AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=LONG)
    purgatory_closed = await factory.get_breaker("closed")
    closed = await ctx.per_call("breaker: closed path", _closed_variants(purgatory_closed))

    purgatory_open = await factory.get_breaker("open", threshold=1)
    try:
        async with purgatory_open:
            await boom()
    except RuntimeError:
        pass
    opened = await ctx.per_call("breaker: open rejection (raise + catch)", await _open_variants(purgatory_open))

    def over(results: dict[str, object], label: str) -> float:
        return results[label].overhead_ns or 0.0  # type: ignore[attr-defined]

    purg = over(closed, "purgatory async with (fetched once)")
    aio = over(closed, "aiobreaker call_async")
    for label in ("seawall async with", "seawall call(noop)"):
        ours = over(closed, label)
        ctx.target(
            "breaker: closed path",
            label,
            f"{label} at least as fast as purgatory (1.0x)",
            ours <= purg,
            f"{ours:.0f} ns vs {purg:.0f} ns ({ratio(ours, purg):.2f}x)",
        )
        ctx.target(
            "breaker: closed path",
            label,
            f"{label} 2x faster than aiobreaker call_async",
            ours * 2 <= aio,
            f"{ours:.0f} ns vs {aio:.0f} ns ({ratio(ours, aio):.2f}x)",
        )
    for label in ("seawall async with", "seawall call(noop)"):
        ours = over(opened, label)
        ctx.target(
            "breaker: open rejection (raise + catch)",
            label,
            f"{label} open rejection under 1 µs",
            ours < 1000,
            f"{ours:.0f} ns (aiobreaker {over(opened, 'aiobreaker call_async'):.0f} ns, "
            f"purgatory {over(opened, 'purgatory async with'):.0f} ns)",
        )

    rejections = 10_000 if ctx.quick else 100_000
    variants = await _open_variants(purgatory_open)
    retained: dict[str, float] = {}
    for label in ("seawall async with", "seawall call(noop)", "aiobreaker call_async", "purgatory async with"):
        retained[label] = await _retained_after(variants[label], rejections)
        ctx.record(
            f"breaker: memory retained over {rejections:,} rejections",
            label,
            retained[label],
            "bytes",
            per_rejection=retained[label] / rejections,
        )
    worst = max(retained["seawall async with"], retained["seawall call(noop)"])
    ctx.target(
        "breaker: memory",
        "seawall",
        f"memory flat over {rejections:,} rejections (under 0.1 byte per rejection)",
        worst < rejections * 0.1,
        f"{worst:,.0f} bytes retained (purgatory {retained['purgatory async with']:,.0f})",
    )
