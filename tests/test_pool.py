"""ConnectionPool with an in-memory factory: ordering, overflow, waiting, cancellation, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import tracemalloc
from datetime import timedelta
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import trio
from trio.testing import MockClock

from seawall import ConfigurationError, ConfigurationTypeError, ConnectionPool, PoolClosed, PoolStatus, PoolTimeout
from seawall._pool import PoolCheckout, PoolFactory, _Background
from seawall.testing import FakeClock, capture_events

pytestmark = pytest.mark.anyio


#: trio with a clock that jumps to the next deadline as soon as every task is blocked.
trio_autojump = pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio-mockclock")]
)


class Conn:
    """A fake worker that remembers whether it was closed."""

    def __init__(self, ident: int) -> None:
        self.ident = ident
        self.closed = False
        self.resets = 0

    def __repr__(self) -> str:
        return f"Conn({self.ident})"


class Factory:
    """An in-memory factory with switches for failures, gates and health."""

    def __init__(self) -> None:
        self.ids = itertools.count(1)
        self.made: list[Conn] = []
        self.closed: list[Conn] = []
        self.fail_create: list[BaseException] = []
        self.create_gate: anyio.Event | None = None
        self.healthy = True

    async def create(self) -> Conn:
        if self.create_gate is not None:
            await self.create_gate.wait()
        if self.fail_create:
            raise self.fail_create.pop(0)
        conn = Conn(next(self.ids))
        self.made.append(conn)
        return conn

    async def close(self, worker: Conn) -> None:
        worker.closed = True
        self.closed.append(worker)

    def is_closed(self, worker: Conn) -> bool:
        return worker.closed

    def open_count(self) -> int:
        return sum(1 for conn in self.made if not conn.closed)


class ResettingFactory(Factory):
    """Adds reset and check hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.reset_gate: anyio.Event | None = None
        self.reset_error: Exception | None = None
        self.checked: list[Conn] = []

    async def reset(self, worker: Conn) -> None:
        if self.reset_gate is not None:
            await self.reset_gate.wait()
        if self.reset_error is not None:
            raise self.reset_error
        worker.resets += 1

    async def check(self, worker: Conn) -> bool:
        self.checked.append(worker)
        return self.healthy


def counts(pool: ConnectionPool[Any]) -> tuple[int, int, int, int]:
    s = pool.status()
    return (s.idle, s.in_use, s.overflow, s.waiting)


async def settle() -> None:
    await anyio.wait_all_tasks_blocked()


async def test_start_creates_size_workers_and_close_closes_them() -> None:
    """`async with pool` opens `size` workers and closes every one on exit."""
    factory = Factory()
    async with ConnectionPool(factory, size=3, name="db") as pool:
        assert pool.status() == PoolStatus("db", 3, 0, 3, 0, 0, 0)
        await pool.start()  # idempotent
        assert len(factory.made) == 3
    assert factory.open_count() == 0
    assert pool.closed


async def test_checkout_is_lifo() -> None:
    """The most recently returned idle worker is handed out first."""
    factory = Factory()
    async with ConnectionPool(factory, size=3) as pool:
        async with pool.checkout() as a, pool.checkout() as b:
            assert a is not b
        async with pool.checkout() as again:
            assert again is a  # b went back first, a on top of it


async def test_overflow_is_created_under_load_and_closed_on_return() -> None:
    """Beyond `size`, overflow workers are made and closed when they come back unneeded."""
    factory = Factory()
    async with ConnectionPool(factory, size=1, max_overflow=2) as pool:
        async with pool.checkout(), pool.checkout() as second, pool.checkout():
            assert counts(pool) == (0, 3, 2, 0)
        await settle()
        assert counts(pool) == (1, 0, 0, 0)
        assert second.closed
        assert factory.open_count() == 1


async def test_waiters_are_served_in_fifo_order() -> None:
    """Tasks waiting for a worker get it in the order they asked."""
    factory = Factory()
    order: list[int] = []
    async with ConnectionPool(factory, size=1) as pool:
        release = anyio.Event()

        async def holder() -> None:
            async with pool.checkout():
                await release.wait()

        async def waiter(i: int) -> None:
            async with pool.checkout():
                order.append(i)

        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await settle()
            for i in range(4):
                tg.start_soon(waiter, i)
                await settle()
            assert pool.status().waiting == 4
            release.set()
        assert order == [0, 1, 2, 3]
        assert counts(pool) == (1, 0, 0, 0)


async def test_returned_worker_goes_to_the_waiter_not_a_newcomer() -> None:
    """A newcomer arriving right after a return queues behind the waiter (no barging)."""
    factory = Factory()
    got: list[str] = []
    async with ConnectionPool(factory, size=1) as pool:
        cm = pool.checkout()
        await cm.__aenter__()

        async def take(label: str) -> None:
            async with pool.checkout():
                got.append(label)

        async with anyio.create_task_group() as tg:
            tg.start_soon(take, "waiter")
            await settle()
            await cm.__aexit__(None, None, None)
            # The worker is promised to the waiter even before it runs.
            assert counts(pool) == (0, 1, 0, 0)
            tg.start_soon(take, "newcomer")
        assert got == ["waiter", "newcomer"]


async def test_checkout_times_out_with_injected_clock() -> None:
    """A waiter raises PoolTimeout exactly when its timeout passes on the pool's clock."""
    clock = FakeClock()
    factory = Factory()
    async with ConnectionPool(factory, size=1, timeout=2.0, name="p", clock=clock) as pool, pool.checkout():
        with capture_events() as events:
            async with anyio.create_task_group() as tg:
                outcome: list[BaseException] = []

                async def wait() -> None:
                    try:
                        async with pool.checkout():
                            pass
                    except PoolTimeout as exc:
                        outcome.append(exc)

                tg.start_soon(wait)
                await settle()
                clock.advance(1.9)
                await settle()
                assert not outcome
                assert pool.status().waiting == 1
                clock.advance(0.1)
        assert len(outcome) == 1
        assert outcome[0].timeout == 2.0
        assert outcome[0].name == "p"
        assert [e.name for e in events] == ["timeout"]
        assert events[0].measurements["duration"] == 2.0
        assert counts(pool) == (0, 1, 0, 0)


async def test_per_checkout_timeout_overrides_and_real_clock_fires() -> None:
    """`checkout(timeout=)` overrides the default, on the real clock too."""
    async with ConnectionPool(Factory(), size=1, timeout=None) as pool, pool.checkout():
        with pytest.raises(PoolTimeout):
            async with pool.checkout(timeout=timedelta(milliseconds=5)):
                pass
        assert counts(pool) == (0, 1, 0, 0)


