"""Run the demo scenario: the upstream, the protected app, the virtual clients, the figures.

Everything runs in this process on 127.0.0.1; the amount of traffic is
bounded by the plan (a few dozen requests a second for ``duration`` seconds,
at most ``_MAX_IN_FLIGHT`` outstanding per client).
"""

from __future__ import annotations

import contextlib
import math
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import httpx

from seawall import telemetry
from seawall._demo._plan import ClientSpec, Plan
from seawall._demo._upstream import Upstream
from seawall._telemetry import BREAKER_STATE_CHANGED

if TYPE_CHECKING:
    from seawall import AsyncInfrastructure

__all__ = ["OUTCOMES", "Recorder", "Tick", "Verdict", "run_scenario"]

#: What a virtual client can observe, in display order.
OUTCOMES: tuple[str, ...] = (
    "successes",
    "rate_limited",
    "breaker_rejected",
    "pool_timeouts",
    "timeouts",
    "upstream_errors",
    "errors",
)
_MAX_IN_FLIGHT = 16
_STATE_RANK = {"closed": 0, "half_open": 1, "open": 2}


def _percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)]


@dataclass(slots=True)
class Tick:
    """The figures of one time slice of the run."""

    index: int
    start: float
    phase: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    latencies: list[float] = field(default_factory=list)
    breaker: str = "closed"
    #: Every state the breaker was in during the slice (``breaker`` is the worst of them).
    states: set[str] = field(default_factory=set)
    pool_in_use: int = 0

    @property
    def sent(self) -> int:
        """Requests completed in this slice."""
        return sum(self.counts.values())

    @property
    def admitted(self) -> int:
        """Requests that passed the per-client rate limit."""
        return self.sent - self.counts["rate_limited"]

    @property
    def states_seen(self) -> str:
        """The states the breaker was in during the slice, worst first: e.g. ``open/half_open``.

        A slice as long as the recovery time of an open breaker nearly always
        holds an ``open``; ``breaker`` alone would hide the half-open trial
        that came and went within it.
        """
        seen = sorted(self.states | {self.breaker}, key=lambda state: -_STATE_RANK.get(state, 0))
        return "/".join(seen)

    def p50(self) -> float | None:
        """Median latency in seconds of the admitted requests."""
        return _percentile(self.latencies, 0.5)

    def p99(self) -> float | None:
        """99th percentile latency in seconds of the admitted requests."""
        return _percentile(self.latencies, 0.99)


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether the scenario behaved as designed, check by check."""

    checks: tuple[tuple[str, bool], ...]

    @property
    def ok(self) -> bool:
        """All checks passed."""
        return all(passed for _, passed in self.checks)


class Recorder:
    """Collects outcomes per tick and the breaker's transitions."""

    __slots__ = ("breaker_state", "error_samples", "plan", "pool_size", "start", "ticks", "transitions")

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.start = 0.0
        count = math.ceil(plan.duration / plan.tick - 1e-9)
        self.ticks = [Tick(i, i * plan.tick, plan.phase_at(i * plan.tick)) for i in range(count)]
        self.transitions: list[tuple[float, str, str]] = []
        self.breaker_state = "closed"
        self.pool_size = plan.pool_size
        self.error_samples: list[str] = []

    def elapsed(self) -> float:
        """Seconds since the load started."""
        return anyio.current_time() - self.start

    def _tick(self, elapsed: float) -> Tick:
        return self.ticks[max(0, min(len(self.ticks) - 1, int(elapsed / self.plan.tick)))]

    def record(self, outcome: str, latency: float) -> None:
        """Count a finished request in the current tick."""
        tick = self._tick(self.elapsed())
        tick.counts[outcome] += 1
        if outcome != "rate_limited":
            tick.latencies.append(latency)

    def on_breaker(self, event: tuple[str, ...], measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        """Telemetry handler: note a breaker state change."""
        del event, measurements
        previous, self.breaker_state = str(metadata["from"]), str(metadata["to"])
        self.transitions.append((self.elapsed(), previous, self.breaker_state))
        # The slice held the state left as well as the state entered, whether or not a sample saw it.
        self._note_state(previous)
        self._note_state(self.breaker_state)

    def _note_state(self, state: str) -> None:
        tick = self._tick(self.elapsed())
        tick.states.add(state)
        if _STATE_RANK.get(state, 0) > _STATE_RANK.get(tick.breaker, 0):
            tick.breaker = state

    def note_pool(self, in_use: int) -> None:
        """Note a sample of the pool's usage."""
        tick = self._tick(self.elapsed())
        tick.pool_in_use = max(tick.pool_in_use, in_use)
        self._note_state(self.breaker_state)

    def breaker_steps(self) -> list[tuple[float, str]]:
        """The breaker's state over real time: ``(seconds, state)`` from 0 to the end of the run.

        Each entry holds until the next one; a half-open trial lasts as long as
        its one request, so it shows here though it may fill no tick.
        """
        steps = [(0.0, self.transitions[0][1] if self.transitions else self.breaker_state)]
        steps.extend((at, to) for at, _, to in self.transitions)
        steps.append((max(self.plan.duration, steps[-1][0]), steps[-1][1]))
        return steps

    def totals(self, phase: str | None = None) -> Tick:
        """The figures summed over the run, or over one phase."""
        total = Tick(-1, 0.0, phase or "total")
        for tick in self.ticks:
            if phase is None or tick.phase == phase:
                for outcome, count in tick.counts.items():
                    total.counts[outcome] += count
                total.latencies.extend(tick.latencies)
                total.pool_in_use = max(total.pool_in_use, tick.pool_in_use)
                if _STATE_RANK[tick.breaker] > _STATE_RANK[total.breaker]:
                    total.breaker = tick.breaker
        return total

    def verdict(self) -> Verdict:
        """Check the run against the design."""
        failing, slow = self.plan.phase_start("failing"), self.plan.phase_start("slow")
        opened = any(failing <= t < slow and to == "open" for t, _, to in self.transitions)
        # Closed again once the upstream answered again (slowly or fully recovered).
        closed = any(t >= slow and to == "closed" for t, _, to in self.transitions)
        totals = self.totals()
        return Verdict(
            (
                ("the breaker opened during the outage", opened),
                ("the breaker closed again after the outage", closed and self.breaker_state == "closed"),
                ("greedy clients were rate limited", totals.counts["rate_limited"] > 0),
                ("requests succeeded after recovery", self.totals("recovered").counts["successes"] > 0),
                ("no unexpected errors", totals.counts["errors"] == 0),
            )
        )


def classify(response: httpx.Response) -> str:
    """Name the outcome of one request to the demo app from its response."""
    status = response.status_code
    if status == 200:
        return "successes"
    if status == 429:
        return "rate_limited"
    if status == 504:
        return "timeouts"
    if status == 502:
        return "upstream_errors"
    if status == 503:
        error = response.json().get("error")
        if error == "circuit_breaker_blown":
            return "breaker_rejected"
        if error == "checkout_timeout":
            return "pool_timeouts"
    return "errors"


async def _drive(
    spec: ClientSpec, index: int, app: Any, recorder: Recorder, rng: random.Random, stop_at: float
) -> None:
    transport = httpx.ASGITransport(app=app, client=(spec.address, 40000 + index))
    gate = anyio.CapacityLimiter(_MAX_IN_FLIGHT)

    async def one(client: httpx.AsyncClient) -> None:
        async with gate:
            began = anyio.current_time()
            try:
                outcome = classify(await client.get("/quote"))
            except Exception as exc:  # any surprise fails the run's verdict, never the demo itself
                outcome = "errors"
                if len(recorder.error_samples) < 5:
                    recorder.error_samples.append(f"{spec.name}: {type(exc).__name__}: {exc}")
            recorder.record(outcome, anyio.current_time() - began)

    async with (
        httpx.AsyncClient(transport=transport, base_url="http://demo.seawall") as client,
        anyio.create_task_group() as requests,
    ):
        next_at = recorder.start + rng.uniform(0.0, 1.0 / spec.rate)
        while next_at < stop_at:
            await anyio.sleep_until(next_at)
            if gate.borrowed_tokens < _MAX_IN_FLIGHT:
                requests.start_soon(one, client)
            next_at += rng.uniform(0.6, 1.4) / spec.rate


async def _sample(infra: Any, recorder: Recorder, stop: anyio.Event, interval: float) -> None:
    while not stop.is_set():
        status = await infra.get_protection_status("upstream")
        pool = status.get("connection_pool")
        if pool is not None:
            pool_dict = pool.to_dict() if hasattr(pool, "to_dict") else dict(pool)
            recorder.note_pool(int(pool_dict.get("in_use", 0)))
        with anyio.move_on_after(interval):
            await stop.wait()


async def _tick_reports(recorder: Recorder, report: Callable[[Tick], None], stop: anyio.Event) -> None:
    for tick in recorder.ticks:
        # Report each slice when it is over; once the load has stopped, at once.
        with anyio.move_on_after(recorder.start + tick.start + recorder.plan.tick - anyio.current_time()):
            await stop.wait()
        report(tick)


async def run_scenario(
    recorder: Recorder,
    report: Callable[[Tick], None],
    announce: Callable[[str], None],
    redis_url: str | None = None,
) -> None:
    """Run the whole scenario of ``recorder.plan``, recording its figures.

    Args:
        recorder: Receives every figure of the run.
        report: Called with each tick once it is over (the live view).
        announce: Called once with the upstream's URL when it is listening.
        redis_url: Keep rate-limit buckets and breaker state in this Redis
            (under a prefix of their own) instead of in memory.
    """
    from seawall import AsyncInfrastructure

    plan = recorder.plan
    upstream = Upstream(lambda: plan.phase_at(recorder.elapsed()), slow_delay=plan.slow_delay)
    async with contextlib.AsyncExitStack() as stack:
        backend = None
        if redis_url is not None:
            from seawall.backends.redis import RedisBackend

            # A prefix of this run's own, so concurrent demos never share buckets.
            prefix = f"seawall-demo-{uuid.uuid4().hex[:12]}"
            backend = await stack.enter_async_context(RedisBackend.from_url(redis_url, prefix=prefix))
        infra = await stack.enter_async_context(AsyncInfrastructure(backend=backend))
        async with anyio.create_task_group() as servers:
            for key, config in plan.protections().items():
                await infra.configure_protection(key, config)
            await servers.start(upstream.serve)
            announce(upstream.url)
            await _drive_clients(infra, upstream, recorder, report)
            servers.cancel_scope.cancel()


async def _drive_clients(
    infra: AsyncInfrastructure, upstream: Upstream, recorder: Recorder, report: Callable[[Tick], None]
) -> None:
    """Run every client against the app for the plan's duration, sampling as they go."""
    from seawall._demo._app import build_app
    from seawall.integrations.httpx import ProtectedTransport

    plan = recorder.plan
    handler_id = f"seawall-demo-{id(recorder)}"
    transport = ProtectedTransport(infra, "upstream")
    async with httpx.AsyncClient(transport=transport, base_url=upstream.url) as upstream_client:
        app = build_app(infra, upstream_client)
        telemetry.attach(handler_id, [BREAKER_STATE_CHANGED.event], recorder.on_breaker)
        try:
            recorder.start = anyio.current_time()
            stop_at = recorder.start + plan.duration
            stop = anyio.Event()
            async with anyio.create_task_group() as background:
                background.start_soon(_sample, infra, recorder, stop, min(0.05, plan.tick / 4))
                background.start_soon(_tick_reports, recorder, report, stop)
                async with anyio.create_task_group() as load:
                    for index, spec in enumerate(plan.clients):
                        rng = random.Random(plan.seed * 1000 + index)
                        load.start_soon(_drive, spec, index, app, recorder, rng, stop_at)
                # Every request has finished: let the last tick report, then stop.
                await anyio.sleep_until(max(stop_at, anyio.current_time()))
                stop.set()
        finally:
            telemetry.detach(handler_id)
