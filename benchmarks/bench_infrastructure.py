"""The coordinator: full-chain overhead of ``execute_protected`` / ``protect()``, and the timer's lateness.

Targets (issue "the protected call, written once"), measured in the same run
against a bare ``await noop()``:

* the full chain (rate limiter + breaker + bulkhead + timeout) at most 0.5x
  the same layers hand-composed from peers (aiolimiter + aiobreaker +
  ``asyncio.Semaphore`` + ``asyncio.timeout``);
* and within 1.5 us of a plain ``anyio.CancelScope()`` (the scope a user would
  write); the figure over the cheapest scope buildable (the backend's class
  called directly) is reported too;
* under a burst of 10,000 concurrent calls, the p99 lateness of their timeouts
  at most 10 ms over ``anyio.fail_after``'s on the same load.

The timeout layer alone is compared with ``anyio.fail_after``,
``anyio.CancelScope()`` and ``asyncio.timeout``; each other layer alone with
its peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import statistics
import time
from collections.abc import Awaitable, Callable

import aiobreaker
import anyio
from aiolimiter import AsyncLimiter

from _harness import BenchContext
from seawall import AsyncInfrastructure, CircuitBreaker, ConnectionPool, ProtectionTimeout, RateLimiter

NAME = "infrastructure"

# So large that no variant ever waits or is denied: we time the bookkeeping.
HUGE = 10**12

FULL = {
    "rate_limiter": {"limit": HUGE, "window": 1},
    "circuit_breaker": {"failure_threshold": 5},
    "connection_pool": {"size": 1000},
    "timeout": 5.0,
}
PEER_CHAIN = "peers: aiolimiter+aiobreaker+Semaphore+asyncio.timeout"
PLAIN_SCOPE = "anyio.CancelScope() (no deadline)"
CHEAPEST_SCOPE = "cheapest anyio scope (backend class)"


async def noop() -> int:
    return 1


async def bare() -> None:
    await noop()


class Peers:
    """The peers' layers, composed by hand in the contract's order."""

    def __init__(self) -> None:
        self.limiter = AsyncLimiter(HUGE, 1)
        self.breaker = aiobreaker.CircuitBreaker(fail_max=5)
        self.semaphore = asyncio.Semaphore(HUGE)

    async def inner(self) -> int:
        async with self.semaphore:
            return await noop()

    async def chain(self) -> None:
        async with self.limiter, asyncio.timeout(5):
            await self.breaker.call_async(self.inner)


async def run(ctx: BenchContext) -> None:
    """Time the full chain, each layer against its peers, and the timer's lateness under a burst."""
    # Many short repeats rather than a few long ones: on a shared machine the
    # median of 21 interleaved repeats shrugs off the ones another process hit.
    calls = 2_000 if ctx.quick else 15_000
    repeats = None if ctx.quick else 21
    peers = Peers()
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("full", FULL)
        await _full_chain(ctx, infra, peers, calls, repeats)
        await _one_layer_per_key(ctx, infra, calls, repeats)
        await _per_entity(ctx, infra, peers, calls, repeats)
        await _each_layer_alone(ctx, infra, peers, calls, repeats)
    await _timer_lateness(ctx, 500 if ctx.quick else 10_000)


async def _full_chain(
    ctx: BenchContext, infra: AsyncInfrastructure, peers: Peers, calls: int, repeats: int | None
) -> None:
    scope_class = type(anyio.CancelScope())

    async def public_scope() -> None:
        with anyio.CancelScope():
            await noop()

    async def cheapest_scope() -> None:
        with scope_class():
            await noop()

    async def fail_after() -> None:
        with anyio.fail_after(5):
            await noop()

    async def asyncio_timeout() -> None:
        async with asyncio.timeout(5):
            await noop()

    async def ours_execute() -> None:
        await infra.execute_protected("full", noop)

    async def ours_protect() -> None:
        async with infra.protect("full"):
            await noop()

    async def ours_timeout_only() -> None:
        await infra.execute_protected("unconfigured", noop)

    results = await ctx.per_call(
        "infrastructure: full chain (limiter + breaker + bulkhead + timeout)",
        {
            "bare": bare,
            PLAIN_SCOPE: public_scope,
            CHEAPEST_SCOPE: cheapest_scope,
            "anyio.fail_after(5)": fail_after,
            "asyncio.timeout(5)": asyncio_timeout,
            PEER_CHAIN: peers.chain,
            "seawall execute_protected": ours_execute,
            "seawall protect()": ours_protect,
            "seawall execute_protected, timeout only": ours_timeout_only,
        },
        calls=calls,
        repeats=repeats,
    )
    _targets(ctx, results)


