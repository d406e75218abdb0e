"""The clock: monotonic in production, fake and advanceable in tests."""

from __future__ import annotations

import time

import anyio
import pytest
import trio
from trio.testing import MockClock

from seawall import Clock, FakeClock, MonotonicClock
from seawall._clock import current_clock, default_clock, in_trio_task

pytestmark = pytest.mark.anyio


#: trio with a clock that jumps to the next deadline as soon as every task is blocked.
trio_autojump = pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio-mockclock")]
)


def test_monotonic_clock_is_time_monotonic() -> None:
    """The production clock reads time.monotonic (asyncio's loop.time source), not the wall clock."""
    clock = MonotonicClock()
    before = time.monotonic()
    assert before <= clock.now() <= time.monotonic()
    assert isinstance(clock, Clock)
    assert repr(clock) == "MonotonicClock()"


async def test_monotonic_clock_sleep_waits_real_time() -> None:
    """MonotonicClock.sleep really waits (generous bound; the real clock is the point)."""
    clock = MonotonicClock()
    start = clock.now()
    await clock.sleep(0.01)
    assert clock.now() - start >= 0.009


def test_outside_any_event_loop_the_current_clock_is_the_monotonic_clock() -> None:
    """With no loop running, clock=None means time.monotonic (and no trio task is detected)."""
    assert current_clock() is default_clock
    assert isinstance(default_clock, MonotonicClock)
    assert not in_trio_task()


async def test_the_current_clock_is_the_running_loops(anyio_backend_name: str) -> None:
    """On asyncio the current clock is time.monotonic (= loop.time()); under trio it reads the run's own clock."""
    clock = current_clock()
    assert isinstance(clock, Clock)
    assert in_trio_task() is (anyio_backend_name == "trio")
    before = anyio.current_time()
    now = clock.now()
    assert before <= now <= anyio.current_time()
    if anyio_backend_name == "asyncio":
        assert clock is default_clock
    else:
        assert repr(clock) == "TrioClock()"
        assert current_clock() is clock  # one instance serves every run
        assert abs(now - time.monotonic()) > 1.0  # trio's clock has its own (random) epoch


@trio_autojump
async def test_under_trio_the_current_clock_follows_a_mock_clock() -> None:
    """A MockClock moves the current clock: its sleep jumps, and now() reads the virtual time."""
    clock = current_clock()
    start, real = clock.now(), time.monotonic()
    await clock.sleep(600.0)
    assert clock.now() - start == pytest.approx(600.0)
    assert clock.now() == trio.current_time()
    assert time.monotonic() - real < 60.0  # virtual time, not slept


async def test_fake_clock_sleepers_wake_in_deadline_order_when_time_passes() -> None:
    """Sleepers on a FakeClock wake exactly when advance() passes their deadline."""
    clock = FakeClock(100.0)
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper, "late", 2.0)
        tg.start_soon(sleeper, "early", 1.0)
        await anyio.wait_all_tasks_blocked()
        assert clock.sleepers == 2
        clock.advance(0.5)
        await anyio.wait_all_tasks_blocked()
        assert woke == []
        clock.advance(0.5)
        await anyio.wait_all_tasks_blocked()
        assert woke == ["early"]
        clock.set(102.0)
    assert woke == ["early", "late"]
    assert clock.now() == 102.0


async def test_a_cancelled_sleep_is_no_longer_a_sleeper() -> None:
    """A sleep cancelled before it was due leaves the clock; the others still wake on time."""
    clock = FakeClock()
    woke: list[str] = []

    async def sleep(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleep, "kept", 2.0)
        async with anyio.create_task_group() as doomed:
            doomed.start_soon(sleep, "cancelled", 1.0)
            await anyio.wait_all_tasks_blocked()
            assert clock.sleepers == 2
            doomed.cancel_scope.cancel()
        assert clock.sleepers == 1
        clock.advance(2.0)
    assert woke == ["kept"]
    assert clock.sleepers == 0


async def test_fake_clock_zero_sleep_is_a_checkpoint() -> None:
    """sleep(0) on a FakeClock returns without waiting for time to move."""
    clock = FakeClock()
    await clock.sleep(0)
    assert clock.sleepers == 0


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_fake_clock_rejects_bad_advance(bad: float) -> None:
    """advance() takes only finite, non-negative amounts."""
    with pytest.raises(ValueError, match="advance"):
        FakeClock().advance(bad)


def test_fake_clock_cannot_go_back() -> None:
    """set() refuses a time in the past: the clock is monotonic."""
    clock = FakeClock(5.0)
    with pytest.raises(ValueError, match="back in time"):
        clock.set(4.0)
    assert "now=5.0" in repr(clock)
