"""The aiobreaker adapter: seawall's breaker surface over an aiobreaker engine, listeners kept."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import anyio
import pytest

from seawall import BreakerState, CircuitOpenError, FakeClock
from seawall._breaker import BreakerLike
from seawall.testing import capture_events

aiobreaker = pytest.importorskip("aiobreaker")

from seawall.integrations.aiobreaker import AiobreakerAdapter, adapt  # noqa: E402

pytestmark = [
    pytest.mark.anyio,
    # aiobreaker itself calls datetime.utcnow(), deprecated from Python 3.12.
    pytest.mark.filterwarnings("ignore:datetime.datetime.utcnow:DeprecationWarning"),
]


class Boom(Exception):
    """A dependency failure."""


class BusinessError(Exception):
    """Excluded from counting."""


class Recorder(aiobreaker.CircuitBreakerListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.events: list[str] = []

    def before_call(self, breaker: Any, func: Any, *args: Any, **kwargs: Any) -> None:
        self.events.append("before_call")

    def failure(self, breaker: Any, exception: Exception) -> None:
        self.events.append(f"failure:{type(exception).__name__}")

    def success(self, breaker: Any) -> None:
        self.events.append("success")

    def state_change(self, breaker: Any, old: Any, new: Any) -> None:
        self.events.append(f"state:{new.state.name}")


async def ok() -> str:
    return "ok"


async def boom() -> None:
    raise Boom("down")


def make(fail_max: int = 2, **options: Any) -> tuple[Any, AiobreakerAdapter]:
    breaker = aiobreaker.CircuitBreaker(fail_max=fail_max, timeout_duration=timedelta(seconds=30), **options)
    return breaker, adapt(breaker, name="legacy")


def elapse_timeout(breaker: Any) -> None:
    """Move aiobreaker's wall-clock 'opened at' back past its timeout (it cannot take a clock)."""
    breaker._state_storage.opened_at -= breaker.timeout_duration


