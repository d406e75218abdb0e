"""The demo's small FastAPI service, protected per client with ``protect()``.

``GET /quote`` asks the upstream through an ``httpx.AsyncClient`` whose
transport is a :class:`~seawall.integrations.httpx.ProtectedTransport`: so a
request first passes the per-client rate limit of the ``api`` key, then the
breaker, bulkhead pool and timeout of the ``upstream`` key.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoint's
# annotations at runtime, and they refer to names local to ``build_app``.

from typing import TYPE_CHECKING

import httpx
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse

from seawall.integrations.fastapi import client_address, protect, setup

if TYPE_CHECKING:
    from seawall._infrastructure import AsyncInfrastructure

__all__ = ["build_app"]


def build_app(infra: "AsyncInfrastructure", upstream: httpx.AsyncClient) -> FastAPI:
    """The demo application, protected by ``infra``; the caller enters ``infra`` itself.

    Args:
        infra: The demo's :class:`~seawall.AsyncInfrastructure`.
        upstream: A client of the upstream service using ``ProtectedTransport``.

    Returns:
        The FastAPI application.
    """
    app = FastAPI(title="seawall demo", openapi_url=None, docs_url=None, redoc_url=None)
    setup(app, infra, lifespan=False)
    per_client = protect("api", entity=client_address)

    @app.get("/quote")
    async def quote(_: object = Depends(per_client)) -> JSONResponse:
        response = await upstream.get("/quote")
        if response.status_code >= 500:
            # The upstream failed (the breaker counted it); say so without a 500 of our own.
            detail = f"upstream answered {response.status_code}"
            return JSONResponse({"error": "upstream_error", "detail": detail}, status_code=502)
        return JSONResponse(response.json())

    return app