async def _one_layer_per_key(ctx: BenchContext, infra: AsyncInfrastructure, calls: int, repeats: int | None) -> None:
    scope_class = type(anyio.CancelScope())
    await infra.configure_protection("limiter_only", {"rate_limiter": {"limit": HUGE, "window": 1}})
    await infra.configure_protection("breaker_only", {"circuit_breaker": {"failure_threshold": 5}})
    await infra.configure_protection("bulkhead_only", {"connection_pool": {"size": 1000}})

    async def cheapest_scope() -> None:
        with scope_class():
            await noop()

    def key_call(key: str) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            await infra.execute_protected(key, noop)

        return call

    await ctx.per_call(
        "infrastructure: one layer per key, each with the timeout",
        {
            "bare": bare,
            CHEAPEST_SCOPE: cheapest_scope,
            "seawall key: timeout only": key_call("unconfigured"),
            "seawall key: rate limiter + timeout": key_call("limiter_only"),
            "seawall key: breaker + timeout": key_call("breaker_only"),
            "seawall key: bulkhead + timeout": key_call("bulkhead_only"),
        },
        calls=calls,
        repeats=repeats,
    )


async def _per_entity(
    ctx: BenchContext, infra: AsyncInfrastructure, peers: Peers, calls: int, repeats: int | None
) -> None:
    # Each call names its entity, so the coordinator keeps a plan per entity;
    # the peers keep one AsyncLimiter per entity in a dict.
    entities = [f"user-{i}" for i in range(100)]
    peer_limiters = {entity: AsyncLimiter(HUGE, 1) for entity in entities}
    next_entity = itertools.cycle(entities).__next__

    async def peer_chain_per_entity() -> None:
        async with peer_limiters[next_entity()], asyncio.timeout(5):
            await peers.breaker.call_async(peers.inner)

    async def ours_protect_per_entity() -> None:
        async with infra.protect("full", rate_limiter=next_entity()):
            await noop()

    async def ours_execute_per_entity() -> None:
        await infra.execute_protected("full", noop, rate_limiter=next_entity())

    async def ours_protect() -> None:
        async with infra.protect("full"):
            await noop()

    await ctx.per_call(
        "infrastructure: full chain, a bucket per entity (100 entities)",
        {
            "bare": bare,
            "peers: AsyncLimiter per entity+aiobreaker+Semaphore+asyncio.timeout": peer_chain_per_entity,
            "seawall execute_protected(rate_limiter=entity)": ours_execute_per_entity,
            "seawall protect(rate_limiter=entity)": ours_protect_per_entity,
            "seawall protect() (the key's one bucket)": ours_protect,
        },
        calls=calls,
        repeats=repeats,
    )


async def _each_layer_alone(
    ctx: BenchContext, infra: AsyncInfrastructure, peers: Peers, calls: int, repeats: int | None
) -> None:
    limiter = RateLimiter(HUGE, 1)
    breaker = CircuitBreaker("bench")
    bulkhead: ConnectionPool[None] = ConnectionPool(None, size=1000)
    await bulkhead.start()

    async def ours_limiter() -> None:
        await limiter.hit("k")
        await noop()

    async def peer_limiter_only() -> None:
        async with peers.limiter:
            await noop()

    async def ours_breaker() -> None:
        async with breaker:
            await noop()

    async def peer_breaker_only() -> None:
        await peers.breaker.call_async(noop)

    async def ours_bulkhead() -> None:
        async with bulkhead.checkout():
            await noop()

    async def semaphore() -> None:
        async with peers.semaphore:
            await noop()

    async def ours_timeout_only() -> None:
        await infra.execute_protected("unconfigured", noop)

    async def fail_after() -> None:
        with anyio.fail_after(5):
            await noop()

    await ctx.per_call(
        "infrastructure: each layer alone",
        {
            "bare": bare,
            "seawall RateLimiter.hit": ours_limiter,
            "aiolimiter AsyncLimiter": peer_limiter_only,
            "seawall CircuitBreaker (async with)": ours_breaker,
            "aiobreaker call_async": peer_breaker_only,
            "seawall bulkhead checkout": ours_bulkhead,
            "asyncio.Semaphore": semaphore,
            "seawall timeout (deadline timer)": ours_timeout_only,
            "anyio.fail_after(5)": fail_after,
        },
        calls=calls,
        repeats=repeats,
    )
    await bulkhead.close()


