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
from starlette.requests import Request as StarletteRequest

from seawall import AsyncInfrastructure, FakeClock
from seawall._errors import (
    CircuitOpenError,
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
    configs: dict[str, dict[str, Any]], *, clock: FakeClock | None = None
) -> AsyncIterator[tuple[FastAPI, AsyncInfrastructure]]:
    async with AsyncInfrastructure(clock=clock) as infra:
        for key, config in configs.items():
            await infra.configure_protection(key, config)
        app = FastAPI()
        setup(app, infra, lifespan=False)
        yield app, infra


# -- error responses ---------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        (RateLimitExceeded(key="k", limit=2, window=60.0, retry_after=0.2), 429, "1"),
        (RateLimiterError(key="k"), 503, None),
        (CircuitOpenError(name="b", retry_after=2.5), 503, "3"),
        (PoolTimeout(name="p", timeout=1.0), 503, None),
        (ProtectionTimeout(key="k", timeout=1.0, retry_after=3.0), 504, "3"),
    ],
)
async def test_errors_map_to_status_json_body_and_rounded_up_retry_after(
    error: SeawallError, status: int, retry_after: str | None
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
    assert response.json() == {"error": error.error_type, "detail": error.message}
    assert response.headers.get("retry-after") == retry_after


async def test_rate_limited_response_advertises_the_exhausted_bucket() -> None:
    """A 429 carries RateLimit-Limit, RateLimit-Remaining 0 and RateLimit-Reset."""
    response = error_response(RateLimitExceeded(key="k", limit=10, window=60.0, retry_after=4.2), 429)
    assert response.headers["ratelimit-limit"] == "10"
    assert response.headers["ratelimit-remaining"] == "0"
    assert response.headers["ratelimit-reset"] == "5"
    assert response.headers["ratelimit-policy"] == "10;w=60"


def test_rate_limit_headers_round_remaining_down_and_reset_up() -> None:
    """Remaining is floored (never promise a hit), reset is ceiled (never invite an early retry)."""
    headers = rate_limit_headers(limit=5, remaining=2.7, reset_after=0.1)
    assert headers == {"RateLimit-Limit": "5", "RateLimit-Remaining": "2", "RateLimit-Reset": "1"}


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
    """RateLimit-Limit/Remaining/Reset reflect the client's bucket after each admitted request."""
    async with _app_with({"api": {"rate_limiter": {"limit": 3, "window": 30}}}) as (app, _):

        @app.get("/", dependencies=[Depends(protect("api", entity=client_address))])
        async def route() -> str:
            return "ok"

        async with _client(app) as client:
            responses = [await client.get("/") for _ in range(2)]
    assert [r.headers["ratelimit-remaining"] for r in responses] == ["2", "1"]
    assert responses[0].headers["ratelimit-limit"] == "3"
    assert responses[0].headers["ratelimit-policy"] == "3;w=30"
    assert 1 <= int(responses[1].headers["ratelimit-reset"]) <= 30


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
        assert "ratelimit-limit" not in response.headers


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
    assert responses[0].headers["ratelimit-remaining"] == "1"
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

            monkeypatch.setattr(type(infra.rate_limiter), "get_status", broken)
            unheaded = await client.get("/pair")
    assert paired.headers["ratelimit-remaining"] == "2"
    assert unheaded.status_code == 200
    assert "ratelimit-limit" not in unheaded.headers


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
            return PlainTextResponse("ok", headers={"RateLimit-Limit": "custom"})

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
    assert as_json_response.headers["ratelimit-remaining"] == "3"
    assert own_response.headers.get_list("ratelimit-limit") == ["custom"]
    assert own_response.headers["ratelimit-remaining"] == "2"
    assert nested_response.headers["ratelimit-limit"] == "4"