async def test_timer_serves_waiters_with_different_deadlines() -> None:
    """One timer times out each waiter at its own deadline, earliest first."""
    clock = FakeClock()
    async with ConnectionPool(Factory(), size=1, timeout=None, clock=clock) as pool, pool.checkout():
        timed_out: list[float] = []

        async def wait(t: float) -> None:
            with pytest.raises(PoolTimeout):
                async with pool.checkout(timeout=t):
                    pass
            timed_out.append(t)

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait, 5.0)
            await settle()
            tg.start_soon(wait, 1.0)
            await settle()
            tg.start_soon(wait, 3.0)
            await settle()
            for _ in range(5):
                clock.advance(1.0)
                await settle()
        assert timed_out == [1.0, 3.0, 5.0]


async def test_cancelled_waiter_leaves_no_trace_and_others_proceed() -> None:
    """Cancelling a waiter removes it; the next waiter still gets the worker."""
    factory = Factory()
    async with ConnectionPool(factory, size=1) as pool:
        cm = pool.checkout()
        await cm.__aenter__()
        served: list[str] = []

        async def take(label: str) -> None:
            async with pool.checkout():
                served.append(label)

        async with anyio.create_task_group() as tg:
            async with anyio.create_task_group() as inner:
                inner.start_soon(take, "doomed")
                await settle()
                tg.start_soon(take, "second")
                await settle()
                assert pool.status().waiting == 2
                inner.cancel_scope.cancel()
            assert pool.status().waiting == 1
            await cm.__aexit__(None, None, None)
        assert served == ["second"]
        assert counts(pool) == (1, 0, 0, 0)


@pytest.mark.asyncio_only("a native task.cancel() after the hand-off; a scope lets a woken task finish (next test)")
async def test_waiter_cancelled_after_handoff_passes_worker_on() -> None:
    """A waiter cancelled just after being handed a worker gives it to the next waiter."""
    factory = Factory()
    async with ConnectionPool(factory, size=1) as pool:
        cm = pool.checkout()
        await cm.__aenter__()
        served: list[str] = []

        async def take(label: str) -> None:
            async with pool.checkout():
                served.append(label)

        async with anyio.create_task_group() as tg:
            doomed = asyncio.get_running_loop().create_task(take("doomed"))
            await settle()
            tg.start_soon(take, "next")
            await settle()
            # Hand the worker to "doomed", then cancel it before it runs
            # (a native cancel: anyio would defer it to the next checkpoint).
            await cm.__aexit__(None, None, None)
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
        assert served == ["next"]
        assert counts(pool) == (1, 0, 0, 0)
        assert factory.open_count() == 1


async def test_waiter_cancelled_by_a_scope_after_handoff_returns_the_worker() -> None:
    """Cancelled by its scope after the hand-off, a waiter gets the worker, is cancelled in its block, returns it."""
    factory = Factory()
    async with ConnectionPool(factory, size=1) as pool:
        cm = pool.checkout()
        await cm.__aenter__()
        served: list[str] = []
        scope = anyio.CancelScope()

        async def take(label: str, scope: anyio.CancelScope) -> None:
            with scope:
                async with pool.checkout():
                    served.append(label)
                    await anyio.lowlevel.checkpoint()  # where the cancellation lands
                    served.append(f"{label} not cancelled")

        async with anyio.create_task_group() as tg:
            tg.start_soon(take, "doomed", scope)
            await settle()
            tg.start_soon(take, "next", anyio.CancelScope())
            await settle()
            await cm.__aexit__(None, None, None)  # hands the worker to "doomed" ...
            scope.cancel()  # ... which is cancelled before it runs: anyio lets it finish its checkout
        assert served == ["doomed", "next", "next not cancelled"]
        assert counts(pool) == (1, 0, 0, 0)
        assert factory.open_count() == 1


async def test_holder_cancelled_mid_use_is_checked_and_kept_when_healthy() -> None:
    """A holder cancelled mid-block returns its worker: checked, reset, counts exact."""
    factory = ResettingFactory()
    async with ConnectionPool(factory, size=1) as pool:
        async with anyio.create_task_group() as tg:

            async def hold() -> None:
                async with pool.checkout():
                    await anyio.sleep_forever()

            tg.start_soon(hold)
            await settle()
            assert counts(pool) == (0, 1, 0, 0)
            tg.cancel_scope.cancel()
        assert counts(pool) == (1, 0, 0, 0)
        assert factory.checked == factory.made
        assert factory.made[0].resets == 1


async def test_failed_check_replaces_worker() -> None:
    """A worker whose block raised and whose check fails is closed, and a fresh one follows."""
    factory = ResettingFactory()
    async with ConnectionPool(factory, size=1) as pool:
        factory.healthy = False
        with pytest.raises(RuntimeError, match="boom"):
            async with pool.checkout():
                raise RuntimeError("boom")
        assert factory.made[0].closed
        assert counts(pool) == (0, 0, 0, 0)
        async with pool.checkout() as conn:
            assert conn is factory.made[1]


async def test_check_that_raises_counts_as_dead() -> None:
    """A check that raises marks the worker dead."""

    class Broken(ResettingFactory):
        async def check(self, worker: Conn) -> bool:
            raise OSError("gone")

    factory = Broken()
    async with ConnectionPool(factory, size=1) as pool:
        with pytest.raises(ValueError, match="x"):
            async with pool.checkout():
                raise ValueError("x")
        assert factory.closed == factory.made[:1]
        assert counts(pool) == (0, 0, 0, 0)


async def test_reset_runs_on_return_and_a_failing_reset_kills_the_worker() -> None:
    """Reset runs on each return; a reset error closes the worker instead of pooling it."""
    factory = ResettingFactory()
    async with ConnectionPool(factory, size=1) as pool:
        async with pool.checkout() as conn:
            pass
        assert conn.resets == 1
        factory.reset_error = OSError("reset failed")
        async with pool.checkout() as conn:
            pass
        assert conn.closed
        assert counts(pool) == (0, 0, 0, 0)


async def test_dead_idle_worker_is_never_handed_out() -> None:
    """A worker closed while idle (e.g. by the server) is replaced on checkout."""
    factory = Factory()
    async with ConnectionPool(factory, size=2) as pool:
        for conn in factory.made:
            conn.closed = True
        async with pool.checkout() as conn:
            assert not conn.closed
            assert conn is factory.made[2]
        await settle()
        assert counts(pool) == (1, 0, 0, 0)