async def _burst_lateness(tasks: int, seconds: float, *, seawall: AsyncInfrastructure | None) -> list[float]:
    """Start ``tasks`` calls at once that never finish; return how late each timeout was seen (s)."""
    lateness: list[float] = []

    async def hung() -> None:
        await anyio.sleep_forever()

    async def call() -> None:
        start = time.monotonic()
        try:
            if seawall is not None:
                await seawall.execute_protected("burst", hung, timeout=seconds)
            else:
                with anyio.fail_after(seconds):
                    await hung()
        except (ProtectionTimeout, TimeoutError):
            lateness.append(time.monotonic() - start - seconds)

    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(call)
    return lateness


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]


async def _timer_lateness(ctx: BenchContext, tasks: int) -> None:
    """p50/p99 lateness of 0.2 s timeouts under a burst of ``tasks`` concurrent calls, vs anyio.fail_after."""
    case = f"infrastructure: timeout lateness, {tasks:,} concurrent calls (0.2 s)"
    rounds: dict[str, list[tuple[float, float]]] = {"anyio.fail_after": [], "seawall execute_protected": []}
    async with AsyncInfrastructure() as infra:
        for _ in range(1 if ctx.quick else 5):  # interleaved rounds; the median round is reported
            for label in rounds:
                seen = await _burst_lateness(tasks, 0.2, seawall=infra if label.startswith("seawall") else None)
                rounds[label].append((_percentile(seen, 0.5), _percentile(seen, 0.99)))
    p99: dict[str, float] = {}
    for label, figures in rounds.items():
        p50 = statistics.median(f[0] for f in figures) * 1000
        p99[label] = statistics.median(f[1] for f in figures) * 1000
        ctx.record(case, f"{label} p50", p50, "ms late")
        ctx.record(case, f"{label} p99", p99[label], "ms late")
    excess = p99["seawall execute_protected"] - p99["anyio.fail_after"]
    ctx.target(
        case,
        "seawall execute_protected",
        "timeout p99 lateness at most 10 ms over anyio.fail_after's under the same burst",
        excess <= 10.0,
        f"{excess:+.1f} ms ({p99['seawall execute_protected']:.1f} ms vs {p99['anyio.fail_after']:.1f} ms)",
    )


def _targets(ctx: BenchContext, results: dict[str, object]) -> None:
    def median(label: str) -> float:
        return float(getattr(results[label], "median_ns", math.nan))

    base = median("bare")
    peers = median(PEER_CHAIN) - base
    plain = median(PLAIN_SCOPE) - base
    cheapest = median(CHEAPEST_SCOPE) - base
    for label in ("seawall execute_protected", "seawall protect()"):
        ours = median(label) - base
        with contextlib.suppress(ZeroDivisionError):
            ctx.target(
                "infrastructure",
                label,
                f"{label}: full chain at most 0.5x the peer chain",
                ours <= 0.5 * peers,
                f"{ours / peers:.2f}x ({ours:.0f} ns vs {peers:.0f} ns over bare)",
            )
        ctx.target(
            "infrastructure",
            label,
            f"{label}: within 1.5 us of a plain anyio.CancelScope()",
            ours - plain <= 1500,
            f"{(ours - plain) / 1000:.2f} us over it ({ours:.0f} ns vs {plain:.0f} ns); "
            f"{(ours - cheapest) / 1000:.2f} us over the cheapest scope",
        )
