"""FastAPI integration: error responses, per-client protection, RateLimit headers.

* :func:`setup` maps seawall's errors to HTTP responses (429, 503, 504) with
  an integer ``Retry-After`` header and a JSON body
  ``{"error": error_type, "detail": message}``, and ties the
  :class:`~seawall.AsyncInfrastructure` to the application's lifespan.
* :func:`protect` makes a dependency that runs the request under
  ``infra.protect(key)`` and yields the pool's connection for the request's
  lifetime; ``entity`` picks the rate-limit bucket (one per client).
* :class:`ClientAddress` / :func:`client_address` name the client by its
  socket peer; ``X-Forwarded-For`` is believed only when the peer is one of
  the configured proxies, so a client cannot pick its own bucket by sending
  the header.

Allowed responses of a rate-limited key carry ``RateLimit-Limit``,
``RateLimit-Remaining``, ``RateLimit-Reset`` (and ``RateLimit-Policy``), the
field names of the IETF ``draft-ietf-httpapi-ratelimit-headers``.
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Request, Response
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from seawall._errors import (
    CircuitOpenError,
    PoolTimeout,
    ProtectionTimeout,
    RateLimiterError,
    RateLimitExceeded,
    SeawallError,
)
from seawall._logging import logger

if TYPE_CHECKING:
    from fastapi import FastAPI

    from seawall._infrastructure import AsyncInfrastructure

__all__ = [
    "ClientAddress",
    "EntityFunction",
    "RateLimitHeadersMiddleware",
    "client_address",
    "error_response",
    "protect",
    "rate_limit_headers",
    "setup",
]

#: A function of the request that names the rate-limit bucket (e.g. the client).
EntityFunction = Callable[[Request], str | Awaitable[str]]

#: HTTP status for each error seawall raises on behalf of a protected route.
#: A limiter backend that fails with ``on_error="deny"`` is a 503 (the service
#: cannot decide now), never a 500: the route itself is healthy.
ERROR_STATUS: Mapping[type[SeawallError], int] = {
    RateLimitExceeded: 429,
    RateLimiterError: 503,
    CircuitOpenError: 503,
    PoolTimeout: 503,
    ProtectionTimeout: 504,
}

_STATE_ATTRIBUTE = "seawall_infrastructure"
#: Where protect() leaves the RateLimit-* headers for the middleware (ASGI extension key).
_SCOPE_KEY = "seawall.rate_limit_headers"


def _ceil_seconds(seconds: float) -> int:
    # Retry-After and RateLimit-Reset are integer delta-seconds; rounding down
    # would invite a retry that is denied again.
    return max(0, math.ceil(seconds))


def rate_limit_headers(
    *, limit: float, remaining: float, reset_after: float, window: float | None = None
) -> dict[str, str]:
    """The RateLimit-* response headers (IETF draft field names) for a bucket.

    Args:
        limit: Hits allowed per window.
        remaining: Hits still allowed now.
        reset_after: Seconds until the bucket is full again.
        window: The window in seconds; adds ``RateLimit-Policy`` when given.

    Returns:
        A header name to value mapping.
    """
    headers = {
        "RateLimit-Limit": str(int(limit)),
        "RateLimit-Remaining": str(max(0, math.floor(remaining))),
        "RateLimit-Reset": str(_ceil_seconds(reset_after)),
    }
    if window is not None:
        headers["RateLimit-Policy"] = f"{int(limit)};w={_ceil_seconds(window)}"
    return headers


def error_response(exc: SeawallError, status_code: int) -> JSONResponse:
    """The HTTP response for a seawall error.

    Args:
        exc: The error raised while protecting the route.
        status_code: The HTTP status to answer with.

    Returns:
        A JSON response ``{"error": error_type, "detail": message}`` with
        ``Retry-After`` (integer seconds, rounded up) when the error knows it.
    """
    headers: dict[str, str] = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(_ceil_seconds(exc.retry_after))
    if isinstance(exc, RateLimitExceeded) and exc.limit is not None:
        headers.update(
            rate_limit_headers(limit=exc.limit, remaining=0, reset_after=exc.retry_after or 0.0, window=exc.window)
        )
    return JSONResponse({"error": exc.error_type, "detail": exc.message}, status_code=status_code, headers=headers)


async def _handle_error(request: Request, exc: Exception) -> Response:
    del request
    assert isinstance(exc, SeawallError)  # registered for SeawallError subclasses only
    status = next(code for kind, code in ERROR_STATUS.items() if isinstance(exc, kind))
    return error_response(exc, status)


def setup(app: FastAPI, infra: AsyncInfrastructure, *, lifespan: bool = True) -> None:
    """Install seawall on a FastAPI application.

    Registers the error handlers (``RateLimitExceeded`` -> 429,
    ``CircuitOpenError`` / ``PoolTimeout`` / ``RateLimiterError`` -> 503,
    ``ProtectionTimeout`` -> 504), adds :class:`RateLimitHeadersMiddleware`,
    makes ``infra`` the one :func:`protect` dependencies use, and (unless ``lifespan=False``) enters ``infra`` around
    the application's own lifespan so its pools start before the first
    request and close at shutdown.

    Args:
        app: The application.
        infra: The :class:`~seawall.AsyncInfrastructure` protecting it.
        lifespan: Enter ``infra`` in the app's lifespan; pass ``False`` when
            you enter it yourself (``async with infra:`` around the server).
    """
    for kind in ERROR_STATUS:
        app.add_exception_handler(kind, _handle_error)
    app.add_middleware(RateLimitHeadersMiddleware)
    setattr(app.state, _STATE_ATTRIBUTE, infra)
    if not lifespan:
        return
    previous = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan_with_infra(app_: Any) -> AsyncIterator[Any]:
        # infra first, so the app's own startup may configure protections.
        async with infra, previous(app_) as state:
            yield state

    app.router.lifespan_context = lifespan_with_infra


def _infrastructure(request: Request) -> AsyncInfrastructure:
    infra: AsyncInfrastructure | None = getattr(request.app.state, _STATE_ATTRIBUTE, None)
    if infra is None:
        raise RuntimeError("seawall.integrations.fastapi.setup(app, infra) was not called for this application")
    return infra


class ClientAddress:
    """Name the client of a request by its IP address, not spoofable by default.

    The socket peer is the client, unless the peer is one of
    ``trusted_proxies``: then ``X-Forwarded-For`` is read from the right, each
    trusted hop is skipped, and the first address not in ``trusted_proxies``
    is the client. An address the client wrote itself sits left of that one
    and is never reached, so sending the header buys nothing.

    Args:
        trusted_proxies: Addresses or networks (``"10.0.0.0/8"``) of your
            reverse proxies. Empty (the default): the header is ignored.

    Use it as the ``entity`` of :func:`protect` to give each client its own
    bucket: ``protect("api", entity=ClientAddress(trusted_proxies=["10.0.0.0/8"]))``.
    """

    __slots__ = ("_networks", "_verdicts")

    def __init__(self, *, trusted_proxies: Iterable[str] = ()) -> None:
        if isinstance(trusted_proxies, str):
            raise TypeError(f"trusted_proxies must be a collection of addresses, not a str: {trusted_proxies!r}")
        networks = []
        for proxy in trusted_proxies:
            try:
                networks.append(ipaddress.ip_network(proxy, strict=False))
            except ValueError:
                raise ValueError(f"trusted_proxies: {proxy!r} is not an IP address or network") from None
        self._networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(networks)
        # canonical address -> is it a trusted proxy; bounded, see _trusted().
        self._verdicts: dict[str, bool] = {}

    def _trusted(self, canonical: str) -> bool:
        verdict = self._verdicts.get(canonical)
        if verdict is None:
            address = ipaddress.ip_address(canonical)
            verdict = any(address in network for network in self._networks)
            if len(self._verdicts) >= _CACHE_SIZE:
                self._verdicts.clear()  # a flood of distinct peers must not grow memory
            self._verdicts[canonical] = verdict
        return verdict

    def __call__(self, request: Request) -> str:
        """Return the client's address for ``request`` (``"unknown"`` when there is no peer)."""
        client = request.client
        if client is None or client.host is None:
            return "unknown"
        peer = _canonical(client.host)
        if peer is None:
            return client.host  # not an IP address (a test client, a Unix socket): use it as it is
        if not self._networks or not self._trusted(peer):
            return peer
        hops = [hop.strip() for value in request.headers.getlist("x-forwarded-for") for hop in value.split(",")]
        found = peer
        for hop in reversed(hops):
            address = _canonical(hop)
            if address is None:
                # A malformed entry was not written by a proxy we trust: stop
                # at the last hop we could vouch for.
                break
            found = address
            if not self._trusted(address):
                break
        return found

    def __repr__(self) -> str:
        return f"ClientAddress(trusted_proxies={[str(network) for network in self._networks]!r})"