async def test_worker_dead_on_return_is_replaced_for_a_waiter() -> None:
    """A worker that died in use frees its slot; a waiter creates the replacement."""
    factory = Factory()
    async with ConnectionPool(factory, size=1) as pool:
        got: list[Conn] = []
        cm = pool.checkout()
        conn = await cm.__aenter__()

        async def take() -> None:
            async with pool.checkout() as c:
                got.append(c)

        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            await settle()
            conn.closed = True
            await cm.__aexit__(None, None, None)
        assert got == [factory.made[1]]
        assert counts(pool) == (1, 0, 0, 0)


async def test_create_failure_reaches_caller_as_itself_and_does_not_shrink_pool() -> None:
    """A failing create() raises its own error, frees the slot, and the next checkout retries."""
    factory = Factory()
    async with ConnectionPool(factory, size=1, max_overflow=1) as pool, pool.checkout():
        factory.fail_create.append(ConnectionRefusedError("db down"))
        with pytest.raises(ConnectionRefusedError, match="db down"):
            async with pool.checkout():
                pass
        assert counts(pool) == (0, 1, 0, 0)
        async with pool.checkout() as again:
            assert again is factory.made[1]


async def test_create_failure_passes_slot_to_next_waiter() -> None:
    """When a replacement cannot be made, the waiting task gets the error and the slot is not lost."""
    factory = Factory()
    async with ConnectionPool(factory, size=1) as pool:
        cm = pool.checkout()
        conn = await cm.__aenter__()
        errors: list[BaseException] = []

        async def take() -> None:
            try:
                async with pool.checkout():
                    pass
            except OSError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            tg.start_soon(take)
            await settle()
            conn.closed = True
            factory.fail_create.append(OSError("no"))
            await cm.__aexit__(None, None, None)
        assert len(errors) == 1
        assert counts(pool) == (1, 0, 0, 0)


async def test_cancel_during_create_frees_the_slot() -> None:
    """Cancelling a checkout while its worker is being created leaves counts exact."""
    factory = Factory()
    async with ConnectionPool(factory, size=1) as pool:
        async with pool.checkout():
            pass
        factory.made[0].closed = True  # force a create on next checkout
        factory.create_gate = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def take() -> None:
                async with pool.checkout():
                    pass

            tg.start_soon(take)
            await settle()
            assert counts(pool) == (0, 1, 0, 0)
            tg.cancel_scope.cancel()
        await settle()
        assert counts(pool) == (0, 0, 0, 0)
        factory.create_gate.set()
        async with pool.checkout() as conn:
            assert not conn.closed


@pytest.mark.asyncio_only("a native task.cancel() cuts through anyio's shield; nothing can on trio")
async def test_native_cancel_during_reset_settles_counts_and_closes_worker() -> None:
    """An asyncio task.cancel() that cuts into the return path still leaks nothing."""
    factory = ResettingFactory()
    async with ConnectionPool(factory, size=1) as pool:
        factory.reset_gate = anyio.Event()

        async def use() -> None:
            async with pool.checkout():
                pass

        task = asyncio.get_running_loop().create_task(use())
        await settle()
        task.cancel()  # native cancellation is not stopped by anyio's shield
        with pytest.raises(asyncio.CancelledError):
            await task
        await settle()
        assert counts(pool) == (0, 0, 0, 0)
        assert factory.made[0].closed


async def test_max_lifetime_rotates_workers() -> None:
    """A worker older than max_lifetime is closed on return and on checkout."""
    clock = FakeClock()
    factory = Factory()
    async with ConnectionPool(factory, size=1, max_lifetime=10.0, clock=clock) as pool:
        async with pool.checkout() as first:
            clock.advance(11.0)
        await settle()
        assert first.closed
        async with pool.checkout() as second:
            assert second is factory.made[1]
        clock.advance(11.0)
        async with pool.checkout() as third:
            assert third is factory.made[2]
        await settle()
        assert second.closed
        assert counts(pool) == (1, 0, 0, 0)


async def test_max_idle_keeps_overflow_then_closes_it() -> None:
    """With max_idle, overflow workers stay idle for a while, then only the surplus closes."""
    clock = FakeClock()
    factory = Factory()
    async with ConnectionPool(factory, size=1, max_overflow=2, max_idle=30.0, clock=clock) as pool:
        async with pool.checkout(), pool.checkout(), pool.checkout():
            pass
        await settle()
        assert counts(pool) == (3, 0, 2, 0)
        clock.advance(29.0)
        await settle()
        assert pool.status().idle == 3
        clock.advance(1.0)
        await settle()
        assert counts(pool) == (1, 0, 0, 0)
        assert factory.open_count() == 1
        # The reaper keeps working for later surpluses.
        async with pool.checkout(), pool.checkout():
            pass
        clock.advance(31.0)
        await settle()
        clock.advance(31.0)
        await settle()
        assert counts(pool) == (1, 0, 0, 0)


async def test_bulkhead_without_factory_limits_concurrency() -> None:
    """`factory=None` yields None and admits at most size + max_overflow at once."""
    pool: ConnectionPool[None] = ConnectionPool(None, size=2, max_overflow=1, timeout=None)
    active = peak = 0
    async with pool:

        async def job() -> None:
            nonlocal active, peak
            async with pool.checkout() as conn:
                assert conn is None
                active += 1
                peak = max(peak, active)
                await anyio.lowlevel.checkpoint()
                await anyio.lowlevel.checkpoint()
                active -= 1

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(job)
        assert peak == 3
        assert counts(pool) == (2, 0, 0, 0)


@pytest.mark.parametrize("size", [1_000_000, 2**53])
async def test_a_huge_bulkhead_costs_what_it_is_used_for(size: int) -> None:
    """A bulkhead's slots are a count: a million (or 2**53) slots start at once, holding only the slots in use."""
    tracemalloc.start()
    try:
        async with ConnectionPool(None, size=size, timeout=None) as pool:
            started, _ = tracemalloc.get_traced_memory()
            assert started < 64 * 1024  # a few objects, not one per slot (a million slots took 3.4 GB)
            assert pool.status().idle == size
            async with pool.checkout() as first, pool.checkout() as second:
                assert (first, second) == (None, None)
                assert (pool.status().idle, pool.status().in_use) == (size - 2, 2)
            lease = pool.checkout_nowait()
            assert pool.status().in_use == 1
            pool.checkin_nowait(lease)
            assert (pool.status().idle, pool.status().in_use, pool.status().overflow) == (size, 0, 0)
    finally:
        tracemalloc.stop()
    assert pool.status().idle == 0  # closed: nothing is lent any more


