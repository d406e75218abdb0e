"""The benchmark harness: seawall and its peers, interleaved, in one process run.

A benchmark module (``benchmarks/bench_<topic>.py``) defines ``NAME`` and
``async def run(ctx: BenchContext) -> None``. Inside it uses:

* ``await ctx.per_call(case, variants, baseline="bare")``: ``variants`` maps a
  label to a zero-argument async callable doing ONE operation. Each repeat
  times every variant for ``calls`` calls, in a rotated order (A B C, B C A,
  ...) so drift and noise from the shared machine hit every variant alike.
  After a warm-up it reports, per variant, the median time per call over the
  repeats, the spread (min..max of the repeats) and the overhead over the
  baseline variant (median of the per-repeat differences, so both sides of a
  difference come from the same moment).
* ``ctx.record(case, label, value, unit, **extra)`` for any other figure
  (memory, throughput).
* ``ctx.target(case, label, description, met, figure)`` to state a target
  from the issues and whether this run met it.

``ctx.quick`` is True in the smoke mode (``--quick``): fewer calls and
repeats, for CI to check that benchmarks run, never how fast.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

AsyncOp = Callable[[], Awaitable[object]]


@dataclass(slots=True)
class PerCallResult:
    """Timing of one variant of a per-call case, in nanoseconds per call."""

    case: str
    label: str
    median_ns: float
    min_ns: float
    max_ns: float
    overhead_ns: float | None
    repeats: int
    calls: int


@dataclass(slots=True)
class Figure:
    """Any other measured figure (memory, throughput...)."""

    case: str
    label: str
    value: float
    unit: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Target:
    """A target from an issue and whether this run met it."""

    case: str
    label: str
    description: str
    met: bool
    figure: str


@dataclass
class BenchContext:
    """What a benchmark module gets: the mode and the recorders."""

    quick: bool
    module: str = ""
    per_call_results: list[PerCallResult] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    @property
    def repeats(self) -> int:
        """Default repeats: at least 5, as the issue asks, fewer calls in quick mode."""
        return 5 if self.quick else 9

    async def per_call(
        self,
        case: str,
        variants: Mapping[str, AsyncOp],
        *,
        baseline: str | None = "bare",
        calls: int | None = None,
        repeats: int | None = None,
        warmup: int | None = None,
    ) -> dict[str, PerCallResult]:
        """Time each variant per call, interleaved; return results by label."""
        if baseline is not None and baseline not in variants:
            raise ValueError(f"baseline {baseline!r} is not one of the variants {list(variants)}")
        calls = calls or (2_000 if self.quick else 50_000)
        repeats = repeats or self.repeats
        warmup = warmup if warmup is not None else min(calls, 5_000)
        labels = list(variants)
        for label in labels:
            await _time_calls(variants[label], warmup)
        samples: dict[str, list[float]] = {label: [] for label in labels}
        for repeat in range(repeats):
            rotation = labels[repeat % len(labels) :] + labels[: repeat % len(labels)]
            for label in rotation:
                samples[label].append(await _time_calls(variants[label], calls) / calls * 1e9)
        results: dict[str, PerCallResult] = {}
        for label in labels:
            overhead = None
            if baseline is not None:
                overhead = statistics.median(a - b for a, b in zip(samples[label], samples[baseline], strict=True))
            result = PerCallResult(
                case=case,
                label=label,
                median_ns=statistics.median(samples[label]),
                min_ns=min(samples[label]),
                max_ns=max(samples[label]),
                overhead_ns=overhead,
                repeats=repeats,
                calls=calls,
            )
            results[label] = result
            self.per_call_results.append(result)
        _print_case(case, results)
        return results

    def record(self, case: str, label: str, value: float, unit: str, **extra: Any) -> None:
        """Record a figure other than a per-call time."""
        self.figures.append(Figure(case, label, value, unit, dict(extra)))
        print(f"  {case:<40} {label:<44} {value:>14,.2f} {unit}")

    def target(self, case: str, label: str, description: str, met: bool, figure: str) -> None:
        """Record whether a target of the issues was met in this run."""
        self.targets.append(Target(case, label, description, met, figure))
        print(f"  target {'MET   ' if met else 'MISSED'} {description}: {figure}")

    def as_json(self) -> dict[str, Any]:
        """Everything recorded, JSON-serialisable."""
        return {
            "per_call": [asdict(r) for r in self.per_call_results],
            "figures": [asdict(f) for f in self.figures],
            "targets": [asdict(t) for t in self.targets],
        }


async def _time_calls(op: AsyncOp, calls: int) -> float:
    """Seconds taken by ``calls`` sequential awaits of ``op``, with GC paused."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(calls):
            await op()
        return time.perf_counter() - start
    finally:
        if gc_was_enabled:
            gc.enable()


def _print_case(case: str, results: Mapping[str, PerCallResult]) -> None:
    print(f"\n{case}")
    for r in results.values():
        overhead = "" if r.overhead_ns is None else f"  overhead {r.overhead_ns:>9.1f} ns"
        print(f"  {r.label:<44} {r.median_ns:>9.1f} ns/call  [{r.min_ns:.1f}..{r.max_ns:.1f}]{overhead}")


def ratio(ours: float, theirs: float) -> float:
    """``theirs / ours``: how many times faster we are (above 1 is better for us)."""
    return theirs / ours if ours > 0 else float("inf")
