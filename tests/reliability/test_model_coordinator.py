"""AsyncInfrastructure against one model of a key's layers: limiter, breaker, pool, timeout, cancellation.

A key is configured with every layer on a ``FakeClock``; calls go through
``execute_protected`` and ``protect()``, per entity bucket, with and without a
telemetry handler attached (which takes the coordinator's general path instead
of its fast one). The model composes the limiter's, the breaker's and the
pool's rules in the contract's order and says what each call raises:

* a rate-limit denial never reaches the breaker or the pool;
* a breaker rejection never reaches the pool;
* a call past its deadline raises ``ProtectionTimeout`` and counts once as a
  breaker failure (a pool wait cut by the pool's own, shorter, timeout raises
  ``PoolTimeout``, which the breaker counts as a failure too: it is raised
  inside the breaker's scope);
* an outside cancellation propagates as cancellation, frees the pool slot and
  the trial slot, and is no breaker outcome.

Times: calls start on whole seconds; the call timeout (2.5 s) and the pool
timeouts (1.25 s, 3.25 s) put deadlines on quarter and half seconds, so two
different kinds of event never fall on one instant, and the machine moves the
clock through every deadline in order.

Some outside cancellations are aimed at the deadline's own loop iteration: the
clock reaches the call's deadline and the call is cancelled before the timer
task has run. The caller's cancellation must win (issue 15: the first release
turned it into ``ProtectionTimeout`` and counted a breaker failure; this model
finds that on 22b471d in its first examples).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule
from reliability_models import BreakerModel, LimiterModel
from reliability_support import LoopMachine, fast, heavy

from seawall import (
    AsyncInfrastructure,
    CircuitOpenError,
    FakeClock,
    PoolTimeout,
    ProtectionTimeout,
    RateLimitExceeded,
)
from seawall.testing import capture_events

pytestmark = pytest.mark.anyio

KEY = "svc"
CALL_TIMEOUT = 2.5
LIMIT_WINDOW = Fraction(4)
BREAKER_WINDOW = 10.0
RECOVERY = 5.0  # the breaker model's recovery time
ENTITIES = (None, "e1", "e:2")


class Boom(Exception):
    """The dependency failed."""


class Business(Exception):
    """An excluded error: a success for the breaker."""


@dataclass(eq=False)
class Worker:
    id: int
    closed: bool = False


class Factory:
    def __init__(self) -> None:
        self.workers: list[Worker] = []
        self.checks = 0  # how many returns after a raised block asked whether the worker lives

    async def create(self) -> Worker:
        await anyio.lowlevel.checkpoint()
        worker = Worker(len(self.workers) + 1)
        self.workers.append(worker)
        return worker

    async def close(self, worker: Worker) -> None:
        worker.closed = True

    async def check(self, worker: Worker) -> bool:
        self.checks += 1
        return True


@dataclass(eq=False)
class Call:
    id: int
    entity: str | None
    style: str
    task: asyncio.Task[Any] | None = None
    body: asyncio.Future[str] | None = None  # resolved by the machine: how fn ends
    conn: Any = None
    # The model:
    phase: str = "new"  # pool (waiting for a slot), running, done
    ticket: tuple[int, int | None] | None = None
    started: Fraction = Fraction(0)
    pool_deadline: Fraction | None = None
    expect: Any = None  # "ok", "cancelled", or an exception class
    retry_after: float | None = None

    @property
    def deadline(self) -> Fraction:
        return self.started + Fraction(CALL_TIMEOUT)

    @property
    def trial(self) -> bool:
        return self.ticket is not None and self.ticket[1] is not None


class CoordinatorMachine(LoopMachine):
    """One key's layers on a FakeClock, through both call paths, step by step against the composed model."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(200.0)
        self.now = Fraction(200)
        self.calls: list[Call] = []
        self.factory = Factory()
        self.capture: Any = None

    @initialize(
        algorithm=st.sampled_from(["gcra", "fixed_window"]),
        limit=st.sampled_from([2, 3, 6]),
        threshold=st.integers(1, 3),
        max_calls=st.integers(1, 2),
        size=st.integers(1, 2),
        overflow=st.integers(0, 1),
        pool_timeout=st.sampled_from([1.25, 3.25]),
        bulkhead=st.booleans(),
        observed=st.booleans(),
    )
    def setup(
        self,
        algorithm: str,
        limit: int,
        threshold: int,
        max_calls: int,
        size: int,
        overflow: int,
        pool_timeout: float,
        bulkhead: bool,
        observed: bool,
    ) -> None:
        self.limiter = LimiterModel(algorithm, limit, LIMIT_WINDOW)
        self.breaker = BreakerModel(threshold, max_calls, BREAKER_WINDOW, RECOVERY)
        self.size = size
        self.slots = size + overflow
        self.pool_timeout = Fraction(pool_timeout)
        self.bulkhead = bulkhead
        self.holding: set[Call] = set()
        self.waiting: deque[Call] = deque()
        self.checks = 0  # returns after a raised block (each runs the factory's check)
        self.live = 0 if bulkhead else size
        if observed:
            self.capture = capture_events()
            self.capture.__enter__()
        config = {
            "rate_limiter": {"limit": limit, "window": float(LIMIT_WINDOW), "algorithm": algorithm},
            "circuit_breaker": {
                "failure_threshold": threshold,
                "window": BREAKER_WINDOW,
                "recovery_time": RECOVERY,
                "half_open_max_calls": max_calls,
                "exclude": [Business],
            },
            "connection_pool": {
                "size": size,
                "max_overflow": overflow,
                "timeout": pool_timeout,
                "factory": None if bulkhead else self.factory,
            },
            "timeout": CALL_TIMEOUT,
        }
        self.stop = asyncio.Event()
        self.host = self.spawn(self.serve(config))
        self.settle()
        assert not self.host.done(), self.host

    async def serve(self, config: dict[str, Any]) -> None:
        async with AsyncInfrastructure(clock=self.clock) as infra:
            self.infra = infra
            await infra.configure_protection(KEY, config)
            await self.stop.wait()

    # -- the calls

    async def run_call(self, call: Call) -> str:
        body = call.body
        assert body is not None
        infra = self.infra

        async def fn(conn: Any = None) -> str:
            call.conn = conn
            how = await body
            if how == "boom":
                raise Boom
            if how == "business":
                raise Business
            return f"ok-{call.id}"

        if call.style == "execute":
            return await infra.execute_protected(KEY, fn, rate_limiter=call.entity)
        async with infra.protect(KEY, rate_limiter=call.entity) as conn:
            return await fn(conn)

    def bucket(self, entity: str | None) -> str:
        return entity or "global"

    @precondition(lambda self: hasattr(self, "breaker"))
    @rule(entity=st.sampled_from(ENTITIES), style=st.sampled_from(["execute", "protect"]))
    def start_call(self, entity: str | None, style: str) -> None:
        call = Call(len(self.calls) + 1, entity, style, started=self.now)
        call.body = self.loop.create_future()
        self.calls.append(call)
        call.task = self.spawn(self.run_call(call))
        self.settle()
        denied = self.limiter.take(self.bucket(entity), 1, self.now)
        if denied is not None:
            call.phase, call.expect = "done", RateLimitExceeded
            call.retry_after = float(max(denied, Fraction(1, 10**6)))
            return
        decision, detail = self.breaker.admit(float(self.now))
        if decision == "reject":
            call.phase, call.expect, call.retry_after = "done", CircuitOpenError, detail
            return
        call.ticket = detail
        if len(self.holding) < self.slots:
            self.hold(call)
        else:
            call.phase = "pool"
            call.pool_deadline = self.now + self.pool_timeout
            self.waiting.append(call)

    def hold(self, call: Call) -> None:
        call.phase = "running"
        self.holding.add(call)
        if not self.bulkhead and len(self.holding) > self.live:
            self.live += 1  # an overflow worker is made

    def free_slot(self, call: Call, expiring: set[Call], *, raised: bool) -> None:
        self.holding.discard(call)
        if raised and not self.bulkhead:
            self.checks += 1
        # A waiter cancelled in the same pass passes the slot on to the next one.
        waiter = next((waiter for waiter in self.waiting if waiter not in expiring), None)
        if waiter is not None:
            self.waiting.remove(waiter)
            self.hold(waiter)
            return
        if not self.bulkhead and self.live > self.size:
            self.live -= 1  # the overflow worker nobody waits for is closed

    def settle_breaker(self, call: Call, outcome: str, at: Fraction) -> None:
        assert call.ticket is not None
        self.breaker.settle(call.ticket, outcome, float(at))

    def stale(self, call: Call) -> bool:
        return call.ticket is not None and call.ticket[0] != self.breaker.generation

    @precondition(lambda self: any(call.phase == "running" for call in self.calls))
    @rule(data=st.data(), how=st.sampled_from(["ok", "boom", "business"]))
    def fn_ends(self, data: st.DataObject, how: str) -> None:
        call = data.draw(st.sampled_from([call for call in self.calls if call.phase == "running"]))
        assert call.body is not None
        call.body.set_result(how)
        self.settle()
        self.free_slot(call, set(), raised=how != "ok")
        self.settle_breaker(call, "failure" if how == "boom" else "success", self.now)
        call.phase = "done"
        call.expect = {"ok": "ok", "boom": Boom, "business": Business}[how]

    @precondition(lambda self: any(call.phase in ("pool", "running") for call in self.calls))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        call = data.draw(st.sampled_from([call for call in self.calls if call.phase in ("pool", "running")]))
        assert call.task is not None
        call.task.cancel()
        self.settle()
        self.cancelled(call)

    def cancelled(self, call: Call, expiring: set[Call] | None = None) -> None:
        if call.phase == "pool":
            self.waiting.remove(call)
        else:
            self.free_slot(call, expiring or set(), raised=True)
        self.settle_breaker(call, "cancelled", self.now)
        call.phase, call.expect = "done", "cancelled"

    @precondition(lambda self: any(call.phase in ("pool", "running") for call in self.calls))
    @rule(data=st.data())
    def cancel_at_its_deadline(self, data: st.DataObject) -> None:
        # The clock reaches the call's deadline and the call is cancelled from outside in the
        # same loop iteration, before the timer task has run: the outside cancellation wins.
        call = data.draw(st.sampled_from([call for call in self.calls if call.phase in ("pool", "running")]))
        self.advance_to(call.deadline, stop_before=True)
        if call.phase == "done":  # its pool wait timed out on the way
            self.advance_to(Fraction(math.ceil(self.now)))  # back to a whole second (see the docstring)
            return
        assert call.task is not None
        at = call.deadline
        self.clock.set(float(at))
        self.now = at
        call.task.cancel()
        self.settle()
        others = {other for other in self.calls if other.phase in ("pool", "running") and other.deadline == at}
        self.cancelled(call, others - {call})
        self.expire(at)
        # Back to a whole second, so that calls keep starting on one (see the module docstring).
        self.advance_to(Fraction(math.ceil(at)))

    # -- time

    def events(self) -> list[Fraction]:
        times = {call.deadline for call in self.calls if call.phase in ("pool", "running")}
        times |= {call.pool_deadline for call in self.waiting if call.pool_deadline is not None}
        return sorted(times)

    def advance_to(self, target: Fraction, *, stop_before: bool = False) -> None:
        """Move the clock to ``target`` through every deadline on the way, in order."""
        for at in self.events():
            if at > target or (stop_before and at == target):
                break
            self.clock.set(float(at))
            self.now = at
            self.settle()
            self.expire(at)
        if stop_before:
            return
        self.clock.set(float(target))
        self.now = target
        self.settle()

    def expire(self, at: Fraction) -> None:
        expiring = [call for call in self.calls if call.phase in ("pool", "running") and call.deadline == at]
        for call in expiring:
            if call.phase == "pool":
                self.waiting.remove(call)
        for call in expiring:
            if call.phase == "running":
                self.free_slot(call, set(expiring), raised=True)
            self.settle_breaker(call, "failure", at)
            call.phase, call.expect = "done", ProtectionTimeout
        for call in [call for call in self.waiting if call.pool_deadline == at]:
            self.waiting.remove(call)
            self.settle_breaker(call, "failure", at)
            call.phase, call.expect = "done", PoolTimeout

    @precondition(lambda self: hasattr(self, "breaker"))
    @rule(seconds=st.sampled_from([1, 2, 3, 5]))
    def advance(self, seconds: int) -> None:
        self.advance_to(self.now + seconds)

    # -- invariants

    @invariant()
    def calls_end_as_the_model_says(self) -> None:
        conns: dict[int, Call] = {}
        for call in self.calls:
            task = call.task
            assert task is not None
            if call.phase != "done":
                assert not task.done(), f"call {call.id} ({call.phase}) ended early: {task!r}"
                if call.phase == "running" and isinstance(call.conn, Worker):
                    assert not call.conn.closed
                    assert call.conn.id not in conns, f"worker {call.conn.id} lent to two calls"
                    conns[call.conn.id] = call
                continue
            assert task.done(), f"call {call.id} should have ended with {call.expect}"
            if call.expect == "cancelled":
                assert task.cancelled(), f"call {call.id}: expected cancellation, got {task!r}"
                continue
            assert not task.cancelled(), f"call {call.id}: expected {call.expect}, it was cancelled"
            error = task.exception()
            if call.expect == "ok":
                assert error is None, f"call {call.id}: {error!r}"
                assert task.result() == f"ok-{call.id}"
                continue
            assert type(error) is call.expect, f"call {call.id}: expected {call.expect}, got {error!r}"
            if call.retry_after is not None:
                assert error.retry_after == pytest.approx(call.retry_after, abs=1e-9)  # type: ignore[union-attr]

    @invariant()
    def layers_agree(self) -> None:
        if not hasattr(self, "infra"):
            return
        status = self.run(self.infra.get_protection_status(KEY))
        breaker = status["circuit_breaker"]
        now = float(self.now)
        assert breaker["state"] == self.breaker.effective(now)
        assert breaker["failure_count"] == self.breaker.failure_count(now)
        live_trials = self.breaker.live_trials(now) if self.breaker.state == "half_open" else []
        assert breaker["trials_in_flight"] == len(live_trials)
        pool = status["connection_pool"]
        assert pool["in_use"] == len(self.holding), pool
        assert pool["waiting"] == len(self.waiting), pool
        if not self.bulkhead:
            assert sum(1 for worker in self.factory.workers if not worker.closed) == self.live
            assert self.factory.checks == self.checks, "a raised block's worker was not checked"
        if all(call.phase == "done" for call in self.calls):
            (key,) = self.infra.statistics().keys
            assert key.inflight == 0, "a finished call still counts in flight"
        count, remaining, _retry, _reset = self.limiter.status("global", self.now)
        assert status["rate_limiter"]["remaining"] == remaining
        assert status["rate_limiter"]["current_count"] == pytest.approx(float(count), abs=1e-9)

    def release(self) -> None:
        for call in self.calls:
            if call.body is not None and not call.body.done():
                call.body.set_result("ok")
        if hasattr(self, "stop"):
            self.stop.set()
        self.settle()
        self.clock.advance(60.0)  # past the closing pool's grace, should a worker never come back
        self.settle()

    def close_machine(self) -> None:
        if self.capture is not None:
            self.capture.__exit__(None, None, None)
        if not self.bulkhead and hasattr(self, "host"):
            assert all(worker.closed for worker in self.factory.workers), "a worker outlived the infrastructure"


CoordinatorMachine.TestCase.settings = fast(120, stateful_step_count=30)
TestCoordinatorModel = CoordinatorMachine.TestCase


@pytest.mark.stress
@pytest.mark.timeout(1800)
class TestCoordinatorModelStress(CoordinatorMachine.TestCase):
    """The coordinator model with many more, longer examples (stress run)."""

    settings = heavy(600, stateful_step_count=50)
