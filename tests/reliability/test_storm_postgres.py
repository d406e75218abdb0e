"""Cancellation storms: thousands of protected calls over asyncpg on the real PostgreSQL, a third cancelled.

Every call goes through the whole chain (rate limiter, breaker, pool of
asyncpg connections, timeout) with ``execute_protected`` or ``protect()``; a
random third is cancelled from outside, at random points: after a random
delay, after a random number of loop iterations, or at the call's own deadline
(a loop timer due at the very instant the deadline timer is, so both land in
one loop iteration). Afterwards everything adds up:

* every task whose ``cancel()`` was accepted ended cancelled (never a timeout,
  never a result), and no other task did;
* the breaker counted exactly the calls that failed or timed out, once each,
  and no cancellation (its threshold is out of reach, so it stays closed);
* the bucket holds exactly one token per call that started;
* the pool is back to idle, with no waiter, and has as many sessions on the
  server as workers; after ``close`` no session of the test is left
  (``pg_stat_activity`` by the test's own ``application_name``);
* the loop (debug mode) reported nothing.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from reliability_support import application_name, pg_sessions, wait_until

from seawall import AsyncInfrastructure, PoolTimeout, ProtectionTimeout
from seawall.integrations.asyncpg import AsyncpgFactory

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

# Long enough that quick queries finish on a loaded machine too (at 0.25 s, with the other core
# busy, every one of 2,000 calls timed out in the pool's queue and the storm tested no success).
TIMEOUT = 0.5
SIZE, OVERFLOW = 4, 2


@dataclass
class Storm:
    """What one storm did and saw."""

    tasks: int
    started: int
    cancel_accepted: int
    at_deadline: int
    outcomes: Counter[str]


CONFIG: dict[str, Any] = {
    "rate_limiter": {"limit": 10**6, "window": 1e9},
    # Out of reach: the breaker stays closed and its failure count is the exact tally.
    "circuit_breaker": {"failure_threshold": 2**40, "window": 3600.0, "recovery_time": 1.0},
    "connection_pool": {"size": SIZE, "max_overflow": OVERFLOW, "timeout": 5.0},
    "timeout": TIMEOUT,
}


class StormRun:
    """Launch the calls and their cancellations; then judge what every task did."""

    def __init__(self, infra: AsyncInfrastructure, style: str, seed: int) -> None:
        self.infra = infra
        self.style = style
        self.rng = random.Random(seed)
        self.loop = asyncio.get_running_loop()
        self.tasks: list[asyncio.Task[Any]] = []
        self.helpers: list[asyncio.Task[None]] = []
        self.started: set[int] = set()
        self.accepted: set[int] = set()
        self.aimed: set[int] = set()
        self.took: dict[int, float] = {}

    async def call(self, index: int, delay: float) -> Any:
        self.started.add(index)  # the same step as the limiter's decision: no await in between
        began = self.loop.time()
        if self.style == "execute":
            # execute_protected hands fn no connection (fn takes no argument): the chain's checkout,
            # and the asyncpg reset on its return, are what this style exercises.
            result = await self.infra.execute_protected("db", lambda: self.work(None, delay))
        else:
            async with self.infra.protect("db") as conn:
                result = await self.work(conn, delay)
        # A call that returns after its deadline (the timer got to it late) keeps its result
        # and counts as a timeout: the breaker's tally needs to know which did.
        self.took[index] = self.loop.time() - began
        return result

    @staticmethod
    async def work(conn: Any, delay: float) -> Any:
        if delay < 0:
            await anyio.sleep_forever()  # only the deadline (or a cancellation) ends it
        if conn is None:
            await anyio.sleep(delay)
            return True
        return await conn.fetchval("SELECT true FROM pg_sleep($1::float8)", delay)

    def cancel(self, index: int, task: asyncio.Task[Any]) -> None:
        if task.cancel():
            self.accepted.add(index)

    async def cancel_after_iterations(self, index: int, task: asyncio.Task[Any], iterations: int) -> None:
        for _ in range(iterations):
            await asyncio.sleep(0)
        self.cancel(index, task)

    def aim(self, index: int, task: asyncio.Task[Any]) -> None:
        how = self.rng.choice(["delay", "iterations", "deadline"])
        if how == "delay":
            self.loop.call_later(self.rng.uniform(0, TIMEOUT * 1.5), self.cancel, index, task)
        elif how == "iterations":
            helper = asyncio.create_task(self.cancel_after_iterations(index, task, self.rng.randrange(30)))
            self.helpers.append(helper)
        else:
            # The call's deadline is its start plus TIMEOUT on this very clock (loop.time() is
            # time.monotonic): a handle due then runs in the deadline timer's own iteration.
            self.aimed.add(index)
            self.loop.call_at(self.loop.time() + TIMEOUT, self.cancel, index, task)

    async def launch(self, count: int) -> None:
        for index in range(count):
            # Mostly quick queries; one in two hundred outlives the timeout (a slow query, or one that never ends).
            delay = self.rng.choices([0.0, 0.001, 0.002, TIMEOUT * 1.5, -1.0], weights=[60, 20, 19, 0.5, 0.5])[0]
            task = asyncio.create_task(self.call(index, delay))
            self.tasks.append(task)
            if self.rng.random() < 1 / 3:
                self.aim(index, task)
            if index % 20 == 19:
                await asyncio.sleep(0.01)  # calls arrive in waves, as traffic does
        await asyncio.wait(self.tasks, timeout=60)
        await asyncio.gather(*self.helpers)
        assert all(task.done() for task in self.tasks), "a protected call never ended"

    def judge(self) -> tuple[Counter[str], range]:
        """Every task's end, tallied; and how many failures the breaker may have counted."""
        outcomes: Counter[str] = Counter()
        for index, task in enumerate(self.tasks):
            if index in self.accepted:
                assert task.cancelled(), f"call {index} was cancelled but ended with {task!r}"
                outcomes["cancelled"] += 1
                continue
            assert not task.cancelled(), f"call {index} ended cancelled, yet nobody cancelled it"
            error = task.exception()
            if error is None:
                assert task.result() is True
                took = self.took[index]
                # Timed from just outside the coordinator's own clock reads (the same clock): never
                # shorter, and longer only by what runs in between (a collection, at worst).
                outcomes["ok" if took < TIMEOUT else "overran" if took > TIMEOUT + 0.01 else "ok or overran"] += 1
            elif isinstance(error, ProtectionTimeout | PoolTimeout):
                outcomes[type(error).__name__] += 1
            else:  # pragma: no cover - the report names it
                raise AssertionError(f"call {index} raised {error!r}") from error
        failures = outcomes["ProtectionTimeout"] + outcomes["PoolTimeout"] + outcomes["overran"]
        return outcomes, range(failures, failures + outcomes["ok or overran"] + 1)


