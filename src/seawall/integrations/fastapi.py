"""FastAPI integration: error responses, per-client protection, RateLimit headers.

* :func:`setup` maps seawall's errors to HTTP responses (429, 503, 504) with
  an integer ``Retry-After`` header and a JSON body
  ``{"error": error_type, "detail": message}``, and ties the
  :class:`~seawall.AsyncInfrastructure` to the application's lifespan. The
  message names the protection key and the retry time, never a rate-limit
  bucket (its entity is the client's address or API key).
* :func:`protect` makes a dependency that runs the request under
  ``infra.protect(key)`` and yields the pool's connection for the request's
  lifetime; ``entity`` picks the rate-limit bucket (one per client).
* :class:`ClientAddress` / :func:`client_address` name the client by its
  socket peer; ``X-Forwarded-For`` is believed only when the peer is one of
  the configured proxies, so a client cannot pick its own bucket by sending
  the header. An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``) is the IPv4
  client it maps.

What a request tells the key's circuit breaker:

* a success: the route returned a response below 500;
* a failure: the route raised (an ``HTTPException`` of 500 or above
  included) or returned a response of 500 or above;
* neither (and a half-open trial slot is freed): FastAPI's request
  validation failed (422), the route raised an ``HTTPException`` below 500,
  or another :func:`protect` of the same request refused it. None of these
  says anything about the health of what the key protects, and counting them
  would let any client open the breaker for everyone.

Allowed responses of a rate-limited key carry the ``RateLimit-Policy`` and
``RateLimit`` structured fields of the IETF draft
(``draft-ietf-httpapi-ratelimit-headers-09``/``-10``), e.g.
``RateLimit-Policy: "api";q=100;w=60`` and ``RateLimit: "api";r=57;t=41``;
``setup(..., rate_limit_headers="legacy")`` sends the older
``RateLimit-Limit``/``-Remaining``/``-Reset`` trio instead.
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from seawall._extras import missing_extra

try:
    from fastapi import Request, Response
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ModuleNotFoundError as exc:
    raise missing_extra(exc, __name__) from exc

from seawall._breaker import Unjudged
from seawall._errors import (
    CircuitOpenError,
    ConcurrencyLimitExceeded,
    ConfigurationError,
    ConfigurationTypeError,
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
    from seawall._limiter import RateLimitStatus

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
    ConcurrencyLimitExceeded: 503,
    ProtectionTimeout: 504,
}

#: The ``detail`` of each error's body, about ``{subject}`` (the protection key).
#: Built here rather than taken from the error's message: that names the
#: bucket, whose entity is the client's address or API key.
_DETAILS: Mapping[type[SeawallError], str] = {
    RateLimitExceeded: "rate limit of {subject} exceeded",
    RateLimiterError: "rate limit of {subject} cannot be checked now",
    CircuitOpenError: "{subject} is temporarily unavailable",
    PoolTimeout: "{subject} is at capacity",
    ConcurrencyLimitExceeded: "{subject} is at capacity",
    ProtectionTimeout: "{subject} did not answer in time",
}

#: The values of ``setup(rate_limit_headers=...)``.
_HEADER_STYLES = ("draft", "legacy")

_STATE_ATTRIBUTE = "seawall_infrastructure"
_STYLE_ATTRIBUTE = "seawall_rate_limit_headers"
#: Where the request's :class:`_Exchange` lives in its ASGI scope (an extension key).
_EXCHANGE_KEY = "seawall.exchange"


class _Exchange:
    """What the :func:`protect` dependencies and the middleware of one request tell each other.

    Made by the request's first ``protect()`` and kept in its ASGI scope, so
    the middleware (which sees the response) and the error handler (which
    sees only the exception) reach it without any global state.
    """

    __slots__ = ("error", "error_key", "error_policy", "headers", "status")

    def __init__(self) -> None:
        # The RateLimit-* headers of the first rate-limited protect(), added by the middleware.
        self.headers: list[tuple[bytes, bytes]] | None = None
        # The response's status once it started: a 5xx the route returned is a breaker failure.
        self.status: int | None = None
        # The seawall error a protect() of this request raised itself, and that protect()'s
        # key and rate-limit policy: the error handler names them instead of the bucket.
        self.error: BaseException | None = None
        self.error_key: str | None = None
        self.error_policy: str | None = None


def _exchange_of(scope: MutableMapping[str, Any]) -> _Exchange:
    exchange: _Exchange | None = scope.get(_EXCHANGE_KEY)
    if exchange is None:
        exchange = scope[_EXCHANGE_KEY] = _Exchange()
    return exchange


def _ceil_seconds(seconds: float) -> int:
    # Retry-After and the reset times are integer delta-seconds; rounding
    # down would invite a retry that is denied again.
    return max(0, math.ceil(seconds))


def _header_style(value: object) -> str:
    if not isinstance(value, str):
        raise ConfigurationTypeError(
            f"rate_limit_headers must be one of {_HEADER_STYLES!r}, got {value!r}", path="rate_limit_headers"
        )
    if value not in _HEADER_STYLES:
        raise ConfigurationError(
            f"rate_limit_headers must be one of {_HEADER_STYLES!r}, got {value!r}", path="rate_limit_headers"
        )
    return value


@functools.lru_cache(maxsize=256)
def _sf_string(text: str) -> str:
    """``text`` as a structured-field String (RFC 9651, 3.3.3), which the draft's policy names are.

    A String holds printable ASCII only: anything else becomes ``?`` (a
    policy name must stay the same on every response, so it is replaced
    consistently, not dropped).
    """
    printable = "".join(char if " " <= char <= "~" else "?" for char in text)
    return '"' + printable.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _rate_limit_fields(
    style: str, policy: str, *, limit: float, remaining: float, reset_after: float, window: float | None
) -> dict[str, str]:
    left = str(max(0, math.floor(remaining)))  # floored: never promise a hit that is denied
    reset = str(_ceil_seconds(reset_after))
    if style == "legacy":
        headers = {"RateLimit-Limit": str(int(limit)), "RateLimit-Remaining": left, "RateLimit-Reset": reset}
        if window is not None:
            headers["RateLimit-Policy"] = f"{int(limit)};w={_ceil_seconds(window)}"
        return headers
    name = _sf_string(policy)
    quota = f"{name};q={int(limit)}"
    if window is not None:
        quota += f";w={max(1, _ceil_seconds(window))}"  # the draft's window is a non-zero integer
    return {"RateLimit-Policy": quota, "RateLimit": f"{name};r={left};t={reset}"}


def _all_rules_fields(style: str, policy: str, statuses: list[RateLimitStatus]) -> dict[str, str]:
    """The RateLimit fields of a bucket under each of its key's rules (one rule: :func:`_rate_limit_fields`).

    Several rules are several policies, as the draft lists them:
    ``RateLimit-Policy: "api.0";q=10;w=1, "api.1";q=50;w=60`` and one
    ``RateLimit`` item per policy. The legacy trio speaks for the rule with
    the fewest hits left, and its ``RateLimit-Policy`` lists every rule
    (``10;w=1, 50;w=60``).
    """
    each = [
        _rate_limit_fields(
            style,
            policy if len(statuses) == 1 else f"{policy}.{index}",
            limit=status.limit,
            remaining=status.remaining,
            reset_after=status.reset_after,
            window=status.window,
        )
        for index, status in enumerate(statuses)
    ]
    if len(each) == 1:
        return each[0]
    if style == "legacy":
        tightest = dict(each[min(range(len(statuses)), key=lambda index: statuses[index].remaining)])
        tightest["RateLimit-Policy"] = ", ".join(fields["RateLimit-Policy"] for fields in each)
        return tightest
    return {name: ", ".join(fields[name] for fields in each) for name in ("RateLimit-Policy", "RateLimit")}


def rate_limit_headers(
    *,
    limit: float,
    remaining: float,
    reset_after: float,
    window: float | None = None,
    policy: str = "default",
    style: str = "draft",
) -> dict[str, str]:
    """The RateLimit response headers for a bucket.

    Args:
        limit: Hits allowed per window.
        remaining: Hits still allowed now (rounded down).
        reset_after: Seconds until the whole quota is back (rounded up).
        window: The window in seconds (rounded up), when it should be advertised.
        policy: The policy's name in the draft's fields (a protection key).
        style: ``"draft"``: ``RateLimit-Policy: "<policy>";q=<limit>;w=<window>``
            and ``RateLimit: "<policy>";r=<remaining>;t=<reset>``
            (``draft-ietf-httpapi-ratelimit-headers-09``/``-10``);
            ``"legacy"``: ``RateLimit-Limit``, ``RateLimit-Remaining``,
            ``RateLimit-Reset`` (and ``RateLimit-Policy: <limit>;w=<window>``).

    Returns:
        A header name to value mapping.

    Raises:
        ConfigurationError: ``style`` is neither ``"draft"`` nor ``"legacy"``.
    """
    style = _header_style(style)
    return _rate_limit_fields(style, policy, limit=limit, remaining=remaining, reset_after=reset_after, window=window)


def _detail(exc: SeawallError, key: str | None) -> str:
    subject = repr(key) if key is not None else "the service"
    template = next(
        (text for kind, text in _DETAILS.items() if isinstance(exc, kind)), "{subject} cannot serve the request"
    )
    detail = template.format(subject=subject)
    if exc.retry_after is None:
        return f"{detail}; try again later"
    return f"{detail}; retry after {_ceil_seconds(exc.retry_after)}s"


def error_response(
    exc: SeawallError,
    status_code: int,
    *,
    key: str | None = None,
    policy: str | None = None,
    rate_limit_headers: str = "draft",
) -> JSONResponse:
    """The HTTP response for a seawall error.

    Args:
        exc: The error raised while protecting the route.
        status_code: The HTTP status to answer with.
        key: The protection key that refused the request, named in the body.
        policy: The rate-limit policy's name in the RateLimit headers of a
            429 (default: ``key``, else ``"default"``).
        rate_limit_headers: ``"draft"`` or ``"legacy"``, as for :func:`setup`.

    Returns:
        A JSON response ``{"error": error_type, "detail": message}`` with
        ``Retry-After`` (integer seconds, rounded up) when the error knows it.
        The message names ``key`` and the retry time, never the bucket.

    Raises:
        ConfigurationError: ``rate_limit_headers`` is neither ``"draft"`` nor ``"legacy"``.
    """
    style = _header_style(rate_limit_headers)
    headers: dict[str, str] = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(_ceil_seconds(exc.retry_after))
    if isinstance(exc, RateLimitExceeded) and exc.limit is not None:
        name = policy or key or "default"
        headers.update(
            _rate_limit_fields(
                style, name, limit=exc.limit, remaining=0, reset_after=exc.retry_after or 0.0, window=exc.window
            )
        )
    body = {"error": exc.error_type, "detail": _detail(exc, key)}
    return JSONResponse(body, status_code=status_code, headers=headers)


async def _handle_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SeawallError)  # registered for SeawallError subclasses only
    status = next(code for kind, code in ERROR_STATUS.items() if isinstance(exc, kind))
    key = policy = None
    exchange: _Exchange | None = request.scope.get(_EXCHANGE_KEY)
    if exchange is not None and exchange.error is exc:
        key, policy = exchange.error_key, exchange.error_policy
    style = getattr(request.app.state, _STYLE_ATTRIBUTE, "draft")
    return error_response(exc, status, key=key, policy=policy, rate_limit_headers=style)


def setup(
    app: FastAPI, infra: AsyncInfrastructure, *, lifespan: bool = True, rate_limit_headers: str = "draft"
) -> None:
    """Install seawall on a FastAPI application.

    Registers the error handlers (``RateLimitExceeded`` -> 429,
    ``CircuitOpenError`` / ``PoolTimeout`` / ``ConcurrencyLimitExceeded`` / ``RateLimiterError`` -> 503,
    ``ProtectionTimeout`` -> 504), adds :class:`RateLimitHeadersMiddleware`,
    makes ``infra`` the one :func:`protect` dependencies use, and (unless ``lifespan=False``) enters ``infra`` around
    the application's own lifespan so its pools start before the first
    request and close at shutdown.

    Args:
        app: The application.
        infra: The :class:`~seawall.AsyncInfrastructure` protecting it.
        lifespan: Enter ``infra`` in the app's lifespan; pass ``False`` when
            you enter it yourself (``async with infra:`` around the server).
        rate_limit_headers: ``"draft"`` (the default): the ``RateLimit-Policy``
            and ``RateLimit`` fields of ``draft-ietf-httpapi-ratelimit-headers``;
            ``"legacy"``: ``RateLimit-Limit``, ``RateLimit-Remaining`` and
            ``RateLimit-Reset``.

    Raises:
        ConfigurationError: ``rate_limit_headers`` is neither ``"draft"`` nor
            ``"legacy"`` (nothing is installed then).
    """
    style = _header_style(rate_limit_headers)
    for kind in ERROR_STATUS:
        app.add_exception_handler(kind, _handle_error)
    app.add_middleware(RateLimitHeadersMiddleware)
    setattr(app.state, _STATE_ATTRIBUTE, infra)
    setattr(app.state, _STYLE_ATTRIBUTE, style)
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
    and is never reached, so sending the header buys nothing. An IPv4-mapped
    IPv6 address (``::ffff:192.0.2.1``, how a dual-stack socket reports an
    IPv4 peer) is the IPv4 address it maps, for the peer, the header's
    entries and the proxy list alike.

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
            forms: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
            if isinstance(address, ipaddress.IPv4Address):
                # The peer arrives unmapped (see _canonical); a proxy listed in
                # its mapped form (::ffff:10.0.0.0/104) is still that proxy.
                forms.append(ipaddress.IPv6Address(_IPV4_MAPPED | int(address)))
            verdict = any(form in network for network in self._networks for form in forms)
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
#: ``::ffff:0:0/96``, the IPv4-mapped IPv6 addresses, as the bits above the IPv4 address.
_IPV4_MAPPED = 0xFFFF << 32


def _parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    # "203.0.113.7:5678" and "[2001:db8::1]:5678" carry a port.
    host = text.rsplit(":", 1)[0].strip("[]") if text.count(":") == 1 or text.startswith("[") else ""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _canonical(text: str) -> str | None:
    """The canonical form of an IP address (a port dropped), or None if it is none.

    An IPv4-mapped IPv6 address becomes the IPv4 address it maps: a dual-stack
    socket reports an IPv4 client as ``::ffff:192.0.2.1``, and the same
    client must not get a second bucket by reaching another listener.

    Cached: parsing and printing an address costs more than the rest of the
    rate-limit decision, and a server sees the same peers over and over.
    """
    address = _parse_address(text)
    if address is None:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


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


class _FailedResponse(Exception):
    """Raised into a protected block to end it as a failure: the route returned a 5xx response."""


def _is_neutral(exc: BaseException, exchange: _Exchange, key: str) -> bool:
    """Whether an exception of the request says nothing about what ``key`` protects."""
    if isinstance(exc, HTTPException):  # starlette's, so fastapi's too
        return exc.status_code < 500
    if isinstance(exc, RequestValidationError):
        return True  # the client sent a bad request; the route never ran
    # Another protect() of this request refused it (say a per-client rate
    # limit): counting it here would let one client open this key's breaker.
    return exc is exchange.error and exchange.error_key != key


def _signal(thrown: BaseException | None, status: int | None) -> BaseException | None:
    """What to raise into the protected block so that its breaker hears the request's outcome."""
    if thrown is not None:
        return Unjudged()  # a neutral exception (any other was re-raised as it came)
    if status is not None and status >= 500:
        return _FailedResponse(f"the route answered {status}")
    return None


