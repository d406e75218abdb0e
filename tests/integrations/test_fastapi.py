"""seawall.integrations.fastapi: error responses, per-client protection, RateLimit headers."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as StarletteRequest

from seawall import AsyncInfrastructure, FakeClock
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
from seawall.integrations.fastapi import (
    ClientAddress,
    client_address,
    error_response,
    protect,
    rate_limit_headers,
    setup,
)

pytestmark = pytest.mark.anyio


def _client(app: FastAPI, address: str = "203.0.113.5", *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(address, 50000), raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def _request(peer: str | None, forwarded: list[str] | None = None) -> StarletteRequest:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded or []]
    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": "/", "headers": headers, "query_string": b""}
    scope["client"] = (peer, 1234) if peer is not None else None
    return StarletteRequest(scope)


@asynccontextmanager
async def _app_with(
    configs: dict[str, dict[str, Any]],
    *,
    clock: FakeClock | None = None,
    backend: Any = None,
    rate_limit_headers: str = "draft",
) -> AsyncIterator[tuple[FastAPI, AsyncInfrastructure]]:
    async with AsyncInfrastructure(clock=clock, backend=backend) as infra:
        for key, config in configs.items():
            await infra.configure_protection(key, config)
        app = FastAPI()
        setup(app, infra, lifespan=False, rate_limit_headers=rate_limit_headers)
        yield app, infra


class _Item(BaseModel):
    name: str


async def _breaker_state(infra: AsyncInfrastructure, key: str) -> str:
    state: str = (await infra.get_protection_status(key))["circuit_breaker"]["state"]
    return state


# -- error responses ---------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "retry_after", "detail"),
    [
        (
            RateLimitExceeded(key="api:198.51.100.1", limit=2, window=60.0, retry_after=0.2),
            429,
            "1",
            "rate limit of the service exceeded; retry after 1s",
        ),
        (
            RateLimiterError(key="api:198.51.100.1"),
            503,
            None,
            "rate limit of the service cannot be checked now; try again later",
        ),
        (
            CircuitOpenError(name="b", retry_after=2.5),
            503,
            "3",
            "the service is temporarily unavailable; retry after 3s",
        ),
        (PoolTimeout(name="p", timeout=1.0), 503, None, "the service is at capacity; try again later"),
        (
            ConcurrencyLimitExceeded(name="api", limit=10, priority=1, retry_after=0.2),
            503,
            "1",
            "the service is at capacity; retry after 1s",
        ),
        (
            ProtectionTimeout(key="k", timeout=1.0, retry_after=3.0),
            504,
            "3",
            "the service did not answer in time; retry after 3s",
        ),
    ],
)
async def test_errors_map_to_status_json_body_and_rounded_up_retry_after(
    error: SeawallError, status: int, retry_after: str | None, detail: str
) -> None:
    """Each seawall error becomes its status, {"error", "detail"} and an integer Retry-After rounded up."""
    app = FastAPI()
    setup(app, AsyncInfrastructure(), lifespan=False)

    @app.get("/")
    async def route() -> None:
        raise error

    async with _client(app) as client:
        response = await client.get("/")
    assert response.status_code == status
    assert response.json() == {"error": error.error_type, "detail": detail}
    assert response.headers.get("retry-after") == retry_after


async def test_rate_limited_response_advertises_the_exhausted_bucket() -> None:
    """A 429 carries the draft's RateLimit-Policy and RateLimit with r=0 and t rounded up."""
    response = error_response(RateLimitExceeded(key="k", limit=10, window=60.0, retry_after=4.2), 429, key="api")
    assert response.headers["ratelimit-policy"] == '"api";q=10;w=60'
    assert response.headers["ratelimit"] == '"api";r=0;t=5'
    assert response.headers["retry-after"] == "5"
    assert "ratelimit-limit" not in response.headers


def test_rate_limit_headers_round_remaining_down_and_reset_up() -> None:
    """Remaining is floored (never promise a hit), reset is ceiled (never invite an early retry)."""
    assert rate_limit_headers(limit=5, remaining=2.7, reset_after=0.1, style="legacy") == {
        "RateLimit-Limit": "5",
        "RateLimit-Remaining": "2",
        "RateLimit-Reset": "1",
    }
    assert rate_limit_headers(limit=5, remaining=2.7, reset_after=0.1, window=0.5) == {
        "RateLimit-Policy": '"default";q=5;w=1',
        "RateLimit": '"default";r=2;t=1',
    }


# -- protect(): the dependency ------------------------------------------------