async def test_async_callable_serves_as_factory() -> None:
    """A zero-argument async callable makes workers; close uses their aclose()/close()."""

    class Client:
        def __init__(self) -> None:
            self.is_closed = False

        async def aclose(self) -> None:
            self.is_closed = True

    class SyncClose:
        def __init__(self) -> None:
            self.shut = False

        def is_closed(self) -> bool:
            return self.shut

        def close(self) -> None:
            self.shut = True

    made: list[Any] = []

    async def make_client() -> Client:
        made.append(Client())
        return made[-1]

    async with ConnectionPool(make_client, size=1) as pool:
        async with pool.checkout() as client:
            assert isinstance(client, Client)
        client.is_closed = True
        async with pool.checkout() as fresh:
            assert fresh is made[1]
    assert all(c.is_closed for c in made)

    async def make_sync() -> SyncClose:
        return SyncClose()

    async with ConnectionPool(make_sync, size=1) as other, other.checkout() as worker:
        pass
    assert worker.shut

    async def make_plain() -> object:
        return object()

    async with ConnectionPool(make_plain, size=1) as plain, plain.checkout():
        pass


async def test_close_waits_for_holders_and_later_checkout_fails() -> None:
    """close() waits for a held worker, closes it on return, then checkout raises PoolClosed."""
    factory = Factory()
    pool = ConnectionPool(factory, size=2, max_overflow=1)
    await pool.start()
    release = anyio.Event()
    closed_at: list[bool] = []

    async def hold() -> None:
        async with pool.checkout():
            await release.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await settle()

        async def close() -> None:
            await pool.close()
            closed_at.append(True)

        tg.start_soon(close)
        await settle()
        assert not closed_at
        assert factory.open_count() == 1
        release.set()
    assert closed_at == [True]
    assert factory.open_count() == 0
    assert counts(pool) == (0, 0, 0, 0)
    with pytest.raises(PoolClosed):
        async with pool.checkout():
            pass
    with pytest.raises(PoolClosed):
        await pool.start()
    await pool.close()  # again: a no-op
    assert "closed" in repr(pool)


async def test_close_gives_up_after_grace_and_fails_waiters() -> None:
    """Waiters fail with PoolClosed at once; a holder past the grace period has its worker closed."""
    clock = FakeClock()
    factory = ResettingFactory()
    pool = ConnectionPool(factory, size=1, clock=clock)
    await pool.start()
    outcomes: list[str] = []

    async def hold() -> None:
        async with pool.checkout() as conn:
            await anyio.sleep_forever()
        outcomes.append(f"returned {conn.closed}")

    async def wait() -> None:
        try:
            async with pool.checkout():
                pass
        except PoolClosed:
            outcomes.append("closed")

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await settle()
        tg.start_soon(wait)
        await settle()
        tg.start_soon(pool.close)
        await settle()
        assert outcomes == ["closed"]
        clock.advance(10.0)
        await settle()
        assert factory.open_count() == 0
        assert counts(pool) == (0, 0, 0, 0)
        tg.cancel_scope.cancel()
    assert factory.reset_gate is None
    assert counts(pool) == (0, 0, 0, 0)


async def test_worker_created_while_closing_is_closed() -> None:
    """A worker whose creation finishes after close() is closed, and the caller gets PoolClosed."""
    factory = Factory()
    pool = ConnectionPool(factory, size=1)
    factory.create_gate = anyio.Event()
    errors: list[BaseException] = []

    async def take() -> None:
        try:
            async with pool.checkout():
                pass
        except PoolClosed as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(take)
        await settle()
        await pool.close()
        factory.create_gate.set()
    await settle()
    assert len(errors) == 1
    assert factory.open_count() == 0


async def test_failed_start_closes_what_it_made_and_raises_the_error() -> None:
    """If one worker cannot be created, start() closes the others and raises the error itself."""
    factory = Factory()
    factory.fail_create.append(ConnectionResetError("nope"))
    pool = ConnectionPool(factory, size=3)
    with pytest.raises(ConnectionResetError):
        await pool.start()
    assert factory.open_count() == 0
    assert counts(pool) == (0, 0, 0, 0)
    await pool.start()  # a retry works
    assert counts(pool) == (3, 0, 0, 0)
    await pool.close()


async def test_close_failures_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    """A factory.close() that raises is logged; the pool still frees the slot."""

    class BadClose(Factory):
        async def close(self, worker: Conn) -> None:
            raise OSError("close failed")

    pool = ConnectionPool(BadClose(), size=1)
    await pool.start()
    await pool.close()
    assert counts(pool) == (0, 0, 0, 0)
    assert "pool_worker_close_failed" in caplog.text


async def test_telemetry_checkout_and_checkin_carry_durations() -> None:
    """Checkout reports the wait, checkin the time held, both in seconds."""
    clock = FakeClock()
    async with ConnectionPool(Factory(), size=1, name="t", clock=clock) as pool:
        with capture_events() as events:
            async with pool.checkout():
                clock.advance(0.5)
        assert [e.name for e in events] == ["checkout", "checkin"]
        assert events[0].measurements["wait"] == 0.0
        assert events[1].measurements["held"] == 0.5
        assert events[1].measurements["duration"] == 0.5
        assert events[1].metadata == {"pool": "t", "raised": False}


async def test_status_to_dict_and_repr_show_live_state() -> None:
    """status().to_dict() has the contract's keys; repr shows the counts."""
    async with ConnectionPool(Factory(), size=2, max_overflow=1, name="r") as pool, pool.checkout():
        assert pool.status().to_dict() == {
            "name": "r",
            "size": 2,
            "max_overflow": 1,
            "idle": 1,
            "in_use": 1,
            "overflow": 0,
            "waiting": 0,
        }
        assert "in_use=1" in repr(pool)
        assert (pool.name, pool.size, pool.max_overflow) == ("r", 2, 1)


async def test_checkout_context_misuse_is_an_error() -> None:
    """A checkout object cannot be entered twice at once or exited before entering."""
    async with ConnectionPool(Factory(), size=2) as pool:
        cm: PoolCheckout[Conn] = pool.checkout()
        with pytest.raises(RuntimeError):
            await cm.__aexit__(None, None, None)
        await cm.__aenter__()
        with pytest.raises(RuntimeError):
            await cm.__aenter__()
        await cm.__aexit__(None, None, None)


