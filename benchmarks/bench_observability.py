"""Observability: what OpenTelemetry instrumentation adds to a protected call on the full chain.

Target (issue 18): at most 3 us extra per protected call on the full chain
(rate limiter + breaker + bulkhead + timeout) with the OpenTelemetry SDK
collecting, at the default ``detail="calls"``. ``detail="layers"`` (every
allowed decision, breaker outcome and checkout) is measured too. One SDK
``Counter.add`` is timed for comparison: instrumentation that called the SDK
per event would pay it several times per call.

Instrumentation attaches process-wide handlers, so the variants cannot be
interleaved call by call: each repeat times the uninstrumented chain, then
instruments, times, collects and uninstruments, per detail level, and the
figure is the median over the repeats of the per-repeat difference.
"""

from __future__ import annotations

import gc
import statistics
import time

from _harness import BenchContext
from seawall import AsyncInfrastructure

NAME = "observability"

HUGE = 10**12
FULL = {
    "rate_limiter": {"limit": HUGE, "window": 1},
    "circuit_breaker": {"failure_threshold": 5},
    "connection_pool": {"size": 1000},
    "timeout": 5.0,
}
TARGET_NS = 3_000


async def noop() -> int:
    return 1


def _sdk_counter_add_ns(calls: int) -> float:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    counter = provider.get_meter("bench").create_counter("bench.calls")
    attributes = {"seawall.key": "full", "seawall.outcome": "success"}
    start = time.perf_counter()
    for _ in range(calls):
        counter.add(1, attributes)
    elapsed = time.perf_counter() - start
    provider.shutdown()
    return elapsed / calls * 1e9


async def run(ctx: BenchContext) -> None:
    """Time the full chain uninstrumented and instrumented (both detail levels), with the real SDK."""
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    except ModuleNotFoundError:
        print("  (opentelemetry-sdk is not installed: skipped)")
        return
    from seawall.integrations import opentelemetry as seawall_otel

    calls = 2_000 if ctx.quick else 20_000
    repeats = ctx.repeats
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    async with AsyncInfrastructure() as infra:
        await infra.configure_protection("full", FULL)

        async def per_call_ns() -> float:
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                start = time.perf_counter()
                for _ in range(calls):
                    await infra.execute_protected("full", noop)
                return (time.perf_counter() - start) / calls * 1e9
            finally:
                if gc_was_enabled:
                    gc.enable()

        await per_call_ns()  # warm-up
        base: list[float] = []
        extra: dict[str, list[float]] = {"calls": [], "layers": []}
        collect_ms: list[float] = []
        for _ in range(repeats):
            for detail in ("calls", "layers"):
                before = await per_call_ns()
                instrumentation = seawall_otel.instrument(infra, meter_provider=provider, detail=detail)
                try:
                    during = await per_call_ns()
                    start = time.perf_counter()
                    reader.get_metrics_data()
                    collect_ms.append((time.perf_counter() - start) * 1e3)
                finally:
                    instrumentation.uninstrument()
                base.append(before)
                extra[detail].append(during - before)
    provider.shutdown()
    ctx.record("observability: full chain", "uninstrumented", statistics.median(base), "ns/call")
    for detail, samples in extra.items():
        ctx.record(
            "observability: full chain",
            f'instrumented, detail="{detail}": extra',
            statistics.median(samples),
            "ns/call",
            spread=[min(samples), max(samples)],
            repeats=repeats,
            calls=calls,
        )
    ctx.record("observability: collection", f"one collection after {calls} calls", statistics.median(collect_ms), "ms")
    ctx.record("observability: SDK", "one Counter.add (for comparison)", _sdk_counter_add_ns(calls), "ns")
    figure = statistics.median(extra["calls"])
    ctx.target(
        "observability",
        "instrumented full chain",
        'OpenTelemetry instrumentation (detail="calls") adds at most 3 us per protected call',
        figure <= TARGET_NS,
        f"{figure:.0f} ns",
    )
