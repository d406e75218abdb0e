"""seawall.integrations.opentelemetry against the real OpenTelemetry SDK (in-memory reader and exporter)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from seawall import (
    AsyncInfrastructure,
    CircuitOpenError,
    ConcurrencyLimiter,
    ConcurrencyLimitExceeded,
    ConfigurationError,
    PoolTimeout,
    ProtectionTimeout,
    RateLimiter,
    RateLimitExceeded,
    telemetry,
)
from seawall._metrics import Durations, split_bucket
from seawall.integrations import opentelemetry as seawall_otel
from seawall.testing import FakeClock, advance

pytestmark = pytest.mark.anyio

Points = dict[str, dict[frozenset[tuple[str, Any]], Any]]


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def meter_provider(reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    provider = MeterProvider(metric_readers=[reader])
    yield provider
    provider.shutdown()


def collect(reader: InMemoryMetricReader) -> Points:
    """Every data point: ``{metric: {attributes: value}}``; a histogram's value is ``(count, sum)``."""
    points: Points = {}
    data = reader.get_metrics_data()
    if data is None:  # the SDK's way of saying "no points at all"
        return points
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            assert scope_metrics.scope.name == "seawall"
            for metric in scope_metrics.metrics:
                series = points.setdefault(metric.name, {})
                for point in metric.data.data_points:
                    attributes = frozenset(dict(point.attributes or {}).items())
                    if isinstance(point, HistogramDataPoint):
                        series[attributes] = (point.count, round(point.sum, 9))
                    else:
                        assert isinstance(point, NumberDataPoint)
                        series[attributes] = point.value
    return points


ATTRIBUTES = {
    "outcome": "seawall.outcome",
    "state": "seawall.circuit_breaker.state",
    "pool_state": "seawall.connection_pool.state",
    "layer": "seawall.layer",
}


def at(points: Points, metric: str, key: str, **attributes: str) -> Any:
    """The value of ``metric``'s series of ``key`` with exactly these other attributes (short names)."""
    wanted = frozenset({("seawall.key", key), *((ATTRIBUTES[name], v) for name, v in attributes.items())})
    return points[metric][wanted]


def key_total(points: Points, metric: str, key: str) -> Any:
    return sum(v for attrs, v in points.get(metric, {}).items() if ("seawall.key", key) in attrs)


async def ok() -> int:
    return 1


async def boom() -> None:
    raise ValueError("dependency failed")


async def _scenario(infra: AsyncInfrastructure, clock: FakeClock, reader: InMemoryMetricReader) -> Points:
    """Denials, a trip and recovery, pool saturation and two kinds of timeouts; returns the points while saturated."""
    await infra.configure_protection("limited", {"rate_limiter": {"limit": 2, "window": 60}})
    await infra.configure_protection("flaky", {"circuit_breaker": {"failure_threshold": 2, "recovery_time": 10}})
    await infra.configure_protection("db", {"connection_pool": {"size": 1, "timeout": 1.0}})
    await infra.configure_protection("slow", {"timeout": 2.0})
    for _ in range(2):
        await infra.execute_protected("limited", ok)
    for _ in range(2):
        with pytest.raises(RateLimitExceeded):
            await infra.execute_protected("limited", ok)
    for _ in range(2):
        with pytest.raises(ValueError, match="dependency failed"):
            await infra.execute_protected("flaky", boom)
    with pytest.raises(CircuitOpenError):
        await infra.execute_protected("flaky", ok)
    clock.advance(10)
    assert await infra.execute_protected("flaky", ok) == 1  # the trial closes it again

    release = anyio.Event()
    outcomes: list[str] = []

    async def hold() -> None:
        async with infra.protect("db"):
            await release.wait()

    async def wait_for_a_connection() -> None:
        try:
            await infra.execute_protected("db", ok)
        except PoolTimeout:
            outcomes.append("pool timeout")

    async def hang() -> None:
        try:
            await infra.execute_protected("slow", anyio.sleep_forever)
        except ProtectionTimeout:
            outcomes.append("protection timeout")

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(wait_for_a_connection)
        tg.start_soon(hang)
        await anyio.wait_all_tasks_blocked()
        saturated = collect(reader)
        await advance(clock, 1.0)  # the waiter gives up
        await advance(clock, 1.0)  # the hanging call's deadline
        release.set()
    assert sorted(outcomes) == ["pool timeout", "protection timeout"]
    return saturated


