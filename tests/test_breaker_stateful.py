"""CircuitBreaker against a reference model, under random calls, outcomes, cancellations and clock moves.

The model keeps one rule per line: every admitted call carries the episode
(generation) it was admitted in, and an outcome counts only in that episode;
``reset()`` and ``trip()`` start a new one even when the state stays.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from seawall import BreakerState, CircuitBreaker, CircuitOpenError, FakeClock

WINDOW = 10.0
RECOVERY = 5.0


class Boom(Exception):
    """A failure."""


class Business(Exception):
    """An excluded error: counts as success."""


@dataclass
class Model:
    """The breaker's rules, written as plainly as possible."""

    threshold: int
    max_calls: int
    state: str = "closed"
    failures: list[float] = field(default_factory=list)
    opened_at: float = 0.0
    episode: int = 0
    trials: dict[int, float] = field(default_factory=dict)
    next_trial: int = 0

    def move(self, state: str, now: float) -> None:
        if state == "open":
            self.opened_at = now
        if state == "closed":
            self.failures = []
        self.state = state
        self.renew()

    def renew(self) -> None:
        self.episode += 1
        self.trials = {}

    def reopens_in(self, now: float) -> float:
        # The one recovery boundary: open while this is above zero.
        return self.opened_at + RECOVERY - now

    def effective(self, now: float) -> str:
        if self.state == "open" and not self.reopens_in(now) > 0:
            return "half_open"
        return self.state

    def live_trials(self, now: float) -> list[float]:
        return [start for start in self.trials.values() if start + RECOVERY - now > 0]

    def admit(self, now: float) -> tuple[str, Any]:
        if self.state == "open":
            if self.reopens_in(now) > 0:
                return "reject", self.reopens_in(now)
            self.move("half_open", now)
        if self.state == "half_open":
            live = self.live_trials(now)
            if len(live) >= self.max_calls:
                return "reject", min(live) + RECOVERY - now
            self.next_trial += 1
            self.trials[self.next_trial] = now
            return "trial", (self.episode, self.next_trial)
        return "closed", (self.episode, None)

    def settle(self, ticket: tuple[int, int | None], outcome: str, now: float) -> None:
        episode, trial = ticket
        if episode != self.episode:
            return  # admitted in an earlier episode: decides nothing
        if trial is not None:
            self.trials.pop(trial, None)
            if outcome == "success":
                self.move("closed", now)
            elif outcome == "failure":
                self.failures.append(now)
                self.move("open", now)
            return
        if outcome == "failure":
            self.failures = [at for at in self.failures if at > now - WINDOW] + [now]
            if len(self.failures) >= self.threshold:
                self.move("open", now)

    def failure_count(self, now: float) -> int:
        return sum(1 for at in self.failures if at > now - WINDOW)


@dataclass
class Pending:
    task: asyncio.Task[Any]
    future: asyncio.Future[Any]
    ticket: tuple[int, int | None]


class BreakerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock(100.0)
        self.pending: list[Pending] = []

    @initialize(threshold=st.integers(1, 3), max_calls=st.integers(1, 2))
    def setup(self, threshold: int, max_calls: int) -> None:
        self.model = Model(threshold, max_calls)
        self.breaker = CircuitBreaker(
            "model",
            failure_threshold=threshold,
            window=WINDOW,
            recovery_time=RECOVERY,
            half_open_max_calls=max_calls,
            exclude=(Business,),
            clock=self.clock,
        )

    def spin(self) -> None:
        for _ in range(3):
            self.loop.run_until_complete(asyncio.sleep(0))

    @rule(form=st.sampled_from(["with", "call", "decorated", "call(decorated)", "nowait"]))
    def start_call(self, form: str) -> None:
        future: asyncio.Future[Any] = self.loop.create_future()
        breaker = self.breaker

        async def body() -> Any:
            return await future

        async def guarded() -> Any:
            if form == "with":
                async with breaker:
                    return await body()
            if form == "nowait":
                permit = breaker.admit_nowait()
                try:
                    result = await body()
                except BaseException as exc:
                    breaker.settle_nowait(permit, exc)
                    raise
                breaker.settle_nowait(permit)
                return result
            if form == "decorated":
                return await breaker(body)()
            if form == "call(decorated)":  # one layer, not two
                return await breaker.call(breaker(body))
            return await breaker.call(body)

        task = self.loop.create_task(guarded())
        self.spin()
        decision, detail = self.model.admit(self.clock.now())
        if decision == "reject":
            assert task.done()
            error = task.exception()
            assert isinstance(error, CircuitOpenError)
            assert error.retry_after == pytest.approx(detail)
        else:
            assert not task.done()
            self.pending.append(Pending(task, future, detail))

    @precondition(lambda self: self.pending)
    @rule(index=st.integers(0, 10), outcome=st.sampled_from(["success", "failure", "excluded", "cancelled"]))
    def finish_call(self, index: int, outcome: str) -> None:
        call = self.pending.pop(index % len(self.pending))
        if outcome == "success":
            call.future.set_result("ok")
        elif outcome == "failure":
            call.future.set_exception(Boom())
        elif outcome == "excluded":
            call.future.set_exception(Business())
        else:
            call.task.cancel()
        self.spin()
        assert call.task.done()
        if outcome == "cancelled":
            assert call.task.cancelled()
        elif outcome == "success":
            assert call.task.result() == "ok"
        else:
            assert isinstance(call.task.exception(), Boom if outcome == "failure" else Business)
        self.model.settle(call.ticket, "success" if outcome == "excluded" else outcome, self.clock.now())

    @rule(seconds=st.sampled_from([5.0, 0.5, 2.5, 4.9, 10.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def trip(self) -> None:
        self.loop.run_until_complete(self.breaker.trip())
        if self.model.state == "open":
            self.model.opened_at = self.clock.now()
            self.model.renew()
        else:
            self.model.move("open", self.clock.now())

    @rule()
    def reset(self) -> None:
        self.loop.run_until_complete(self.breaker.reset())
        if self.model.state == "closed":
            self.model.failures = []
            self.model.renew()
        else:
            self.model.move("closed", self.clock.now())

    @invariant()
    def agrees_with_model(self) -> None:
        if not hasattr(self, "model"):
            return
        now = self.clock.now()
        status = self.loop.run_until_complete(self.breaker.status())
        expected_state = self.model.effective(now)
        assert self.breaker.state is BreakerState(expected_state)
        assert status.state is BreakerState(expected_state)
        assert status.failure_count == self.model.failure_count(now)
        live = self.model.live_trials(now) if self.model.state == "half_open" else []
        assert status.trials_in_flight == len(live)
        assert math.isfinite(status.retry_after)
        assert status.retry_after >= 0

    def teardown(self) -> None:
        for call in self.pending:
            call.task.cancel()
        self.spin()
        self.loop.close()


BreakerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
TestBreakerAgainstModel = BreakerMachine.TestCase