async def _storm(dsn: str, style: str, count: int, seed: int) -> Storm:
    name = application_name("seawall-storm")
    factory = AsyncpgFactory(dsn, server_settings={"application_name": name}, reset_timeout=2.0, close_timeout=2.0)
    config = {**CONFIG, "connection_pool": {**CONFIG["connection_pool"], "factory": factory}}
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("db", config)
        pool = infra.connection_manager.get("db")
        assert await pg_sessions(dsn, name) == SIZE
        run = StormRun(infra, style, seed)
        await run.launch(count)
        outcomes, failures = run.judge()

        status = await infra.get_protection_status("db")
        assert status["circuit_breaker"]["state"] == "closed"
        assert status["circuit_breaker"]["failure_count"] in failures, "each timeout counts once, no cancel counts"
        assert status["rate_limiter"]["current_count"] == pytest.approx(len(run.started), abs=0.5)
        pool_status = pool.status()
        assert (pool_status.in_use, pool_status.waiting) == (0, 0), pool_status
        assert pool_status.idle <= SIZE + OVERFLOW

        async def sessions_match_workers() -> bool:
            return await pg_sessions(dsn, name) == pool.status().idle

        assert await wait_until(sessions_match_workers, 10.0), "the server has sessions the pool does not know of"

    async def no_sessions() -> bool:
        return await pg_sessions(dsn, name) == 0

    assert await wait_until(no_sessions, 10.0), f"sessions of {name} outlived close()"
    return Storm(count, len(run.started), len(run.accepted), len(run.aimed), outcomes)


@pytest.mark.parametrize("style", ["execute", "protect"])
async def test_cancellation_storm(postgres_dsn: str, style: str) -> None:
    """2,000 calls, a third cancelled anywhere, some in the deadline's iteration: every count adds up, no leak."""
    storm = await _storm(postgres_dsn, style, 2000, seed=14)
    print(f"\nstorm[{style}]: {storm}")
    assert storm.cancel_accepted > 0
    assert storm.outcomes["ok"] > 0
    assert storm.outcomes["ProtectionTimeout"] > 0


@pytest.mark.stress
@pytest.mark.timeout(600)
@pytest.mark.parametrize("style", ["execute", "protect"])
@pytest.mark.parametrize("seed", range(5))
async def test_cancellation_storm_at_length(postgres_dsn: str, style: str, seed: int) -> None:
    """Five storms of 10,000 calls per style (stress run): the same sums hold."""
    storm = await _storm(postgres_dsn, style, 10_000, seed=seed)
    print(f"\nstorm[{style}, seed {seed}]: {storm}")