def test_adapt_wraps_once_and_names() -> None:
    """adapt() wraps an aiobreaker breaker, returns an adapter unchanged, and picks a name."""
    breaker = aiobreaker.CircuitBreaker(name="payments")
    adapter = adapt(breaker)
    assert adapter.name == "payments"
    assert adapter.breaker is breaker
    assert adapt(adapter) is adapter
    assert adapt(aiobreaker.CircuitBreaker(), name="x").name == "x"
    assert AiobreakerAdapter(aiobreaker.CircuitBreaker()).name == "aiobreaker"
    assert isinstance(adapter, BreakerLike)
    with pytest.raises(TypeError, match=r"expected an aiobreaker\.CircuitBreaker"):
        AiobreakerAdapter(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        AiobreakerAdapter(breaker, name="")


async def test_failures_open_and_the_callers_exception_propagates() -> None:
    """The failure that trips aiobreaker reaches the caller as their own exception, then calls are rejected."""
    _, adapter = make()
    assert await adapter.call(ok) == "ok"
    for _ in range(2):
        with pytest.raises(Boom, match="down"):
            await adapter.call(boom)
    assert adapter.state is BreakerState.OPEN
    ran: list[bool] = []

    async def tracked() -> None:
        ran.append(True)

    with pytest.raises(CircuitOpenError) as info:
        await adapter.call(tracked)
    assert ran == []
    assert info.value.name == "legacy"
    assert info.value.retry_after is not None
    assert 29.0 < info.value.retry_after <= 30.0
    assert isinstance(info.value.__cause__, aiobreaker.CircuitBreakerError)


async def test_async_with_guards_a_block() -> None:
    """`async with adapter:` counts failures, passes successes and rejects when open."""
    breaker, adapter = make()
    async with adapter:
        pass
    for _ in range(2):
        with pytest.raises(Boom):
            async with adapter:
                raise Boom
    with pytest.raises(CircuitOpenError):
        async with adapter:
            pass  # pragma: no cover - never runs
    assert breaker.fail_counter == 2
    assert adapter._blocks == {}


async def test_half_open_trial_success_closes_and_failure_reopens() -> None:
    """After aiobreaker's timeout a trial runs: success closes, failure re-opens."""
    breaker, adapter = make(fail_max=1)
    with pytest.raises(Boom):
        await adapter.call(boom)
    elapse_timeout(breaker)
    assert adapter.state is BreakerState.HALF_OPEN
    assert (await adapter.status()).retry_after == 0.0
    with pytest.raises(Boom):
        async with adapter:
            raise Boom
    assert adapter.state is BreakerState.OPEN
    elapse_timeout(breaker)
    assert await adapter.call(ok) == "ok"
    assert adapter.state is BreakerState.CLOSED


async def test_excluded_errors_count_as_success() -> None:
    """The wrapped breaker's exclude list applies: excluded errors propagate and do not count."""
    _, adapter = make(fail_max=1, exclude=[BusinessError])

    async def business() -> None:
        raise BusinessError

    with pytest.raises(BusinessError):
        await adapter.call(business)
    assert adapter.state is BreakerState.CLOSED
    with capture_events() as events, pytest.raises(BusinessError):
        async with adapter:
            raise BusinessError
    assert events[0].metadata["outcome"] == "success"


async def test_listeners_are_still_called() -> None:
    """The wrapped breaker's listeners see before_call, success, failure and state changes."""
    recorder = Recorder()
    _, adapter = make(fail_max=1, listeners=[recorder])
    await adapter.call(ok)
    with pytest.raises(Boom):
        async with adapter:
            raise Boom
    assert recorder.events == ["before_call", "success", "before_call", "failure:Boom", "state:OPEN"]


async def test_cancellation_is_neither_success_nor_failure() -> None:
    """A cancelled call changes no counter."""
    breaker, adapter = make(fail_max=1)
    recorder = Recorder()
    breaker.add_listener(recorder)
    with anyio.move_on_after(0):
        await adapter.call(anyio.sleep_forever)
    with anyio.move_on_after(0):
        async with adapter:
            await anyio.sleep_forever()
    assert recorder.events == ["before_call", "before_call"]
    assert breaker.fail_counter == 0
    assert adapter._blocks == {}


async def test_telemetry_and_logs() -> None:
    """The adapter emits fuse_installed, call_executed, call_rejected and state_changed."""
    clock = FakeClock()
    with capture_events() as events:
        breaker = aiobreaker.CircuitBreaker(fail_max=1, timeout_duration=timedelta(seconds=30))
        adapter = AiobreakerAdapter(breaker, name="legacy", clock=clock)

        async def slow_failure() -> None:
            clock.advance(0.5)
            raise Boom

        with pytest.raises(Boom):
            await adapter.call(slow_failure)
        with pytest.raises(CircuitOpenError):
            await adapter.call(ok)
        elapse_timeout(breaker)
        async with adapter:
            clock.advance(0.25)
    names = [e.name for e in events]
    assert names == [
        "fuse_installed",
        "state_changed",
        "call_executed",
        "call_rejected",
        "state_changed",
        "state_changed",
        "call_executed",
    ]
    assert events[0].metadata["engine"] == "aiobreaker"
    assert events[1].metadata == {"name": "legacy", "from": "closed", "to": "open"}
    assert events[2].measurements == {"duration": 0.5}
    assert events[2].metadata["success"] is False
    assert events[4].metadata["to"] == "half_open"
    assert events[6].measurements == {"duration": 0.25}
    assert events[6].metadata["trial"] is True


async def test_status_reset_trip_repr() -> None:
    """status() maps aiobreaker's counters; reset() and trip() drive the wrapped breaker."""
    breaker, adapter = make(fail_max=3)
    with pytest.raises(Boom):
        await adapter.call(boom)
    status = await adapter.status()
    assert (status.state, status.failure_count, status.failure_threshold) == (BreakerState.CLOSED, 1, 3)
    assert (status.recovery_time, status.window, status.half_open_max_calls) == (30.0, None, None)
    assert status.to_dict()["window"] is None
    assert repr(adapter) == "<AiobreakerAdapter 'legacy' state=closed failures=1/3>"
    await adapter.trip()
    assert breaker.current_state is aiobreaker.CircuitBreakerState.OPEN
    assert 29.0 < (await adapter.status()).retry_after <= 30.0
    await adapter.reset()
    assert adapter.state is BreakerState.CLOSED
    assert breaker.fail_counter == 0


async def test_decorator_and_detach() -> None:
    """@adapter guards an async function; detach() removes the adapter's listener."""
    breaker, adapter = make(fail_max=1)

    @adapter
    async def fetch(user: int) -> str:
        """Fetch."""
        return f"user-{user}"

    assert fetch.__name__ == "fetch"
    assert await fetch(3) == "user-3"
    with pytest.raises(TypeError, match="async functions"):
        adapter(lambda: None)  # type: ignore[arg-type,return-value]
    assert len(breaker.listeners) == 1
    adapter.detach()
    adapter.detach()
    assert breaker.listeners == ()


async def test_unknown_opened_at_gives_no_retry_after() -> None:
    """With no recorded opening time retry_after is None rather than a guess."""
    breaker, adapter = make()
    breaker._state_storage.opened_at = None
    assert adapter._retry_after() is None


@pytest.fixture
def non_utc_timezone() -> Iterator[None]:
    if not hasattr(time, "tzset"):  # pragma: no cover - Windows has no tzset
        pytest.skip("time.tzset is not available")
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Kolkata"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


async def test_retry_after_right_off_utc_where_aiobreakers_own_is_not(non_utc_timezone: None) -> None:
    """Off UTC the adapter's retry_after is right; aiobreaker's own reopen time is lost."""
    _, adapter = make(fail_max=1)
    with pytest.raises(Boom):
        await adapter.call(boom)
    with pytest.raises(CircuitOpenError) as info:
        await adapter.call(ok)
    assert info.value.retry_after is not None
    assert 29.0 < info.value.retry_after <= 30.0
    cause = info.value.__cause__
    assert isinstance(cause, aiobreaker.CircuitBreakerError)
    # The defect that made seawall build its own engine: comparing its UTC
    # opening time with local time, aiobreaker believes the timeout passed
    # hours ago in Kolkata and cannot say when the breaker re-closes.
    assert cause.reopen_time is None


async def test_nested_blocks_in_one_task() -> None:
    """Nested `async with` blocks of one adapter in one task each settle their own call."""
    breaker, adapter = make(fail_max=3)

    async def nested() -> None:
        async with adapter:
            async with adapter:
                pass
            raise Boom

    with pytest.raises(Boom):
        await nested()
    assert breaker.fail_counter == 1
    assert adapter._blocks == {}