def _check_protect_arguments(entity: object, options: Mapping[str, Any]) -> None:
    if entity is not None and "rate_limiter" in options:
        raise TypeError("protect() takes either entity= or rate_limiter=, not both")
    if entity is not None and not (isinstance(entity, str) or callable(entity)):
        raise TypeError(f"protect(entity=...) must be a str or a function of the request, got {entity!r}")


def _policy_of(key: str, options: Mapping[str, Any]) -> tuple[str, str]:
    """The ``(operation, entity)`` of the bucket a protect() call hits (see execute_protected)."""
    bucket = options.get("rate_limiter")
    if isinstance(bucket, tuple):
        operation, entity_id = bucket
        return operation, entity_id
    return key, bucket if bucket is not None else "global"


def protect(
    key: str, *, entity: str | EntityFunction | None = None, headers: bool = True, **options: Any
) -> Callable[[Request], AsyncIterator[Any]]:
    """A FastAPI dependency that protects the request with ``infra.protect(key)``.

    The request passes the key's rate limiter (bucket ``entity``), breaker and
    pool checkout before the route runs; the route then runs under the key's
    timeout, holding the pool connection (the dependency's value) until the
    response is done, and the connection is returned even if the route raises.

    The breaker hears a failure when the route raises (an ``HTTPException``
    of 500 or above included) or returns a response of 500 or above, and
    nothing at all (a half-open trial slot is freed) when FastAPI's request
    validation fails, when the route raises an ``HTTPException`` below 500,
    or when another ``protect()`` of the request refused it: those say
    nothing about the health of what the key protects. A returned 5xx is
    seen as the response starts, so it counts when the dependency has the
    default ``scope="request"`` (with ``Depends(..., scope="function")`` the
    dependency ends before the response exists).

    Args:
        key: The protection key configured on the infrastructure.
        entity: The rate-limit bucket: a ``str``, or a function of the
            ``Request`` (sync or async) returning one, e.g.
            :func:`client_address`; ``None`` uses the key's shared bucket.
        headers: Add the RateLimit headers to allowed responses when the
            key has a rate limiter.
        **options: Passed on to ``infra.protect()`` (``circuit_breaker``,
            ``connection_pool``, ``timeout``, or ``rate_limiter`` instead of
            ``entity``).

    Returns:
        The dependency; use it as ``Depends(protect("api", entity=client_address))``.
    """
    _check_protect_arguments(entity, options)

    async def seawall_protect(request: Request) -> AsyncIterator[Any]:
        infra = _infrastructure(request)
        exchange = _exchange_of(request.scope)
        call_options = dict(options)
        entity_id = await _entity_of(entity, request)
        if entity_id is not None:
            call_options["rate_limiter"] = entity_id
        operation, bucket_entity = _policy_of(key, call_options)
        thrown: BaseException | None = None
        try:
            async with infra.protect(key, **call_options) as connection:
                if headers:
                    await _add_rate_limit_headers(infra, key, operation, bucket_entity, request, exchange)
                try:
                    yield connection
                except BaseException as exc:
                    thrown = exc
                    if not _is_neutral(exc, exchange, key):
                        raise
                # Raised here, not in the handler above, so that the route's
                # exception is not chained to a signal of ours.
                signal = _signal(thrown, exchange.status)
                if signal is not None:
                    raise signal
        except (Unjudged, _FailedResponse):
            pass  # the breaker heard what the signal meant
        except SeawallError as exc:
            if exc is not thrown:  # raised by this protection itself, not by the route
                exchange.error, exchange.error_key, exchange.error_policy = exc, key, operation
            raise
        if thrown is not None:
            raise thrown  # FastAPI expects the exception it threw in back

    return seawall_protect