async def test_size_zero_is_a_pure_overflow_pool() -> None:
    """size=0 with overflow creates on demand and closes every worker on return."""
    factory = Factory()
    async with ConnectionPool(factory, size=0, max_overflow=2) as pool:
        async with pool.checkout():
            assert counts(pool) == (0, 1, 1, 0)
        await settle()
        assert counts(pool) == (0, 0, 0, 0)
        assert factory.open_count() == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"size": 0}, ConfigurationError, "size: must be at least 1"),
        ({"size": -1}, ConfigurationError, "size: must be at least 0, got -1"),
        ({"size": 1.5}, ConfigurationTypeError, "size: expected an integer"),
        ({"size": True}, ConfigurationTypeError, "size: expected an integer"),
        ({"max_overflow": -1}, ConfigurationError, "max_overflow: must be at least 0"),
        ({"timeout": 0}, ConfigurationError, "timeout: must be a number of seconds above 0 and at most 1e\\+09, got 0"),
        ({"timeout": float("inf")}, ConfigurationError, "timeout"),
        ({"timeout": 10**400}, ConfigurationError, "timeout: must be a number of seconds"),
        ({"timeout": "5"}, ConfigurationTypeError, "timeout: expected a number"),
        ({"max_idle": -1.0}, ConfigurationError, "max_idle"),
        ({"max_lifetime": 0.0}, ConfigurationError, "max_lifetime"),
        ({"name": 3}, ConfigurationTypeError, "name: must be a str"),
        ({"clock": object()}, ConfigurationTypeError, "clock: must be a seawall Clock"),
    ],
)
def test_bad_configuration_is_rejected_with_a_clear_message(kwargs: dict[str, Any], error: type, match: str) -> None:
    """Bad options fail at construction, naming the parameter and the value."""
    with pytest.raises(error, match=match):
        ConnectionPool(Factory(), **kwargs)


def test_factory_missing_methods_is_rejected() -> None:
    """A factory without create/close that is not callable is a TypeError naming what is missing."""

    class OnlyCreate:
        async def create(self) -> None:
            return None

    with pytest.raises(TypeError, match="lacks close"):
        ConnectionPool(OnlyCreate(), size=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="lacks create and close"):
        ConnectionPool(42, size=1)  # type: ignore[arg-type]


async def test_checkout_timeout_argument_is_validated() -> None:
    """checkout(timeout=) must be a positive number of seconds."""
    pool = ConnectionPool(Factory(), size=1)
    with pytest.raises(ValueError, match="timeout"):
        pool.checkout(timeout=-1)
    with pytest.raises(ValueError, match="grace"):
        await pool.close(grace=0)


def test_factory_protocol_is_runtime_checkable() -> None:
    """The factory protocol recognises objects with create and close."""
    assert isinstance(Factory(), PoolFactory)
    assert not isinstance(object(), PoolFactory)


@pytest.mark.asyncio_only("a native task.cancel() after the hand-off of a slot")
async def test_waiter_cancelled_after_being_handed_a_slot_passes_it_on() -> None:
    """A waiter cancelled just after being promised a free slot hands the slot to the next waiter."""
    factory = Factory()
    async with ConnectionPool(factory, size=1) as pool:
        cm = pool.checkout()
        conn = await cm.__aenter__()
        served: list[Conn] = []

        async def take() -> None:
            async with pool.checkout() as c:
                served.append(c)

        async with anyio.create_task_group() as tg:
            doomed = asyncio.get_running_loop().create_task(take())
            await settle()
            tg.start_soon(take)
            await settle()
            conn.closed = True  # dies in use: its slot goes to the oldest waiter
            await cm.__aexit__(None, None, None)
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
        assert served == [factory.made[1]]
        assert counts(pool) == (1, 0, 0, 0)


@pytest.mark.asyncio_only("a native task.cancel() cuts through anyio's shield; nothing can on trio")
async def test_native_cancel_during_close_finishes_close_in_background() -> None:
    """A close() of a worker interrupted by task.cancel() still completes and frees the slot."""

    class SlowClose(Factory):
        def __init__(self) -> None:
            super().__init__()
            self.close_gate = anyio.Event()

        async def close(self, worker: Conn) -> None:
            await self.close_gate.wait()
            await super().close(worker)

    factory = SlowClose()
    pool = ConnectionPool(factory, size=1)
    async with pool.checkout() as conn:
        pass
    conn.closed = False
    task = asyncio.get_running_loop().create_task(pool.close())
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert counts(pool) == (0, 0, 0, 0)
    factory.close_gate.set()
    await settle()
    assert factory.closed == [conn]


async def test_dead_top_worker_is_skipped_for_the_next_healthy_one() -> None:
    """When the top idle worker is dead, the next idle one is handed out instead of a new one."""
    factory = Factory()
    async with ConnectionPool(factory, size=2) as pool:
        async with pool.checkout() as top, pool.checkout() as below:
            pass
        assert pool._idle[-1].conn is top  # `below` went back first, `top` onto it
        top.closed = True
        async with pool.checkout() as got:
            assert got is below
        assert len(factory.made) == 2


async def test_concurrent_starts_fill_the_pool_once() -> None:
    """Two start() calls at once create `size` workers, not twice as many."""
    factory = Factory()
    pool = ConnectionPool(factory, size=3)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.start)
        tg.start_soon(pool.start)
    assert len(factory.made) == 3
    assert counts(pool) == (3, 0, 0, 0)
    await pool.close()


