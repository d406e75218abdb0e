"""CircuitBreaker against the contract's model: count mode, trials, exclusions, reset()/trip() mid-call, generations.

The model is the contract of the second release, written as plainly as
possible (``reliability_models.BreakerModel``): every state change, and every
``reset()``/``trip()``, starts a new period (a *generation*); a call's outcome
counts only in the period it was admitted in, so a call admitted before the
breaker last changed state decides nothing when it ends, whatever it raises.
Calls go through every style: ``async with``, ``call()``, ``@breaker`` and
``breaker.call(decorated)``, which counts once. The example tests at the end
pin the cases the model found against the first release (issue 13, items 3a,
3c, 3d), each on its own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule
from reliability_models import BreakerModel
from reliability_support import LoopMachine, fast, heavy

from seawall import BreakerState, CircuitBreaker, CircuitOpenError, FakeClock

pytestmark = pytest.mark.anyio

WINDOW = 10.0
RECOVERY = 5.0


class Boom(Exception):
    """A failure of the dependency."""


class Business(Exception):
    """An excluded error: not a failure."""


@dataclass
class Call:
    task: asyncio.Task[Any]
    future: asyncio.Future[Any]
    ticket: tuple[int, int | None]


STYLES = ("with", "call", "decorated", "double", "nowait")


class BreakerMachine(LoopMachine):
    """Calls in flight through every style, finished in any order, with clock moves, reset() and trip()."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(100.0)
        self.calls: list[Call] = []

    @initialize(threshold=st.integers(1, 3), max_calls=st.integers(1, 2))
    def setup(self, threshold: int, max_calls: int) -> None:
        self.model = BreakerModel(threshold, max_calls, WINDOW, RECOVERY)
        self.breaker = CircuitBreaker(
            "model",
            failure_threshold=threshold,
            window=WINDOW,
            recovery_time=RECOVERY,
            half_open_max_calls=max_calls,
            exclude=(Business,),
            clock=self.clock,
        )

        async def body(future: asyncio.Future[Any]) -> Any:
            return await future

        self.body = body
        self.decorated = self.breaker(body)

    def now(self) -> float:
        return self.clock.now()

    @rule(style=st.sampled_from(STYLES))
    def start_call(self, style: str) -> None:
        future: asyncio.Future[Any] = self.loop.create_future()
        breaker = self.breaker

        async def guarded() -> Any:
            if style == "with":
                async with breaker:
                    return await self.body(future)
            if style == "call":
                return await breaker.call(self.body, future)
            if style == "decorated":
                return await self.decorated(future)
            if style == "nowait":  # the coordinator's form
                permit = breaker.admit_nowait()
                try:
                    result = await self.body(future)
                except BaseException as exc:
                    breaker.settle_nowait(permit, exc)
                    raise
                if not permit.plain:  # a closed call's shared permit: a success changes nothing
                    breaker.settle_nowait(permit)
                return result
            return await breaker.call(self.decorated, future)

        task = self.spawn(guarded())
        self.settle()
        decision, detail = self.model.admit(self.now())
        if decision == "reject":
            assert task.done(), "a rejected call ends at once"
            error = task.exception()
            assert isinstance(error, CircuitOpenError), error
            assert error.retry_after == pytest.approx(detail)
            assert not future.done(), "the protected code of a rejected call never runs"
        else:
            assert not task.done(), f"an admitted {decision} call runs"
            self.calls.append(Call(task, future, detail))

    @precondition(lambda self: self.calls)
    @rule(data=st.data(), outcome=st.sampled_from(["success", "failure", "excluded", "cancelled"]))
    def finish_call(self, data: st.DataObject, outcome: str) -> None:
        call = data.draw(st.sampled_from(self.calls))
        self.calls.remove(call)
        if outcome == "success":
            call.future.set_result("ok")
        elif outcome == "failure":
            call.future.set_exception(Boom())
        elif outcome == "excluded":
            call.future.set_exception(Business())
        else:
            call.task.cancel()
        self.settle()
        assert call.task.done()
        if outcome == "cancelled":
            assert call.task.cancelled(), "cancellation propagates as cancellation"
        elif outcome == "success":
            assert call.task.result() == "ok"
        else:
            error = call.task.exception()
            assert type(error) is (Boom if outcome == "failure" else Business), "errors propagate unchanged"
        self.model.settle(call.ticket, "success" if outcome == "excluded" else outcome, self.now())

    @rule(seconds=st.sampled_from([0.5, 2.5, 4.9, 5.0, 10.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def trip(self) -> None:
        self.run(self.breaker.trip())
        self.model.move("open", self.now())

    @rule()
    def reset(self) -> None:
        self.run(self.breaker.reset())
        self.model.move("closed", self.now())

    @invariant()
    def agrees_with_model(self) -> None:
        if not hasattr(self, "model"):
            return
        now = self.now()
        status = self.run(self.breaker.status())
        expected = BreakerState(self.model.effective(now))
        assert self.breaker.state is expected
        assert status.state is expected
        assert status.failure_count == self.model.failure_count(now)
        live = self.model.live_trials(now) if self.model.state == "half_open" else []
        assert status.trials_in_flight == len(live)
        assert status.retry_after == pytest.approx(self.model.retry_after(now))

    def close_machine(self) -> None:
        for call in self.calls:
            call.task.cancel()


BreakerMachine.TestCase.settings = fast(200, stateful_step_count=30)
TestBreakerModel = BreakerMachine.TestCase


@pytest.mark.stress
@pytest.mark.timeout(1800)
class TestBreakerModelStress(BreakerMachine.TestCase):
    """The breaker model with many more, longer examples (stress run)."""

    settings = heavy(2500, stateful_step_count=50)


# -- each disagreement on its own ----------------------------------------------------


def _breaker(clock: FakeClock, threshold: int = 1) -> CircuitBreaker:
    return CircuitBreaker("b", failure_threshold=threshold, window=WINDOW, recovery_time=RECOVERY, clock=clock)


async def _fail(future: asyncio.Future[Any]) -> None:
    await future


async def test_a_call_admitted_before_reset_decides_nothing() -> None:
    """A closed call admitted before reset() (the breaker still closed) fails afterwards: nothing is counted."""
    breaker = _breaker(FakeClock(100.0))
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(breaker.call(_fail, future))
    await asyncio.sleep(0)
    await breaker.reset()
    future.set_exception(Boom())
    with pytest.raises(Boom):
        await task
    assert breaker.state is BreakerState.CLOSED
    assert (await breaker.status()).failure_count == 0


async def test_a_trial_in_flight_at_reset_decides_nothing() -> None:
    """A half-open trial still running when reset() is called does not re-open the breaker when it fails."""
    clock = FakeClock(100.0)
    breaker = _breaker(clock)
    await breaker.trip()
    clock.advance(RECOVERY)
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    trial = asyncio.create_task(breaker.call(_fail, future))
    await asyncio.sleep(0)
    await breaker.reset()
    future.set_exception(Boom())
    with pytest.raises(Boom):
        await trial
    assert breaker.state is BreakerState.CLOSED


async def test_calls_from_before_an_outage_do_not_reopen_the_recovered_breaker() -> None:
    """A call admitted before the breaker opened, failing after it recovered, counts nothing."""
    clock = FakeClock(100.0)
    breaker = _breaker(clock)
    loop = asyncio.get_running_loop()
    old: asyncio.Future[Any] = loop.create_future()
    before = asyncio.create_task(breaker.call(_fail, old))
    await asyncio.sleep(0)
    with pytest.raises(Boom):
        async with breaker:
            raise Boom
    assert breaker.state is BreakerState.OPEN
    clock.advance(RECOVERY)
    async with breaker:  # the trial succeeds: closed
        pass
    assert breaker.state is BreakerState.CLOSED
    old.set_exception(Boom())
    with pytest.raises(Boom):
        await before
    assert breaker.state is BreakerState.CLOSED


async def test_a_decorated_function_through_call_counts_once() -> None:
    """``breaker.call(decorated)`` failing once is one failure, not two."""
    breaker = _breaker(FakeClock(100.0), threshold=3)

    @breaker
    async def failing() -> None:
        raise Boom

    with pytest.raises(Boom):
        await breaker.call(failing)
    assert (await breaker.status()).failure_count == 1


async def test_a_decorated_function_through_call_is_one_trial() -> None:
    """In half-open, ``breaker.call(decorated)`` is a single trial whose success closes the breaker."""
    clock = FakeClock(100.0)
    breaker = _breaker(clock)

    @breaker
    async def fine() -> str:
        return "ok"

    await breaker.trip()
    clock.advance(RECOVERY)
    assert await breaker.call(fine) == "ok"
    assert breaker.state is BreakerState.CLOSED