async def _add_rate_limit_headers(
    infra: AsyncInfrastructure, key: str, operation: str, entity_id: str, request: Request, exchange: _Exchange
) -> None:
    if exchange.headers is not None:
        return  # an outer protect() of this request already set them: the first one speaks
    try:
        statuses = await infra.rate_limiter.get_statuses(entity_id, operation)
    except LookupError:
        return  # the key has no rate limiter: nothing to advertise
    except SeawallError as exc:
        # The request was admitted; a status read that fails must not fail it.
        logger.warning("rate_limit_headers_unavailable", key=key, error=exc.error_type)
        return
    style = getattr(request.app.state, _STYLE_ATTRIBUTE, "draft")
    # The middleware installed by setup() adds them when the response starts,
    # whatever the route returns (a Response object bypasses FastAPI's
    # injected-response headers). The policy is named after the bucket's
    # operation (the key, unless rate_limiter= names another), never its entity.
    fields = _all_rules_fields(style, operation, statuses)
    exchange.headers = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in fields.items()]


class RateLimitHeadersMiddleware:
    """Pure ASGI middleware between :func:`protect` and the response.

    :func:`setup` installs it. As a response of a protected request starts,
    it adds the RateLimit headers :func:`protect` computed (a header the
    route set itself is left alone) and notes the response's status for
    :func:`protect`, which ends its block after the response is sent: a 5xx
    the route returned is a breaker failure.
    """

    __slots__ = ("app",)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange: _Exchange | None = scope.get(_EXCHANGE_KEY)  # only a protected request has one
                if exchange is not None:
                    exchange.status = message["status"]
                    extra = exchange.headers
                    if extra:
                        headers = list(message.get("headers", ()))
                        present = {name.lower() for name, _ in headers}
                        headers.extend(header for header in extra if header[0] not in present)
                        message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_observed)


