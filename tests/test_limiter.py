"""RateLimiter: GCRA and fixed windows per key, deny or wait, bounded memory, on an injected clock."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import logging
import math
import pickle
import random
from datetime import timedelta
from typing import Any

import anyio
import pytest
import trio
from trio.testing import MockClock

from seawall import ConfigurationError, FakeClock, MonotonicClock, RateLimiter, RateLimitExceeded, RateLimitStatus
from seawall.backends import (
    LocalRateLimitBackend,
    MemoryRateLimitBackend,
    RateLimitBackend,
    RateLimitDecision,
    RateLimitRule,
)
from seawall.backends._limiter_memory import FixedWindowTable, GcraTable
from seawall.backends._limiter_protocol import Algorithm, check_rule
from seawall.testing import capture_events

pytestmark = pytest.mark.anyio


#: trio with a clock that jumps to the next deadline as soon as every task is blocked.
trio_autojump = pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio-mockclock")]
)


async def denied(limiter: RateLimiter, key: str = "k", cost: float = 1) -> RateLimitExceeded:
    with pytest.raises(RateLimitExceeded) as info:
        await limiter.hit(key, cost)
    return info.value


class RemoteBackend:
    """A backend with only the async protocol (as Redis will be), backed by a memory store."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self._store = MemoryRateLimitBackend(clock=clock)
        self.calls: list[str] = []

    async def take(self, key: str, cost: float, rule: RateLimitRule) -> RateLimitDecision:
        self.calls.append("take")
        return await self._store.take(key, cost, rule)

    async def peek(self, key: str, rule: RateLimitRule) -> RateLimitDecision:
        self.calls.append("peek")
        return await self._store.peek(key, rule)

    async def reset(self, key: str, rule: RateLimitRule) -> None:
        self.calls.append("reset")
        await self._store.reset(key, rule)


# -- configuration ------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("param", ["limit", "window"])
def test_non_positive_or_non_finite_numbers_are_value_errors(param: str, bad: float) -> None:
    """limit/window that are not finite and positive raise ConfigurationError naming the parameter."""
    options: dict[str, Any] = {"limit": 10, "window": 1.0, param: bad}
    with pytest.raises(ConfigurationError, match=param) as info:
        RateLimiter(options["limit"], options["window"])
    assert info.value.path == param
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", ["10", None, True, [1]])
@pytest.mark.parametrize("param", ["limit", "window"])
def test_non_numbers_are_type_errors(param: str, bad: object) -> None:
    """A limit/window that is not a number (a string, a bool) is a TypeError naming it."""
    options: dict[str, Any] = {"limit": 10, "window": 1.0, param: bad}
    with pytest.raises(TypeError, match=param):
        RateLimiter(options["limit"], options["window"])


def test_other_options_are_checked() -> None:
    """An unknown algorithm, a non-str name, a non-clock or a non-backend fail at construction."""
    with pytest.raises(ConfigurationError, match="algorithm"):
        RateLimiter(1, 1.0, algorithm="sliding")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name"):
        RateLimiter(1, 1.0, name=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="clock"):
        RateLimiter(1, 1.0, clock=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="backend"):
        RateLimiter(1, 1.0, backend=object())  # type: ignore[arg-type]


def test_rule_is_exposed_and_timedelta_accepted() -> None:
    """The rule is in limit and window; a timedelta window is converted to seconds once."""
    limiter = RateLimiter(5, timedelta(minutes=1), name="api")
    assert (limiter.limit, limiter.window, limiter.algorithm, limiter.name) == (5, 60.0, "gcra", "api")
    assert "limit=5" in repr(limiter)
    assert "window=60.0" in repr(limiter)


def test_default_clock_is_the_monotonic_clock_and_a_backend_clock_is_adopted() -> None:
    """Without a clock the limiter uses the backend's clock, by default the monotonic one."""
    assert isinstance(RateLimiter(1, 1.0).clock, MonotonicClock)
    clock = FakeClock()
    assert RateLimiter(1, 1.0, backend=MemoryRateLimitBackend(clock=clock)).clock is clock