@pytest.mark.asyncio_only("native cancellations at random points; the scoped variant below runs on both backends")
@pytest.mark.parametrize("seed", range(6))
async def test_random_mix_of_use_failure_death_and_cancellation_keeps_counts_exact(seed: int) -> None:
    """Under a random mix of holds, errors, dead workers, timeouts and cancellations, nothing leaks."""
    rng = random.Random(seed)
    factory = ResettingFactory()
    pool = ConnectionPool(factory, size=3, max_overflow=2, timeout=0.05)
    peak = 0

    async def job() -> None:
        nonlocal peak
        action = rng.random()
        try:
            async with pool.checkout() as conn:
                peak = max(peak, pool.status().in_use)
                assert not conn.closed
                for _ in range(rng.randrange(4)):
                    await anyio.lowlevel.checkpoint()
                if action < 0.15:
                    conn.closed = True  # the server dropped it
                elif action < 0.3:
                    factory.healthy = rng.random() < 0.5
                    raise KeyError("user error")
        except (KeyError, PoolTimeout):
            pass

    loop = asyncio.get_running_loop()
    loose: list[asyncio.Task[None]] = []
    async with pool:
        async with anyio.create_task_group() as tg:
            for _ in range(150):
                if rng.random() < 0.1:
                    factory.fail_create.append(OSError("refused"))
                if rng.random() < 0.2:
                    loose.append(loop.create_task(_swallow_os_error(job)))
                else:
                    tg.start_soon(_swallow_os_error, job)
                if rng.random() < 0.3:
                    await anyio.lowlevel.checkpoint()
                if loose and rng.random() < 0.2:
                    rng.choice(loose).cancel()  # native cancellation at a random point
                if rng.random() < 0.01:
                    tg.cancel_scope.cancel()  # and sometimes everything at once
                    break
        await asyncio.gather(*loose, return_exceptions=True)
        await settle()
        status = pool.status()
        assert (status.in_use, status.waiting) == (0, 0)
        assert peak <= 5
        assert status.idle == factory.open_count()
        assert all(not w.conn.closed for w in pool._idle)
    await settle()
    assert factory.open_count() == 0
    assert pool.status().to_dict()["idle"] == 0


@pytest.mark.parametrize("seed", range(4))
async def test_random_mix_with_scoped_cancellation_keeps_counts_exact(seed: int) -> None:
    """Holds, errors, dead workers, timeouts and scope cancellations at random, on either backend: nothing leaks."""
    rng = random.Random(seed)
    clock = FakeClock()
    factory = ResettingFactory()
    pool = ConnectionPool(factory, size=3, max_overflow=2, timeout=0.5, clock=clock)
    scopes: list[anyio.CancelScope] = []

    async def job(scope: anyio.CancelScope) -> None:
        action = rng.random()
        with scope:
            try:
                async with pool.checkout() as conn:
                    assert not conn.closed
                    for _ in range(rng.randrange(4)):
                        await anyio.lowlevel.checkpoint()
                    if action < 0.15:
                        conn.closed = True  # the server dropped it
                    elif action < 0.3:
                        factory.healthy = rng.random() < 0.5
                        raise KeyError("user error")
            except (KeyError, PoolTimeout, OSError):
                pass

    async with pool:
        async with anyio.create_task_group() as tg:
            for _ in range(150):
                if rng.random() < 0.1:
                    factory.fail_create.append(OSError("refused"))
                scope = anyio.CancelScope()
                scopes.append(scope)
                tg.start_soon(job, scope)
                if rng.random() < 0.3:
                    await anyio.lowlevel.checkpoint()
                if rng.random() < 0.2:
                    rng.choice(scopes).cancel()
                if rng.random() < 0.05:
                    clock.advance(0.5)  # the waiters of the moment time out
            while pool.status().waiting:
                await settle()
                clock.advance(0.5)
        await settle()
        status = pool.status()
        assert (status.in_use, status.waiting) == (0, 0)
        assert status.idle == factory.open_count()
        assert all(not w.conn.closed for w in pool._idle)
    assert factory.open_count() == 0
    assert len(pool._background) == 0


async def _swallow_os_error(job: Any) -> None:
    try:
        await job()
    except OSError:
        pass


# -- background work and the loop's clock ---------------------------------------


async def test_close_waits_for_the_background_closes_it_owns() -> None:
    """A close started in the background (a dead worker given back synchronously) finishes before close() returns."""

    class SlowClose(Factory):
        def __init__(self) -> None:
            super().__init__()
            self.close_gate = anyio.Event()

        async def close(self, worker: Conn) -> None:
            await self.close_gate.wait()
            await super().close(worker)

    factory = SlowClose()
    pool = ConnectionPool(factory, size=1)
    await pool.start()
    lease = pool.checkout_nowait()
    lease.conn.closed = True  # died while lent
    pool.checkin_nowait(lease)  # closed in a background task the pool owns
    await settle()
    assert len(pool._background) == 1
    closed = anyio.Event()

    async def close() -> None:
        await pool.close()
        closed.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(close)
        await settle()
        assert not closed.is_set()  # waiting for the background close
        factory.close_gate.set()
    assert factory.closed == [lease.conn]
    assert len(pool._background) == 0
    assert counts(pool) == (0, 0, 0, 0)


async def test_the_timer_and_the_reaper_end_with_their_work() -> None:
    """No background task outlives its work: the timer ends with the last deadline, the reaper with the surplus."""
    clock = FakeClock()
    async with ConnectionPool(Factory(), size=1, max_overflow=1, max_idle=5.0, timeout=1.0, clock=clock) as pool:
        timed_out: list[PoolTimeout] = []

        async def wait() -> None:
            with pytest.raises(PoolTimeout) as info:
                async with pool.checkout():
                    pass  # pragma: no cover - times out
            timed_out.append(info.value)

        async with pool.checkout(), pool.checkout(), anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await settle()
            assert pool._timer
            clock.advance(1.0)
        assert len(timed_out) == 1
        await settle()
        assert not pool._timer  # nobody waits with a deadline
        assert pool._reaper is not None  # the overflow worker idles
        clock.advance(5.0)
        await settle()
        assert pool._reaper is None
        assert len(pool._background) == 0
        assert counts(pool) == (1, 0, 0, 0)


async def test_a_failing_background_job_is_logged_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    """A bug in a background job is logged as an error and ends the job; nothing escapes into the event loop."""
    background = _Background("p")

    async def broken() -> None:
        raise RuntimeError("a bug")

    background.spawn(broken)
    assert len(background) == 1
    await background.wait()
    assert len(background) == 0
    assert "pool_background_task_failed" in caplog.text


@trio_autojump
async def test_trio_mock_clock_jumps_through_a_checkout_timeout_and_the_reaper() -> None:
    """Under trio a pool built in the run times out and reaps on the run's clock: a MockClock jumps both."""
    factory = Factory()
    async with ConnectionPool(factory, size=1, max_overflow=1, timeout=10.0, max_idle=30.0) as pool:
        async with pool.checkout(), pool.checkout():
            start = trio.current_time()
            with pytest.raises(PoolTimeout):
                async with pool.checkout():
                    pass  # pragma: no cover - times out
            assert trio.current_time() - start == pytest.approx(10.0)
        assert counts(pool) == (2, 0, 1, 0)
        await trio.sleep(31.0)
        assert counts(pool) == (1, 0, 0, 0)
        assert factory.open_count() == 1


# -- checkout_nowait / checkin_nowait / checkin: the non-waiting form ----------


