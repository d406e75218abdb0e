"""ProtectedTransport against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import gzip
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from seawall import AsyncInfrastructure, CircuitOpenError, FakeClock, ProtectionTimeout, RateLimitExceeded
from seawall.integrations.httpx import ProtectedTransport, parse_retry_after

pytestmark = pytest.mark.anyio


@dataclass
class Server:
    """A tiny HTTP/1.1 upstream whose answer depends on the path (on anyio: it serves on both backends)."""

    url: str = ""
    hits: list[str] = field(default_factory=list)
    arrived: anyio.Event = field(default_factory=anyio.Event)

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        reader = BufferedByteReceiveStream(stream)
        async with stream:
            try:
                while True:
                    head = await reader.receive_until(b"\r\n\r\n", 65536)
                    if not await self.answer(stream, head.split(b" ", 2)[1].decode()):
                        return
            except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
                pass

    async def answer(self, stream: anyio.abc.SocketStream, path: str) -> bool:
        """Answer one request; ``False``: hang up instead."""
        self.hits.append(path)
        headers = ""
        body = f"hello {path}".encode()
        status = 200
        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
        elif path.startswith("/retry/"):
            status, headers = 429, f"Retry-After: {path.split('/', 2)[2]}\r\n"
        elif path == "/gzip":
            body, headers = gzip.compress(b"squeezed" * 100), "Content-Encoding: gzip\r\n"
        elif path == "/slow":
            self.arrived.set()
            await anyio.sleep_forever()  # (cancelled when the server stops)
        elif path == "/hang-up":
            return False
        await stream.send(
            f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode("latin-1") + body
        )
        return True


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    """The upstream on a free port of 127.0.0.1; stopping it cancels the handlers still running (a /slow one)."""
    upstream = Server()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    upstream.url = f"http://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
    async with listener, anyio.create_task_group() as handlers:
        handlers.start_soon(listener.serve, upstream.handle)
        yield upstream
        handlers.cancel_scope.cancel()


async def _infra(config: dict[str, Any], clock: FakeClock | None = None) -> AsyncInfrastructure:
    infra = AsyncInfrastructure(clock=clock)
    await infra.__aenter__()
    await infra.configure_protection("up", config)
    return infra


@pytest.fixture
async def infra() -> AsyncIterator[AsyncInfrastructure]:
    """An infrastructure with key "up": a limit of 3 per minute per bucket and a breaker of threshold 2."""
    config = {
        "rate_limiter": {"limit": 3, "window": 60},
        "circuit_breaker": {"failure_threshold": 2, "recovery_time": 60},
        "timeout": 5.0,
    }
    infra = await _infra(config)
    try:
        yield infra
    finally:
        await infra.aclose()


async def _state(infra: AsyncInfrastructure) -> str:
    status = await infra.get_protection_status("up")
    state: str = status["circuit_breaker"]["state"]
    return state


async def test_success_passes_through_and_is_rate_limited(server: Server, infra: AsyncInfrastructure) -> None:
    """A 200 is returned as sent; the key's limiter counts every request and denies past its limit."""
    transport = ProtectedTransport(infra, "up")
    async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
        responses = [await client.get("/a") for _ in range(3)]
        with pytest.raises(RateLimitExceeded) as denied:
            await client.get("/a")
    assert [r.text for r in responses] == ["hello /a"] * 3
    assert denied.value.retry_after is not None
    assert denied.value.retry_after > 0
    assert server.hits == ["/a"] * 3


async def test_failure_statuses_are_returned_and_open_the_breaker(server: Server, infra: AsyncInfrastructure) -> None:
    """5xx responses come back to the caller, count as failures, and the open breaker stops the next call."""
    async with httpx.AsyncClient(transport=ProtectedTransport(infra, "up"), base_url=server.url) as client:
        first = await client.get("/status/500")
        second = await client.get("/status/503")
        with pytest.raises(CircuitOpenError):
            await client.get("/status/200")
    assert (first.status_code, second.status_code) == (500, 503)
    assert first.text == "hello /status/500"
    assert server.hits == ["/status/500", "/status/503"]
    assert await _state(infra) == "open"


async def test_custom_failure_statuses(server: Server, infra: AsyncInfrastructure) -> None:
    """failure_statuses decides what counts: here 404 does and 500 does not."""
    transport = ProtectedTransport(infra, "up", failure_statuses={404}, entity=lambda request: request.url.path)
    async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
        await client.get("/status/500")
        await client.get("/status/500")
        assert await _state(infra) == "closed"
        await client.get("/status/404")
        await client.get("/status/404")
    assert await _state(infra) == "open"


async def test_transport_errors_propagate_and_count_as_failures(infra: AsyncInfrastructure) -> None:
    """A refused connection raises httpx.ConnectError unchanged and counts as a breaker failure."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]  # bound but not listening: connections are refused
        transport = ProtectedTransport(infra, "up", entity="e")
        async with httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{closed_port}") as client:
            for _ in range(2):
                with pytest.raises(httpx.ConnectError):
                    await client.get("/")
            with pytest.raises(CircuitOpenError):
                await client.get("/")


async def test_server_hanging_up_is_a_failure(server: Server, infra: AsyncInfrastructure) -> None:
    """A connection closed without a response raises httpx's error and counts as a failure."""
    async with httpx.AsyncClient(transport=ProtectedTransport(infra, "up"), base_url=server.url) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/hang-up")
    assert (await infra.get_protection_status("up"))["circuit_breaker"]["failure_count"] == 1