_CACHE_SIZE = 4096


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _canonical(text: str) -> str | None:
    """The canonical form of an IP address (a port dropped), or None if it is none.

    Cached: parsing and printing an address costs more than the rest of the
    rate-limit decision, and a server sees the same peers over and over.
    """
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    # "203.0.113.7:5678" and "[2001:db8::1]:5678" carry a port.
    host = text.rsplit(":", 1)[0].strip("[]") if text.count(":") == 1 or text.startswith("[") else ""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


_peer_only = ClientAddress()


def client_address(request: Request) -> str:
    """The client's address: the socket peer, ignoring ``X-Forwarded-For``.

    Behind a reverse proxy use :class:`ClientAddress` with ``trusted_proxies``.

    Args:
        request: The incoming request.

    Returns:
        The peer's IP address in canonical form, or ``"unknown"``.
    """
    return _peer_only(request)


async def _entity_of(entity: str | EntityFunction | None, request: Request) -> str | None:
    if entity is None or isinstance(entity, str):
        return entity
    result = entity(request)
    if inspect.isawaitable(result):
        result = await result
    if not isinstance(result, str):
        raise TypeError(f"protect(entity=...) must return a str, got {type(result).__name__}: {result!r}")
    return result


def protect(
    key: str, *, entity: str | EntityFunction | None = None, headers: bool = True, **options: Any
) -> Callable[[Request], AsyncIterator[Any]]:
    """A FastAPI dependency that protects the request with ``infra.protect(key)``.

    The request passes the key's rate limiter (bucket ``entity``), breaker and
    pool checkout before the route runs; the route then runs under the key's
    timeout, holding the pool connection (the dependency's value) until the
    response is done, and the connection is returned even if the route raises.
    An ``HTTPException`` with a 4xx status is the client's fault and does not
    count as a breaker failure; any other exception does.

    Args:
        key: The protection key configured on the infrastructure.
        entity: The rate-limit bucket: a ``str``, or a function of the
            ``Request`` (sync or async) returning one, e.g.
            :func:`client_address`; ``None`` uses the key's shared bucket.
        headers: Add the RateLimit-* headers to allowed responses when the
            key has a rate limiter.
        **options: Passed on to ``infra.protect()`` (``circuit_breaker``,
            ``connection_pool``, ``timeout``, or ``rate_limiter`` instead of
            ``entity``).

    Returns:
        The dependency; use it as ``Depends(protect("api", entity=client_address))``.
    """
    if entity is not None and "rate_limiter" in options:
        raise TypeError("protect() takes either entity= or rate_limiter=, not both")
    if entity is not None and not (isinstance(entity, str) or callable(entity)):
        raise TypeError(f"protect(entity=...) must be a str or a function of the request, got {entity!r}")

    async def seawall_protect(request: Request) -> AsyncIterator[Any]:
        infra = _infrastructure(request)
        call_options = dict(options)
        entity_id = await _entity_of(entity, request)
        if entity_id is not None:
            call_options["rate_limiter"] = entity_id
        client_error: HTTPException | None = None
        async with infra.protect(key, **call_options) as connection:
            if headers:
                await _add_rate_limit_headers(infra, key, call_options.get("rate_limiter"), request)
            try:
                yield connection
            except HTTPException as exc:
                if exc.status_code >= 500:
                    raise
                # Leave the protected block normally: a 404 says nothing about
                # the health of what the key protects.
                client_error = exc
        if client_error is not None:
            raise client_error

    return seawall_protect