async def test_each_client_address_gets_its_own_bucket() -> None:
    """With entity=client_address, one client's denials leave another client's bucket alone."""
    async with _app_with({"api": {"rate_limiter": {"limit": 2, "window": 60}}}) as (app, _):

        @app.get("/", dependencies=[Depends(protect("api", entity=client_address))])
        async def route() -> dict[str, str]:
            return {"ok": "yes"}

        async with _client(app, "203.0.113.5") as first, _client(app, "198.51.100.7") as second:
            statuses = [(await first.get("/")).status_code for _ in range(3)]
            denied = await first.get("/")
            other = await second.get("/")
    assert statuses == [200, 200, 429]
    assert denied.json()["error"] == "rate_limit_exceeded"
    assert int(denied.headers["retry-after"]) >= 1
    assert other.status_code == 200


async def test_allowed_responses_carry_rate_limit_headers() -> None:
    """RateLimit-Policy names the key's quota and window; RateLimit the client's remaining hits and reset."""
    clock = FakeClock()
    async with _app_with({"api": {"rate_limiter": {"limit": 3, "window": 30}}}, clock=clock) as (app, _):

        @app.get("/", dependencies=[Depends(protect("api", entity=client_address))])
        async def route() -> str:
            return "ok"

        async with _client(app) as client:
            responses = [await client.get("/") for _ in range(2)]
    assert [r.headers["ratelimit-policy"] for r in responses] == ['"api";q=3;w=30'] * 2
    assert [r.headers["ratelimit"] for r in responses] == ['"api";r=2;t=10', '"api";r=1;t=20']
    assert "203.0.113.5" not in str(responses[0].headers)  # the bucket's entity is not advertised
    assert "ratelimit-remaining" not in responses[0].headers


async def test_legacy_rate_limit_headers_when_asked() -> None:
    """setup(rate_limit_headers="legacy") sends RateLimit-Limit/-Remaining/-Reset, on 200s and 429s alike."""
    clock = FakeClock()
    config = {"api": {"rate_limiter": {"limit": 2, "window": 30}}}
    async with _app_with(config, clock=clock, rate_limit_headers="legacy") as (app, _):

        @app.get("/", dependencies=[Depends(protect("api", entity=client_address))])
        async def route() -> str:
            return "ok"

        async with _client(app) as client:
            allowed, _, denied = [await client.get("/") for _ in range(3)]
    assert (allowed.headers["ratelimit-limit"], allowed.headers["ratelimit-remaining"]) == ("2", "1")
    assert allowed.headers["ratelimit-reset"] == "15"
    assert allowed.headers["ratelimit-policy"] == "2;w=30"
    assert "ratelimit" not in allowed.headers
    assert denied.status_code == 429
    assert (denied.headers["ratelimit-remaining"], denied.headers["ratelimit-reset"]) == ("0", "15")
    assert "ratelimit" not in denied.headers


def test_an_unknown_rate_limit_headers_style_is_a_configuration_error() -> None:
    """setup(), error_response() and rate_limit_headers() refuse a style other than "draft"/"legacy", naming it."""
    app = FastAPI()
    with pytest.raises(ConfigurationError, match="rate_limit_headers") as refused:
        setup(app, AsyncInfrastructure(), rate_limit_headers="ietf")
    assert refused.value.path == "rate_limit_headers"
    assert app.user_middleware == []  # nothing was installed
    with pytest.raises(ConfigurationTypeError, match="rate_limit_headers"):
        setup(app, AsyncInfrastructure(), rate_limit_headers=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="rate_limit_headers"):
        error_response(RateLimitExceeded(limit=1, window=1.0), 429, rate_limit_headers="Draft")
    with pytest.raises(ConfigurationError, match="rate_limit_headers"):
        rate_limit_headers(limit=1, remaining=0, reset_after=1.0, style="")


def test_policy_names_are_structured_field_strings() -> None:
    """A key with quotes, backslashes or non-ASCII characters still makes a valid sf-string policy name."""
    headers = rate_limit_headers(limit=1, remaining=1, reset_after=0.0, policy='a"b\\c-\u00e9')
    assert headers["RateLimit"] == '"a\\"b\\\\c-?";r=1;t=0'


async def test_no_rate_limit_headers_without_a_limiter_or_when_disabled() -> None:
    """A key with no rate limiter, or headers=False, adds no RateLimit-* headers."""
    async with _app_with({"plain": {"timeout": 5.0}, "api": {"rate_limiter": {"limit": 3, "window": 30}}}) as (app, _):

        @app.get("/plain", dependencies=[Depends(protect("plain"))])
        async def plain() -> str:
            return "ok"

        @app.get("/quiet", dependencies=[Depends(protect("api", headers=False))])
        async def quiet() -> str:
            return "ok"

        async with _client(app) as client:
            responses = [await client.get("/plain"), await client.get("/quiet")]
    for response in responses:
        assert response.status_code == 200
        assert "ratelimit" not in response.headers
        assert "ratelimit-policy" not in response.headers


