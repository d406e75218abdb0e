"""asyncpg workers for :class:`seawall.ConnectionPool`.

``AsyncpgFactory`` makes asyncpg connections and treats them the way
asyncpg's own pool does on release: roll back an open transaction and reset the
session state (``Connection.reset()``), check a connection with ``SELECT 1``
after the block that held it raised, and never hand out one that the server or
the network closed (``Connection.is_closed()``).

Example::

    pool = ConnectionPool(AsyncpgFactory("postgresql://app@db/app"), size=5, max_overflow=5)
    async with pool, pool.checkout() as conn:
        await conn.fetchval("SELECT 1")

asyncpg runs on asyncio only: under trio, building a factory and its first
``create()`` fail at once with a :class:`~seawall.ConfigurationError` that
says so, never deep inside asyncpg.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from seawall._extras import missing_extra

try:
    import asyncpg
except ModuleNotFoundError as exc:
    raise missing_extra(exc, __name__) from exc

from seawall._clock import require_asyncio

__all__ = ["AsyncpgFactory"]


class AsyncpgFactory:
    """Make, reset, check and close ``asyncpg`` connections for a pool.

    Args:
        dsn: The connection string, passed to ``asyncpg.connect``.
        reset: Reset each connection on return as ``asyncpg.Pool`` does by
            default (``Connection.reset()``: roll back, close cursors, unlisten,
            ``RESET ALL``, release advisory locks; one round trip). With
            ``False`` nothing is sent on return, and a connection given back
            inside an open transaction is closed and replaced instead of being
            handed to the next user.
        reset_timeout: Seconds the reset may take before the connection is
            given up as dead.
        check_timeout: Seconds the ``SELECT 1`` health check may take.
        close_timeout: Seconds a graceful close may take before the connection
            is terminated.
        **connect_kwargs: Anything else ``asyncpg.connect`` takes (``user``,
            ``server_settings``, ``ssl``...).

    Raises:
        ConfigurationError: Built under trio (asyncpg runs on asyncio only); a
            factory built outside any loop raises it at its first ``create()`` under trio.
    """

    __slots__ = ("_connect_kwargs", "check_timeout", "close_timeout", "dsn", "reset", "reset_timeout")

    def __init__(
        self,
        dsn: str | None = None,
        *,
        reset: bool = True,
        reset_timeout: float = 5.0,
        check_timeout: float = 2.0,
        close_timeout: float = 5.0,
        **connect_kwargs: Any,
    ) -> None:
        _require_asyncio("AsyncpgFactory()")
        self.dsn = dsn
        self.reset_timeout = reset_timeout
        self.check_timeout = check_timeout
        self.close_timeout = close_timeout
        self._connect_kwargs = connect_kwargs
        # The pool looks ``reset`` up once; ``None`` tells it there is nothing
        # to await on return, which keeps the return path pure bookkeeping.
        self.reset: Callable[[Any], Awaitable[None]] | None = self._reset if reset else None

    async def create(self) -> Any:
        """Open a new connection."""
        _require_asyncio("AsyncpgFactory.create()")
        return await asyncpg.connect(self.dsn, **self._connect_kwargs)

    async def close(self, worker: Any) -> None:
        """Close gracefully; terminate if that fails or takes too long."""
        try:
            await worker.close(timeout=self.close_timeout)
        except Exception:
            worker.terminate()

    async def _reset(self, worker: Any) -> None:
        await worker.reset(timeout=self.reset_timeout)

    async def check(self, worker: Any) -> bool:
        """Whether the connection still answers ``SELECT 1`` in time."""
        try:
            return bool(await worker.fetchval("SELECT 1", timeout=self.check_timeout) == 1)
        except Exception:
            return False

    def is_closed(self, worker: Any) -> bool:
        """Closed by us or the server, or (with ``reset=False``) left inside a transaction."""
        if worker.is_closed():
            return True
        return self.reset is None and bool(worker.is_in_transaction())

    def __repr__(self) -> str:
        return f"AsyncpgFactory(dsn={self.dsn!r}, reset={self.reset is not None})"


def _require_asyncio(operation: str) -> None:
    require_asyncio("asyncpg", operation, path="factory", instead="AsyncpgFactory cannot serve a pool under trio")