async def _add_rate_limit_headers(infra: AsyncInfrastructure, key: str, bucket: Any, request: Request) -> None:
    if _SCOPE_KEY in request.scope:
        return  # an outer protect() of this request already set them: the first one speaks
    if isinstance(bucket, tuple):
        operation, entity_id = bucket
    else:
        operation, entity_id = key, bucket if bucket is not None else "global"
    try:
        status = await infra.rate_limiter.get_status(entity_id, operation)
    except LookupError:
        return  # the key has no rate limiter: nothing to advertise
    except SeawallError as exc:
        # The request was admitted; a status read that fails must not fail it.
        logger.warning("rate_limit_headers_unavailable", key=key, error=exc.error_type)
        return
    # The middleware installed by setup() adds them when the response starts,
    # whatever the route returns (a Response object bypasses FastAPI's
    # injected-response headers).
    request.scope[_SCOPE_KEY] = [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in rate_limit_headers(
            limit=status.limit, remaining=status.remaining, reset_after=status.reset_after, window=status.window
        ).items()
    ]


class RateLimitHeadersMiddleware:
    """Pure ASGI middleware adding the RateLimit-* headers :func:`protect` computed.

    :func:`setup` installs it; the headers go on every response of an admitted
    request (a header the route set itself is left alone).
    """

    __slots__ = ("app",)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = scope.get(_SCOPE_KEY)
                if extra:
                    headers = list(message.get("headers", ()))
                    present = {name.lower() for name, _ in headers}
                    headers.extend(header for header in extra if header[0] not in present)
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
