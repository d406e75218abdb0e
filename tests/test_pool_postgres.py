"""ConnectionPool of asyncpg connections against the real PostgreSQL server (no mocks).

Every pool here connects with an ``application_name`` unique to this test, so
``pg_stat_activity`` counts only our own sessions, and only those are ever
terminated.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import pytest

from seawall import ConfigurationError, ConnectionPool, PoolTimeout
from seawall.integrations.asyncpg import AsyncpgFactory
from seawall.testing import capture_events

pytestmark = [pytest.mark.anyio, pytest.mark.postgres, pytest.mark.asyncio_only("asyncpg runs on asyncio only")]


@pytest.fixture
def app_name() -> str:
    """A unique application_name marking this test's server sessions."""
    return f"seawall-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def observer(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A separate connection (not in the pool) that inspects pg_stat_activity."""
    conn = await asyncpg.connect(postgres_dsn, server_settings={"application_name": "seawall-test-observer"})
    try:
        yield conn
    finally:
        await conn.close()


def factory(dsn: str, app_name: str, **kwargs: Any) -> AsyncpgFactory:
    return AsyncpgFactory(dsn, server_settings={"application_name": app_name}, **kwargs)


async def server_sessions(observer: asyncpg.Connection, app_name: str) -> int:
    return int(await observer.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name))


async def wait_for_sessions(observer: asyncpg.Connection, app_name: str, expected: int) -> int:
    """Poll until the server reports ``expected`` sessions (it notices disconnects asynchronously)."""
    seen = -1
    for _ in range(500):
        seen = await server_sessions(observer, app_name)
        if seen == expected:
            break
        await anyio.sleep(0.02)
    return seen


async def test_200_concurrent_selects_never_exceed_size_plus_overflow(
    postgres_dsn: str, app_name: str, observer: asyncpg.Connection
) -> None:
    """200 tasks doing SELECT 1 through size 5 + overflow 5 all succeed on at most 10 sessions."""
    pool = ConnectionPool(factory(postgres_dsn, app_name), size=5, max_overflow=5, timeout=30.0)
    peak = 0
    stop = anyio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, await server_sessions(observer, app_name))
            await anyio.sleep(0.005)

    results: list[int] = []
    full = anyio.Event()  # set once the pool has been seen full: until then holders keep their worker

    async def job() -> None:
        async with pool.checkout() as conn:
            results.append(await conn.fetchval("SELECT 1"))
            await full.wait()  # hold it until the test has seen the pool full (no timing race)

    async with pool:
        assert await server_sessions(observer, app_name) == 5
        async with anyio.create_task_group() as outer:
            outer.start_soon(sample)
            async with anyio.create_task_group() as tg:
                for _ in range(200):
                    tg.start_soon(job)
                with anyio.fail_after(30):
                    while pool.status().in_use < 10:  # noqa: ASYNC110 - the pool's counts have no event
                        await anyio.sleep(0.005)
                assert pool.status().overflow == 5
                assert pool.status().in_use == 10
                assert pool.status().waiting == 190
                full.set()
            stop.set()
        assert results == [1] * 200
        assert 5 < peak <= 10
        # Overflow connections went away once nobody needed them.
        assert await wait_for_sessions(observer, app_name, 5) == 5
        assert pool.status().to_dict() | {"name": None} == {
            "name": None,
            "size": 5,
            "max_overflow": 5,
            "idle": 5,
            "in_use": 0,
            "overflow": 0,
            "waiting": 0,
        }
    assert await wait_for_sessions(observer, app_name, 0) == 0


async def test_terminated_connection_is_replaced(
    postgres_dsn: str, app_name: str, observer: asyncpg.Connection
) -> None:
    """A session killed server-side (pg_terminate_backend) is never handed out; the next checkout works."""
    async with ConnectionPool(factory(postgres_dsn, app_name), size=1) as pool:
        async with pool.checkout() as conn:
            first_pid = conn.get_server_pid()
        killed = await observer.fetchval(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1 AND pid = $2",
            app_name,
            first_pid,
        )
        assert killed is True
        # Let the client notice the closed socket.
        for _ in range(500):
            if conn.is_closed():
                break
            await anyio.sleep(0.01)
        async with pool.checkout() as conn2:
            assert conn2.get_server_pid() != first_pid
            assert await conn2.fetchval("SELECT 41 + 1") == 42
        assert pool.status().idle == 1
        assert await wait_for_sessions(observer, app_name, 1) == 1


async def test_connection_killed_while_held_is_replaced(
    postgres_dsn: str, app_name: str, observer: asyncpg.Connection
) -> None:
    """A session killed while in use raises in the block; the pool closes it and makes a new one."""
    async with ConnectionPool(factory(postgres_dsn, app_name), size=1) as pool:
        held: list[asyncpg.Connection] = []

        async def use_and_get_killed() -> None:
            async with pool.checkout() as conn:
                held.append(conn)
                await observer.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
                await conn.fetchval("SELECT pg_sleep(0.2)")

        with pytest.raises(
            (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, ConnectionError)
        ):
            await use_and_get_killed()
        conn = held[0]
        assert pool.status().in_use == 0
        async with pool.checkout() as fresh:
            assert fresh is not conn
            assert await fresh.fetchval("SELECT 1") == 1