@pytest.mark.parametrize("algorithm", ["gcra", "fixed_window"])
async def test_bad_call_arguments(algorithm: str) -> None:
    """A non-str key is a TypeError; a cost that is not finite, positive and at most limit is a ValueError."""
    limiter = RateLimiter(5, 1.0, algorithm=algorithm, clock=FakeClock())  # type: ignore[arg-type]
    for call in (limiter.hit, limiter.acquire):
        with pytest.raises(TypeError, match="key"):
            await call(b"k")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="cost"):
            await call("k", "1")  # type: ignore[arg-type]
        for bad in (0, -1, math.nan, math.inf):
            with pytest.raises(ValueError, match="cost"):
                await call("k", bad)
        with pytest.raises(ValueError, match="above the limit"):
            await call("k", 6)
    with pytest.raises(TypeError, match="key"):
        await limiter.status(1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key"):
        await limiter.reset(None)  # type: ignore[arg-type]
    assert limiter.resident_buckets == 0


@pytest.mark.parametrize("algorithm", ["gcra", "fixed_window"])
async def test_bad_types_are_value_errors_too(algorithm: str) -> None:
    """As the contract promises, `except ValueError` catches wrong types too; a bool is no cost."""
    limiter = RateLimiter(5, 1.0, algorithm=algorithm, clock=FakeClock())  # type: ignore[arg-type]
    for call in (limiter.hit, limiter.acquire):
        with pytest.raises(ValueError, match="key must be a str"):
            await call(123)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="cost"):
            await call("k", True)
        with pytest.raises(ConfigurationError, match="cost"):
            await call("k", "2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        RateLimiter("5", 1.0)  # type: ignore[arg-type]
    assert limiter.resident_buckets == 0


async def test_str_subclass_keys_are_accepted() -> None:
    """A key of a str subclass is a key."""

    class Key(str):
        __slots__ = ()

    limiter = RateLimiter(1, 1.0, clock=FakeClock())
    await limiter.hit(Key("k"))
    await denied(limiter, "k")


# -- GCRA -----------------------------------------------------------------------


async def test_gcra_admits_a_burst_of_limit_then_the_drain_rate() -> None:
    """A burst of limit passes at once; then one hit per window/limit."""
    clock = FakeClock(1_000_000.0)  # a large epoch, as time.monotonic() has on a long-running host
    limiter = RateLimiter(4, 2.0, clock=clock)
    for _ in range(4):
        await limiter.hit("k")
    error = await denied(limiter)
    assert error.retry_after == pytest.approx(0.5)
    assert (error.key, error.limit, error.window) == ("k", 4, 2.0)
    clock.advance(0.5)
    await limiter.hit("k")
    await denied(limiter)
    clock.advance(1.0)
    await limiter.hit("k")
    await limiter.hit("k")
    await denied(limiter)


async def test_a_denial_consumes_nothing_and_retry_after_is_exact() -> None:
    """Denied hits take nothing; just before retry_after the hit is denied, at retry_after it passes."""
    clock = FakeClock(12.345)
    limiter = RateLimiter(10, 1.0, clock=clock)
    await limiter.hit("k", 10)
    before = await limiter.status("k")
    for _ in range(5):
        error = await denied(limiter, cost=3)
    assert await limiter.status("k") == before
    assert error.retry_after == pytest.approx(0.3)
    assert error.retry_after is not None
    clock.advance(error.retry_after * 0.999)
    await denied(limiter, cost=3)
    clock.advance(error.retry_after * 0.001)
    await limiter.hit("k", 3)


async def test_keys_are_independent() -> None:
    """Each key has its own bucket."""
    limiter = RateLimiter(1, 1.0, clock=FakeClock())
    await limiter.hit("a")
    await limiter.hit("b")
    await denied(limiter, "a")
    await limiter.hit()  # the "default" key


async def test_gcra_status_reports_the_bucket() -> None:
    """status(): level, remaining, retry_after and reset_after of a draining bucket."""
    clock = FakeClock()
    limiter = RateLimiter(4, 4.0, clock=clock)
    status = await limiter.status("k")
    assert status == RateLimitStatus("k", True, 0.0, 4, 4.0, 4, 0.0, 0.0)
    await limiter.hit("k", 4)
    clock.advance(0.5)
    status = await limiter.status("k")
    assert status.current_count == pytest.approx(3.5)
    assert (status.allowed, status.remaining) == (False, 0)
    assert status.retry_after == pytest.approx(0.5)
    assert status.reset_after == pytest.approx(3.5)
    clock.advance(2.0)
    status = await limiter.status("k")
    assert (status.allowed, status.remaining, status.retry_after) == (True, 2, 0.0)


async def test_hit_returns_a_lazy_status_equal_to_an_eager_one() -> None:
    """hit()'s status is a frozen dataclass; its fields equal status() taken at the same instant."""
    clock = FakeClock(5.0)
    limiter = RateLimiter(3, 1.0, clock=clock)
    status = await limiter.hit("k")
    assert status == await limiter.status("k")
    assert dataclasses.is_dataclass(status)
    assert status.to_dict() == dataclasses.asdict(status)
    assert status.to_dict()["remaining"] == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.remaining = 9  # type: ignore[misc]
    with pytest.raises(AttributeError):
        _ = status.nonexistent  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        _ = RateLimitStatus.__new__(RateLimitStatus).nonexistent  # type: ignore[attr-defined]
    # The snapshot is of the moment of the hit, whenever it is first read.
    later = await limiter.hit("k")
    clock.advance(10.0)
    assert later.current_count == pytest.approx(2.0)
    assert pickle.loads(pickle.dumps(later)) == later
    assert hash(later) == hash(dataclasses.replace(later))
    assert "remaining=1" in repr(later)


async def test_large_clock_values_keep_a_burst_exact() -> None:
    """A burst of exactly limit passes at one instant even on a clock reading ~1e9 s."""
    clock = FakeClock(987_654_321.123)
    limiter = RateLimiter(1000, 1.0, clock=clock)
    for _ in range(1000):
        await limiter.hit("k")
    await denied(limiter)


# -- fixed window -------------------------------------------------------------


async def test_fixed_windows_are_aligned_to_the_clock() -> None:
    """fixed_window counts per aligned window [k*window, (k+1)*window); a denial waits for the next one."""
    clock = FakeClock(10.5)
    limiter = RateLimiter(3, 1.0, algorithm="fixed_window", clock=clock)
    for _ in range(3):
        await limiter.hit("k")
    error = await denied(limiter)
    assert error.retry_after == pytest.approx(0.5)
    status = await limiter.status("k")
    assert (status.current_count, status.remaining, status.allowed) == (3, 0, False)
    assert status.reset_after == pytest.approx(0.5)
    clock.advance(0.5)  # 11.0: a new window
    assert (await limiter.status("k")).current_count == 0
    status = await limiter.hit("k", 2)
    assert (status.current_count, status.remaining, status.allowed, status.retry_after) == (2, 1, True, 0.0)
    assert status.reset_after == pytest.approx(1.0)
    await denied(limiter, cost=2)


async def test_fixed_window_allows_limit_per_window_even_across_a_boundary() -> None:
    """At most limit per window (Hammer's semantics): a full window then a full next one."""
    clock = FakeClock(0.9)
    limiter = RateLimiter(2, 1.0, algorithm="fixed_window", clock=clock)
    await limiter.hit("k", 2)
    clock.advance(0.1)
    await limiter.hit("k", 2)
    await denied(limiter)


async def test_fixed_window_status_of_an_unknown_key() -> None:
    """status() of an unknown key is an empty window, not an error."""
    limiter = RateLimiter(2, 1.0, algorithm="fixed_window", clock=FakeClock(3.25))
    assert await limiter.status("nobody") == RateLimitStatus("nobody", True, 0, 2, 1.0, 2, 0.0, 0.0)


def test_window_end_never_rounds_back_onto_now() -> None:
    """The aligned window containing now ends after now, even when now / window rounds up."""
    table = FixedWindowTable(RateLimitRule(1, 0.1, "fixed_window"))
    assert table.retry_after("k", 1, 0.05) == 0.0
    assert table.take("k", 1, 0.05) == 1
    assert table.retry_after("k", 1, 0.05) == pytest.approx(0.05)
    for now in (0.3, 0.7, 1.0, 2.9999999999999996, 1e6 + 0.1):
        assert table.window_end(now) > now
        assert table.window_end(now) - now <= 0.1 + 1e-9


# -- reset and memory ---------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["gcra", "fixed_window"])
async def test_reset_empties_a_bucket(algorithm: str) -> None:
    """reset(key) forgets the bucket; the next hit passes."""
    limiter = RateLimiter(1, 1.0, algorithm=algorithm, clock=FakeClock())  # type: ignore[arg-type]
    await limiter.hit("k")
    await denied(limiter)
    await limiter.reset("k")
    await limiter.hit("k")
    await limiter.reset("unknown")


@pytest.mark.parametrize("algorithm", ["gcra", "fixed_window"])
async def test_one_off_keys_do_not_stay_resident(algorithm: str) -> None:
    """Buckets of one-off keys are dropped once drained: one window after the run, none is left."""
    clock = FakeClock(100.0)
    limiter = RateLimiter(10, 1.0, algorithm=algorithm, clock=clock)  # type: ignore[arg-type]
    for i in range(10_000):
        await limiter.hit(f"user-{i}", 10)
        clock.advance(0.5 / 10_000)
    assert limiter.resident_buckets == 10_000
    clock.advance(1.0)
    await limiter.hit("late")
    assert limiter.resident_buckets == 1


async def test_generations_drop_only_empty_buckets() -> None:
    """A bucket still draining survives the turn of a generation; one idle for a generation is dropped."""
    clock = FakeClock()
    limiter = RateLimiter(2, 10.0, clock=clock)  # one unit drains in 5 s
    await limiter.hit("full", 2)  # empty at 10 s
    clock.advance(6.0)
    await limiter.hit("late", 2)  # empty at 16 s
    assert limiter.resident_buckets == 2
    clock.advance(4.5)  # 10.5 s: a new generation; both buckets are kept in the previous one
    await limiter.hit("other")
    assert limiter.resident_buckets == 3
    await denied(limiter, "late")  # level 1.1 read through the previous generation
    await limiter.hit("full", 2)  # drained: a fresh bucket
    await denied(limiter, "full")
    clock.advance(4.5)
    await limiter.hit("busy")  # 15 s
    clock.advance(5.5)  # 20.5 s: the previous generation ("late", drained at 16 s) is dropped
    await limiter.hit("new")
    assert limiter.resident_buckets == 4  # "other", "full", "busy" from the last generation, "new"
    clock.advance(20.0)  # idle for a window: everything has drained and is dropped
    await limiter.hit("other")
    assert limiter.resident_buckets == 1
    assert (await limiter.status("other")).current_count == pytest.approx(1.0)


async def test_a_bucket_in_the_previous_generation_keeps_denying() -> None:
    """A denial of a key known only to the previous generation loses nothing."""
    clock = FakeClock()
    limiter = RateLimiter(1, 10.0, clock=clock)
    await limiter.hit("k")
    clock.advance(9.0)
    await limiter.hit("keep-busy")
    clock.advance(1.5)  # 10.5 s: new generation, "k" (empty at 10 s) and "keep-busy" (19 s) move back
    await denied(limiter, "keep-busy")
    await denied(limiter, "keep-busy")
    status = await limiter.status("keep-busy")
    assert status.retry_after == pytest.approx(8.5)
    await limiter.reset("keep-busy")
    await limiter.hit("keep-busy")


# -- concurrency ----------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["gcra", "fixed_window"])
async def test_a_thousand_tasks_on_one_key_admit_exactly_limit(algorithm: str) -> None:
    """1,000 concurrent tasks hitting one key with limit 100 at one instant: exactly 100 pass."""
    limiter = RateLimiter(100, 1.0, algorithm=algorithm, clock=FakeClock(7.0))  # type: ignore[arg-type]
    admitted: list[int] = []
    denials: list[RateLimitExceeded] = []

    async def one(i: int) -> None:
        await anyio.lowlevel.checkpoint()  # interleave the tasks
        try:
            await limiter.hit("hot")
        except RateLimitExceeded as error:
            denials.append(error)
        else:
            admitted.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(1000):
            tg.start_soon(one, i)
    assert len(admitted) == 100
    assert len(denials) == 900
    assert all(error.retry_after is not None and error.retry_after > 0 for error in denials)


async def test_acquire_waits_fifo_at_the_drain_rate() -> None:
    """acquire() beyond the burst waits; waiters pass in arrival order, one per window/limit."""
    clock = FakeClock(50.0)
    limiter = RateLimiter(2, 1.0, clock=clock)
    order: list[tuple[int, float]] = []

    async def waiter(i: int) -> None:
        await limiter.acquire("k")
        order.append((i, clock.now()))

    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(waiter, i)
            await anyio.wait_all_tasks_blocked()
        assert [i for i, _ in order] == [0, 1]
        assert "waiting_keys=1" in repr(limiter)
        assert "waiters=3" in repr(limiter._waiting["k"])
        assert "timer=next at 50.5" in repr(limiter._line)  # the one timer, on the fake clock
        for expected in (2, 3, 4):
            clock.advance(0.25)
            await anyio.wait_all_tasks_blocked()
            assert len(order) == expected
            clock.advance(0.25)
            await anyio.wait_all_tasks_blocked()
            assert order[-1][0] == expected
    assert [t for _, t in order] == pytest.approx([50.0, 50.0, 50.5, 51.0, 51.5])
    assert "waiting_keys=0" in repr(limiter)


async def test_a_newcomer_does_not_take_the_capacity_freed_for_a_waiter() -> None:
    """A waiter woken by the timer keeps its turn against an acquire() arriving at that instant."""
    clock = FakeClock()
    limiter = RateLimiter(1, 1.0, clock=clock)
    await limiter.acquire("k")
    order: list[tuple[str, float]] = []

    async def waiter(name: str) -> None:
        await limiter.acquire("k")
        order.append((name, clock.now()))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "first")
        await anyio.wait_all_tasks_blocked()
        clock.advance(1.0)  # the timer of "first" is due...
        tg.start_soon(waiter, "newcomer")  # ...and a newcomer starts right behind it
        await anyio.wait_all_tasks_blocked()
        assert order == [("first", 1.0)]
        clock.advance(1.0)
    assert order == [("first", 1.0), ("newcomer", 2.0)]


