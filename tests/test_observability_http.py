"""The health route and Prometheus's /metrics: through ASGI on both backends, and a real uvicorn server."""

from __future__ import annotations

import socket
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from seawall import (
    AsyncInfrastructure,
    CircuitOpenError,
    ConcurrencyLimitExceeded,
    ConfigurationError,
    RateLimitExceeded,
)
from seawall.integrations import prometheus as seawall_prometheus
from seawall.integrations.fastapi import health_route, metrics_route

pytestmark = pytest.mark.anyio


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def _get(app: FastAPI, path: str) -> httpx.Response:
    async with _client(app) as client:
        return await client.get(path)


async def test_healthy_is_200() -> None:
    """A running infrastructure with every breaker closed answers 200 "healthy"."""
    app = FastAPI()
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("db", {"circuit_breaker": {"failure_threshold": 1}, "connection_pool": {}})
        health_route(app, infra)
        response = await _get(app, "/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert body["running"] is True
    assert body["circuit_breakers"]["db"]["state"] == "closed"


async def test_degraded_is_200_by_default() -> None:
    """An open breaker makes the report "degraded", still 200: one shared dependency must not empty the rotation."""
    app = FastAPI()
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("db", {"circuit_breaker": {"failure_threshold": 1}})
        await infra.circuit_breaker.get("db").trip()
        health_route(app, infra, "/healthz")
        response = await _get(app, "/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "degraded"
    assert response.json()["circuit_breakers"]["db"]["state"] == "open"


async def test_degraded_is_503_with_fail_on_degraded() -> None:
    """fail_on_degraded=True answers 503 for "degraded" (and still 200 for "healthy")."""
    app = FastAPI()
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("db", {"circuit_breaker": {"failure_threshold": 1}})
        health_route(app, infra, fail_on_degraded=True)
        healthy = await _get(app, "/health")
        await infra.circuit_breaker.get("db").trip()
        degraded = await _get(app, "/health")
    assert (healthy.status_code, healthy.json()["status"]) == (200, "healthy")
    assert (degraded.status_code, degraded.json()["status"]) == (503, "degraded")


async def test_unhealthy_is_503_before_start_and_after_close() -> None:
    """An infrastructure that is not started, or closed, cannot serve: 503 "unhealthy"."""
    app = FastAPI()
    infra = AsyncInfrastructure()
    health_route(app, infra)
    before = await _get(app, "/health")
    async with infra:
        during = await _get(app, "/health")
    after = await _get(app, "/health")
    assert (before.status_code, before.json()["status"], before.json()["running"]) == (503, "unhealthy", False)
    assert (during.status_code, during.json()["status"]) == (200, "healthy")
    assert (after.status_code, after.json()["status"]) == (503, "unhealthy")


@pytest.mark.parametrize(
    ("args", "kwargs", "path"),
    [
        ((), {"path": "health"}, "path"),
        ((), {"path": 3}, "path"),
        ((), {"fail_on_degraded": "yes"}, "fail_on_degraded"),
        (("not an infra",), {}, "infra"),
    ],
)
def test_health_route_rejects_bad_arguments(args: tuple[Any, ...], kwargs: dict[str, Any], path: str) -> None:
    """A bad path, flag or infrastructure raises ConfigurationError naming it."""
    call_args = args or (AsyncInfrastructure(),)
    with pytest.raises(ConfigurationError) as info:
        health_route(FastAPI(), *call_args, **kwargs)
    assert info.value.path == path


def test_metrics_route_and_collector_reject_bad_registries() -> None:
    """A registry that is not a CollectorRegistry raises ConfigurationError naming it."""
    with pytest.raises(ConfigurationError) as info:
        metrics_route(FastAPI(), registry={})
    assert info.value.path == "registry"
    with pytest.raises(ConfigurationError) as info:
        seawall_prometheus.instrument(registry="default")  # type: ignore[arg-type]
    assert info.value.path == "registry"


# -- Prometheus ---------------------------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a text exposition, parsed back with prometheus_client's own parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def _traffic(infra: AsyncInfrastructure) -> None:
    api = {"rate_limiter": {"limit": 2, "window": 60}, "circuit_breaker": {"failure_threshold": 1}}
    await infra.configure_protection("api", {**api, "connection_pool": {}})

    async def ok() -> int:
        return 1

    async def boom() -> None:
        raise ValueError("down")

    for _ in range(2):
        await infra.execute_protected("api", ok)
    with pytest.raises(RateLimitExceeded):
        await infra.execute_protected("api", ok)
    await infra.configure_protection("flaky", {"circuit_breaker": {"failure_threshold": 1}})
    with pytest.raises(ValueError, match="down"):
        await infra.execute_protected("flaky", boom)
    with pytest.raises(CircuitOpenError):
        await infra.execute_protected("flaky", ok)
    await infra.configure_protection("reports", {"concurrency": {"algorithm": "fixed", "limit": 1}})
    async with infra.protect("reports"):
        with pytest.raises(ConcurrencyLimitExceeded):
            await infra.execute_protected("reports", ok)


def _check_series(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> None:
    def value(name: str, **labels: str) -> float:
        return samples[name, frozenset(labels.items())]

    assert value("seawall_calls_total", seawall_key="api", seawall_outcome="success") == 2
    assert value("seawall_calls_total", seawall_key="api", seawall_outcome="error") == 1
    assert value("seawall_rate_limiter_decisions_total", seawall_key="api", seawall_outcome="allowed") == 2
    assert value("seawall_rate_limiter_decisions_total", seawall_key="api", seawall_outcome="denied") == 1
    assert value("seawall_protection_triggered_total", seawall_key="flaky", seawall_layer="circuit_breaker") == 1
    assert value("seawall_circuit_breaker_state", seawall_key="flaky", seawall_circuit_breaker_state="open") == 1
    assert value("seawall_circuit_breaker_state", seawall_key="api", seawall_circuit_breaker_state="closed") == 1
    assert value("seawall_connection_pool_connection_max", seawall_key="api") == 10
    assert value("seawall_call_duration_seconds_count", seawall_key="api", seawall_outcome="success") == 2
    assert value("seawall_call_duration_seconds_bucket", seawall_key="api", seawall_outcome="success", le="+Inf") == 2
    assert value("seawall_connection_pool_wait_time_seconds_count", seawall_key="api") == 2
    reports = {"seawall_key": "reports"}
    assert (
        value("seawall_concurrency_limiter_rejections_total", **reports, seawall_concurrency_limiter_reason="limit")
        == 1
    )
    assert value("seawall_concurrency_limiter_limit", **reports) == 1


async def test_metrics_route_through_asgi() -> None:
    """GET /metrics of a FastAPI app shows seawall's series in the text exposition format, on both backends."""
    registry = CollectorRegistry()
    app = FastAPI()
    metrics_route(app, registry=registry)
    async with AsyncInfrastructure() as infra:
        instrumentation = seawall_prometheus.instrument(infra, registry=registry, detail="layers")
        try:
            await _traffic(infra)
            response = await _get(app, "/metrics")
        finally:
            instrumentation.uninstrument()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    _check_series(_samples(response.text))
    assert not instrumentation.active
    # Unregistered: the registry no longer has seawall's series.
    assert (
        registry.get_sample_value("seawall_calls_total", {"seawall_key": "api", "seawall_outcome": "success"}) is None
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.asyncio_only("uvicorn serves on asyncio only (the ASGI test above runs the app on both backends)")
async def test_metrics_of_a_real_app_under_uvicorn() -> None:
    """A real FastAPI app under uvicorn on 127.0.0.1: GET /metrics parses back with prometheus_client's parser."""
    import uvicorn

    registry = CollectorRegistry()
    app = FastAPI()
    metrics_route(app, registry=registry)
    async with AsyncInfrastructure() as infra:
        health_route(app, infra)
        instrumentation = seawall_prometheus.instrument(infra, registry=registry, detail="layers")
        try:
            await _traffic(infra)
            port = _free_port()
            config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off", ws="none")
            server = uvicorn.Server(config)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(server.serve)
                try:
                    with anyio.fail_after(10):
                        while not server.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
                            await anyio.sleep(0.01)
                    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                        metrics = await client.get("/metrics")
                        health = await client.get("/health")
                finally:
                    server.should_exit = True  # also on failure: a server left serving would hang the task group
        finally:
            instrumentation.uninstrument()
    assert metrics.status_code == 200
    _check_series(_samples(metrics.text))
    assert (health.status_code, health.json()["status"]) == (200, "degraded")  # "flaky" is open


def test_the_grafana_dashboard_queries_only_series_seawall_exports() -> None:
    """Every panel of docs/grafana/seawall-dashboard.json has a description and queries existing series."""
    import json
    import re
    from pathlib import Path

    from seawall._metrics import METRICS, prometheus_name

    dashboard = json.loads((Path(__file__).parent.parent / "docs" / "grafana" / "seawall-dashboard.json").read_text())
    exported = set()
    for spec in METRICS:
        name = prometheus_name(spec)
        if spec.kind == "counter":
            exported.add(f"{name}_total")
        elif spec.kind == "histogram":
            exported |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
        else:
            exported.add(name)
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["description"]
        for target in panel["targets"]:
            # Label names appear in `by (...)` groups and `{...}` selectors: drop those, keep the series names.
            expr = re.sub(r"by \([^)]*\)|\{[^}]*\}", "", target["expr"])
            for series in re.findall(r"\bseawall_[a-z_]+", expr):
                assert series in exported, (panel["title"], series)


def test_demo_metrics_port_serves_the_series() -> None:
    """``demo --metrics-port`` serves seawall's series on 127.0.0.1 while the block runs (here: a denial)."""
    import urllib.request

    from seawall import RateLimiter
    from seawall._demo_metrics import serve_metrics

    limiter = RateLimiter(1, 60, name="demo")
    with serve_metrics(_free_port()) as url:

        async def deny() -> None:
            await limiter.hit("x")
            with pytest.raises(RateLimitExceeded):
                await limiter.hit("x")

        anyio.run(deny)
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    samples = _samples(text)
    assert (
        samples[
            "seawall_rate_limiter_decisions_total", frozenset({("seawall_key", "demo"), ("seawall_outcome", "denied")})
        ]
        == 1
    )
    with pytest.raises(ConfigurationError), serve_metrics(0):
        pass


@pytest.mark.parametrize("auto_describe", [False, True])
def test_a_second_collector_on_one_registry_is_refused(auto_describe: bool) -> None:
    """Two active collectors would expose each series twice (an invalid scrape): the second raises, attaches nothing."""
    from seawall import telemetry

    registry = CollectorRegistry(auto_describe=auto_describe)
    first = seawall_prometheus.instrument(registry=registry)
    try:
        handlers = {handler.id for handler in telemetry.list_handlers()}
        with pytest.raises(ConfigurationError, match=r"watch\(infra\)") as info:
            seawall_prometheus.instrument(registry=registry)
        assert info.value.path == "registry"
        assert {handler.id for handler in telemetry.list_handlers()} == handlers
    finally:
        first.uninstrument()
    again = seawall_prometheus.instrument(registry=registry)  # free again once the first is gone
    again.uninstrument()
    again.uninstrument()  # twice is harmless
    assert not any(handler.id.startswith("seawall.metrics.") for handler in telemetry.list_handlers())


def test_demo_metrics_port_taken_leaves_nothing_attached() -> None:
    """When the port is in use, serve_metrics raises and detaches its handlers (no recorder left counting)."""
    from seawall import telemetry
    from seawall._demo_metrics import serve_metrics

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match=r"(?i)address already in use"), serve_metrics(taken.getsockname()[1]):
            pass
    assert not any(handler.id.startswith("seawall.metrics.") for handler in telemetry.list_handlers())
