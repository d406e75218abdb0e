"""Retries against a real HTTP upstream on 127.0.0.1 that fails a given share of its requests."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import anyio.abc
import httpx
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from seawall import AsyncInfrastructure

pytestmark = pytest.mark.anyio


@dataclass
class Upstream:
    """An HTTP/1.1 server answering 503 to a share ``failure_rate`` of requests (seeded draws), else 200."""

    failure_rate: float = 0.0
    seed: int = 0
    url: str = ""
    requests: int = 0

    def __post_init__(self) -> None:
        self._draws = random.Random(self.seed)  # (the test's model, not cryptography)

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        reader = BufferedByteReceiveStream(stream)
        async with stream:
            try:
                while True:
                    await reader.receive_until(b"\r\n\r\n", 65536)
                    self.requests += 1
                    failed = self._draws.random() < self.failure_rate
                    status, body = (503, b"down") if failed else (200, b"ok")
                    await stream.send(f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
                pass


@pytest.fixture
def failure_rate(request: pytest.FixtureRequest) -> float:
    """The upstream's share of failed requests (parametrized indirectly)."""
    rate: float = request.param
    return rate


@pytest.fixture
async def upstream(failure_rate: float) -> AsyncIterator[Upstream]:
    """The upstream on a free port of 127.0.0.1."""
    server = Upstream(failure_rate=failure_rate, seed=19)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    server.url = f"http://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
    async with listener, anyio.create_task_group() as handlers:
        handlers.start_soon(listener.serve, server.handle)
        yield server
        handlers.cancel_scope.cancel()


async def run_calls(upstream: Upstream, retry: dict[str, object], calls: int) -> int:
    """Make ``calls`` calls of key "up" (5xx raise); return how many succeeded."""
    succeeded = 0
    async with AsyncInfrastructure() as infra, httpx.AsyncClient(base_url=upstream.url) as client:
        await infra.configure_protection("up", {"retry": retry, "timeout": 10.0})

        async def get() -> httpx.Response:
            return (await client.get("/")).raise_for_status()

        for _ in range(calls):
            try:
                await infra.execute_protected("up", get)
            except httpx.HTTPStatusError:
                continue
            succeeded += 1
    return succeeded


@pytest.mark.parametrize("failure_rate", [0.3], indirect=True)
async def test_three_attempts_raise_the_success_rate_as_the_model_says(upstream: Upstream) -> None:
    """With 30% of requests failing, 3 attempts succeed for 1 - 0.3^3 = 97.3% of calls, at 1.39 requests each."""
    calls = 400
    retry = {"attempts": 3, "initial": 0.0, "budget_ratio": 10.0}  # (a budget that never refuses here)
    succeeded = await run_calls(upstream, retry, calls)
    assert 0.95 <= succeeded / calls <= 0.99  # the model: 0.973
    assert 1.3 <= upstream.requests / calls <= 1.5  # the model: 1 + 0.3 + 0.09 = 1.39


@pytest.mark.parametrize("failure_rate", [1.0], indirect=True)
async def test_the_budget_holds_upstream_requests_under_a_full_outage(upstream: Upstream) -> None:
    """Every request fails: upstream requests stay within (1 + 0.2) x calls + the floor (1/s x 10 s), measured."""
    calls = 200
    succeeded = await run_calls(upstream, {"attempts": 5, "initial": 0.0}, calls)
    assert succeeded == 0
    assert calls < upstream.requests <= (1 + 0.2) * calls + 1.0 * 10