@pytest.mark.parametrize("algorithm", ["gcra", "fixed_window"])
async def test_a_cancelled_waiter_consumes_nothing_and_blocks_nobody(algorithm: str) -> None:
    """Cancelling a queued acquire() takes nothing; the waiter behind it is served on time."""
    clock = FakeClock(0.0)
    limiter = RateLimiter(1, 1.0, algorithm=algorithm, clock=clock)  # type: ignore[arg-type]
    await limiter.acquire("k")
    served: list[str] = []

    async def waiter(name: str, scope: anyio.CancelScope) -> None:
        with scope:
            await limiter.acquire("k")
            served.append(name)

    first, second = anyio.CancelScope(), anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "first", first)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(waiter, "second", second)
        await anyio.wait_all_tasks_blocked()
        first.cancel()
        await anyio.wait_all_tasks_blocked()
        clock.advance(1.0)
        await anyio.wait_all_tasks_blocked()
        assert served == ["second"]
    status = await limiter.status("k")
    assert status.current_count == pytest.approx(1.0)
    assert "waiting_keys=0" in repr(limiter)


@pytest.mark.asyncio_only("asyncio.timeout() is asyncio's own; anyio's scopes are tested on both backends")
async def test_asyncio_timeout_cancels_a_waiter_cleanly() -> None:
    """asyncio.timeout around acquire() on the real clock: TimeoutError, nothing taken, nothing left."""
    limiter = RateLimiter(1, 3600.0)
    await limiter.hit("k")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await limiter.acquire("k")
    assert "waiting_keys=0" in repr(limiter)
    status = await limiter.status("k")
    assert status.current_count == pytest.approx(1.0, abs=1e-3)