async def test_spoofed_forwarded_for_does_not_change_the_bucket() -> None:
    """By default X-Forwarded-For is ignored: a client cannot escape its bucket by sending it."""
    async with _app_with({"api": {"rate_limiter": {"limit": 1, "window": 60}}}) as (app, _):

        @app.get("/", dependencies=[Depends(protect("api", entity=client_address))])
        async def route() -> str:
            return "ok"

        async with _client(app) as client:
            first = await client.get("/", headers={"X-Forwarded-For": "192.0.2.1"})
            second = await client.get("/", headers={"X-Forwarded-For": "192.0.2.2"})
    assert (first.status_code, second.status_code) == (200, 429)


async def test_entity_may_be_an_async_function_or_a_string() -> None:
    """An async entity function (e.g. an API key header) and a fixed string both pick buckets."""

    async def api_key(request: Request) -> str:
        return request.headers.get("x-api-key", "anonymous")

    async with _app_with({"api": {"rate_limiter": {"limit": 1, "window": 60}}}) as (app, _):

        @app.get("/keyed", dependencies=[Depends(protect("api", entity=api_key))])
        async def keyed() -> str:
            return "ok"

        @app.get("/shared", dependencies=[Depends(protect("api", entity="everyone"))])
        async def shared() -> str:
            return "ok"

        async with _client(app) as client:
            statuses = [
                (await client.get("/keyed", headers={"x-api-key": "a"})).status_code,
                (await client.get("/keyed", headers={"x-api-key": "b"})).status_code,
                (await client.get("/keyed", headers={"x-api-key": "a"})).status_code,
                (await client.get("/shared")).status_code,
                (await client.get("/shared")).status_code,
            ]
    assert statuses == [200, 200, 429, 200, 429]


async def test_entity_function_returning_a_non_string_is_a_type_error() -> None:
    """An entity function must return a str; anything else fails loudly."""
    async with _app_with({"api": {"rate_limiter": {"limit": 1, "window": 60}}}) as (app, _):

        @app.get("/", dependencies=[Depends(protect("api", entity=lambda request: 42))])  # type: ignore[arg-type,return-value]
        async def route() -> str:
            return "ok"

        async with _client(app) as client:
            with pytest.raises(TypeError, match="must return a str"):
                await client.get("/")


def test_protect_rejects_bad_arguments() -> None:
    """Passing entity with rate_limiter, or an entity that is neither str nor callable, is refused."""
    with pytest.raises(TypeError, match="either entity= or rate_limiter="):
        protect("api", entity="a", rate_limiter="b")
    with pytest.raises(TypeError, match="must be a str or a function"):
        protect("api", entity=42)  # type: ignore[arg-type]


async def test_protect_without_setup_says_what_is_missing() -> None:
    """Using protect() on an app that setup() never saw raises a clear RuntimeError."""
    app = FastAPI()

    @app.get("/", dependencies=[Depends(protect("api"))])
    async def route() -> str:
        return "ok"

    async with _client(app) as client:
        with pytest.raises(RuntimeError, match="setup"):
            await client.get("/")


async def test_connection_is_yielded_and_returned_even_when_the_route_raises() -> None:
    """The pool connection is the dependency's value and goes back to the pool after a failing route."""
    made: list[object] = []

    async def factory() -> object:
        conn = object()
        made.append(conn)
        return conn

    config = {"connection_pool": {"size": 1, "factory": factory, "timeout": 1.0}}
    async with _app_with({"db": config}) as (app, infra):
        seen: list[object] = []

        @app.get("/")
        async def route(conn: object = Depends(protect("db"))) -> str:
            seen.append(conn)
            raise RuntimeError("boom")

        async with _client(app, raise_app_exceptions=False) as client:
            first = await client.get("/")
            second = await client.get("/")
        status = await infra.get_protection_status("db")
    assert (first.status_code, second.status_code) == (500, 500)
    assert seen == [made[0], made[0]]  # the one connection was returned and handed out again
    assert status["connection_pool"]["in_use"] == 0