async def test_checkout_timeout_fires(postgres_dsn: str, app_name: str) -> None:
    """With every connection held, a checkout fails with PoolTimeout after its short timeout."""
    async with ConnectionPool(factory(postgres_dsn, app_name), size=1, timeout=0.05, name="pg") as pool:
        async with pool.checkout():
            started = anyio.current_time()
            with capture_events() as events, pytest.raises(PoolTimeout) as info:
                async with pool.checkout():
                    pass
            waited = anyio.current_time() - started
        assert info.value.timeout == 0.05
        assert waited >= 0.05
        assert [e.name for e in events] == ["timeout"]
        assert pool.status().waiting == 0


async def test_cancelling_waiters_holders_and_creators_leaks_nothing(
    postgres_dsn: str, app_name: str, observer: asyncpg.Connection
) -> None:
    """Cancel waiters, holders mid-query and a checkout mid-connect: counts stay exact, no session leaks."""
    pool = ConnectionPool(factory(postgres_dsn, app_name), size=2, max_overflow=1, timeout=30.0)
    async with pool:
        # Holders in the middle of a slow query, plus waiters behind them.
        async with anyio.create_task_group() as tg:

            async def slow() -> None:
                async with pool.checkout() as conn:
                    await conn.execute("SELECT pg_sleep(10)")

            for _ in range(6):
                tg.start_soon(slow)
            await anyio.wait_all_tasks_blocked()
            assert pool.status().waiting == 3
            assert pool.status().in_use == 3
            tg.cancel_scope.cancel()
        status = pool.status()
        assert (status.in_use, status.waiting) == (0, 0)
        assert status.idle == 2  # the overflow one was closed, the others reset and kept
        async with pool.checkout() as conn:
            assert await conn.fetchval("SELECT 1") == 1
        assert await wait_for_sessions(observer, app_name, 2) == 2

        # A checkout cancelled while its (overflow) connection is being opened.
        async with pool.checkout(), pool.checkout():
            async with anyio.create_task_group() as tg:

                async def third() -> None:
                    async with pool.checkout():
                        await anyio.sleep_forever()

                tg.start_soon(third)
                await anyio.wait_all_tasks_blocked()  # it is now waiting on the server
                assert pool.status().in_use == 3
                tg.cancel_scope.cancel()
            assert pool.status().in_use == 2
        assert pool.status().idle == 2
        assert await wait_for_sessions(observer, app_name, 2) == 2
    assert await wait_for_sessions(observer, app_name, 0) == 0


async def test_reset_rolls_back_an_open_transaction(postgres_dsn: str, app_name: str) -> None:
    """The default reset rolls back what a holder left open, as asyncpg's pool does."""
    async with ConnectionPool(factory(postgres_dsn, app_name), size=1) as pool:
        async with pool.checkout() as conn:
            await conn.execute("BEGIN")
            await conn.execute("SET LOCAL statement_timeout = 1234")
            await conn.execute("SET application_name = 'changed'")
        async with pool.checkout() as again:
            assert again is conn
            assert not again.is_in_transaction()
            assert await again.fetchval("SHOW application_name") == app_name


async def test_without_reset_a_connection_left_in_a_transaction_is_replaced(postgres_dsn: str, app_name: str) -> None:
    """With reset=False nothing is sent on return, but a connection left mid-transaction is not reused."""
    async with ConnectionPool(factory(postgres_dsn, app_name, reset=False), size=1) as pool:
        async with pool.checkout() as clean:
            pass
        async with pool.checkout() as conn:
            assert conn is clean
            await conn.execute("BEGIN")
        await asyncio.sleep(0)
        async with pool.checkout() as fresh:
            assert fresh is not conn
            assert not fresh.is_in_transaction()
        assert conn.is_closed()


async def test_factory_check_and_repr(postgres_dsn: str, app_name: str) -> None:
    """check() answers True on a live connection and False on a closed one; close() tolerates dead ones."""
    made = factory(postgres_dsn, app_name, reset=False)
    assert "reset=False" in repr(made)
    conn = await made.create()
    assert await made.check(conn) is True
    assert made.is_closed(conn) is False
    await made.close(conn)
    assert made.is_closed(conn) is True
    assert await made.check(conn) is False
    await made.close(conn)  # closing twice is harmless


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_under_trio_building_a_factory_fails_at_once_saying_so() -> None:
    """Under trio, AsyncpgFactory() raises a ConfigurationError saying asyncpg is asyncio-only (no server needed)."""
    with pytest.raises(ConfigurationError, match="asyncpg runs on asyncio only") as info:
        AsyncpgFactory("postgresql://nobody@127.0.0.1:1/none")
    assert info.value.path == "factory"


def test_a_factory_built_outside_any_loop_fails_at_its_first_create_under_trio() -> None:
    """Built outside any loop, the factory's first create() under trio (a pool's start) raises the same error."""
    made = AsyncpgFactory("postgresql://nobody@127.0.0.1:1/none")

    async def main() -> None:
        with pytest.raises(ConfigurationError, match="asyncpg runs on asyncio only"):
            await made.create()
        pool = ConnectionPool(made, size=1)
        with pytest.raises(ConfigurationError, match=r"AsyncpgFactory\.create\(\) was called under trio"):
            await pool.start()
        await pool.close()

    anyio.run(main, backend="trio")