async def test_scenario_gives_exactly_the_expected_counts(
    reader: InMemoryMetricReader, meter_provider: MeterProvider
) -> None:
    """Denials, a trip and recovery, a saturated pool and timeouts: every counter, gauge and histogram is exact."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        instrumentation = seawall_otel.instrument(infra, meter_provider=meter_provider, detail="layers")
        try:
            saturated = await _scenario(infra, clock, reader)
            points = collect(reader)
        finally:
            instrumentation.uninstrument()

    # While one call held the only connection and one waited:
    assert at(saturated, "seawall.connection_pool.connection.count", "db", pool_state="used") == 1
    assert at(saturated, "seawall.connection_pool.connection.count", "db", pool_state="idle") == 0
    assert at(saturated, "seawall.connection_pool.pending_requests", "db") == 1
    assert at(saturated, "seawall.connection_pool.connection.max", "db") == 1

    decisions = "seawall.rate_limiter.decisions"
    assert at(points, decisions, "limited", outcome="allowed") == 2
    assert at(points, decisions, "limited", outcome="denied") == 2
    assert len(points[decisions]) == 2

    triggered = "seawall.protection.triggered"
    assert points[triggered] == {
        frozenset({("seawall.key", "limited"), ("seawall.layer", "rate_limiter")}): 2,
        frozenset({("seawall.key", "flaky"), ("seawall.layer", "circuit_breaker")}): 1,
        frozenset({("seawall.key", "db"), ("seawall.layer", "connection_pool")}): 1,
        frozenset({("seawall.key", "slow"), ("seawall.layer", "timeout")}): 1,
    }

    breaker_calls = "seawall.circuit_breaker.calls"
    assert at(points, breaker_calls, "flaky", outcome="failure", state="closed") == 2
    assert at(points, breaker_calls, "flaky", outcome="rejected", state="open") == 1
    assert at(points, breaker_calls, "flaky", outcome="success", state="half_open") == 1
    assert len(points[breaker_calls]) == 3

    transitions = {
        (dict(attrs)["seawall.circuit_breaker.previous_state"], dict(attrs)["seawall.circuit_breaker.state"]): value
        for attrs, value in points["seawall.circuit_breaker.transitions"].items()
    }
    assert transitions == {("closed", "open"): 1, ("open", "half_open"): 1, ("half_open", "closed"): 1}
    assert at(points, "seawall.circuit_breaker.state", "flaky", state="closed") == 1
    assert at(points, "seawall.circuit_breaker.state", "flaky", state="open") == 0

    assert at(points, "seawall.connection_pool.timeouts", "db") == 1
    assert at(points, "seawall.connection_pool.wait_time", "db") == (1, 0.0)  # one checkout, no wait
    assert at(points, "seawall.connection_pool.use_time", "db") == (1, 2.0)  # held for 2 fake seconds
    assert at(points, "seawall.connection_pool.pending_requests", "db") == 0

    calls = "seawall.calls"
    assert at(points, calls, "limited", outcome="success") == 2
    assert at(points, calls, "limited", outcome="error") == 2
    assert at(points, calls, "flaky", outcome="error") == 3
    assert at(points, calls, "flaky", outcome="success") == 1
    assert at(points, calls, "db", outcome="success") == 1
    assert at(points, calls, "db", outcome="error") == 1
    assert at(points, calls, "slow", outcome="error") == 1
    # Durations in seconds on the fake clock: the waiter gave up after 1 s, the hanging call after 2 s.
    assert at(points, "seawall.call.duration", "db", outcome="error") == (1, 1.0)
    assert at(points, "seawall.call.duration", "slow", outcome="error") == (1, 2.0)
    assert at(points, "seawall.call.duration", "limited", outcome="success") == (2, 0.0)

    errors = {(dict(a)["seawall.key"], dict(a)["error.type"]): v for a, v in points["seawall.call.errors"].items()}
    assert errors == {
        ("limited", "rate_limit_exceeded"): 2,
        ("flaky", "ValueError"): 2,
        ("flaky", "circuit_breaker_blown"): 1,
        ("db", "checkout_timeout"): 1,
        ("slow", "timeout"): 1,
    }


async def test_default_detail_leaves_out_the_per_call_layer_events(
    reader: InMemoryMetricReader, meter_provider: MeterProvider
) -> None:
    """detail="calls" (default) records calls, rejections and state, not each allowed decision or checkout."""
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        instrumentation = seawall_otel.instrument(infra, meter_provider=meter_provider)
        try:
            await _scenario(infra, clock, reader)
            points = collect(reader)
        finally:
            instrumentation.uninstrument()
    assert set(points["seawall.rate_limiter.decisions"]) == {
        frozenset({("seawall.key", "limited"), ("seawall.outcome", "denied")})
    }
    assert {dict(a)["seawall.outcome"] for a in points["seawall.circuit_breaker.calls"]} == {"rejected"}
    assert "seawall.connection_pool.wait_time" not in points
    assert key_total(points, "seawall.calls", "limited") == 4
    assert key_total(points, "seawall.protection.triggered", "slow") == 1


async def test_span_events_on_the_current_span(meter_provider: MeterProvider) -> None:
    """Denials, rejections, state changes and timeouts become events of the span that is current."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = tracer_provider.get_tracer("tests")
    clock = FakeClock()
    async with AsyncInfrastructure(clock=clock) as infra:
        instrumentation = seawall_otel.instrument(infra, meter_provider=meter_provider, tracer_provider=tracer_provider)
        try:
            await infra.configure_protection("api", {"rate_limiter": {"limit": 1, "window": 60}})
            await infra.configure_protection("flaky", {"circuit_breaker": {"failure_threshold": 1}})
            with tracer.start_as_current_span("request"):
                await infra.execute_protected("api", ok)
                with pytest.raises(RateLimitExceeded):
                    await infra.execute_protected("api", ok)
                with pytest.raises(ValueError, match="dependency failed"):
                    await infra.execute_protected("flaky", boom)
                with pytest.raises(CircuitOpenError):
                    await infra.execute_protected("flaky", ok)
            with pytest.raises(RateLimitExceeded):  # outside any span: nothing to add an event to, no error
                await infra.execute_protected("api", ok)
        finally:
            instrumentation.uninstrument()
    (span,) = exporter.get_finished_spans()
    names = [event.name for event in span.events]
    assert names == [
        "seawall.rate_limiter.denied",
        "seawall.circuit_breaker.state_changed",
        "seawall.circuit_breaker.rejected",
    ]
    denied = span.events[0].attributes
    assert denied is not None
    assert denied["seawall.key"] == "api"
    assert denied["seawall.retry_after"] > 0
    assert "seawall.entity" not in denied
    changed = span.events[1].attributes
    assert changed is not None
    assert (changed["seawall.circuit_breaker.previous_state"], changed["seawall.circuit_breaker.state"]) == (
        "closed",
        "open",
    )
    tracer_provider.shutdown()