async def test_client_errors_do_not_count_as_breaker_failures() -> None:
    """An HTTPException below 500 leaves the breaker closed; a 500-class one and other errors open it."""
    config = {"circuit_breaker": {"failure_threshold": 2, "recovery_time": 60}}
    async with _app_with({"svc": config}) as (app, infra):

        @app.get("/missing", dependencies=[Depends(protect("svc"))])
        async def missing() -> None:
            raise HTTPException(status_code=404, detail="no such thing")

        @app.get("/broken", dependencies=[Depends(protect("svc"))])
        async def broken() -> None:
            raise HTTPException(status_code=502, detail="bad gateway")

        async with _client(app) as client:
            missing_statuses = [(await client.get("/missing")).status_code for _ in range(3)]
            state_after_404s = (await infra.get_protection_status("svc"))["circuit_breaker"]["state"]
            broken_statuses = [(await client.get("/broken")).status_code for _ in range(3)]
    assert missing_statuses == [404, 404, 404]
    assert state_after_404s == "closed"
    assert broken_statuses[:2] == [502, 502]
    rejected = broken_statuses[2]
    assert rejected == 503


async def test_request_validation_errors_do_not_count_as_breaker_failures() -> None:
    """422s (a bad query parameter, a body of the wrong shape, malformed JSON) never open the breaker."""
    config = {"circuit_breaker": {"failure_threshold": 2, "recovery_time": 60}}
    async with _app_with({"svc": config}) as (app, infra):

        @app.get("/items", dependencies=[Depends(protect("svc"))])
        async def read(n: int) -> int:
            return n

        @app.post("/items", dependencies=[Depends(protect("svc"))])
        async def create(item: _Item) -> str:
            return item.name

        async with _client(app) as client:
            rejected = [
                await client.get("/items", params={"n": "many"}),
                await client.post("/items", json={"title": "no name"}),
                await client.post("/items", content=b"{not json", headers={"Content-Type": "application/json"}),
                await client.get("/items", params={"n": "again"}),
            ]
            state = await _breaker_state(infra, "svc")
            served = await client.get("/items", params={"n": "1"})
    assert [response.status_code for response in rejected] == [422, 422, 422, 422]
    assert state == "closed"
    assert served.status_code == 200


async def test_client_errors_free_a_half_open_trial_without_closing_the_breaker() -> None:
    """During half-open, a 4xx HTTPException (fastapi's or starlette's) or a 422 frees the trial, closing nothing."""
    clock = FakeClock()
    config = {"circuit_breaker": {"failure_threshold": 1, "recovery_time": 30, "half_open_max_calls": 1}}
    async with _app_with({"svc": config}, clock=clock) as (app, infra):

        @app.get("/missing", dependencies=[Depends(protect("svc"))])
        async def missing() -> None:
            raise HTTPException(status_code=404, detail="no such thing")

        @app.get("/gone", dependencies=[Depends(protect("svc"))])
        async def gone() -> None:
            raise StarletteHTTPException(status_code=410)

        @app.get("/items", dependencies=[Depends(protect("svc"))])
        async def read(n: int) -> int:
            return n

        await infra.circuit_breaker.get("svc").trip()
        clock.advance(30)
        states: list[str] = []
        async with _client(app) as client:
            statuses = []
            for path in ("/missing", "/gone", "/items?n=x"):
                statuses.append((await client.get(path)).status_code)
                states.append(await _breaker_state(infra, "svc"))
            statuses.append((await client.get("/items?n=1")).status_code)
            states.append(await _breaker_state(infra, "svc"))
    # Each neutral answer gave its trial slot back (one slot: else the next one would be a 503).
    assert statuses == [404, 410, 422, 200]
    assert states == ["half_open", "half_open", "half_open", "closed"]


async def test_returned_server_error_responses_count_as_breaker_failures() -> None:
    """A route that returns (not raises) a 5xx response counts as a failure and opens the breaker."""
    config = {"circuit_breaker": {"failure_threshold": 2, "recovery_time": 60}}
    async with _app_with({"svc": config}) as (app, infra):

        @app.get("/", dependencies=[Depends(protect("svc"))])
        async def route() -> JSONResponse:
            return JSONResponse({"error": "upstream_error"}, status_code=502)

        async with _client(app) as client:
            responses = [await client.get("/") for _ in range(3)]
            state = await _breaker_state(infra, "svc")
    assert [response.status_code for response in responses] == [502, 502, 503]
    assert responses[1].json() == {"error": "upstream_error"}  # the route's own answer is sent unchanged
    assert responses[2].json()["error"] == "circuit_breaker_blown"
    assert state == "open"


