"""ConnectionPool of httpx clients against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import anyio.abc
import httpx
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from seawall import ConnectionPool
from seawall.integrations.httpx import HttpxFactory

pytestmark = pytest.mark.anyio


async def _serve(stream: anyio.abc.SocketStream) -> None:
    """A minimal HTTP/1.1 server: answers every request with its path, keeps the connection alive."""
    reader = BufferedByteReceiveStream(stream)
    async with stream:
        try:
            while True:
                head = await reader.receive_until(b"\r\n\r\n", 65536)
                path = head.split(b" ", 2)[1]
                body = b"hello " + path
                await stream.send(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n%s" % (len(body), body)
                )
        except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
            pass


@pytest.fixture
async def server_url() -> AsyncIterator[str]:
    """Start the server on a free port (on anyio: both backends) and yield its base URL."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as handlers:
        handlers.start_soon(listener.serve, _serve)
        yield f"http://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
        handlers.cancel_scope.cancel()


async def test_httpx_clients_serve_concurrent_requests(server_url: str) -> None:
    """Pooled clients make real requests; at most size + overflow clients exist; all are closed at the end."""
    seen: set[int] = set()
    pool = ConnectionPool(HttpxFactory(base_url=server_url, timeout=5.0), size=2, max_overflow=1)
    bodies: list[str] = []

    async def fetch(i: int) -> None:
        async with pool.checkout() as client:
            seen.add(id(client))
            response = await client.get(f"/item/{i}")
            bodies.append(response.text)

    async with pool:
        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(fetch, i)
        status = pool.status()
        assert (status.idle, status.in_use, status.overflow) == (2, 0, 0)
    assert sorted(bodies) == sorted(f"hello /item/{i}" for i in range(30))
    assert 2 <= len(seen) <= 30


async def test_closed_client_is_never_handed_out_again(server_url: str) -> None:
    """A client closed by its user is replaced by a fresh one on the next checkout."""
    async with ConnectionPool(HttpxFactory(base_url=server_url), size=1) as pool:
        async with pool.checkout() as client:
            await client.aclose()
        async with pool.checkout() as fresh:
            assert fresh is not client
            assert not fresh.is_closed
            assert (await fresh.get("/again")).text == "hello /again"
        assert client.is_closed


async def test_factory_makes_configured_clients(server_url: str) -> None:
    """HttpxFactory passes its keyword arguments to httpx.AsyncClient and closes with aclose()."""
    factory = HttpxFactory(base_url=server_url, headers={"x-test": "1"})
    assert "base_url" in repr(factory)
    client = await factory.create()
    assert isinstance(client, httpx.AsyncClient)
    assert client.headers["x-test"] == "1"
    assert factory.is_closed(client) is False
    await factory.close(client)
    assert factory.is_closed(client) is True