async def test_acquire_on_the_default_clock_waits_on_the_loop_clock() -> None:
    """Production waiting (the running loop's clock) admits a waiter once the bucket drains, on either backend."""
    limiter = RateLimiter(1, 0.02)
    await limiter.acquire()
    start = anyio.current_time()
    async with limiter:  # waits ~20 ms of the loop's time
        pass
    # A lower bound only (a loaded machine may wake it later): it did wait for the bucket to drain.
    assert anyio.current_time() - start >= 0.015
    assert "waiting_keys=0" in repr(limiter)


@trio_autojump
async def test_trio_mock_clock_jumps_through_an_acquire_wait() -> None:
    """Under trio a limiter built in the run waits on the run's clock: a MockClock jumps an hour-long wait at once."""
    limiter = RateLimiter(1, 3600.0)
    await limiter.acquire("k")
    start = trio.current_time()
    with anyio.fail_after(7200):  # virtual seconds too: a wait on another clock would never end
        await limiter.acquire("k")
    assert trio.current_time() - start == pytest.approx(3600.0)
    assert (await limiter.status("k")).current_count == pytest.approx(1.0)


async def test_waiters_are_fifo_whatever_their_cost() -> None:
    """A smaller cost queued behind a larger one waits its turn: strict arrival order, so no cost starves."""
    clock = FakeClock()
    limiter = RateLimiter(4, 4.0, clock=clock)  # one unit drains per second
    await limiter.hit("k", 4)
    order: list[tuple[str, float]] = []

    async def waiter(name: str, cost: float) -> None:
        await limiter.acquire("k", cost)
        order.append((name, clock.now()))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "big", 3)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(waiter, "small", 1)
        await anyio.wait_all_tasks_blocked()
        for _ in range(4):
            clock.advance(1.0)
            await anyio.wait_all_tasks_blocked()
    # The small one fitted from 1 s on, but the big one came first (3 s); then the small one behind it (4 s).
    assert order == [("big", 3.0), ("small", 4.0)]


async def test_one_timer_serves_every_waiting_key() -> None:
    """However many keys and waiters wait, one task sleeps on the clock; each head is served at its own time."""
    clock = FakeClock()
    limiter = RateLimiter(1, 10.0, clock=clock)
    served: list[tuple[str, float]] = []

    async def waiter(key: str) -> None:
        await limiter.acquire(key)
        served.append((key, clock.now()))

    for offset, key in enumerate(["late", "middle", "early"]):
        await limiter.hit(key)
        clock.advance(1.0 if offset < 2 else 0.0)
    # Buckets full until 10 s ("late"), 11 s ("middle"), 12 s ("early").
    async with anyio.create_task_group() as tg:
        for key in ["early", "early", "middle", "late"]:
            tg.start_soon(waiter, key)
            await anyio.wait_all_tasks_blocked()
        assert clock.sleepers == 1  # the one timer
        while len(served) < 4:
            clock.advance(1.0)
            await anyio.wait_all_tasks_blocked()
            assert clock.sleepers <= 1
    assert served == [("late", 10.0), ("middle", 11.0), ("early", 12.0), ("early", 22.0)]
    assert clock.sleepers == 0
    assert "timer=idle" in repr(limiter._line)


async def test_an_earlier_deadline_on_another_key_cuts_the_timer_short() -> None:
    """A key that fits sooner than the one the timer sleeps for is served on time, not after it."""
    clock = FakeClock()
    slow = RateLimiter(1, 60.0, clock=clock)
    await slow.hit("slow")
    clock.advance(59.0)
    await slow.hit("quick")  # "slow" fits again at 60 s, "quick" at 119 s
    served: list[tuple[str, float]] = []

    async def waiter(key: str) -> None:
        await slow.acquire(key)
        served.append((key, clock.now()))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "quick")  # the timer sleeps for 119 s
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(waiter, "slow")  # due at 60 s: the timer must wake for it
        await anyio.wait_all_tasks_blocked()
        assert clock.sleepers == 1
        clock.advance(1.0)
        await anyio.wait_all_tasks_blocked()
        assert served == [("slow", 60.0)]
        clock.advance(59.0)
    assert served == [("slow", 60.0), ("quick", 119.0)]


@pytest.mark.parametrize("algorithm", ["gcra", "fixed_window"])
async def test_cancelling_the_waiter_that_keeps_the_timer_hands_the_timer_on(algorithm: str) -> None:
    """The waiter sleeping for everyone is cancelled: another takes over the timer, every other waiter is served."""
    clock = FakeClock()
    limiter = RateLimiter(1, 1.0, algorithm=algorithm, clock=clock)  # type: ignore[arg-type]
    await limiter.hit("a")
    await limiter.hit("b")
    served: list[str] = []

    async def waiter(key: str, scope: anyio.CancelScope) -> None:
        with scope:
            await limiter.acquire(key)
            served.append(key)

    scopes = [anyio.CancelScope() for _ in range(3)]
    async with anyio.create_task_group() as tg:
        for key, scope in zip(["a", "a", "b"], scopes, strict=True):
            tg.start_soon(waiter, key, scope)
            await anyio.wait_all_tasks_blocked()
        keeper = limiter._line._keeper
        assert keeper is not None
        assert clock.sleepers == 1
        scopes[0].cancel()  # the first waiter: the head of "a", and the one keeping time
        await anyio.wait_all_tasks_blocked()
        assert limiter._line._keeper not in (None, keeper)
        assert clock.sleepers == 1
        clock.advance(1.0)
    assert sorted(served) == ["a", "b"]
    assert (await limiter.status("a")).current_count == pytest.approx(1.0)
    assert limiter._line._keeper is None
    assert "waiting_keys=0" in repr(limiter)


async def test_a_waiter_woken_then_cancelled_by_a_scope_completes_first() -> None:
    """On both backends (anyio's rule) a task already woken completes its acquire(); the cancellation lands after."""
    clock = FakeClock()
    limiter = RateLimiter(2, 2.0, clock=clock)
    await limiter.hit("k", 2)
    served: list[str] = []
    scope = anyio.CancelScope()

    async def waiter(name: str, scope: anyio.CancelScope) -> None:
        with scope:
            await limiter.acquire("k")
            served.append(name)
            await anyio.lowlevel.checkpoint()  # where the cancellation lands
            served.append(f"{name} not cancelled")

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "first", scope)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(waiter, "second", anyio.CancelScope())
        await anyio.wait_all_tasks_blocked()
        clock.advance(1.0)  # one unit drained: the first waiter's turn ...
        scope.cancel()  # ... and its cancellation, before it ran
        await anyio.wait_all_tasks_blocked()
        assert served == ["first"]
        clock.advance(1.0)
    assert served == ["first", "second", "second not cancelled"]
    assert (await limiter.status("k")).current_count == pytest.approx(2.0)