async def test_entity_attributes_only_when_asked(reader: InMemoryMetricReader, meter_provider: MeterProvider) -> None:
    """Buckets per client add a seawall.entity attribute only with entity_attributes=True."""
    async with AsyncInfrastructure(clock=FakeClock()) as infra:
        await infra.configure_protection("api", {"rate_limiter": {"limit": 1, "window": 60}})
        instrumentation = seawall_otel.instrument(infra, meter_provider=meter_provider, entity_attributes=True)
        try:
            for client in ("alice", "bob", "bob"):
                try:
                    await infra.execute_protected("api", ok, rate_limiter=client)
                except RateLimitExceeded:
                    pass
            points = collect(reader)
        finally:
            instrumentation.uninstrument()
    assert points["seawall.rate_limiter.decisions"] == {
        frozenset({("seawall.key", "api"), ("seawall.outcome", "denied"), ("seawall.entity", "bob")}): 1
    }


async def test_a_standalone_limiter_is_labelled_by_its_name(
    reader: InMemoryMetricReader, meter_provider: MeterProvider
) -> None:
    """Outside the coordinator a limiter's series carry its name, never its per-client keys."""
    limiter = RateLimiter(1, 60, name="signups", clock=FakeClock())
    instrumentation = seawall_otel.instrument(meter_provider=meter_provider, detail="layers")
    try:
        await limiter.hit("alice")
        with pytest.raises(RateLimitExceeded):
            await limiter.hit("alice")
        points = collect(reader)
    finally:
        instrumentation.uninstrument()
    assert points["seawall.rate_limiter.decisions"] == {
        frozenset({("seawall.key", "signups"), ("seawall.outcome", "allowed")}): 1,
        frozenset({("seawall.key", "signups"), ("seawall.outcome", "denied")}): 1,
    }


