"""Telemetry: what a primitive pays to emit an event nobody listens to.

Target (issue 2): under 100 ns per event, building the measurements included,
over a bare function call. Primitives guard with ``if TOPIC.handlers:`` before
they build any dict; the public ``execute()`` is measured too, for users who
emit their own events.
"""

from __future__ import annotations

import time

from _harness import BenchContext
from seawall import telemetry
from seawall._telemetry import LIMITER_REQUEST_ALLOWED as TOPIC

NAME = "telemetry"
EVENT = TOPIC.event


def _bare() -> None:
    pass


def _guarded_emit() -> None:
    # Exactly what a primitive does on its hot path.
    if TOPIC.handlers:
        TOPIC.emit({"count": 1, "duration": time.perf_counter()}, {"key": "k", "limit": 10})


def _public_execute() -> None:
    telemetry.execute(EVENT, {"count": 1}, {"key": "k"})


async def run(ctx: BenchContext) -> None:
    """Time the guard and ``execute()`` with no handler attached."""

    # Sync callables are wrapped the same way for every variant, so the wrapper
    # cancels out in the overhead column.
    async def bare() -> None:
        _bare()

    async def guarded() -> None:
        _guarded_emit()

    async def public() -> None:
        _public_execute()

    results = await ctx.per_call(
        "telemetry: emit with no handler attached",
        {"bare": bare, "seawall guarded emit (primitives)": guarded, "seawall telemetry.execute()": public},
        calls=20_000 if ctx.quick else 200_000,
    )
    overhead = results["seawall guarded emit (primitives)"].overhead_ns or 0.0
    ctx.target(
        "telemetry",
        "guarded emit",
        "idle emit under 100 ns over a bare call",
        overhead < 100,
        f"{overhead:.1f} ns",
    )