async def test_a_refusal_by_another_protect_is_not_a_failure_of_this_key() -> None:
    """A per-client 429 from an inner protect() never counts against the outer key's breaker."""
    configs = {
        "svc": {"circuit_breaker": {"failure_threshold": 2, "recovery_time": 60}},
        "api": {"rate_limiter": {"limit": 1, "window": 60}},
    }
    async with _app_with(configs) as (app, infra):
        outer, inner = protect("svc"), protect("api", entity=client_address)

        @app.get("/", dependencies=[Depends(outer), Depends(inner)])
        async def route() -> str:
            return "ok"

        async with _client(app) as client:
            responses = [await client.get("/") for _ in range(4)]
            state = await _breaker_state(infra, "svc")
    assert [response.status_code for response in responses] == [200, 429, 429, 429]
    assert responses[1].json()["detail"] == "rate limit of 'api' exceeded; retry after 60s"
    assert state == "closed"


async def test_error_bodies_name_the_key_and_retry_time_never_the_bucket() -> None:
    """429, 503 (breaker, pool) and 504 bodies name the protection key and retry time, not the client's bucket."""
    clock = FakeClock()
    configs: dict[str, dict[str, Any]] = {
        "limited": {"rate_limiter": {"limit": 1, "window": 60}},
        "broken": {"circuit_breaker": {"failure_threshold": 1, "recovery_time": 30}},
        "db": {"connection_pool": {"size": 1, "timeout": 1.0}, "timeout": 10.0},
        "slow": {"timeout": 2.0},
    }
    async with _app_with(configs, clock=clock) as (app, infra):
        release = anyio.Event()

        @app.get("/limited", dependencies=[Depends(protect("limited", entity=client_address))])
        async def limited() -> str:
            return "ok"

        @app.get("/broken", dependencies=[Depends(protect("broken"))])
        async def broken() -> str:
            return "ok"  # pragma: no cover - the breaker is open

        @app.get("/db", dependencies=[Depends(protect("db"))])
        async def db() -> str:
            await release.wait()
            return "ok"

        @app.get("/slow", dependencies=[Depends(protect("slow"))])
        async def slow() -> str:
            await anyio.sleep_forever()
            return "never"  # pragma: no cover - cancelled by the timeout

        await infra.circuit_breaker.get("broken").trip()
        results: dict[str, httpx.Response] = {}
        async with _client(app) as client, anyio.create_task_group() as tasks:

            async def get(name: str, path: str) -> None:
                results[name] = await client.get(path)

            await get("allowed", "/limited")
            await get("limited", "/limited")
            await get("broken", "/broken")
            tasks.start_soon(get, "held", "/db")
            await anyio.wait_all_tasks_blocked()
            tasks.start_soon(get, "db", "/db")
            tasks.start_soon(get, "slow", "/slow")
            await anyio.wait_all_tasks_blocked()
            clock.advance(2.0)  # the checkout's 1 s and the slow route's 2 s
            await anyio.wait_all_tasks_blocked()
            release.set()
    assert (results["allowed"].status_code, results["held"].status_code) == (200, 200)
    refused = ("limited", "broken", "db", "slow")
    details = {name: (results[name].status_code, results[name].json()["detail"]) for name in refused}
    assert details["limited"] == (429, "rate limit of 'limited' exceeded; retry after 60s")
    assert details["broken"] == (503, "'broken' is temporarily unavailable; retry after 30s")
    assert details["db"] == (503, "'db' is at capacity; try again later")
    assert details["slow"] == (504, "'slow' did not answer in time; try again later")
    for response in results.values():
        assert "203.0.113.5" not in response.text


class _FailingBackend:
    """A limiter store that is down, under on_error="deny": every decision raises RateLimiterError."""

    async def take(self, key: str, cost: float, rule: object) -> None:
        raise RateLimiterError(key=key)

    async def peek(self, key: str, rule: object) -> None:
        raise RateLimiterError(key=key)  # pragma: no cover - headers are not read for a refused request

    async def reset(self, key: str, rule: object) -> None:
        raise RateLimiterError(key=key)  # pragma: no cover - nothing resets here


async def test_a_failing_limiter_backend_body_names_the_key_not_the_bucket() -> None:
    """A 503 rate_limiter_exception names the protection key, not the client's bucket."""
    config = {"api": {"rate_limiter": {"limit": 5, "window": 60}}}
    async with _app_with(config, backend=_FailingBackend()) as (app, _):

        @app.get("/", dependencies=[Depends(protect("api", entity=client_address))])
        async def route() -> str:
            return "ok"  # pragma: no cover - the limiter refuses

        async with _client(app) as client:
            response = await client.get("/")
    assert response.status_code == 503
    assert response.json() == {
        "error": "rate_limiter_exception",
        "detail": "rate limit of 'api' cannot be checked now; try again later",
    }