async def test_uninstrument_detaches_and_reports_nothing(
    reader: InMemoryMetricReader, meter_provider: MeterProvider
) -> None:
    """After uninstrument() no handler stays attached and the instruments report no points."""
    instrumentation = seawall_otel.instrument(meter_provider=meter_provider)
    assert instrumentation.active
    assert any(info.id.startswith("seawall.metrics.otel-") for info in telemetry.list_handlers())
    instrumentation.uninstrument()
    assert not instrumentation.active
    assert not any(info.id.startswith("seawall.metrics.") for info in telemetry.list_handlers())
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("k", {"rate_limiter": {"limit": 1, "window": 60}})
        await infra.execute_protected("k", ok)
    assert collect(reader) == {}


async def test_histograms_are_sampled_beyond_sample_size(
    reader: InMemoryMetricReader, meter_provider: MeterProvider
) -> None:
    """Past sample_size durations per collection a uniform sample is handed over; the counters stay exact."""
    instrumentation = seawall_otel.instrument(meter_provider=meter_provider, sample_size=10)
    try:
        async with AsyncInfrastructure() as infra:
            for _ in range(25):
                await infra.execute_protected("k", ok)
            points = collect(reader)
            assert at(points, "seawall.calls", "k", outcome="success") == 25
            assert at(points, "seawall.call.duration", "k", outcome="success")[0] == 10
            for _ in range(3):
                await infra.execute_protected("k", ok)
            points = collect(reader)
            assert at(points, "seawall.calls", "k", outcome="success") == 28
            assert at(points, "seawall.call.duration", "k", outcome="success")[0] == 13
    finally:
        instrumentation.uninstrument()


@pytest.mark.parametrize(
    ("options", "path"),
    [
        ({"meter_provider": object()}, "meter_provider"),
        ({"tracer_provider": "global"}, "tracer_provider"),
        ({"entity_attributes": "yes"}, "entity_attributes"),
        ({"span_events": 1}, "span_events"),
        ({"sample_size": -1}, "sample_size"),
        ({"detail": "everything"}, "detail"),
    ],
)
def test_bad_arguments_raise_configuration_error(options: dict[str, Any], path: str) -> None:
    """Each bad argument raises ConfigurationError naming it, and nothing stays attached."""
    with pytest.raises(ConfigurationError) as info:
        seawall_otel.instrument(**options)
    assert info.value.path == path
    assert not any(info.id.startswith("seawall.metrics.") for info in telemetry.list_handlers())


def test_bad_infra_raises_configuration_error() -> None:
    """The positional argument must be an AsyncInfrastructure."""
    with pytest.raises(ConfigurationError, match="infra"):
        seawall_otel.instrument("not an infrastructure")  # type: ignore[arg-type]


def test_bucket_keys_split_into_operation_and_entity() -> None:
    """The coordinator's escaped bucket names split back into the key and the entity."""
    assert split_bucket("api:alice") == ("api", "alice")
    assert split_bucket("api:admin:alice") == ("api", "admin:alice")
    assert split_bucket(r"a\:b:alice") == ("a:b", "alice")
    assert split_bucket(r"a\\b:c") == ("a\\b", "c")
    assert split_bucket("alone") == (None, "alone")
    assert split_bucket(r"only\:escaped") == (None, r"only\:escaped")