# -- health and metrics routes ------------------------------------------------------

#: HTTP status of each health report, by ``fail_on_degraded``.
_HEALTH_STATUS_CODES: Mapping[bool, Mapping[str, int]] = {
    False: {"healthy": 200, "degraded": 200, "unhealthy": 503},
    True: {"healthy": 200, "degraded": 503, "unhealthy": 503},
}


def _check_route_path(path: object) -> str:
    if not isinstance(path, str):
        raise ConfigurationTypeError(f"path: expected a str, got {path!r}", path="path")
    if not path.startswith("/"):
        raise ConfigurationError(f"path: a route path starts with '/', got {path!r}", path="path")
    return path


def health_route(
    app: FastAPI, infra: AsyncInfrastructure, path: str = "/health", *, fail_on_degraded: bool = False
) -> None:
    """Add ``GET path`` answering ``infra.health()`` as JSON.

    The report's ``"status"`` is ``"healthy"``, ``"degraded"`` (a breaker
    open, a pool closed, a shared store down under ``on_error="allow"`` or
    ``"local"``) or ``"unhealthy"`` (the infrastructure is not started or is
    closed, or a shared store is down under ``on_error="deny"``). The answer
    is 200 for healthy and degraded, 503 for unhealthy; with
    ``fail_on_degraded=True`` degraded is 503 too. Keep the default for a
    load balancer's check: an open breaker of a dependency every instance
    shares would otherwise take every instance out of rotation at once.

    Args:
        app: The application.
        infra: The infrastructure to report on.
        path: The route's path.
        fail_on_degraded: Answer 503 when degraded as well.

    Raises:
        ConfigurationError: A bad argument (named in the message).
    """
    from seawall._infrastructure import AsyncInfrastructure

    route_path = _check_route_path(path)
    if not isinstance(fail_on_degraded, bool):
        raise ConfigurationTypeError(
            f"fail_on_degraded: expected a bool, got {fail_on_degraded!r}", path="fail_on_degraded"
        )
    if not isinstance(infra, AsyncInfrastructure):
        raise ConfigurationTypeError(f"infra: expected an AsyncInfrastructure, got {infra!r}", path="infra")
    codes = _HEALTH_STATUS_CODES[fail_on_degraded]

    async def health() -> Response:
        report = await infra.health()
        return JSONResponse(report, status_code=codes.get(report["status"], 503))

    app.add_api_route(route_path, health, methods=["GET"], name="seawall_health", include_in_schema=False)


def metrics_route(app: FastAPI, *, registry: Any = None, path: str = "/metrics") -> None:
    """Add ``GET path`` answering Prometheus's text exposition of ``registry`` (extra ``prometheus``).

    Pair it with :func:`seawall.integrations.prometheus.instrument`, which
    registers seawall's collector (on the default registry unless told otherwise).

    Args:
        app: The application.
        registry: A ``prometheus_client.CollectorRegistry``; the default registry when ``None``.
        path: The route's path.

    Raises:
        ConfigurationError: A bad argument (named in the message).
    """
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
    except ModuleNotFoundError as exc:
        raise missing_extra(exc, "seawall.integrations.prometheus") from exc
    route_path = _check_route_path(path)
    if registry is None:
        registry = REGISTRY
    elif not isinstance(registry, CollectorRegistry):
        raise ConfigurationTypeError(
            f"registry: expected a prometheus_client CollectorRegistry, got {registry!r}", path="registry"
        )

    async def metrics() -> Response:
        # On the event loop, not in a worker thread: seawall's gauges read breaker
        # states on the loop's clock (trio's answers in trio's thread only).
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route(route_path, metrics, methods=["GET"], name="seawall_metrics", include_in_schema=False)