async def test_open_breaker_answers_503_with_retry_after() -> None:
    """Once the key's breaker is open, requests get 503 circuit_breaker_blown with Retry-After."""
    config = {"circuit_breaker": {"failure_threshold": 1, "recovery_time": 30}}
    async with _app_with({"svc": config}) as (app, infra):

        @app.get("/", dependencies=[Depends(protect("svc"))])
        async def route() -> str:
            return "ok"

        await infra.circuit_breaker.get("svc").trip()
        async with _client(app) as client:
            response = await client.get("/")
    assert response.status_code == 503
    assert response.json()["error"] == "circuit_breaker_blown"
    assert 1 <= int(response.headers["retry-after"]) <= 30


async def test_exhausted_pool_answers_503_checkout_timeout() -> None:
    """A request that cannot get a pool slot within the pool's timeout gets 503 checkout_timeout."""
    clock = FakeClock()
    config = {"connection_pool": {"size": 1, "timeout": 1.0}, "timeout": 10.0}
    async with _app_with({"db": config}, clock=clock) as (app, _):
        release = anyio.Event()

        @app.get("/hold", dependencies=[Depends(protect("db"))])
        async def hold() -> str:
            await release.wait()
            return "held"

        @app.get("/", dependencies=[Depends(protect("db"))])
        async def route() -> str:
            return "ok"

        results: dict[str, httpx.Response] = {}
        async with _client(app) as client, anyio.create_task_group() as tasks:

            async def get(path: str) -> None:
                results[path] = await client.get(path)

            tasks.start_soon(get, "/hold")
            await anyio.wait_all_tasks_blocked()
            tasks.start_soon(get, "/")
            await anyio.wait_all_tasks_blocked()
            clock.advance(1.0)
            await anyio.wait_all_tasks_blocked()
            release.set()
    assert results["/"].status_code == 503
    assert results["/"].json()["error"] == "checkout_timeout"
    assert results["/hold"].status_code == 200


async def test_slow_route_answers_504_timeout() -> None:
    """A route that outlives the key's timeout is cancelled and answered 504."""
    clock = FakeClock()
    async with _app_with({"svc": {"timeout": 2.0}}, clock=clock) as (app, _):
        finished = []

        @app.get("/", dependencies=[Depends(protect("svc"))])
        async def route() -> str:
            await anyio.sleep_forever()
            finished.append(True)  # pragma: no cover - cancelled by the timeout
            return "never"

        async with _client(app) as client, anyio.create_task_group() as tasks:
            results: list[httpx.Response] = []

            async def get() -> None:
                results.append(await client.get("/"))

            tasks.start_soon(get)
            await anyio.wait_all_tasks_blocked()
            clock.advance(2.0)
    assert results[0].status_code == 504
    assert results[0].json() == {"error": "timeout", "detail": results[0].json()["detail"]}
    assert "svc" in results[0].json()["detail"]
    assert finished == []


# -- the client's address -------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("203.0.113.5", ["192.0.2.1"], (), "203.0.113.5"),  # header ignored by default
        ("10.0.0.2", ["192.0.2.1"], ("10.0.0.0/8",), "192.0.2.1"),  # from a trusted proxy
        ("10.0.0.2", ["6.6.6.6, 192.0.2.1"], ("10.0.0.0/8",), "192.0.2.1"),  # spoofed prefix skipped
        ("10.0.0.2", ["192.0.2.1, 10.0.0.9"], ("10.0.0.0/8",), "192.0.2.1"),  # two trusted hops
        ("10.0.0.2", ["192.0.2.1", "10.0.0.9"], ("10.0.0.0/8",), "192.0.2.1"),  # repeated header lines
        ("10.0.0.2", [], ("10.0.0.0/8",), "10.0.0.2"),  # no header: the proxy itself
        ("10.0.0.2", ["10.0.0.7"], ("10.0.0.0/8",), "10.0.0.7"),  # all hops trusted: the leftmost
        ("10.0.0.2", ["garbage, 192.0.2.1"], ("10.0.0.0/8",), "192.0.2.1"),
        ("10.0.0.2", ["192.0.2.1, garbage"], ("10.0.0.0/8",), "10.0.0.2"),  # stop at a malformed hop
        ("10.0.0.2", ["192.0.2.1:5678"], ("10.0.0.0/8",), "192.0.2.1"),  # a port is dropped
        ("::1", ["[2001:db8::1]:443"], ("::1",), "2001:db8::1"),
        ("testclient", ["192.0.2.1"], ("10.0.0.0/8",), "testclient"),  # a peer that is not an IP
        (None, ["192.0.2.1"], ("10.0.0.0/8",), "unknown"),
    ],
)
def test_client_address_trusts_forwarded_for_only_from_proxies(
    peer: str | None, forwarded: list[str], trusted: tuple[str, ...], expected: str
) -> None:
    """The socket peer names the client; X-Forwarded-For only counts when the peer is a trusted proxy."""
    assert ClientAddress(trusted_proxies=trusted)(_request(peer, forwarded)) == expected