@pytest.mark.asyncio_only("task.cancel() of a task whose wake-up is already scheduled: only asyncio can cut it")
async def test_a_waiter_natively_cancelled_as_its_turn_comes_takes_nothing() -> None:
    """The head is cancelled (task.cancel()) in the instant its turn came: it takes nothing, the next gets the turn."""
    clock = FakeClock()
    limiter = RateLimiter(2, 2.0, clock=clock)
    await limiter.hit("k", 2)
    served: list[str] = []

    async def waiter(name: str) -> None:
        await limiter.acquire("k")
        served.append(name)

    first = asyncio.get_running_loop().create_task(waiter("first"))
    await anyio.wait_all_tasks_blocked()
    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "second")
        await anyio.wait_all_tasks_blocked()
        clock.advance(1.0)  # the first waiter's turn (its timer fired) ...
        first.cancel()  # ... and a native cancellation before it ran
        with pytest.raises(asyncio.CancelledError):
            await first
        await anyio.wait_all_tasks_blocked()
    assert served == ["second"]
    assert (await limiter.status("k")).current_count == pytest.approx(2.0)
    assert "waiting_keys=0" in repr(limiter)


async def test_a_table_whose_retry_time_and_take_disagree_costs_a_rearm_not_a_spin() -> None:
    """A head given its turn that cannot take after all (a table's rounding) goes back on the timer, no busy loop."""
    clock = FakeClock()

    class Rounding(GcraTable):
        """Says "fits now" once, where take() still refuses."""

        fibs = 1

        def retry_after(self, key: str, cost: float, now: float) -> float:
            if self.fibs:
                self.fibs -= 1
                return 0.0
            return super().retry_after(key, cost, now)

    class Backend(MemoryRateLimitBackend):
        def __init__(self) -> None:
            super().__init__(clock=clock)
            self.rounding: Rounding | None = None

        def table(self, rule: RateLimitRule) -> Rounding:
            if self.rounding is None:
                self.rounding = Rounding(rule)
            return self.rounding

    limiter = RateLimiter(1, 1.0, backend=Backend())
    await limiter.hit("k")
    done = anyio.Event()

    async def waiter() -> None:
        await limiter.acquire("k")
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        assert not done.is_set()
        assert clock.sleepers == 1  # back on the timer, for the true retry time
        clock.advance(1.0)
    assert done.is_set()


async def test_many_waiters_cancelled_mid_line_leave_the_rest_in_order() -> None:
    """Cancelling most of a long line keeps the survivors' order and drops every cancelled waiter's cost."""
    clock = FakeClock()
    limiter = RateLimiter(1, 1.0, clock=clock)
    await limiter.hit("k")
    served: list[int] = []
    scopes = [anyio.CancelScope() for _ in range(50)]

    async def waiter(i: int) -> None:
        with scopes[i]:
            await limiter.acquire("k")
            served.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(waiter, i)
            await anyio.wait_all_tasks_blocked()
        for i in range(50):
            if i % 10:
                scopes[i].cancel()
        await anyio.wait_all_tasks_blocked()
        assert limiter._waiting["k"].queued == 5
        error = await denied(limiter)
        assert error.retry_after == pytest.approx(6.0)  # behind the five survivors
        for _ in range(5):
            clock.advance(1.0)
            await anyio.wait_all_tasks_blocked()
    assert served == [0, 10, 20, 30, 40]