def test_reservoir_keeps_a_bounded_uniform_sample() -> None:
    """A series keeps at most sample_size values however many it sees, and its count and sum stay exact."""
    series = Durations(buckets=True, sample_size=100)
    for i in range(10_000):
        series.observe(i / 10_000)
    sample, seen = series.take()
    assert len(sample) == 100
    assert seen == 10_000
    assert series.count == 10_000
    assert abs(series.sum - sum(i / 10_000 for i in range(10_000))) < 1e-6
    assert 0.2 < sum(sample) / len(sample) < 0.8  # uniform over [0, 1), not the first 100 values
    buckets, count, _ = series.snapshot()
    assert sum(buckets) == count == 10_000


async def test_instrumenting_the_same_provider_again_reports_again(
    reader: InMemoryMetricReader, meter_provider: MeterProvider
) -> None:
    """instrument, uninstrument, instrument on one provider: the instruments are reused and report the new counts."""
    async with AsyncInfrastructure() as infra:
        first = seawall_otel.instrument(infra, meter_provider=meter_provider)
        first.uninstrument()
        first.uninstrument()  # twice is harmless
        second = seawall_otel.instrument(infra, meter_provider=meter_provider)
        try:
            await infra.execute_protected("k", ok)
            assert at(collect(reader), "seawall.calls", "k", outcome="success") == 1
            for _ in range(2):
                await infra.execute_protected("k", ok)
            points = collect(reader)
        finally:
            second.uninstrument()
    assert at(points, "seawall.calls", "k", outcome="success") == 3
    assert at(points, "seawall.call.duration", "k", outcome="success")[0] == 3


async def test_a_second_instrumentation_of_one_provider_is_refused(
    reader: InMemoryMetricReader, meter_provider: MeterProvider
) -> None:
    """Two active instrumentations on one provider would count every call twice: the second raises, attaches nothing."""
    async with AsyncInfrastructure() as infra, AsyncInfrastructure() as other:
        first = seawall_otel.instrument(infra, meter_provider=meter_provider)
        try:
            handlers = {handler.id for handler in telemetry.list_handlers()}
            with pytest.raises(ConfigurationError, match=r"watch\(infra\)") as info:
                seawall_otel.instrument(other, meter_provider=meter_provider)
            assert info.value.path == "meter_provider"
            assert {handler.id for handler in telemetry.list_handlers()} == handlers
            first.watch(other)  # the way to report a second infrastructure
            await other.configure_protection("other", {"connection_pool": {"size": 3}})
            await infra.execute_protected("k", ok)
            await other.execute_protected("other", ok)
            points = collect(reader)
        finally:
            first.uninstrument()
    assert at(points, "seawall.calls", "k", outcome="success") == 1  # once, not twice
    assert at(points, "seawall.calls", "other", outcome="success") == 1
    assert at(points, "seawall.connection_pool.connection.max", "other") == 3


async def test_concurrency_refusals_and_limits_are_metered(
    reader: InMemoryMetricReader, meter_provider: MeterProvider
) -> None:
    """Refusals are counted by key and reason; the limit gauge reads the coordinator's limiters and the events."""
    clock = FakeClock()
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    batch = ConcurrencyLimiter(
        algorithm="fixed", limit=1, priorities=2, max_waiting=1, timeout=2.0, name="batch", clock=clock
    )
    adaptive = ConcurrencyLimiter(algorithm="aimd", initial_limit=100, window=1.0, name="adaptive", clock=clock)
    async with AsyncInfrastructure(clock=clock) as infra:
        instrumentation = seawall_otel.instrument(infra, meter_provider=meter_provider, tracer_provider=tracer_provider)
        try:
            await infra.configure_protection("reports", {"concurrency": {"algorithm": "fixed", "limit": 1}})
            with tracer_provider.get_tracer("tests").start_as_current_span("request"):
                async with infra.protect("reports"):
                    with pytest.raises(ConcurrencyLimitExceeded):
                        await infra.execute_protected("reports", ok)
            held = batch.acquire_nowait(0)

            async def waits(priority: int) -> None:
                with pytest.raises(ConcurrencyLimitExceeded):
                    await batch.acquire(priority)

            async with anyio.create_task_group() as tg:
                tg.start_soon(waits, 1)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(waits, 0)  # sheds the waiter of priority 1, then times out
                await advance(clock, 2.0)
            batch.release(held)
            clock.advance(1.0)
            for index in range(10):  # one window with a drop: 100 -> 90
                adaptive.release(adaptive.acquire_nowait(), dropped=index == 0)
            points = collect(reader)
        finally:
            instrumentation.uninstrument()
    rejections = {
        (dict(attributes)["seawall.key"], dict(attributes)["seawall.concurrency_limiter.reason"]): value
        for attributes, value in points["seawall.concurrency_limiter.rejections"].items()
    }
    assert rejections == {("reports", "limit"): 1, ("batch", "shed"): 1, ("batch", "timeout"): 1}
    assert at(points, "seawall.protection.triggered", "reports", layer="concurrency") == 1
    limits = {
        dict(attributes)["seawall.key"]: value
        for attributes, value in points["seawall.concurrency_limiter.limit"].items()
    }
    assert limits == {"reports": 1, "adaptive": adaptive.statistics().limit}
    assert limits["adaptive"] == 90
    (span,) = exporter.get_finished_spans()
    (event,) = [event for event in span.events if event.name == "seawall.concurrency_limiter.rejected"]
    assert dict(event.attributes or {}) == {
        "seawall.key": "reports",
        "seawall.concurrency_limiter.reason": "limit",
        "seawall.priority": 0,
    }
    tracer_provider.shutdown()