def test_client_address_function_uses_the_socket_peer() -> None:
    """client_address() is the peer, in canonical form, whatever the headers say."""
    assert client_address(_request("2001:DB8::0001", ["192.0.2.1"])) == "2001:db8::1"


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("::ffff:203.0.113.5", [], (), "203.0.113.5"),  # the socket peer
        ("::FFFF:cb00:7105", [], (), "203.0.113.5"),  # written in hex
        ("[::ffff:203.0.113.5]:50000", [], (), "203.0.113.5"),  # with a port
        ("::ffff:10.0.0.2", ["192.0.2.1"], ("10.0.0.0/8",), "192.0.2.1"),  # a mapped peer is the trusted proxy
        ("10.0.0.2", ["::ffff:192.0.2.1"], ("10.0.0.0/8",), "192.0.2.1"),  # a mapped X-Forwarded-For entry
        ("10.0.0.2", ["[::ffff:192.0.2.1]:443"], ("10.0.0.0/8",), "192.0.2.1"),
        ("10.0.0.2", ["192.0.2.1, ::ffff:10.0.0.9"], ("10.0.0.0/8",), "192.0.2.1"),  # a mapped trusted hop
        ("10.0.0.2", ["192.0.2.1"], ("::ffff:10.0.0.0/104",), "192.0.2.1"),  # a proxy listed mapped
        ("::ffff:10.0.0.2", ["192.0.2.1"], ("::ffff:10.0.0.2",), "192.0.2.1"),
        ("::ffff:198.51.100.9", ["192.0.2.1"], ("10.0.0.0/8",), "198.51.100.9"),  # not a proxy, mapped or not
    ],
)
def test_ipv4_mapped_addresses_are_the_ipv4_client(
    peer: str, forwarded: list[str], trusted: tuple[str, ...], expected: str
) -> None:
    """::ffff:a.b.c.d is a.b.c.d: as the peer, in X-Forwarded-For, and when matching trusted proxies."""
    assert ClientAddress(trusted_proxies=trusted)(_request(peer, forwarded)) == expected


async def test_an_ipv4_mapped_peer_shares_the_ipv4_clients_bucket() -> None:
    """A client reaching a dual-stack listener (::ffff:203.0.113.5) draws on the bucket of 203.0.113.5."""
    async with _app_with({"api": {"rate_limiter": {"limit": 1, "window": 60}}}) as (app, _):

        @app.get("/", dependencies=[Depends(protect("api", entity=client_address))])
        async def route() -> str:
            return "ok"

        async with _client(app, "::ffff:203.0.113.5") as mapped, _client(app, "203.0.113.5") as plain:
            first = await mapped.get("/")
            second = await plain.get("/")
    assert (first.status_code, second.status_code) == (200, 429)


def test_client_address_rejects_bad_proxy_lists() -> None:
    """A malformed proxy address, or a bare string, fails at construction."""
    with pytest.raises(ValueError, match="not-an-ip"):
        ClientAddress(trusted_proxies=["not-an-ip"])
    with pytest.raises(TypeError, match="collection"):
        ClientAddress(trusted_proxies="10.0.0.0/8")
    assert "10.0.0.0/8" in repr(ClientAddress(trusted_proxies=["10.0.0.0/8"]))