async def test_checkout_nowait_lends_idle_workers_lifo_and_would_block_when_none() -> None:
    """checkout_nowait lends idle workers top first; with none idle it raises WouldBlock and changes nothing."""
    factory = Factory()
    async with ConnectionPool(factory, size=2, max_overflow=1) as pool:
        first = pool.checkout_nowait()
        second = pool.checkout_nowait()
        assert first.conn is not second.conn
        assert repr(first) == f"<PoolLease conn={first.conn!r}>"
        assert counts(pool) == (0, 2, 0, 0)
        with pytest.raises(anyio.WouldBlock):
            pool.checkout_nowait()  # an overflow worker would have to be created
        assert counts(pool) == (0, 2, 0, 0)
        assert len(factory.made) == 2
        pool.checkin_nowait(second)
        pool.checkin_nowait(first)
        assert counts(pool) == (2, 0, 0, 0)
        again = pool.checkout_nowait()
        assert again.conn is first.conn  # LIFO, as checkout()
        pool.checkin_nowait(again)


async def test_nowait_pair_agrees_with_checkout_on_a_random_schedule() -> None:
    """Interleaving checkout_nowait/checkin_nowait and async checkouts keeps every count as checkout() alone would."""
    rng = random.Random(3)
    factory = Factory()
    async with ConnectionPool(factory, size=4) as pool:
        leases: list[Any] = []
        for _ in range(200):
            if leases and rng.random() < 0.5:
                pool.checkin_nowait(leases.pop(rng.randrange(len(leases))))
            else:
                try:
                    leases.append(pool.checkout_nowait())
                except anyio.WouldBlock:
                    assert len(leases) == 4
            assert counts(pool) == (4 - len(leases), len(leases), 0, 0)
            async with pool.checkout() if len(leases) < 4 else contextlib.nullcontext():
                pass
        for lease in leases:
            pool.checkin_nowait(lease)
        assert counts(pool) == (4, 0, 0, 0)
        assert len(factory.made) == 4


async def test_checkin_nowait_hands_the_worker_to_the_oldest_waiter() -> None:
    """A worker given back with checkin_nowait goes to a task waiting in checkout(), not to the stack."""
    factory = Factory()
    async with ConnectionPool(factory, size=1) as pool:
        lease = pool.checkout_nowait()
        got: list[Any] = []

        async def waiter() -> None:
            async with pool.checkout() as conn:
                got.append(conn)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await settle()
            assert counts(pool) == (0, 1, 0, 1)
            pool.checkin_nowait(lease)
        assert got == [lease.conn]
        assert counts(pool) == (1, 0, 0, 0)


async def test_checkin_nowait_twice_or_foreign_lease_is_an_error() -> None:
    """Giving a lease back twice, or to another pool, raises RuntimeError and changes no count."""
    async with ConnectionPool(Factory(), size=1) as pool, ConnectionPool(Factory(), size=1) as other:
        lease = pool.checkout_nowait()
        with pytest.raises(RuntimeError, match="not checked out of this pool"):
            other.checkin_nowait(lease)
        with pytest.raises(RuntimeError, match="not checked out of this pool"):
            await other.checkin(lease)
        pool.checkin_nowait(lease)
        with pytest.raises(RuntimeError, match="given back already"):
            pool.checkin_nowait(lease)
        with pytest.raises(RuntimeError, match="given back already"):
            pool.checkin_nowait(lease, raised=True)
        assert counts(pool) == (1, 0, 0, 0)
        assert counts(other) == (1, 0, 0, 0)


async def test_checkout_nowait_on_a_closed_pool() -> None:
    """checkout_nowait on a closed pool raises PoolClosed."""
    pool = ConnectionPool(Factory(), size=1, name="db")
    await pool.start()
    await pool.close()
    with pytest.raises(PoolClosed):
        pool.checkout_nowait()


async def test_checkout_nowait_retires_dead_idle_workers() -> None:
    """Dead idle workers met by checkout_nowait are closed, never lent; with none left it would block."""
    factory = Factory()
    async with ConnectionPool(factory, size=2) as pool:
        for conn in factory.made:
            conn.closed = True  # died while idle
        with pytest.raises(anyio.WouldBlock):
            pool.checkout_nowait()
        await settle()
        assert counts(pool) == (0, 0, 0, 0)
        async with pool.checkout() as fresh:
            assert not fresh.closed
        lease = pool.checkout_nowait()
        assert lease.conn is fresh
        lease.conn.closed = True  # died while lent
        pool.checkin_nowait(lease)
        await settle()
        assert counts(pool) == (0, 0, 0, 0)
        assert factory.open_count() == 0


async def test_expired_workers_are_not_lent_and_are_closed_on_return() -> None:
    """With max_lifetime, checkout_nowait skips expired idle workers and checkin_nowait closes expired ones."""
    clock = FakeClock()
    factory = Factory()
    async with ConnectionPool(factory, size=1, max_lifetime=10.0, clock=clock) as pool:
        lease = pool.checkout_nowait()
        pool.checkin_nowait(lease)
        lease = pool.checkout_nowait()
        clock.advance(10.0)
        pool.checkin_nowait(lease)
        await settle()
        assert lease.conn.closed
        assert counts(pool) == (0, 0, 0, 0)
        async with pool.checkout():
            pass
        clock.advance(10.0)
        with pytest.raises(anyio.WouldBlock):
            pool.checkout_nowait()
        await settle()
        assert factory.open_count() == 0


async def test_a_resetting_pool_needs_the_awaited_checkin() -> None:
    """With a reset hook checkin_nowait raises WouldBlock, the worker stays lent, and checkin() resets it."""
    factory = ResettingFactory()
    async with ConnectionPool(factory, size=1) as pool:
        lease = pool.checkout_nowait()
        with pytest.raises(anyio.WouldBlock):
            pool.checkin_nowait(lease)
        assert counts(pool) == (0, 1, 0, 0)
        await pool.checkin(lease)
        assert lease.conn.resets == 1
        assert counts(pool) == (1, 0, 0, 0)


async def test_a_failed_block_with_a_check_hook_needs_the_awaited_checkin() -> None:
    """After a failure a check hook must run: checkin_nowait(raised=True) would block; checkin() checks."""

    class CheckingFactory(Factory):
        def __init__(self) -> None:
            super().__init__()
            self.checked: list[Conn] = []

        async def check(self, worker: Conn) -> bool:
            self.checked.append(worker)
            return False

    factory = CheckingFactory()
    async with ConnectionPool(factory, size=1) as pool:
        lease = pool.checkout_nowait()
        pool.checkin_nowait(lease)  # a success needs no check
        lease = pool.checkout_nowait()
        with pytest.raises(anyio.WouldBlock):
            pool.checkin_nowait(lease, raised=True)
        await pool.checkin(lease, raised=True)
        assert factory.checked == [lease.conn]
        assert lease.conn.closed  # the check said dead
        assert counts(pool) == (0, 0, 0, 0)