async def test_hit_does_not_jump_the_queue() -> None:
    """While acquire() waiters queue on a key, hit() is denied until they and it fit."""
    clock = FakeClock()
    limiter = RateLimiter(2, 2.0, clock=clock)  # one unit drains per second
    await limiter.hit("k", 2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(limiter.acquire, "k", 1)
        await anyio.wait_all_tasks_blocked()
        error = await denied(limiter)
        assert error.retry_after == pytest.approx(2.0)  # 1 s for the waiter, 1 s more for this hit
        clock.advance(1.0)
        await anyio.wait_all_tasks_blocked()
    await denied(limiter)
    clock.advance(1.0)
    await limiter.hit("k")


class LateReplyBackend(RemoteBackend):
    """A remote backend whose take() decides at once but answers only when ``reply`` is set."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.reply: anyio.Event | None = None

    async def take(self, key: str, cost: float, rule: RateLimitRule) -> RateLimitDecision:
        decision = await super().take(key, cost, rule)
        if self.reply is not None:
            await self.reply.wait()
        return decision


@pytest.mark.parametrize("algorithm", ["gcra", "fixed_window"])
@pytest.mark.parametrize("late_reply", [False, True])
async def test_reset_wakes_waiters(algorithm: str, late_reply: bool) -> None:
    """reset(key) lets the waiters of the key pass at once.

    Also when the waiter's refusal, decided by a remote backend before the
    reset, only arrives after it: the waiter asks again rather than sleep.
    """
    clock = FakeClock()
    backend = LateReplyBackend(clock) if late_reply else None
    limiter = RateLimiter(1, 60.0, algorithm=algorithm, backend=backend, clock=clock)
    await limiter.hit("k")
    if backend is not None:
        backend.reply = anyio.Event()
    done = anyio.Event()

    async def waiter() -> None:
        await limiter.acquire("k")
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        await limiter.reset("k")
        if backend is not None:
            backend.reply.set()
        await anyio.wait_all_tasks_blocked()
        assert done.is_set()
        assert clock.sleepers == 0


async def test_fixed_window_waiters_pass_in_the_next_window_in_order() -> None:
    """fixed_window acquire(): waiters are served FIFO as windows open."""
    clock = FakeClock(0.0)
    limiter = RateLimiter(1, 1.0, algorithm="fixed_window", clock=clock)
    order: list[int] = []

    async def waiter(i: int) -> None:
        await limiter.acquire("k")
        order.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(waiter, i)
            await anyio.wait_all_tasks_blocked()
        assert order == [0]
        error = await denied(limiter)
        assert error.retry_after == pytest.approx(1.0)
        clock.advance(1.0)
        await anyio.wait_all_tasks_blocked()
        assert order == [0, 1]
        clock.advance(1.0)
        await anyio.wait_all_tasks_blocked()
    assert order == [0, 1, 2]


# -- context managers -----------------------------------------------------------


async def test_context_manager_forms() -> None:
    """Both `async with limiter` and limiter(key) wait; limiter(key, wait=False) denies like hit()."""
    clock = FakeClock()
    limiter = RateLimiter(1, 1.0, clock=clock)
    async with limiter:
        pass
    async with limiter("other", cost=1):
        pass
    with pytest.raises(RateLimitExceeded):
        async with limiter("other", wait=False):
            pytest.fail("the block must not run")  # pragma: no cover
    clock.advance(1.0)
    async with limiter("other", wait=False):
        pass
    assert (await limiter.status()).current_count == pytest.approx(0.0)


async def test_errors_in_the_block_propagate() -> None:
    """An exception inside the block passes through the limiter unchanged."""
    limiter = RateLimiter(5, 1.0, clock=FakeClock())
    with pytest.raises(KeyError):
        async with limiter("k"):
            raise KeyError("mine")


# -- telemetry and logs -----------------------------------------------------------


async def test_telemetry_allowed_and_denied() -> None:
    """request_allowed / request_denied carry key, limit, window and cost."""
    clock = FakeClock()
    limiter = RateLimiter(2, 1.0, name="api", clock=clock)
    with capture_events() as events:
        await limiter.hit("k", 2)
        await denied(limiter)
        await limiter.acquire("other")
        async with anyio.create_task_group() as tg:
            tg.start_soon(limiter.acquire, "k", 1)
            await anyio.wait_all_tasks_blocked()
            clock.advance(0.5)
    names = [event.name for event in events]
    assert names == ["request_allowed", "request_denied", "request_allowed", "request_allowed"]
    allowed, rejected = events[0], events[1]
    assert allowed.metadata == {
        "key": "k",
        "limit": 2,
        "window": 1.0,
        "cost": 2,
        "algorithm": "gcra",
        "name": "api",
    }
    assert rejected.metadata["cost"] == 1
    assert rejected.measurements["retry_after"] == pytest.approx(0.5)


async def test_denials_are_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    """A denial is logged at debug level with its key and retry time."""
    limiter = RateLimiter(1, 1.0, clock=FakeClock())
    await limiter.hit("k")
    with caplog.at_level(logging.DEBUG, logger="seawall"):
        await denied(limiter)
    messages = [record.getMessage() for record in caplog.records]
    assert any("rate_limit_denied" in message and "key='k'" in message for message in messages)


# -- backends ---------------------------------------------------------------------


def test_memory_backend_implements_both_protocols() -> None:
    """The memory backend is a RateLimitBackend with the local fast path."""
    backend = MemoryRateLimitBackend()
    assert isinstance(backend, RateLimitBackend)
    assert isinstance(backend, LocalRateLimitBackend)
    rule = RateLimitRule(3, 1.0)
    assert backend.table(rule) is backend.table(rule)
    assert isinstance(backend.table(RateLimitRule(3, 1.0, "fixed_window")), FixedWindowTable)
    assert rule.interval == pytest.approx(1 / 3)
    assert "rules=2" in repr(backend)
    assert "GcraTable" in repr(backend.table(rule))
    assert "FixedWindowTable" in repr(backend.table(RateLimitRule(3, 1.0, "fixed_window")))


def test_rules_are_checked() -> None:
    """A rule with unusable numbers or algorithm is refused by the backend."""
    for bad in (RateLimitRule(0, 1.0), RateLimitRule(1, math.nan), RateLimitRule(1, 1.0, "leaky")):  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match=r"limit|window|algorithm"):
            check_rule(bad)
        with pytest.raises(ConfigurationError, match=r"limit|window|algorithm"):
            MemoryRateLimitBackend().table(bad)


@pytest.mark.parametrize("algorithm", ["gcra", "fixed_window"])
async def test_memory_backend_async_protocol(algorithm: str) -> None:
    """take/peek/reset through the async protocol return decisions with the bucket's state."""
    clock = FakeClock(4.0)
    backend = MemoryRateLimitBackend(clock=clock)
    rule = RateLimitRule(2, 1.0, algorithm)  # type: ignore[arg-type]
    first = await backend.take("k", 2, rule)
    assert (first.admitted, first.retry_after, first.current_count, first.remaining) == (True, 0.0, 2, 0)
    second = await backend.take("k", 1, rule)
    assert not second.admitted
    assert second.retry_after == pytest.approx(0.5 if algorithm == "gcra" else 1.0)
    peeked = await backend.peek("k", rule)
    assert (peeked.admitted, peeked.remaining) == (False, 0)
    assert len(backend) == 1
    await backend.reset("k", rule)
    assert (await backend.peek("k", rule)).admitted
    assert len(backend) == 0


async def test_a_remote_backend_plugs_in_without_the_fast_path() -> None:
    """A backend with only the async protocol serves hit, acquire, status and reset."""
    clock = FakeClock()
    backend = RemoteBackend(clock)
    limiter = RateLimiter(2, 1.0, backend=backend, name="remote")
    assert limiter.clock is clock
    assert limiter.resident_buckets is None
    assert "buckets" not in repr(limiter)
    with capture_events() as events:
        status = await limiter.hit("k")
    assert [event.name for event in events] == ["request_allowed"]
    assert (status.current_count, status.remaining, status.allowed) == (1.0, 1, True)
    await limiter.hit("k")
    error = await denied(limiter)
    assert error.retry_after == pytest.approx(0.5)
    assert (await limiter.status("k")).remaining == 0
    done: list[str] = []

    async def waiter() -> None:
        await limiter.acquire("k")
        done.append("waiter")

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        queued = await denied(limiter)  # the waiter goes first
        assert queued.retry_after == pytest.approx(1.0)
        clock.advance(0.5)
        await anyio.wait_all_tasks_blocked()
    assert done == ["waiter"]
    await limiter.reset("k")
    assert (await limiter.status("k")).remaining == 2
    assert {"take", "peek", "reset"} <= set(backend.calls)


async def test_a_remote_backend_that_denies_without_retry_time_does_not_spin() -> None:
    """A denial with retry_after 0 from a remote store waits a floor delay before asking again."""
    clock = FakeClock()

    class Stubborn(RemoteBackend):
        async def take(self, key: str, cost: float, rule: RateLimitRule) -> RateLimitDecision:
            self.calls.append("take")
            admitted = len(self.calls) >= 2
            return RateLimitDecision(admitted, 0.0, 0.0, 1, 0.0, 0.0)

    backend = Stubborn(clock)
    limiter = RateLimiter(1, 1.0, backend=backend)
    async with anyio.create_task_group() as tg:
        tg.start_soon(limiter.acquire, "k")
        await anyio.wait_all_tasks_blocked()
        assert backend.calls == ["take"]
        clock.advance(1e-3)
    assert backend.calls == ["take", "take"]


def test_gcra_table_details() -> None:
    """GcraTable: level and retry_after of unknown keys, sweep of drained buckets."""
    table = GcraTable(RateLimitRule(2, 1.0))
    assert table.level("k", 0.0) == 0.0
    assert table.retry_after("k", 1, 0.0) == 0.0
    assert table.take("k", 2, 0.0) == pytest.approx(1.0)
    assert table.level("k", 0.25) == pytest.approx(1.5)
    assert table.take("k", 1, 0.25) is None
    assert table.retry_after("k", 1, 0.25) == pytest.approx(0.25)
    del table
    gc.collect()


# -- hit_nowait: the synchronous form of hit() --------------------------------


def refusal(call: Any) -> tuple[float, float, float] | str:
    """What a decision raised: the RateLimitExceeded fields, or the status fields as a string."""
    try:
        status = call()
    except RateLimitExceeded as exc:
        return (exc.retry_after, exc.limit, exc.window)
    return repr(status.to_dict())


@pytest.mark.parametrize("algorithm", ["gcra", "fixed_window"])
async def test_hit_nowait_decides_exactly_as_hit(algorithm: Any) -> None:
    """On the same schedule of hits, hit_nowait() admits, denies and reports exactly what hit() does."""
    clock = FakeClock(100.0)
    sync = RateLimiter(3, 2.0, algorithm=algorithm, clock=clock)
    wait = RateLimiter(3, 2.0, algorithm=algorithm, clock=clock)
    rng = random.Random(7)
    outcomes = []
    for _ in range(200):
        key = rng.choice(["a", "b"])
        cost = rng.choice([1, 1, 2, 0.5])
        mine = refusal(lambda key=key, cost=cost: sync.hit_nowait(key, cost))
        try:
            status: Any = await wait.hit(key, cost)
        except RateLimitExceeded as exc:
            theirs: Any = (exc.retry_after, exc.limit, exc.window)
        else:
            theirs = repr(status.to_dict())
        assert mine == theirs
        outcomes.append(isinstance(mine, str))
        clock.advance(rng.choice([0.0, 0.1, 0.4, 1.0]))
    assert any(outcomes)  # the schedule saw both answers
    assert not all(outcomes)


async def test_hit_nowait_returns_the_lazy_status_and_denies_taking_nothing() -> None:
    """A hit_nowait() status reads like hit()'s; a denial leaves the bucket as it was."""
    clock = FakeClock()
    limiter = RateLimiter(2, 1.0, clock=clock)
    status = limiter.hit_nowait("k", 2)
    assert (status.key, status.allowed, status.remaining, status.current_count) == ("k", False, 0, 2)
    before = await limiter.status("k")
    with pytest.raises(RateLimitExceeded) as info:
        limiter.hit_nowait("k")
    assert info.value.retry_after == pytest.approx(0.5)
    assert info.value.key == "k"
    assert await limiter.status("k") == before
    clock.advance(0.5)
    assert limiter.hit_nowait("k").remaining == 0


async def test_hit_nowait_checks_its_arguments() -> None:
    """hit_nowait() refuses what hit() refuses, with the same errors."""
    limiter = RateLimiter(2, 1.0, clock=FakeClock())
    with pytest.raises(TypeError, match="key must be a str"):
        limiter.hit_nowait(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cost"):
        limiter.hit_nowait("k", "1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="above the limit"):
        limiter.hit_nowait("k", 3)
    with pytest.raises(ValueError, match="cost"):
        limiter.hit_nowait("k", -1)
    assert limiter.hit_nowait(type("Key", (str,), {})("k")).key == "k"
    assert limiter.resident_buckets == 1


async def test_hit_nowait_does_not_jump_the_queue() -> None:
    """While acquire() waiters queue on a key, hit_nowait() is denied as hit() is, with the same retry_after."""
    clock = FakeClock()
    limiter = RateLimiter(2, 2.0, clock=clock)
    limiter.hit_nowait("k", 2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(limiter.acquire, "k", 1)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(RateLimitExceeded) as info:
            limiter.hit_nowait("k")
        assert info.value.retry_after == pytest.approx((await denied(limiter)).retry_after)
        assert info.value.retry_after == pytest.approx(2.0)
        assert limiter.hit_nowait("other").key == "other"  # other keys are not held up
        clock.advance(1.0)
        await anyio.wait_all_tasks_blocked()
    clock.advance(1.0)
    limiter.hit_nowait("k")


async def test_hit_nowait_would_block_on_a_remote_backend() -> None:
    """With a remote backend hit_nowait() raises WouldBlock and asks nothing; hit() then decides."""
    clock = FakeClock()
    backend = RemoteBackend(clock)
    limiter = RateLimiter(1, 1.0, backend=backend, clock=clock)
    with pytest.raises(anyio.WouldBlock):
        limiter.hit_nowait("k")
    assert backend.calls == []
    await limiter.hit("k")
    assert backend.calls == ["take"]


async def test_hit_nowait_telemetry_is_hits() -> None:
    """hit_nowait() emits request_allowed / request_denied with hit()'s payloads."""
    clock = FakeClock()
    limiter = RateLimiter(1, 1.0, name="api", clock=clock)
    with capture_events() as events:
        limiter.hit_nowait("k")
        with pytest.raises(RateLimitExceeded):
            limiter.hit_nowait("k")
    assert [event.name for event in events] == ["request_allowed", "request_denied"]
    assert events[0].metadata == {
        "key": "k",
        "limit": 1,
        "window": 1.0,
        "cost": 1,
        "algorithm": "gcra",
        "name": "api",
    }
    assert events[1].measurements["retry_after"] == pytest.approx(1.0)


def denial(call: Any) -> float | None:
    """The retry_after of the RateLimitExceeded ``call()`` raised, or None if it admitted."""
    try:
        call()
    except RateLimitExceeded as exc:
        return exc.retry_after
    return None


async def test_acquire_nowait_decides_as_hit_nowait_and_returns_nothing() -> None:
    """acquire_nowait() admits and denies exactly as hit_nowait(), takes the same cost, and returns None."""
    clock = FakeClock()
    plain = RateLimiter(3, 1.0, clock=clock)
    status = RateLimiter(3, 1.0, clock=clock)
    rng = random.Random(5)
    for _ in range(100):
        cost = rng.choice([1, 2])
        assert denial(lambda cost=cost: plain.acquire_nowait("k", cost)) == denial(
            lambda cost=cost: status.hit_nowait("k", cost)
        )
        clock.advance(rng.choice([0.0, 0.2, 0.5]))
    assert await plain.status("k") == await status.status("k")


async def test_acquire_nowait_errors_and_remote_backends() -> None:
    """acquire_nowait() checks its arguments, denies behind queued waiters, and would block on a remote backend."""
    clock = FakeClock()
    limiter = RateLimiter(1, 1.0, clock=clock)
    with pytest.raises(TypeError, match="key must be a str"):
        limiter.acquire_nowait(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="above the limit"):
        limiter.acquire_nowait("k", 2)
    assert limiter.acquire_nowait("k", 0.5) is None  # type: ignore[func-returns-value]
    async with anyio.create_task_group() as tg:
        tg.start_soon(limiter.acquire, "k", 1)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(RateLimitExceeded) as info:
            limiter.acquire_nowait("k", 0.5)
        assert info.value.retry_after == pytest.approx(1.0)
        clock.advance(1.0)  # the waiter's turn: half a window for GCRA, the window's end for a fixed window
    backend = RemoteBackend(clock)
    remote = RateLimiter(1, 1.0, backend=backend, clock=clock)
    with pytest.raises(anyio.WouldBlock):
        remote.acquire_nowait("k")
    assert backend.calls == []
    with capture_events() as events:
        limiter.acquire_nowait("fresh")
    assert [event.name for event in events] == ["request_allowed"]


async def test_bucket_handle_decides_as_acquire_nowait() -> None:
    """A bucket handle's acquire_nowait() admits and denies exactly as acquire_nowait(key, cost), on both algorithms."""
    for algorithm in ("gcra", "fixed_window"):
        clock = FakeClock()
        plain = RateLimiter(3, 1.0, algorithm=algorithm, clock=clock)
        handled = RateLimiter(3, 1.0, algorithm=algorithm, clock=clock)
        one, two = handled.bucket("k"), handled.bucket("k", 2)
        assert (one.key, one.cost, two.cost, one.limiter) == ("k", 1, 2, handled)
        rng = random.Random(7)
        for _ in range(100):
            cost = rng.choice([1, 2])
            handle = one if cost == 1 else two
            assert denial(functools.partial(plain.acquire_nowait, "k", cost)) == denial(handle.acquire_nowait)
            clock.advance(rng.choice([0.0, 0.2, 0.5]))
        assert await plain.status("k") == await handled.status("k")
        assert "RateLimitBucket(key='k', cost=1" in repr(one)


@pytest.mark.parametrize("algorithm", ["gcra", "fixed_window"])
async def test_bucket_handle_errors_waiters_remote_and_telemetry(algorithm: Algorithm) -> None:
    """bucket() checks its arguments once; the handle denies behind waiters, would block remotely, and emits."""
    clock = FakeClock()
    limiter = RateLimiter(1, 1.0, algorithm=algorithm, clock=clock)
    with pytest.raises(TypeError, match="key must be a str"):
        limiter.bucket(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="above the limit"):
        limiter.bucket("k", 2)
    half = limiter.bucket("k", 0.5)
    assert half.acquire_nowait() is None  # type: ignore[func-returns-value]
    async with anyio.create_task_group() as tg:
        tg.start_soon(limiter.acquire, "k", 1)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(RateLimitExceeded) as info:
            half.acquire_nowait()
        assert info.value.retry_after == pytest.approx(1.0)
        clock.advance(1.0)  # the waiter's turn: half a window for GCRA, the window's end for a fixed window
    backend = RemoteBackend(clock)
    remote = RateLimiter(1, 1.0, backend=backend, clock=clock).bucket("k")
    with pytest.raises(anyio.WouldBlock):
        remote.acquire_nowait()
    assert backend.calls == []
    with capture_events() as events:
        limiter.bucket("fresh").acquire_nowait()
    assert [event.name for event in events] == ["request_allowed"]


async def test_bucket_handle_refuses_a_bool_cost() -> None:
    """limiter.bucket() checks its cost like hit(): True is no cost."""
    limiter = RateLimiter(5, 1.0, clock=FakeClock())
    with pytest.raises(ValueError, match="cost"):
        limiter.bucket("k", cost=True)


@pytest.mark.parametrize("algorithm", ["gcra", "fixed_window"])
async def test_a_denial_behind_due_waiters_carries_a_positive_retry_time(algorithm: Algorithm) -> None:
    """A hit denied because queued waiters are due but have not run yet is never told to retry after 0 s."""
    clock = FakeClock()
    limiter = RateLimiter(2, 2.0, algorithm=algorithm, clock=clock)
    await limiter.hit("k", 2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(limiter.acquire, "k", 1)
        await anyio.wait_all_tasks_blocked()
        clock.advance(2.0)  # the bucket has room for the waiter and this hit, but the waiter has not run
        with pytest.raises(RateLimitExceeded) as by_hit:
            await limiter.hit("k")
        with pytest.raises(RateLimitExceeded) as by_nowait:
            limiter.acquire_nowait("k")
        for info in (by_hit, by_nowait):
            assert info.value.retry_after is not None
            assert info.value.retry_after > 0


@pytest.mark.parametrize("algorithm", ["gcra", "fixed_window"])
@pytest.mark.parametrize("limit", [10**6, 10**9, 10**10, 10**12])
async def test_huge_limits_admit_exactly_their_limit(algorithm: Algorithm, limit: int) -> None:
    """At one instant a bucket admits exactly ``limit`` units, never one more, up to the largest accepted limit."""
    limiter = RateLimiter(limit, 60.0, algorithm=algorithm, clock=FakeClock(12345.678))
    await limiter.hit("whole", limit)
    with pytest.raises(RateLimitExceeded):
        await limiter.hit("whole", 1)
    for _ in range(4):
        await limiter.hit("quarters", limit // 4)
    with pytest.raises(RateLimitExceeded):
        await limiter.hit("quarters", 1)
    await limiter.hit("less-one", limit - 1)
    await limiter.hit("less-one", 1)
    with pytest.raises(RateLimitExceeded):
        await limiter.hit("less-one", 1)
    assert (await limiter.status("whole")).remaining == 0


@pytest.mark.parametrize(
    ("arguments", "path"),
    [
        ({"limit": 10**400, "window": 1.0}, "limit"),
        ({"limit": 10**13, "window": 1.0}, "limit"),
        ({"limit": float("nan"), "window": 1.0}, "limit"),
        ({"limit": 5, "window": 10**400}, "window"),
        ({"limit": 5, "window": 1e15}, "window"),
        ({"limit": 5, "window": 1e-310}, "window"),
        ({"limit": 5, "window": 1e-9, "algorithm": "fixed_window"}, "window"),
        ({"limit": 5, "window": -0.0}, "window"),
        ({"limit": 5, "window": 1.0, "algorithm": "sliding"}, "algorithm"),
        ({"limit": 5, "window": 1.0, "name": 7}, "name"),
    ],
)
def test_rules_no_backend_can_evaluate_exactly_are_refused(arguments: dict[str, Any], path: str) -> None:
    """A rule out of the documented bounds fails at construction with a ConfigurationError naming it."""
    with pytest.raises(ConfigurationError) as info:
        RateLimiter(**arguments)
    assert info.value.path == path
    assert not isinstance(info.value.__cause__, OverflowError)


@pytest.mark.parametrize("cost", [10**400, float("inf"), 1e-300, -1, 0, True, "1"])
async def test_costs_out_of_range_are_refused(cost: object) -> None:
    """A cost that is not a finite number from limit * 2**-40 to the limit is a ConfigurationError naming cost."""
    limiter = RateLimiter(5, 1.0, clock=FakeClock())
    for call in (limiter.hit_nowait, limiter.acquire_nowait, limiter.bucket):
        with pytest.raises(ConfigurationError) as info:
            call("k", cost)  # type: ignore[arg-type]
        assert info.value.path == "cost"
    with pytest.raises(ConfigurationError):
        await limiter.acquire("k", cost)  # type: ignore[arg-type]
    assert limiter.resident_buckets == 0
