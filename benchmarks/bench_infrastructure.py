"""The coordinator: full-chain overhead of ``execute_protected`` / ``protect()``.

Issue 6 targets, measured in the same run against a bare ``await noop()``:

* the full chain (rate limiter + breaker + bulkhead + timeout) at most 1.0x
  the same layers hand-composed from peers (aiolimiter + aiobreaker +
  ``asyncio.Semaphore`` + ``asyncio.timeout``);
* and within 1.5 us of the cheapest anyio cancel scope buildable per call
  (the backend's ``CancelScope`` class called directly, no deadline).

The timeout layer alone is compared with ``anyio.fail_after``,
``anyio.CancelScope()`` and ``asyncio.timeout``; each other layer alone with
its peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math

import aiobreaker
import anyio
from aiolimiter import AsyncLimiter

from _harness import BenchContext
from seawall import AsyncInfrastructure, CircuitBreaker, ConnectionPool, RateLimiter

NAME = "infrastructure"

# So large that no variant ever waits or is denied: we time the bookkeeping.
HUGE = 10**12


async def noop() -> int:
    return 1


async def run(ctx: BenchContext) -> None:
    """Time the full chain, the timeout layer and each layer against its peers."""
    # Many short repeats rather than a few long ones: on a shared machine the
    # median of 21 interleaved repeats shrugs off the ones another process hit.
    calls = 2_000 if ctx.quick else 15_000
    repeats = None if ctx.quick else 21
    scope_class = type(anyio.CancelScope())

    async def bare() -> None:
        await noop()

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

    # -- the peers, composed by hand in the contract's order ---------------
    peer_limiter = AsyncLimiter(HUGE, 1)
    peer_breaker = aiobreaker.CircuitBreaker(fail_max=5)
    peer_semaphore = asyncio.Semaphore(HUGE)

    async def peer_inner() -> int:
        async with peer_semaphore:
            return await noop()

    async def peer_chain() -> None:
        async with peer_limiter, asyncio.timeout(5):
            await peer_breaker.call_async(peer_inner)

    async with AsyncInfrastructure() as infra:
        await infra.configure_protection(
            "full",
            {
                "rate_limiter": {"limit": HUGE, "window": 1},
                "circuit_breaker": {"failure_threshold": 5},
                "connection_pool": {"size": 1000},
                "timeout": 5.0,
            },
        )

        await infra.configure_protection("limiter_only", {"rate_limiter": {"limit": HUGE, "window": 1}})
        await infra.configure_protection("breaker_only", {"circuit_breaker": {"failure_threshold": 5}})
        await infra.configure_protection("bulkhead_only", {"connection_pool": {"size": 1000}})

        async def ours_limiter_key() -> None:
            await infra.execute_protected("limiter_only", noop)

        async def ours_breaker_key() -> None:
            await infra.execute_protected("breaker_only", noop)

        async def ours_bulkhead_key() -> None:
            await infra.execute_protected("bulkhead_only", noop)

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
                "anyio.CancelScope() (no deadline)": public_scope,
                "cheapest anyio scope (backend class)": cheapest_scope,
                "anyio.fail_after(5)": fail_after,
                "asyncio.timeout(5)": asyncio_timeout,
                "peers: aiolimiter+aiobreaker+Semaphore+asyncio.timeout": peer_chain,
                "seawall execute_protected": ours_execute,
                "seawall protect()": ours_protect,
                "seawall execute_protected, timeout only": ours_timeout_only,
            },
            calls=calls,
            repeats=repeats,
        )
        _targets(ctx, results)

        await ctx.per_call(
            "infrastructure: one layer per key, each with the timeout",
            {
                "bare": bare,
                "cheapest anyio scope (backend class)": cheapest_scope,
                "seawall key: timeout only": ours_timeout_only,
                "seawall key: rate limiter + timeout": ours_limiter_key,
                "seawall key: breaker + timeout": ours_breaker_key,
                "seawall key: bulkhead + timeout": ours_bulkhead_key,
            },
            calls=calls,
            repeats=repeats,
        )

        # -- a bucket per entity (per user, per client address) ---------------
        # Each call names its entity, so the coordinator builds a plan for it;
        # the peers keep one AsyncLimiter per entity in a dict.
        entities = [f"user-{i}" for i in range(100)]
        peer_limiters = {entity: AsyncLimiter(HUGE, 1) for entity in entities}
        next_entity = itertools.cycle(entities).__next__

        async def peer_chain_per_entity() -> None:
            async with peer_limiters[next_entity()], asyncio.timeout(5):
                await peer_breaker.call_async(peer_inner)

        async def ours_protect_per_entity() -> None:
            async with infra.protect("full", rate_limiter=next_entity()):
                await noop()

        async def ours_execute_per_entity() -> None:
            await infra.execute_protected("full", noop, rate_limiter=next_entity())

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

        # -- each layer alone, against its peer ------------------------------
        limiter = RateLimiter(HUGE, 1)
        breaker = CircuitBreaker("bench")
        bulkhead: ConnectionPool[None] = ConnectionPool(None, size=1000)
        await bulkhead.start()

        async def ours_limiter() -> None:
            await limiter.hit("k")
            await noop()

        async def peer_limiter_only() -> None:
            async with peer_limiter:
                await noop()

        async def ours_breaker() -> None:
            async with breaker:
                await noop()

        async def peer_breaker_only() -> None:
            await peer_breaker.call_async(noop)

        async def ours_bulkhead() -> None:
            async with bulkhead.checkout():
                await noop()

        async def semaphore() -> None:
            async with peer_semaphore:
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


def _targets(ctx: BenchContext, results: dict[str, object]) -> None:
    def median(label: str) -> float:
        return float(getattr(results[label], "median_ns", math.nan))

    bare = median("bare")
    peers = median("peers: aiolimiter+aiobreaker+Semaphore+asyncio.timeout") - bare
    cheapest = median("cheapest anyio scope (backend class)") - bare
    for label in ("seawall execute_protected", "seawall protect()"):
        ours = median(label) - bare
        with contextlib.suppress(ZeroDivisionError):
            ctx.target(
                "infrastructure",
                label,
                f"{label}: full chain at most 1.0x the peer chain",
                ours <= peers,
                f"{ours / peers:.2f}x ({ours:.0f} ns vs {peers:.0f} ns over bare)",
            )
        ctx.target(
            "infrastructure",
            label,
            f"{label}: within 1.5 us of the cheapest anyio cancel scope",
            ours - cheapest <= 1500,
            f"{(ours - cheapest) / 1000:.2f} us over it ({ours:.0f} ns vs {cheapest:.0f} ns)",
        )
