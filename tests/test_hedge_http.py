"""Hedging against real upstreams on 127.0.0.1: a long-tailed HTTP server, and PostgreSQL.

These use the real clock: the tail latency is the point. Their bounds are generous
(the issue's target is p99 < 0.2 s; the benchmark reports the figures).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from seawall import AsyncInfrastructure
from seawall.integrations.httpx import ProtectedTransport
from seawall.testing import capture_events

pytestmark = pytest.mark.anyio


@dataclass
class Upstream:
    """An HTTP/1.1 server: a fixed 5% of requests (every 20th) take 1 s, the rest 10 ms.

    ``/fail`` answers 503; ``/slow`` takes 0.3 s; ``paths`` records each request's path.
    """

    url: str = ""
    requests: int = 0
    paths: list[str] = field(default_factory=list)

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        reader = BufferedByteReceiveStream(stream)
        async with stream:
            try:
                while True:
                    head = await reader.receive_until(b"\r\n\r\n", 65536)
                    await self._drain_body(reader, head)
                    path = head.split(b" ", 2)[1].decode()
                    self.paths.append(path)
                    self.requests += 1
                    status = 503 if path == "/fail" else 200
                    tail = 1.0 if self.requests % 20 == 10 else 0.01
                    await anyio.sleep(0.3 if path == "/slow" else tail)
                    await stream.send(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\nok".encode())
            except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
                pass  # a cancelled hedge's connection went away

    @staticmethod
    async def _drain_body(reader: BufferedByteReceiveStream, head: bytes) -> None:
        lines = head.lower().split(b"\r\n")
        length = next((int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:")), 0)
        if length:
            await reader.receive_exactly(length)
        elif b"transfer-encoding: chunked" in lines:
            while True:
                size = int(await reader.receive_until(b"\r\n", 64), 16)
                await reader.receive_exactly(size + 2)
                if size == 0:
                    break


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """The upstream on a free port of 127.0.0.1."""
    server = Upstream()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    server.url = f"http://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
    async with listener, anyio.create_task_group() as handlers:
        handlers.start_soon(listener.serve, server.handle)
        yield server
        handlers.cancel_scope.cancel()


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    return ordered[max(math.ceil(share * len(ordered)) - 1, 0)]


@pytest.mark.parametrize("delay", [0.05, "p90"])
async def test_hedging_cuts_the_tail_of_a_long_tailed_upstream(upstream: Upstream, delay: object) -> None:
    """With 5% of requests taking 1 s, a hedged key's p99 over 200 calls stays far below 1 s."""
    latencies: list[float] = []
    async with AsyncInfrastructure() as infra:
        config = {
            "circuit_breaker": {"failure_threshold": 50},
            "connection_pool": {"size": 4},
            "hedge": {"delay": delay},
        }
        await infra.configure_protection("up", config)
        transport = ProtectedTransport(infra, "up")
        async with httpx.AsyncClient(base_url=upstream.url, transport=transport) as client:
            with capture_events([("seawall", "hedge", "won")]) as won:
                for _ in range(200):
                    started = anyio.current_time()
                    assert (await client.get("/")).status_code == 200
                    latencies.append(anyio.current_time() - started)
        status = await infra.get_protection_status("up")
    assert percentile(latencies, 0.99) < 0.5, sorted(latencies)[-5:]
    assert upstream.requests > 200  # hedges were sent
    assert any(event.metadata["attempt"] == 1 for event in won)  # and some won
    assert status["connection_pool"]["in_use"] == 0


async def test_the_transport_resends_the_request_for_each_retry(upstream: Upstream) -> None:
    """A key with retries re-sends a failing request per attempt; the last failure's response is returned."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("up", {"retry": {"attempts": 3, "initial": 0.001}})
        async with httpx.AsyncClient(base_url=upstream.url, transport=ProtectedTransport(infra, "up")) as client:
            response = await client.get("/fail")
    assert response.status_code == 503
    assert upstream.paths == ["/fail"] * 3


async def test_the_transport_resends_the_request_for_each_hedge(upstream: Upstream) -> None:
    """A slow request of a hedged key is sent again after the delay, body and all."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("up", {"hedge": {"delay": 0.05}})
        async with httpx.AsyncClient(base_url=upstream.url, transport=ProtectedTransport(infra, "up")) as client:
            response = await client.post("/slow", content=b"payload")
    assert response.status_code == 200
    assert upstream.paths == ["/slow", "/slow"]


async def test_a_streamed_request_body_makes_one_attempt(upstream: Upstream) -> None:
    """A body that can be read once is sent once, whatever the key's retry and hedge sections say."""

    async def body() -> AsyncIterator[bytes]:
        yield b"pay"
        yield b"load"

    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("up", {"hedge": {"delay": 0.05}, "retry": {"attempts": 3, "initial": 0.001}})
        async with httpx.AsyncClient(base_url=upstream.url, transport=ProtectedTransport(infra, "up")) as client:
            assert (await client.post("/slow", content=body())).status_code == 200
            assert (await client.post("/fail", content=body())).status_code == 503
    assert upstream.paths == ["/slow", "/fail"]


async def hedged_calls(infra: AsyncInfrastructure, key: str, calls: int) -> None:
    """``calls`` calls of ``key`` whose every other first attempt is slow enough to be hedged."""
    made = 0

    async def fn() -> None:
        nonlocal made
        made += 1
        await anyio.sleep(0.003 if made % 2 else 0.0)

    for _ in range(calls):
        await infra.execute_protected(key, fn)


async def test_no_task_or_slot_leaks_after_1000_hedged_calls() -> None:
    """After 1,000 hedged calls every worker is back, no task is left, and the hedges did run."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection(
            "api", {"connection_pool": {"size": 1, "max_overflow": 1}, "hedge": {"delay": 0.001}}
        )
        tasks = len(anyio.get_running_tasks())
        with capture_events([("seawall", "hedge", "started")]) as started:
            await hedged_calls(infra, "api", 1000)
        pool = (await infra.get_protection_status("api"))["connection_pool"]
        assert (pool["in_use"], pool["waiting"]) == (0, 0)
        assert len(anyio.get_running_tasks()) == tasks
        assert len(started) >= 400


@pytest.mark.postgres
@pytest.mark.asyncio_only("asyncpg runs on asyncio only")
async def test_no_session_leaks_after_1000_hedged_calls_on_an_asyncpg_pool(postgres_dsn: str) -> None:
    """1,000 hedged calls on an asyncpg pool leave its workers idle and PostgreSQL with its two sessions."""
    import asyncpg

    from seawall.integrations.asyncpg import AsyncpgFactory

    app_name = f"seawall-test-{uuid.uuid4().hex[:12]}"
    factory = AsyncpgFactory(postgres_dsn, server_settings={"application_name": app_name})
    observer: Any = await asyncpg.connect(postgres_dsn)
    try:
        async with AsyncInfrastructure() as infra:
            await infra.configure_protection(
                "db", {"connection_pool": {"size": 2, "factory": factory}, "hedge": {"delay": 0.001}}
            )
            await hedged_calls(infra, "db", 1000)
            pool = (await infra.get_protection_status("db"))["connection_pool"]
            assert (pool["in_use"], pool["waiting"]) == (0, 0)
            query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
            assert await observer.fetchval(query, app_name) <= 2
        for _ in range(250):  # the server notices closed sessions asynchronously
            if await observer.fetchval(query, app_name) == 0:
                break
            await anyio.sleep(0.02)
        assert await observer.fetchval(query, app_name) == 0
    finally:
        await observer.close()
