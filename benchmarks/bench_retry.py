"""Retry: what a key's ``"retry"`` section costs when the first attempt succeeds, and against the peers.

Targets (issue 19, "Pipeline layers"), measured in the same run:

* a key with a retry section whose first attempt succeeds costs at most
  0.3 us more than the same key without it (the paired median of the
  per-repeat differences);
* seawall's retrying chain (rate limiter + breaker + bulkhead + timeout +
  retry) at most 0.5x of the peers' chain (aiolimiter + aiobreaker +
  ``asyncio.Semaphore`` + ``asyncio.timeout``) wrapped in stamina's and in
  tenacity's retry.

A standalone ``Retry.call`` is compared with stamina's and tenacity's
decorators around the same no-op, too.
"""

from __future__ import annotations

import asyncio

import aiobreaker
import stamina
import tenacity
from aiolimiter import AsyncLimiter

from _harness import BenchContext, PerCallResult
from seawall import AsyncInfrastructure, Retry

NAME = "retry"

# So large that no variant ever waits or is denied: we time the bookkeeping.
HUGE = 10**12

CHAIN = {
    "rate_limiter": {"limit": HUGE, "window": 1},
    "circuit_breaker": {"failure_threshold": 5},
    "connection_pool": {"size": 1000},
    "timeout": 5.0,
}
RETRY = {"attempts": 3, "initial": 0.1, "maximum": 5.0, "retry_on": ["builtins:ConnectionError"]}

WITHOUT = "seawall key without retry"
WITH = "seawall key with retry (first attempt succeeds)"
STAMINA_CHAIN = "peers' chain in stamina.retry"
TENACITY_CHAIN = "peers' chain in tenacity.retry"


async def noop() -> int:
    return 1


async def bare() -> None:
    await noop()


class Peers:
    """The peers' layers composed by hand in the contract's order, and retried by stamina and tenacity."""

    def __init__(self) -> None:
        self.limiter = AsyncLimiter(HUGE, 1)
        self.breaker = aiobreaker.CircuitBreaker(fail_max=5)
        self.semaphore = asyncio.Semaphore(HUGE)
        self.stamina_chain = stamina.retry(on=ConnectionError, attempts=3, wait_initial=0.1, wait_max=5.0)(self.chain)
        self.tenacity_chain = tenacity.retry(
            retry=tenacity.retry_if_exception_type(ConnectionError),
            stop=tenacity.stop_after_attempt(3),
            wait=tenacity.wait_random_exponential(multiplier=0.1, max=5.0),
            reraise=True,
        )(self.chain)

    async def inner(self) -> int:
        async with self.semaphore:
            return await noop()

    async def chain(self) -> None:
        async with self.limiter, asyncio.timeout(5):
            await self.breaker.call_async(self.inner)


async def run(ctx: BenchContext) -> None:
    """Time a retrying key against the same key without retry and against the peers' retried chain."""
    calls = 2_000 if ctx.quick else 15_000
    repeats = None if ctx.quick else 21
    peers = Peers()
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("plain", CHAIN)
        await infra.configure_protection("retrying", {**CHAIN, "retry": RETRY})

        async def without_retry() -> None:
            await infra.execute_protected("plain", noop)

        async def with_retry() -> None:
            await infra.execute_protected("retrying", noop)

        results = await ctx.per_call(
            "retry: the full chain, first attempt succeeds",
            {
                WITHOUT: without_retry,
                WITH: with_retry,
                STAMINA_CHAIN: peers.stamina_chain,
                TENACITY_CHAIN: peers.tenacity_chain,
            },
            baseline=WITHOUT,
            calls=calls,
            repeats=repeats,
        )
    _targets(ctx, results)
    await _standalone(ctx, calls, repeats)


def _targets(ctx: BenchContext, results: dict[str, PerCallResult]) -> None:
    extra = results[WITH].overhead_ns
    ctx.target(
        "retry",
        WITH,
        "a key's retry section costs at most 0.3 us when the first attempt succeeds",
        extra is not None and extra <= 300.0,
        f"{extra:.0f} ns over the same key without retry",
    )
    ours = results[WITH].median_ns
    for peer in (STAMINA_CHAIN, TENACITY_CHAIN):
        share = ours / results[peer].median_ns
        ctx.target(
            "retry",
            peer,
            f"seawall's retrying chain at most 0.5x of the {peer}",
            share <= 0.5,
            f"{ours:.0f} ns vs {results[peer].median_ns:.0f} ns = {share:.2f}x",
        )


async def _standalone(ctx: BenchContext, calls: int, repeats: int | None) -> None:
    retry = Retry(attempts=3, initial=0.1, retry_on=ConnectionError)
    no_budget = Retry(attempts=3, initial=0.1, retry_on=ConnectionError, budget_ratio=None)
    retried = retry(noop)
    by_stamina = stamina.retry(on=ConnectionError, attempts=3, wait_initial=0.1)(noop)
    by_tenacity = tenacity.retry(
        retry=tenacity.retry_if_exception_type(ConnectionError), stop=tenacity.stop_after_attempt(3), reraise=True
    )(noop)

    async def call_form() -> None:
        await retry.call(noop)

    async def no_budget_form() -> None:
        await no_budget.call(noop)

    async def block_form() -> None:
        async for attempt in retry:
            with attempt:
                await noop()

    await ctx.per_call(
        "retry: standalone around a no-op, first attempt succeeds",
        {
            "bare": bare,
            "seawall Retry.call": call_form,
            "seawall Retry.call, no budget": no_budget_form,
            "seawall @retry": retried,
            "seawall async for attempt": block_form,
            "stamina.retry": by_stamina,
            "tenacity.retry": by_tenacity,
        },
        calls=calls,
        repeats=repeats,
    )