# -- the lifespan, through a real server ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.asyncio_only("uvicorn serves on asyncio only (the ASGI tests above run the app on both)")
async def test_real_uvicorn_server_with_lifespan() -> None:
    """Through uvicorn on 127.0.0.1: the lifespan enters infra, limits apply per client, and shutdown closes it."""
    import uvicorn

    infra = AsyncInfrastructure()
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # infra is already entered here, so the app's own startup can configure it.
        await infra.configure_protection(
            "api", {"rate_limiter": {"limit": 2, "window": 60}, "connection_pool": {"size": 2}}
        )
        events.append("started")
        yield
        events.append("stopped")

    app = FastAPI(lifespan=lifespan)
    setup(app, infra)

    @app.get("/", dependencies=[Depends(protect("api", entity=client_address))])
    async def route() -> str:
        return "ok"

    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="on", ws="none")
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(server.serve)
        with anyio.fail_after(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
                await anyio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            responses = [await client.get("/") for _ in range(3)]
        pool = infra.connection_manager.get(infra.list_protection_keys()[0])
        server.should_exit = True
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert responses[0].headers["ratelimit"].startswith('"api";r=1;t=')
    assert responses[2].json()["error"] == "rate_limit_exceeded"
    assert events == ["started", "stopped"]
    assert pool.closed


async def test_operation_entity_pair_and_failing_status_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """An (operation, entity) bucket gets its headers; a failing status read drops them but not the request."""
    async with _app_with({"api": {"rate_limiter": {"limit": 3, "window": 30}}}) as (app, infra):

        @app.get("/pair", dependencies=[Depends(protect("api", rate_limiter=("api", "team-a")))])
        async def pair() -> str:
            return "ok"

        async with _client(app) as client:
            paired = await client.get("/pair")

            async def broken(self: object, entity_id: str, operation: str) -> None:
                raise RateLimiterError(key=f"{operation}:{entity_id}")

            monkeypatch.setattr(type(infra.rate_limiter), "get_statuses", broken)
            unheaded = await client.get("/pair")
    assert paired.headers["ratelimit"].startswith('"api";r=2;t=')
    assert unheaded.status_code == 200
    assert "ratelimit" not in unheaded.headers


def test_proxy_verdicts_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-address trust cache is cleared when full, so a flood of peers cannot grow memory."""
    from seawall.integrations import fastapi as integration

    monkeypatch.setattr(integration, "_CACHE_SIZE", 2)
    resolver = ClientAddress(trusted_proxies=["10.0.0.0/8"])
    answers = [resolver(_request(f"10.0.0.{i}", ["192.0.2.1"])) for i in range(1, 6)]
    assert answers == ["192.0.2.1"] * 5
    assert len(resolver._verdicts) <= 2


async def test_headers_reach_responses_the_route_builds_itself() -> None:
    """A route returning its own Response still gets RateLimit-*; its own header wins; the outer key speaks."""
    from fastapi.responses import JSONResponse, PlainTextResponse

    configs = {
        "api": {"rate_limiter": {"limit": 4, "window": 10}},
        "inner": {"rate_limiter": {"limit": 100, "window": 10}},
    }
    async with _app_with(configs) as (app, _):

        @app.get("/json", dependencies=[Depends(protect("api", entity=client_address))])
        async def as_json() -> JSONResponse:
            return JSONResponse({"ok": True})

        @app.get("/own", dependencies=[Depends(protect("api", entity=client_address))])
        async def own() -> PlainTextResponse:
            return PlainTextResponse("ok", headers={"RateLimit": "custom"})

        @app.get(
            "/nested",
            dependencies=[Depends(protect("api", entity=client_address)), Depends(protect("inner", entity="x"))],
        )
        async def nested() -> str:
            return "ok"

        async with _client(app) as client:
            as_json_response = await client.get("/json")
            own_response = await client.get("/own")
            nested_response = await client.get("/nested")
    assert as_json_response.headers["ratelimit"].startswith('"api";r=3;')
    assert own_response.headers.get_list("ratelimit") == ["custom"]
    assert own_response.headers["ratelimit-policy"] == '"api";q=4;w=10'
    assert nested_response.headers["ratelimit-policy"] == '"api";q=4;w=10'
    assert nested_response.headers["ratelimit"].startswith('"api";r=1;')


async def test_several_rules_are_several_policies_in_the_headers() -> None:
    """A key with 10/s and 50/min advertises both policies, draft and legacy."""
    config = {"api": {"rate_limiter": [{"limit": 10, "window": 1}, {"limit": 50, "window": 60}]}}
    async with _app_with(config, clock=FakeClock()) as (app, _):

        @app.get("/", dependencies=[Depends(protect("api", entity=client_address))])
        async def route() -> str:
            return "ok"

        async with _client(app) as client:
            response = await client.get("/")
    assert response.headers["ratelimit-policy"] == '"api.0";q=10;w=1, "api.1";q=50;w=60'
    assert response.headers["ratelimit"] == '"api.0";r=9;t=1, "api.1";r=49;t=2'
    async with _app_with(config, clock=FakeClock(), rate_limit_headers="legacy") as (app, _):

        @app.get("/", dependencies=[Depends(protect("api", entity=client_address))])
        async def legacy_route() -> str:
            return "ok"

        async with _client(app) as client:
            legacy = await client.get("/")
    assert legacy.headers["ratelimit-policy"] == "10;w=1, 50;w=60"
    assert (legacy.headers["ratelimit-limit"], legacy.headers["ratelimit-remaining"]) == ("10", "9")