def test_every_event_feeds_a_metric() -> None:
    """Each event seawall emits has a recorder handler, or is listed as feeding none (with the reason)."""
    from seawall._metrics import UNMETERED_EVENTS, Recorder

    handled = {event for event, _ in Recorder("coverage", detail="layers")._handlers()}
    assert handled | UNMETERED_EVENTS == set(telemetry.ALL_EVENTS)
    assert not handled & UNMETERED_EVENTS


def test_the_docs_list_every_metric() -> None:
    """docs/observability.md has a row for each instrument instrument() creates."""
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "observability.md").read_text()
    assert [name for name in seawall_otel.METRIC_NAMES if f"| `{name}` |" not in page] == []


async def test_retries_are_counted(reader: InMemoryMetricReader, meter_provider: MeterProvider) -> None:
    """Each scheduled retry and each retrying call that gave up is counted, by key and limit."""
    from seawall import Retry

    clock = FakeClock()
    retry = Retry(attempts=3, initial=1.0, jitter=0.0, clock=clock, name="fetch")
    instrumentation = seawall_otel.instrument(meter_provider=meter_provider)
    outcomes: list[str] = []

    async def give_up() -> None:
        with pytest.raises(ValueError, match="dependency failed"):  # the last attempt's own error
            await retry.call(boom)
        outcomes.append("gave up")

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(give_up)
            await advance(clock, 1.0)
            await advance(clock, 2.0)
        points = collect(reader)
    finally:
        instrumentation.uninstrument()
    assert outcomes == ["gave up"]
    assert at(points, "seawall.retry.attempts", "fetch") == 2
    assert points["seawall.retry.gave_up"] == {
        frozenset({("seawall.key", "fetch"), ("seawall.retry.limit", "attempts")}): 1
    }


async def test_hedges_are_counted(reader: InMemoryMetricReader, meter_provider: MeterProvider) -> None:
    """Each hedge started is counted by key, and each race with a hedge in it by key and winner."""
    from seawall import AsyncInfrastructure

    clock = FakeClock()
    durations = iter([3.0, 0.5])

    async def upstream() -> str:
        await clock.sleep(next(durations))
        return "ok"

    instrumentation = seawall_otel.instrument(meter_provider=meter_provider)
    try:
        async with AsyncInfrastructure(clock=clock) as infra:
            await infra.configure_protection("api", {"hedge": {"delay": 0.25}})
            async with anyio.create_task_group() as group:
                group.start_soon(infra.execute_protected, "api", upstream)
                await advance(clock, 0.25)
                await advance(clock, 0.5)
        points = collect(reader)
    finally:
        instrumentation.uninstrument()
    assert at(points, "seawall.hedge.started", "api") == 1
    assert points["seawall.hedge.won"] == {frozenset({("seawall.key", "api"), ("seawall.hedge.winner", "hedge")}): 1}