async def test_a_failed_block_without_check_hook_returns_synchronously() -> None:
    """With no check hook, checkin_nowait(raised=True) puts a live worker back at once."""
    async with ConnectionPool(Factory(), size=1) as pool:
        lease = pool.checkout_nowait()
        pool.checkin_nowait(lease, raised=True)
        assert counts(pool) == (1, 0, 0, 0)


async def test_cancelled_awaited_checkin_loses_nothing() -> None:
    """checkin() is shielded: cancelled while the reset runs, the worker still goes back."""
    factory = ResettingFactory()
    factory.reset_gate = anyio.Event()
    async with ConnectionPool(factory, size=1) as pool:
        lease = pool.checkout_nowait()
        scope = anyio.CancelScope()

        async def give_back() -> None:
            with scope:
                await pool.checkin(lease)

        async with anyio.create_task_group() as tg:
            tg.start_soon(give_back)
            await settle()
            scope.cancel()
            await settle()
            assert counts(pool) == (0, 1, 0, 0)  # still resetting, under the shield
            factory.reset_gate.set()
        assert counts(pool) == (1, 0, 0, 0)
        assert lease.conn.resets == 1


async def test_overflow_lease_given_back_with_nobody_waiting_is_closed() -> None:
    """An overflow worker lent by checkout_nowait and given back unneeded is closed, as with checkout()."""
    factory = Factory()
    async with ConnectionPool(factory, size=1, max_overflow=1) as pool:
        async with pool.checkout():
            async with pool.checkout():
                pass
            assert counts(pool) == (0, 1, 0, 0)
        lease = pool.checkout_nowait()
        async with pool.checkout():  # creates the overflow worker
            pass
        await settle()
        assert len(factory.made) == 3
        pool.checkin_nowait(lease)
        assert counts(pool) == (1, 0, 0, 0)


async def test_lease_orphaned_by_close_is_accepted_back() -> None:
    """A lease whose worker close() closed after the grace period is taken back without effect."""
    factory = ResettingFactory()
    pool = ConnectionPool(factory, size=1)
    await pool.start()
    lease = pool.checkout_nowait()
    other = ConnectionPool(Factory(), size=1)
    await other.start()
    other_lease = other.checkout_nowait()
    with anyio.fail_after(5):
        await pool.close(grace=0.01)
        await other.close(grace=0.01)
    assert lease.conn.closed
    await pool.checkin(lease)  # reset pools take the awaited path
    other.checkin_nowait(other_lease)  # plain pools the synchronous one
    assert counts(pool) == (0, 0, 0, 0)
    assert counts(other) == (0, 0, 0, 0)


async def test_nowait_checkout_telemetry() -> None:
    """checkout_nowait/checkin_nowait emit checkout and checkin events like checkout() does."""
    clock = FakeClock()
    async with ConnectionPool(Factory(), size=1, name="db", clock=clock) as pool:
        with capture_events() as events:
            lease = pool.checkout_nowait()
            clock.advance(0.5)
            pool.checkin_nowait(lease, raised=True)
            lease = pool.checkout_nowait()
            await pool.checkin(lease)
        lease = pool.checkout_nowait()  # lent unobserved ...
        with capture_events() as late:
            pool.checkin_nowait(lease)  # ... so its return has no "held" to report
    assert [e.name for e in events] == ["checkout", "checkin", "checkout", "checkin"]
    assert events[0].measurements == {"duration": 0.0, "wait": 0.0}
    assert events[0].metadata == {"pool": "db"}
    assert events[1].measurements == {"duration": 0.5, "held": 0.5}
    assert events[1].metadata == {"pool": "db", "raised": True}
    assert events[3].metadata == {"pool": "db", "raised": False}
    assert late == []


async def test_bulkhead_lease_given_back_twice_is_an_error() -> None:
    """On a bulkhead (no factory hooks) a second checkin_nowait of one lease raises and changes no count."""
    async with ConnectionPool(None, size=2) as pool:
        lease = pool.checkout_nowait()
        assert lease.conn is None
        pool.checkin_nowait(lease)
        with pytest.raises(RuntimeError, match="given back already"):
            pool.checkin_nowait(lease)
        assert counts(pool) == (2, 0, 0, 0)


@pytest.mark.asyncio_only("asyncio's FIFO ready queue orders the timer, the holder and the waiter in one iteration")
async def test_an_overflow_worker_back_as_its_only_waiter_times_out_is_closed_without_a_reset() -> None:
    """A waiter timed out but not yet run is nobody waiting: the returned overflow worker is closed, not reset first."""
    clock = FakeClock()
    factory = ResettingFactory()
    factory.reset_gate = anyio.Event()  # a reset would keep the overflow connection open until this is set
    timed_out: list[PoolTimeout] = []
    release = anyio.Event()
    async with ConnectionPool(factory, size=1, max_overflow=1, timeout=1.0, clock=clock) as pool:
        first = pool.checkout()
        await first.__aenter__()

        async def hold_overflow() -> None:
            async with pool.checkout():
                await release.wait()

        async def wait() -> None:
            try:
                async with pool.checkout():
                    pass
            except PoolTimeout as exc:
                timed_out.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold_overflow)
            await settle()
            tg.start_soon(wait)
            await settle()
            assert counts(pool) == (0, 2, 1, 1)
            # Both wake-ups in one iteration, in this order: the timer hands the waiter its
            # timeout, then the overflow holder's block ends before that waiter has run (and
            # left the queue).
            clock.advance(1.0)
            release.set()
            await settle()
            after_return = counts(pool)
            # Before asserting: a return stuck in its reset, or a worker still lent, would hang
            # the task group or close() (whose grace runs on the fake clock).
            factory.reset_gate.set()
        await first.__aexit__(None, None, None)  # the pool's own worker: reset and kept
        assert counts(pool) == (1, 0, 0, 0)
    assert len(timed_out) == 1
    overflow = factory.made[1]
    assert overflow.resets == 0, "the surplus overflow worker was reset before being closed"
    assert after_return == (0, 1, 0, 0)  # not (0, 2, 1, 0): nobody waits, yet its connection stayed open
    assert factory.open_count() == 0
