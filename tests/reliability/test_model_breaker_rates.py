"""CircuitBreaker's rate modes against a plain model: windowed failure and slow-call rates on a fake clock.

``reliability_models.RateBreakerModel`` keeps every outcome as an event and
recomputes the rates from scratch; the breaker keeps time-bucketed counters
(O(1) per call). Calls run one at a time through ``admit_nowait`` /
``settle_nowait`` with their duration on a ``FakeClock``, mixed with clock
jumps (short ones, and ones past the whole window) and ``reset()``; after every
step the state and ``status()``'s ``calls``, ``failure_rate`` and
``slow_call_rate`` must match the model's.
"""

from __future__ import annotations

import math

import anyio
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from reliability_models import RateBreakerModel
from reliability_support import fast, heavy

from seawall import CircuitBreaker, CircuitOpenError, FakeClock, ProtectionTimeout

WINDOW = 10.0
RECOVERY = 5.0
SLOW = 1.0
#: How a call goes through the breaker: the permit pair, ``async with``, ``call()``.
STYLES = ("permit", "with", "call")


class Boom(Exception):
    """A failure of the dependency."""


class RateBreakerMachine(RuleBasedStateMachine):
    """Sequential calls of any duration and outcome, clock jumps and resets, compared with the model."""

    @initialize(
        threshold=st.one_of(st.none(), st.integers(2, 6)),
        rate=st.one_of(st.none(), st.sampled_from([0.25, 0.5, 1.0])),
        slow_rate=st.one_of(st.none(), st.sampled_from([0.3, 0.5, 1.0])),
        minimum=st.integers(1, 6),
    )
    def build(self, threshold: int | None, rate: float | None, slow_rate: float | None, minimum: int) -> None:
        if rate is None and slow_rate is None:
            rate = 0.5  # (count mode alone is the other model's)
        self.clock = FakeClock(1000.0)
        self.breaker = CircuitBreaker(
            "model",
            failure_threshold=threshold,
            window=WINDOW,
            recovery_time=RECOVERY,
            failure_rate=rate,
            slow_call_duration=SLOW if slow_rate is not None else None,
            slow_call_rate=slow_rate,
            minimum_calls=minimum,
            clock=self.clock,
        )
        self.model = RateBreakerModel(
            threshold, rate, SLOW if slow_rate is not None else None, slow_rate, minimum, WINDOW, RECOVERY
        )

    @rule(
        failed=st.booleans(),
        duration=st.sampled_from([0.0, 0.3, 0.999, 1.0, 2.5]),
        timed_out=st.booleans(),
        style=st.sampled_from(STYLES),
    )
    def call(self, failed: bool, duration: float, timed_out: bool, style: str) -> None:
        anyio.run(self._call, failed, duration, timed_out, style)

    async def _call(self, failed: bool, duration: float, timed_out: bool, style: str) -> None:
        kind = self.model.admit(self.clock.now())
        exc: BaseException | None = None
        if timed_out:
            exc = ProtectionTimeout(key="model", timeout=duration)
        elif failed:
            exc = Boom()

        async def body() -> None:
            self.clock.advance(duration)
            if exc is not None:
                raise exc

        try:
            if style == "permit":
                permit = self.breaker.admit_nowait()
                self.clock.advance(duration)
                self.breaker.settle_nowait(permit, exc)
            elif style == "with":
                async with self.breaker:
                    await body()
            else:
                await self.breaker.call(body)
        except CircuitOpenError:
            assert kind == "reject"
            return
        except (Boom, ProtectionTimeout):
            pass
        assert kind != "reject"
        slow = self.model.slow_call_duration is not None and (timed_out or duration >= SLOW)
        self.model.settle(kind, failed or timed_out, slow, self.clock.now())

    @rule(seconds=st.sampled_from([0.1, 0.5, 0.95, 1.0, 3.0, 10.0, 25.0]))
    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def reset(self) -> None:
        anyio.run(self.breaker.reset)
        self.model.reset()

    @invariant()
    def agrees(self) -> None:
        now = self.clock.now()
        assert self.breaker.state.value == self.model.effective(now)
        status = anyio.run(self.breaker.status)
        calls, failure_rate, slow_rate = self.model.rates(now)
        assert status.calls == calls
        assert _same(status.failure_rate, failure_rate)
        assert _same(status.slow_call_rate, slow_rate)


def _same(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b))


RateBreakerMachine.TestCase.settings = fast(150, stateful_step_count=40)
TestRateBreakerModel = RateBreakerMachine.TestCase


@pytest.mark.stress
class TestRateBreakerModelStress(RateBreakerMachine.TestCase):
    """The same model, many more and longer runs (``nox -s stress``)."""

    settings = heavy(2000, stateful_step_count=80)
