"""ConnectionPool(max_waiting=): a checkout beyond that many waiters fails at once with PoolTimeout."""

from __future__ import annotations

import anyio
import pytest

from seawall import ConfigurationError, ConnectionPool, PoolTimeout
from seawall.testing import FakeClock, advance

pytestmark = pytest.mark.anyio


async def test_a_checkout_beyond_max_waiting_fails_at_once() -> None:
    """With one slot taken and max_waiting=1 waiting, the next checkout raises PoolTimeout without waiting."""
    clock = FakeClock()
    pool: ConnectionPool[None] = ConnectionPool(size=1, timeout=10.0, max_waiting=1, clock=clock)
    async with pool:
        lease = pool.checkout_nowait()
        got: list[str] = []

        async def waiter() -> None:
            async with pool.checkout():
                got.append("waiter")

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(PoolTimeout, match="max_waiting=1"):
                async with pool.checkout():
                    pass  # pragma: no cover
            assert clock.now() == 0.0  # it did not wait
            pool.checkin_nowait(lease)
        assert got == ["waiter"]
        assert pool.status().waiting == 0


async def test_a_cancelled_waiter_frees_its_place_in_the_queue() -> None:
    """A waiter that leaves (cancelled) no longer counts against max_waiting."""
    clock = FakeClock()
    pool: ConnectionPool[None] = ConnectionPool(size=1, timeout=10.0, max_waiting=1, clock=clock)
    async with pool:
        lease = pool.checkout_nowait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.checkout().__aenter__)
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
        assert pool.status().waiting == 0
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                async with pool.checkout():
                    pass

            tg.start_soon(waiter)
            await advance(clock, 0.0)
            pool.checkin_nowait(lease)
        assert pool.status().in_use == 0


async def test_max_waiting_zero_never_queues() -> None:
    """max_waiting=0: a checkout that would wait fails at once."""
    pool: ConnectionPool[None] = ConnectionPool(size=1, max_waiting=0, clock=FakeClock())
    async with pool:
        lease = pool.checkout_nowait()
        with pytest.raises(PoolTimeout):
            async with pool.checkout():
                pass  # pragma: no cover
        pool.checkin_nowait(lease)


@pytest.mark.parametrize("value", [-1, 1.5, True])
async def test_a_bad_max_waiting_names_it(value: object) -> None:
    """A negative or non-integer max_waiting raises ConfigurationError naming it."""
    with pytest.raises(ConfigurationError) as caught:
        ConnectionPool(max_waiting=value)  # type: ignore[arg-type]
    assert caught.value.path == "max_waiting"
