"""httpx integration: ``httpx.AsyncClient`` workers for :class:`seawall.ConnectionPool`.

:class:`ProtectedTransport` sends every request of a client through ``infra.protect(key)``.

Importing this module imports httpx: it is only imported by code that uses it.
"""

from __future__ import annotations

from typing import Any

from seawall._extras import missing_extra

try:
    import httpx
except ModuleNotFoundError as exc:
    raise missing_extra(exc, __name__) from exc

from seawall.integrations._httpx_transport import ProtectedTransport, parse_retry_after

__all__ = ["HttpxFactory", "ProtectedTransport", "parse_retry_after"]


class HttpxFactory:
    """Make and close ``httpx.AsyncClient`` instances for a pool.

    Each worker is a client with its own connection pool, so a seawall pool of
    them bounds how many clients (and so connections) a service opens. A
    client found closed (``client.is_closed``) is replaced, never handed out.

    Args:
        **client_kwargs: Passed to ``httpx.AsyncClient`` (``base_url``,
            ``timeout``, ``limits``, ``transport``...).
    """

    __slots__ = ("client_kwargs",)

    def __init__(self, **client_kwargs: Any) -> None:
        self.client_kwargs = client_kwargs

    async def create(self) -> httpx.AsyncClient:
        """Open a new client."""
        return httpx.AsyncClient(**self.client_kwargs)

    async def close(self, worker: httpx.AsyncClient) -> None:
        """Close the client and its connections."""
        await worker.aclose()

    def is_closed(self, worker: httpx.AsyncClient) -> bool:
        """Whether the client was closed."""
        return worker.is_closed

    def __repr__(self) -> str:
        return f"HttpxFactory({', '.join(f'{k}={v!r}' for k, v in self.client_kwargs.items())})"
