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
    assert adapter._calls == {}


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
    assert adapter._calls == {}


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


async def test_open_storage_without_opened_at_is_reported_as_aiobreaker_treats_it() -> None:
    """OPEN storage with no opening time admits the next call in aiobreaker, so the adapter says HALF_OPEN."""
    breaker, adapter = make()
    breaker._state_storage.state = aiobreaker.CircuitBreakerState.OPEN
    breaker._state_storage.opened_at = None
    assert adapter.state is BreakerState.HALF_OPEN
    status = await adapter.status()
    assert (status.state, status.retry_after) == (BreakerState.HALF_OPEN, 0.0)
    assert await adapter.call(ok) == "ok"  # admitted, as aiobreaker admits it
    assert adapter.state is BreakerState.CLOSED


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
    """Nested `async with` blocks of one adapter in one task are one call: the outer block settles it."""
    breaker, adapter = make(fail_max=3)

    async def nested() -> None:
        async with adapter:
            async with adapter:
                pass
            raise Boom

    with pytest.raises(Boom):
        await nested()
    assert breaker.fail_counter == 1
    assert adapter._calls == {}


# -- one call, one count -------------------------------------------------------------


def guarded_pair(fail_max: int = 3) -> tuple[Any, AiobreakerAdapter, Any, Any]:
    """An adapted breaker, and a failing function decorated by aiobreaker and one decorated by the adapter."""
    breaker, adapter = make(fail_max=fail_max)

    @breaker  # type: ignore[misc]
    async def by_aiobreaker() -> None:
        raise Boom("down")

    @adapter
    async def by_adapter() -> None:
        raise Boom("down")

    return breaker, adapter, by_aiobreaker, by_adapter


@pytest.mark.parametrize("decorated_by", ["aiobreaker", "adapter"])
async def test_decorated_function_through_the_adapter_counts_once(decorated_by: str) -> None:
    """As aiobreaker's test_double_count, through the adapter: call() and async with count a decorated failure once."""
    breaker, adapter, by_aiobreaker, by_adapter = guarded_pair()
    fn = by_aiobreaker if decorated_by == "aiobreaker" else by_adapter
    with pytest.raises(Boom):
        await adapter.call(fn)
    assert breaker.fail_counter == 1
    with pytest.raises(Boom):
        async with adapter:
            await fn()
    assert breaker.fail_counter == 2
    assert adapter._calls == {}


@pytest.mark.parametrize("decorated_by", ["aiobreaker", "adapter"])
async def test_decorated_function_through_the_coordinator_counts_once(decorated_by: str) -> None:
    """infra.circuit_breaker.execute and execute_protected count a decorated failure once."""
    from seawall import AsyncInfrastructure

    breaker, _, by_aiobreaker, _ = guarded_pair()
    async with AsyncInfrastructure() as infra:
        adapter = infra.circuit_breaker.register("legacy", breaker)
        fn = by_aiobreaker
        if decorated_by == "adapter":
            assert isinstance(adapter, AiobreakerAdapter)

            @adapter
            async def fn() -> None:
                raise Boom("down")

        with pytest.raises(Boom):
            await infra.circuit_breaker.execute("legacy", fn)
        assert breaker.fail_counter == 1
        with pytest.raises(Boom):
            await infra.execute_protected("calls", fn, circuit_breaker="legacy")
        assert breaker.fail_counter == 2


async def test_decorated_function_closes_a_half_open_breaker_through_the_adapter() -> None:
    """Past its timeout, adapter.call() of an aiobreaker-decorated success closes the breaker once."""
    breaker, adapter = make(fail_max=1)
    recorder = Recorder()
    breaker.add_listener(recorder)

    @breaker  # type: ignore[misc]
    async def fetch() -> str:
        return "ok"

    with pytest.raises(Boom):
        await adapter.call(boom)
    elapse_timeout(breaker)
    recorder.events.clear()
    assert await adapter.call(fetch) == "ok"
    assert adapter.state is BreakerState.CLOSED
    assert recorder.events.count("state:CLOSED") == 1  # closed by aiobreaker's layer, not again by the adapter


async def test_wrapped_breakers_own_rejection_inside_a_call_is_no_failure() -> None:
    """An aiobreaker CircuitBreakerError raised inside an adapter call is the breaker's verdict, not a failure."""
    breaker, adapter = make(fail_max=2)

    async def tripped_meanwhile() -> None:
        breaker.open()  # another caller opened it while this call ran
        await breaker.call_async(ok)  # aiobreaker's own layer rejects

    with pytest.raises(aiobreaker.CircuitBreakerError):
        await adapter.call(tripped_meanwhile)
    assert breaker.fail_counter == 0