async def test_slow_upstream_times_out(server: Server) -> None:
    """A response slower than the key's timeout raises ProtectionTimeout and counts as a failure."""
    clock = FakeClock()
    infra = await _infra({"circuit_breaker": {"failure_threshold": 1, "recovery_time": 60}, "timeout": 2.0}, clock)
    try:
        async with httpx.AsyncClient(transport=ProtectedTransport(infra, "up"), base_url=server.url) as client:
            outcome: list[BaseException] = []

            async def call() -> None:
                try:
                    await client.get("/slow")
                except ProtectionTimeout as exc:
                    outcome.append(exc)

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(call)
                await server.arrived.wait()
                clock.advance(2.0)
        assert len(outcome) == 1
        assert await _state(infra) == "open"
    finally:
        await infra.aclose()


async def test_body_is_read_inside_the_block_and_decoded_as_usual(server: Server, infra: AsyncInfrastructure) -> None:
    """A gzip-encoded body is delivered exactly as without the wrapper, also when streamed."""
    async with httpx.AsyncClient(transport=ProtectedTransport(infra, "up"), base_url=server.url) as client:
        response = await client.get("/gzip")
        async with client.stream("GET", "/gzip") as streamed:
            chunks = [chunk async for chunk in streamed.aiter_bytes()]
    assert response.content == b"squeezed" * 100
    assert b"".join(chunks) == b"squeezed" * 100


async def test_upstream_retry_after_holds_the_bucket(server: Server, infra: AsyncInfrastructure) -> None:
    """After a 429 with Retry-After, the same bucket is denied locally until then; other buckets are not."""
    clock = FakeClock()

    def bucket(request: httpx.Request) -> str:
        return request.headers["x-client"]

    transport = ProtectedTransport(infra, "up", entity=bucket, clock=clock)
    async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
        limited = await client.get("/retry/30", headers={"x-client": "a"})
        with pytest.raises(RateLimitExceeded) as held:
            await client.get("/x", headers={"x-client": "a"})
        other = await client.get("/x", headers={"x-client": "b"})
        clock.advance(30.0)
        again = await client.get("/x", headers={"x-client": "a"})
    assert limited.status_code == 429
    assert held.value.retry_after == pytest.approx(30.0)
    assert held.value.key == "a"
    assert (other.status_code, again.status_code) == (200, 200)
    assert server.hits == ["/retry/30", "/x", "/x"]  # the held request never reached the upstream
    assert "held_buckets=0" in repr(transport)


async def test_retry_after_is_capped_and_junk_is_ignored(server: Server, infra: AsyncInfrastructure) -> None:
    """A huge Retry-After holds only max_retry_after seconds; a malformed one holds nothing."""
    clock = FakeClock()
    transport = ProtectedTransport(infra, "up", max_retry_after=5.0, clock=clock)
    async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
        await client.get("/retry/soon")
        await client.get("/retry/0")
        await client.get("/retry/86400")
        with pytest.raises(RateLimitExceeded) as held:
            await client.get("/x")
    assert held.value.retry_after == pytest.approx(5.0)


async def test_async_entity_and_bad_entity_results(server: Server, infra: AsyncInfrastructure) -> None:
    """An async entity function picks the bucket; one returning a non-str raises TypeError."""

    async def tenant(request: httpx.Request) -> str:
        return request.url.params.get("tenant", "none")

    transport = ProtectedTransport(infra, "up", entity=tenant)
    bad = ProtectedTransport(infra, "up", entity=lambda request: 7)  # type: ignore[arg-type,return-value]
    async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
        statuses = [(await client.get("/", params={"tenant": t})).status_code for t in "aaab"]
        with pytest.raises(RateLimitExceeded):
            await client.get("/", params={"tenant": "a"})
    async with httpx.AsyncClient(transport=bad, base_url=server.url) as client:
        with pytest.raises(TypeError, match="must return a str"):
            await client.get("/")
    assert statuses == [200, 200, 200, 200]


def test_constructor_validates_its_arguments() -> None:
    """A non-str key, a bad entity, entity with rate_limiter, or a bad cap fail at once."""
    infra = AsyncInfrastructure()
    with pytest.raises(TypeError, match="key"):
        ProtectedTransport(infra, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="entity"):
        ProtectedTransport(infra, "up", entity=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="either entity= or rate_limiter="):
        ProtectedTransport(infra, "up", entity="a", rate_limiter="b")
    with pytest.raises(ValueError, match="max_retry_after"):
        ProtectedTransport(infra, "up", max_retry_after=float("inf"))


async def test_closing_the_transport_closes_the_wrapped_one() -> None:
    """aclose() and async with close the wrapped transport."""
    closed: list[bool] = []

    class Inner(httpx.AsyncBaseTransport):
        async def aclose(self) -> None:
            closed.append(True)

    async with ProtectedTransport(AsyncInfrastructure(), "up", transport=Inner()):
        pass
    await ProtectedTransport(AsyncInfrastructure(), "up", transport=Inner()).aclose()
    assert closed == [True, True]


def test_parse_retry_after() -> None:
    """Delay-seconds and HTTP dates become non-negative seconds; junk and absence are None."""
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=90), usegmt=True), now=now) == 90.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30", now=now) == 30.0  # no zone: read as UTC
    assert parse_retry_after(format_datetime(now - timedelta(seconds=5), usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after(format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)) > 3000


async def test_responses_already_in_memory_pass_unchanged(infra: AsyncInfrastructure) -> None:
    """A transport that hands back a body already read (httpx.MockTransport) is not read twice."""
    body = gzip.compress(b"mocked")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"Content-Encoding": "gzip"})

    transport = ProtectedTransport(infra, "up", transport=httpx.MockTransport(handler))
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
        response = await client.get("/")
    assert response.content == b"mocked"
