"""The integrations: what ``protect()`` adds to a FastAPI route and ``ProtectedTransport`` to an httpx request.

* ``fastapi_route``: one GET through ``httpx.ASGITransport`` (no sockets) to a
  route without protection (``bare``), behind an empty ``yield`` dependency
  taking the request and response (what FastAPI itself costs), and behind
  ``Depends(protect("api", entity=client_address))`` with a per-client rate
  limiter, with and without the RateLimit-* headers.
* ``httpx_request``: one GET to a keep-alive HTTP server on 127.0.0.1 through
  the plain ``httpx.AsyncHTTPTransport`` (``bare``) and through
  ``ProtectedTransport`` (rate limiter + breaker + bulkhead + timeout).

Limits are so large that nothing is ever denied: this times the bookkeeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
from fastapi import Depends, FastAPI, Request, Response

from _harness import BenchContext
from seawall import AsyncInfrastructure
from seawall.integrations.fastapi import client_address, protect, setup
from seawall.integrations.httpx import ProtectedTransport

NAME = "integrations"

HUGE = 10**12


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def run(ctx: BenchContext) -> None:
    """Time a protected FastAPI route and a protected httpx request against unprotected ones."""
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("api", {"rate_limiter": {"limit": HUGE, "window": 1}})
        await infra.configure_protection(
            "upstream",
            {
                "rate_limiter": {"limit": HUGE, "window": 1},
                "circuit_breaker": {"failure_threshold": 5},
                "connection_pool": {"size": 10},
                "timeout": 5.0,
            },
        )
        app = FastAPI()
        setup(app, infra, lifespan=False)

        @app.get("/bare")
        async def bare_route() -> str:
            return "ok"

        async def empty_dependency(request: Request, response: Response) -> AsyncIterator[None]:
            yield None

        @app.get("/empty", dependencies=[Depends(empty_dependency)])
        async def empty_route() -> str:
            return "ok"

        @app.get("/protected", dependencies=[Depends(protect("api", entity=client_address))])
        async def protected_route() -> str:
            return "ok"

        @app.get("/quiet", dependencies=[Depends(protect("api", entity=client_address, headers=False))])
        async def quiet_route() -> str:
            return "ok"

        transport = httpx.ASGITransport(app=app, client=("203.0.113.5", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:

            async def bare() -> None:
                await client.get("/bare")

            async def empty() -> None:
                await client.get("/empty")

            async def protected() -> None:
                await client.get("/protected")

            async def quiet() -> None:
                await client.get("/quiet")

            await ctx.per_call(
                "fastapi_route",
                {
                    "bare": bare,
                    "empty yield dependency (FastAPI's share)": empty,
                    "seawall protect()": protected,
                    "seawall protect(headers=False)": quiet,
                },
                baseline="bare",
                calls=100 if ctx.quick else 2_000,
                warmup=50 if ctx.quick else 500,
            )

        server = await asyncio.start_server(_serve, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            async with (
                httpx.AsyncClient(base_url=url) as plain,
                httpx.AsyncClient(transport=ProtectedTransport(infra, "upstream"), base_url=url) as guarded,
            ):

                async def bare_request() -> None:
                    await plain.get("/")

                async def protected_request() -> None:
                    await guarded.get("/")

                await ctx.per_call(
                    "httpx_request",
                    {"bare": bare_request, "seawall ProtectedTransport": protected_request},
                    baseline="bare",
                    calls=100 if ctx.quick else 2_000,
                    warmup=50 if ctx.quick else 500,
                )
        finally:
            server.close()
            await server.wait_closed()
