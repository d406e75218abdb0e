"""CircuitBreaker: the state machine, its three call forms, telemetry, and the aiobreaker defects it avoids."""

from __future__ import annotations

import gc
import inspect
import logging
import math
import os
import pickle
import random
import time
import tracemalloc
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import anyio
import pytest

from seawall import (
    BreakerState,
    BreakerStatus,
    CircuitBreaker,
    CircuitOpenError,
    ConfigurationError,
    ConfigurationTypeError,
    FakeClock,
    telemetry,
)
from seawall._breaker import BreakerLike, _open_error, guarded_by
from seawall.backends._breaker_memory import MemoryBreakerBackend
from seawall.backends._breaker_protocol import (
    Admission,
    BreakerBackend,
    BreakerPolicy,
    BreakerSnapshot,
    Outcome,
    Ticket,
    Transition,
)
from seawall.testing import capture_events

pytestmark = pytest.mark.anyio


class Boom(Exception):
    """A dependency failure."""


class BusinessError(Exception):
    """An error the dependency answered with; not a failure."""


class Interrupt(BaseException):
    """A BaseException that is not cancellation."""


async def ok(value: Any = "ok") -> Any:
    return value


async def boom() -> None:
    raise Boom


def make(clock: FakeClock, **options: Any) -> CircuitBreaker:
    options.setdefault("failure_threshold", 3)
    options.setdefault("window", 10.0)
    options.setdefault("recovery_time", 5.0)
    return CircuitBreaker("svc", clock=clock, **options)


async def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(Boom):
            await breaker.call(boom)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


# -- closed ------------------------------------------------------------------


async def test_closed_call_returns_result_and_passes_arguments(clock: FakeClock) -> None:
    """call() forwards positional and keyword arguments and returns the result."""
    breaker = make(clock)

    async def add(a: int, b: int, *, scale: int = 1) -> int:
        return (a + b) * scale

    assert await breaker.call(add, 1, 2, scale=3) == 9
    assert breaker.state is BreakerState.CLOSED


async def test_threshold_failures_within_window_open(clock: FakeClock) -> None:
    """failure_threshold failures within window open the breaker; fewer do not."""
    breaker = make(clock)
    await fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    clock.advance(1)
    await fail(breaker)
    assert breaker.state is BreakerState.OPEN


async def test_threshold_one_opens_on_first_failure(clock: FakeClock) -> None:
    """failure_threshold=1 opens on the very first failure."""
    breaker = make(clock, failure_threshold=1)
    await fail(breaker)
    assert breaker.state is BreakerState.OPEN


async def test_successes_do_not_erase_failures(clock: FakeClock) -> None:
    """Interleaved successes do not reset the count (aiobreaker counts consecutive failures only)."""
    breaker = make(clock)
    for _ in range(2):
        await fail(breaker)
        assert await breaker.call(ok) == "ok"
        clock.advance(1)
    await fail(breaker)
    assert breaker.state is BreakerState.OPEN


async def test_failures_older_than_window_do_not_count(clock: FakeClock) -> None:
    """A failure leaves the rolling window after window seconds."""
    breaker = make(clock)
    await fail(breaker, 2)
    clock.advance(10.0)
    await fail(breaker)
    assert breaker.state is BreakerState.CLOSED
    assert (await breaker.status()).failure_count == 1


async def test_excluded_errors_are_not_failures(clock: FakeClock) -> None:
    """An excluded exception propagates unchanged and does not count."""
    breaker = make(clock, failure_threshold=1, exclude=(BusinessError,))

    async def business() -> None:
        raise BusinessError("no such user")

    for _ in range(3):
        with pytest.raises(BusinessError, match="no such user"):
            await breaker.call(business)
        with pytest.raises(BusinessError):
            async with breaker:
                raise BusinessError
    assert breaker.state is BreakerState.CLOSED


async def test_user_exception_propagates_unchanged(clock: FakeClock) -> None:
    """The exception that trips the breaker is the caller's own, not a breaker error."""
    breaker = make(clock, failure_threshold=1)
    error = Boom("down")

    async def raiser() -> None:
        raise error

    with pytest.raises(Boom) as info:
        await breaker.call(raiser)
    assert info.value is error


async def test_async_with_counts_failures_and_passes_success(clock: FakeClock) -> None:
    """`async with breaker:` counts a raising block as a failure and lets a clean one pass."""
    breaker = make(clock, failure_threshold=2)
    async with breaker:
        pass
    for _ in range(2):
        with pytest.raises(Boom):
            async with breaker:
                raise Boom
    assert breaker.state is BreakerState.OPEN


# -- open --------------------------------------------------------------------


@pytest.mark.parametrize("form", ["call", "with", "decorator"])
async def test_open_rejects_without_running(clock: FakeClock, form: str) -> None:
    """OPEN rejects every form at once with CircuitOpenError(name, retry_after); the code never runs."""
    breaker = make(clock, failure_threshold=1)
    await fail(breaker)
    clock.advance(2.0)
    ran: list[bool] = []

    @breaker
    async def guarded() -> None:
        ran.append(True)

    async def attempt() -> None:
        if form == "call":
            await breaker.call(guarded.__wrapped__)  # type: ignore[attr-defined]
        elif form == "with":
            async with breaker:
                ran.append(True)
        else:
            await guarded()

    with pytest.raises(CircuitOpenError) as info:
        await attempt()
    assert ran == []
    assert info.value.name == "svc"
    assert info.value.retry_after == pytest.approx(3.0)
    assert info.value.error_type == "circuit_breaker_blown"


async def test_open_becomes_half_open_after_recovery_time(clock: FakeClock) -> None:
    """The state reads HALF_OPEN once recovery_time has passed since opening."""
    breaker = make(clock, failure_threshold=1)
    await fail(breaker)
    clock.advance(4.999)
    assert breaker.state is BreakerState.OPEN
    clock.advance(0.001)
    assert breaker.state is BreakerState.HALF_OPEN


# -- half-open ---------------------------------------------------------------


async def test_trial_success_closes_and_clears_failures(clock: FakeClock) -> None:
    """A successful trial closes the breaker and forgets the failures."""
    breaker = make(clock)
    await fail(breaker, 3)
    clock.advance(5.0)
    assert await breaker.call(ok) == "ok"
    status = await breaker.status()
    assert status.state is BreakerState.CLOSED
    assert status.failure_count == 0


async def test_trial_failure_reopens_for_fresh_recovery_time(clock: FakeClock) -> None:
    """A failed trial re-opens the breaker with a full recovery_time."""
    breaker = make(clock, failure_threshold=1)
    await fail(breaker)
    clock.advance(7.0)
    await fail(breaker)
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpenError) as info:
        await breaker.call(ok)
    assert info.value.retry_after == pytest.approx(5.0)


async def test_excluded_error_in_trial_closes(clock: FakeClock) -> None:
    """An excluded exception in a trial counts as success: the dependency answered."""
    breaker = make(clock, failure_threshold=1, exclude=BusinessError)
    await fail(breaker)
    clock.advance(5.0)
    with pytest.raises(BusinessError):
        async with breaker:
            raise BusinessError
    assert breaker.state is BreakerState.CLOSED


async def test_async_with_trial_success_closes(clock: FakeClock) -> None:
    """A trial run as an `async with` block closes the breaker on success."""
    breaker = make(clock, failure_threshold=1)
    await fail(breaker)
    clock.advance(5.0)
    async with breaker:
        assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize("max_calls", [1, 3])
@pytest.mark.parametrize("form", ["call", "with"])
async def test_no_stampede_on_recovery(clock: FakeClock, max_calls: int, form: str) -> None:
    """50 concurrent calls after recovery: exactly half_open_max_calls reach the function."""
    breaker = make(clock, failure_threshold=1, half_open_max_calls=max_calls)
    await fail(breaker)
    clock.advance(5.0)
    reached = 0
    rejected = 0
    release = anyio.Event()

    async def slow() -> None:
        nonlocal reached
        reached += 1
        await release.wait()

    async def one() -> None:
        nonlocal rejected
        try:
            if form == "call":
                await breaker.call(slow)
            else:
                async with breaker:
                    await slow()
        except CircuitOpenError:
            rejected += 1

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(one)
        await anyio.wait_all_tasks_blocked()
        assert reached == max_calls
        assert rejected == 50 - max_calls
        assert (await breaker.status()).trials_in_flight == max_calls
        release.set()
    assert breaker.state is BreakerState.CLOSED


async def test_rejected_while_trials_full_reports_when_a_slot_frees(clock: FakeClock) -> None:
    """A call rejected because the trial slots are taken gets retry_after up to the hung-trial limit."""
    breaker = make(clock, failure_threshold=1)
    await fail(breaker)
    clock.advance(5.0)
    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(breaker.call, release.wait)
        await anyio.wait_all_tasks_blocked()
        clock.advance(2.0)
        with pytest.raises(CircuitOpenError) as info:
            await breaker.call(ok)
        assert info.value.retry_after == pytest.approx(3.0)
        assert (await breaker.status()).retry_after == pytest.approx(3.0)
        release.set()


async def test_hung_trial_stops_blocking_after_recovery_time(clock: FakeClock) -> None:
    """A trial holding its slot for recovery_time no longer blocks a new trial (no stuck HALF_OPEN)."""
    breaker = make(clock, failure_threshold=1)
    await fail(breaker)
    clock.advance(5.0)
    hung = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(breaker.call, hung.wait)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(CircuitOpenError):
            await breaker.call(ok)
        clock.advance(4.9)
        assert (await breaker.status()).trials_in_flight == 1
        clock.advance(0.1)
        assert (await breaker.status()).trials_in_flight == 0
        assert await breaker.call(ok) == "ok"
        assert breaker.state is BreakerState.CLOSED
        hung.set()
    # The hung trial belonged to an older episode: its late end changes nothing.
    assert breaker.state is BreakerState.CLOSED


async def test_late_result_of_expired_trial_still_decides_its_episode(clock: FakeClock) -> None:
    """A trial past the hung limit that finally fails, while its episode lasts, re-opens the breaker."""
    breaker = make(clock, failure_threshold=1, half_open_max_calls=1)
    await fail(breaker)
    clock.advance(5.0)
    go = anyio.Event()

    async def late_failure() -> None:
        await go.wait()
        raise Boom

    async with anyio.create_task_group() as tg:

        async def trial() -> None:
            with pytest.raises(Boom):
                await breaker.call(late_failure)

        tg.start_soon(trial)
        await anyio.wait_all_tasks_blocked()
        clock.advance(6.0)
        go.set()
    assert breaker.state is BreakerState.OPEN


# -- cancellation and BaseException -------------------------------------------


@pytest.mark.parametrize("form", ["call", "with"])
async def test_cancelled_trial_frees_its_slot(clock: FakeClock, form: str) -> None:
    """A cancelled trial is neither success nor failure and frees its slot."""
    breaker = make(clock, failure_threshold=1)
    await fail(breaker)
    clock.advance(5.0)

    async def trial() -> None:
        if form == "call":
            await breaker.call(anyio.sleep_forever)
        else:
            async with breaker:
                await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(trial)
        await anyio.wait_all_tasks_blocked()
        assert (await breaker.status()).trials_in_flight == 1
        tg.cancel_scope.cancel()
    status = await breaker.status()
    assert status.state is BreakerState.HALF_OPEN
    assert status.trials_in_flight == 0
    assert await breaker.call(ok) == "ok"
    assert breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize("form", ["call", "with"])
async def test_cancelled_closed_call_is_not_a_failure(clock: FakeClock, form: str) -> None:
    """Cancelling calls in the closed state never counts towards opening."""
    breaker = make(clock, failure_threshold=1)
    with anyio.move_on_after(0):  # real time, but only to cancel at the first checkpoint
        if form == "call":
            await breaker.call(anyio.sleep_forever)
        else:
            async with breaker:
                await anyio.sleep_forever()
    assert breaker.state is BreakerState.CLOSED
    assert (await breaker.status()).failure_count == 0


@pytest.mark.parametrize("form", ["call", "with"])
async def test_base_exception_is_neither_success_nor_failure(clock: FakeClock, form: str) -> None:
    """A BaseException in a trial frees the slot without closing or opening."""
    breaker = make(clock, failure_threshold=1)
    await fail(breaker)
    clock.advance(5.0)

    async def interrupt() -> None:
        raise Interrupt

    async def attempt() -> None:
        if form == "call":
            await breaker.call(interrupt)
        else:
            async with breaker:
                raise Interrupt

    with pytest.raises(Interrupt):
        await attempt()
    status = await breaker.status()
    assert status.state is BreakerState.HALF_OPEN
    assert status.trials_in_flight == 0
    with pytest.raises(Interrupt):
        async with make(clock, failure_threshold=1):
            raise Interrupt


# -- reset, trip, stale tickets -------------------------------------------------


async def test_trip_and_reset(clock: FakeClock) -> None:
    """trip() forces OPEN for a fresh recovery_time; reset() forces CLOSED and clears failures."""
    breaker = make(clock)
    await fail(breaker, 2)
    await breaker.trip()
    assert breaker.state is BreakerState.OPEN
    clock.advance(3.0)
    await breaker.trip()  # tripping an open breaker restarts its recovery time
    assert (await breaker.status()).retry_after == pytest.approx(5.0)
    await breaker.reset()
    status = await breaker.status()
    assert (status.state, status.failure_count) == (BreakerState.CLOSED, 0)
    await fail(breaker, 2)
    await breaker.reset()  # resetting a closed breaker still forgets its failures
    assert (await breaker.status()).failure_count == 0


async def test_trial_outliving_reset_decides_nothing(clock: FakeClock) -> None:
    """A trial of an earlier episode cannot close or open the breaker after reset()/trip()."""
    breaker = make(clock, failure_threshold=1)
    await fail(breaker)
    clock.advance(5.0)
    go = anyio.Event()

    async def late_success() -> None:
        await go.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(breaker.call, late_success)
        await anyio.wait_all_tasks_blocked()
        await breaker.trip()
        go.set()
    assert breaker.state is BreakerState.OPEN


async def test_closed_call_ending_after_breaker_opened_is_ignored(clock: FakeClock) -> None:
    """A plain call that started closed and fails once the breaker is open does not count."""
    breaker = make(clock, failure_threshold=1)
    go = anyio.Event()

    async def late_failure() -> None:
        await go.wait()
        raise Boom

    async with anyio.create_task_group() as tg:

        async def slow_call() -> None:
            with pytest.raises(Boom):
                async with breaker:
                    await late_failure()

        tg.start_soon(slow_call)
        await anyio.wait_all_tasks_blocked()
        await breaker.trip()
        clock.advance(1.0)
        go.set()
    assert (await breaker.status()).retry_after == pytest.approx(4.0)


async def test_breakers_sharing_a_backend_and_name_share_state(clock: FakeClock) -> None:
    """Two breakers with one memory backend and one name see one state."""
    backend = MemoryBreakerBackend()
    first = CircuitBreaker("db", failure_threshold=1, backend=backend, clock=clock)
    second = CircuitBreaker("db", failure_threshold=1, backend=backend, clock=clock)
    other = CircuitBreaker("cache", failure_threshold=1, backend=backend, clock=clock)
    await fail(first)
    assert second.state is BreakerState.OPEN
    assert other.state is BreakerState.CLOSED
    assert "db" in repr(backend)


# -- status, repr, decorator --------------------------------------------------


async def test_status_snapshot_and_to_dict(clock: FakeClock) -> None:
    """status() reports the contract fields; to_dict() is JSON-friendly."""
    breaker = make(clock, half_open_max_calls=2)
    await fail(breaker)
    status = await breaker.status()
    assert status == BreakerStatus(
        name="svc",
        state=BreakerState.CLOSED,
        failure_count=1,
        failure_threshold=3,
        recovery_time=5.0,
        retry_after=0.0,
        window=10.0,
        half_open_max_calls=2,
        trials_in_flight=0,
    )
    assert status.to_dict()["state"] == "closed"
    assert status.to_dict()["failure_count"] == 1
    with pytest.raises(AttributeError):
        status.state = BreakerState.OPEN  # type: ignore[misc]
    await breaker.trip()
    clock.advance(1.0)
    assert (await breaker.status()).retry_after == pytest.approx(4.0)


async def test_repr_shows_state_and_counts(clock: FakeClock) -> None:
    """The repr names the breaker and shows state, failures and trials."""
    breaker = make(clock)
    await fail(breaker)
    assert repr(breaker) == "<CircuitBreaker 'svc' state=closed failures=1/3 trials=0/1>"
    assert "BreakerRecord(state='closed'" in repr(breaker._record)


async def test_decorator_keeps_metadata_and_guards(clock: FakeClock) -> None:
    """@breaker keeps the function's name and signature and routes calls through the breaker."""
    breaker = make(clock, failure_threshold=1)

    @breaker
    async def fetch(user_id: int, *, fresh: bool = False) -> str:
        """Fetch a user."""
        if fresh:
            raise Boom
        return f"user-{user_id}"

    assert fetch.__name__ == "fetch"
    assert fetch.__doc__ == "Fetch a user."
    assert list(inspect.signature(fetch).parameters) == ["user_id", "fresh"]
    assert await fetch(7) == "user-7"
    with pytest.raises(Boom):
        await fetch(7, fresh=True)
    with pytest.raises(CircuitOpenError):
        await fetch(7)


async def test_decorator_excluded_errors_do_not_count(clock: FakeClock) -> None:
    """@breaker lets excluded errors through without counting them."""
    breaker = make(clock, failure_threshold=1, exclude=(BusinessError,))

    @breaker
    async def business() -> None:
        raise BusinessError

    for _ in range(3):
        with pytest.raises(BusinessError):
            await business()
    assert (await breaker.status()).failure_count == 0


def test_decorator_rejects_sync_functions() -> None:
    """@breaker on a plain function fails at decoration time."""
    breaker = CircuitBreaker("svc")
    with pytest.raises(TypeError, match="async functions"):
        breaker(lambda: None)  # type: ignore[arg-type,return-value]


def test_configuration_is_read_only() -> None:
    """The name and the policy cannot be changed after construction."""
    breaker = CircuitBreaker("svc")
    with pytest.raises(AttributeError):
        breaker.name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        breaker.half_open_max_calls = 5  # type: ignore[misc]


async def test_failing_trials_keep_failure_memory_bounded(clock: FakeClock) -> None:
    """Trials failing for a long time keep only the failures within the window."""
    breaker = make(clock, failure_threshold=1, window=10.0, recovery_time=5.0)
    await fail(breaker)
    for _ in range(100):
        clock.advance(5.0)
        await fail(breaker)
    assert breaker._record is not None
    assert len(breaker._record.failures) == 2  # the trial failures of the last 10 s
    assert (await breaker.status()).failure_count == 2


def test_properties_and_protocol() -> None:
    """The configuration is readable and the breaker satisfies BreakerLike."""
    breaker = CircuitBreaker(
        "svc", failure_threshold=2, window=timedelta(seconds=30), recovery_time=timedelta(minutes=1), exclude=[KeyError]
    )
    assert (breaker.failure_threshold, breaker.window, breaker.recovery_time) == (2, 30.0, 60.0)
    assert breaker.half_open_max_calls == 1
    assert breaker.exclude == (KeyError,)
    assert isinstance(breaker.backend, MemoryBreakerBackend)
    assert isinstance(breaker, BreakerLike)


# -- validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"failure_threshold": 0}, ConfigurationError, "failure_threshold: must be at least 1, got 0"),
        ({"failure_threshold": 2.5}, ConfigurationTypeError, "failure_threshold: expected an integer"),
        ({"failure_threshold": True}, ConfigurationTypeError, "failure_threshold"),
        ({"window": 0}, ConfigurationError, "window: must be a number of seconds above 0"),
        ({"window": -1.0}, ValueError, "window"),
        ({"window": math.inf}, ValueError, "window"),
        ({"window": math.nan}, ValueError, "window"),
        ({"window": 10**400}, ConfigurationError, "window"),
        ({"recovery_time": 1e10}, ConfigurationError, "recovery_time: .* at most 1e\\+09"),
        ({"failure_threshold": 10**400}, ConfigurationError, "failure_threshold: must be at most"),
        ({"window": "60"}, ConfigurationTypeError, "window: expected a number of seconds"),
        ({"recovery_time": 0.0}, ValueError, "recovery_time"),
        ({"recovery_time": timedelta(0)}, ValueError, "recovery_time"),
        ({"half_open_max_calls": 0}, ConfigurationError, "half_open_max_calls: must be at least 1"),
        ({"exclude": (ValueError, "nope")}, TypeError, "exclude: must hold Exception subclasses only, got 'nope'"),
        ({"exclude": (int,)}, ConfigurationTypeError, "exclude: must hold Exception subclasses"),
        ({"exclude": (KeyboardInterrupt,)}, ConfigurationTypeError, "exclude: must hold Exception subclasses"),
        ({"exclude": 3}, ConfigurationTypeError, "exclude: expected an exception class or a tuple"),
        ({"exclude": "ValueError"}, ConfigurationTypeError, "exclude: expected"),
        ({"clock": object()}, ConfigurationTypeError, "clock must provide"),
        ({"backend": object()}, ConfigurationTypeError, "backend must implement BreakerBackend"),
    ],
)
def test_bad_configuration_fails_at_construction(options: dict[str, Any], error: type[Exception], match: str) -> None:
    """Bad input fails in __init__ with a message naming the parameter and the value."""
    with pytest.raises(error, match=match):
        CircuitBreaker("svc", **options)


def test_value_errors_are_configuration_errors_with_path() -> None:
    """Out-of-range numbers raise ConfigurationError whose path names the parameter."""
    with pytest.raises(ConfigurationError) as info:
        CircuitBreaker("svc", recovery_time=-5)
    assert info.value.path == "recovery_time"


@pytest.mark.parametrize("name", ["", None, 3])
def test_name_must_be_non_empty_str(name: Any) -> None:
    """The name is a non-empty str."""
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        CircuitBreaker(name)


# -- telemetry and logging -------------------------------------------------------


async def test_fuse_installed_emitted_on_construction(clock: FakeClock) -> None:
    """Constructing a breaker emits fuse_installed with its policy."""
    with capture_events() as events:
        make(clock)
    assert [e.name for e in events] == ["fuse_installed"]
    assert events[0].metadata == {
        "name": "svc",
        "failure_threshold": 3,
        "window": 10.0,
        "recovery_time": 5.0,
        "half_open_max_calls": 1,
    }


@pytest.mark.parametrize("form", ["call", "with"])
async def test_call_executed_rejected_and_state_changed_events(clock: FakeClock, form: str) -> None:
    """Each run call emits call_executed (duration, success), rejections call_rejected, changes state_changed."""
    breaker = make(clock, failure_threshold=1)

    async def timed(seconds: float, error: bool) -> None:
        clock.advance(seconds)
        if error:
            raise Boom

    async def run(seconds: float, error: bool = False) -> None:
        if form == "call":
            await breaker.call(timed, seconds, error)
        else:
            async with breaker:
                await timed(seconds, error)

    with capture_events() as events:
        await run(0.25)
        with pytest.raises(Boom):
            await run(0.5, error=True)
        with pytest.raises(CircuitOpenError):
            await run(0)
        clock.advance(5.0)
        await run(1.0)
    summary = [(e.name, e.measurements, e.metadata) for e in events]
    assert summary == [
        ("call_executed", {"duration": 0.25}, {"name": "svc", "success": True, "outcome": "success", "trial": False}),
        ("state_changed", {}, {"name": "svc", "from": "closed", "to": "open"}),
        ("call_executed", {"duration": 0.5}, {"name": "svc", "success": False, "outcome": "failure", "trial": False}),
        ("call_rejected", {"retry_after": 5.0}, {"name": "svc", "state": "open"}),
        ("state_changed", {}, {"name": "svc", "from": "open", "to": "half_open"}),
        ("state_changed", {}, {"name": "svc", "from": "half_open", "to": "closed"}),
        ("call_executed", {"duration": 1.0}, {"name": "svc", "success": True, "outcome": "success", "trial": True}),
    ]


async def test_rejection_with_full_trial_slots_is_reported(clock: FakeClock) -> None:
    """A half-open rejection emits call_rejected with state half_open; a cancelled call reports success None."""
    breaker = make(clock, failure_threshold=1)
    await fail(breaker)
    clock.advance(5.0)
    with capture_events() as events:
        async with anyio.create_task_group() as tg:
            tg.start_soon(breaker.call, anyio.sleep_forever)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(CircuitOpenError):
                await breaker.call(ok)
            tg.cancel_scope.cancel()
    rejected = [e for e in events if e.name == "call_rejected"]
    assert rejected[0].metadata == {"name": "svc", "state": "half_open"}
    executed = [e for e in events if e.name == "call_executed"]
    assert executed[0].metadata["success"] is None
    assert executed[0].metadata["outcome"] == "cancelled"


async def test_nested_blocks_in_one_task_keep_their_own_bookkeeping(clock: FakeClock) -> None:
    """Nested `async with` of one breaker in one task report one call_executed each."""
    breaker = make(clock)
    with capture_events() as events:
        async with breaker:
            clock.advance(1.0)
            async with breaker:
                clock.advance(2.0)
    durations = [e.measurements["duration"] for e in events if e.name == "call_executed"]
    assert durations == [2.0, 3.0]
    assert breaker._inflight == {}


async def test_state_changes_are_logged(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """Opening logs a warning; half-opening and closing log at info."""
    caplog.set_level(logging.INFO, logger="seawall")
    breaker = make(clock, failure_threshold=1)
    await fail(breaker)
    clock.advance(5.0)
    await breaker.call(ok)
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "seawall"]
    assert records[0][0] == logging.WARNING
    assert "circuit_breaker_opened" in records[0][1]
    assert "name='svc'" in records[0][1]
    assert [level for level, _ in records[1:]] == [logging.INFO, logging.INFO]
    assert "circuit_breaker_half_open" in records[1][1]
    assert "circuit_breaker_closed" in records[2][1]


# -- the rejection error, time zones, memory -------------------------------------


def test_fast_rejection_error_equals_constructed_one() -> None:
    """The fast-built CircuitOpenError matches the constructor's in every respect users see."""
    fast = _open_error("svc", 1.5)
    slow = CircuitOpenError(name="svc", retry_after=1.5)
    assert type(fast) is type(slow)
    assert vars(fast) == vars(slow)
    assert fast.to_dict() == slow.to_dict()
    assert (repr(fast), str(fast), fast.args) == (repr(slow), str(slow), slow.args)
    assert pickle.loads(pickle.dumps(fast)).to_dict() == slow.to_dict()


@pytest.fixture
def non_utc_timezone() -> Iterator[str]:
    if not hasattr(time, "tzset"):  # pragma: no cover - Windows has no tzset
        pytest.skip("time.tzset is not available")
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    try:
        yield "America/New_York"
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


async def test_retry_after_is_right_off_utc(non_utc_timezone: str) -> None:
    """With TZ off UTC and the real monotonic clock, retry_after is the remaining recovery time."""
    assert time.localtime().tm_gmtoff != 0
    breaker = CircuitBreaker("svc", failure_threshold=1, recovery_time=30.0)
    await fail(breaker)
    with pytest.raises(CircuitOpenError) as info:
        await breaker.call(ok)
    assert info.value.retry_after is not None
    assert 29.0 < info.value.retry_after <= 30.0
    assert 29.0 < (await breaker.status()).retry_after <= 30.0


async def test_rejections_retain_no_memory(clock: FakeClock) -> None:
    """100,000-style rejection storms keep memory flat: each error is fresh and dropped."""
    breaker = make(clock, failure_threshold=1)
    await fail(breaker)

    async def reject(times: int) -> None:
        for _ in range(times):
            try:
                async with breaker:
                    pass  # pragma: no cover - never runs
            except CircuitOpenError:
                pass
            try:
                await breaker.call(ok)
            except CircuitOpenError:
                pass

    await reject(200)  # warm caches first
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await reject(5000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 8_000


# -- a backend known only through the protocol -------------------------------------


class ProtocolOnlyBackend:
    """Delegates to the memory store but is known to the breaker only as a BreakerBackend."""

    def __init__(self) -> None:
        self.inner = MemoryBreakerBackend()
        self.calls: list[str] = []

    async def breaker_admit(self, name: str, policy: BreakerPolicy, now: float) -> Admission:
        self.calls.append("admit")
        await anyio.lowlevel.checkpoint()
        return await self.inner.breaker_admit(name, policy, now)

    async def breaker_settle(
        self, name: str, policy: BreakerPolicy, now: float, ticket: Ticket | None, outcome: Outcome
    ) -> Transition | None:
        self.calls.append(f"settle:{outcome}")
        await anyio.lowlevel.checkpoint()
        return await self.inner.breaker_settle(name, policy, now, ticket, outcome)

    async def breaker_force(
        self, name: str, policy: BreakerPolicy, now: float, state: BreakerState
    ) -> Transition | None:
        return await self.inner.breaker_force(name, policy, now, state)

    async def breaker_snapshot(self, name: str, policy: BreakerPolicy, now: float) -> BreakerSnapshot:
        return await self.inner.breaker_snapshot(name, policy, now)

    def __repr__(self) -> str:
        return "ProtocolOnlyBackend()"


async def test_protocol_backend_drives_the_same_state_machine(clock: FakeClock) -> None:
    """A backend known only by the protocol sees every admit/settle; cancelled trials still settle."""
    backend = ProtocolOnlyBackend()
    assert isinstance(backend, BreakerBackend)
    breaker = CircuitBreaker("remote", failure_threshold=2, recovery_time=5.0, backend=backend, clock=clock)
    assert breaker._record is None
    assert await breaker.call(ok) == "ok"
    async with breaker:
        pass
    with pytest.raises(Boom):
        async with breaker:
            raise Boom
    await fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert repr(breaker) == "<CircuitBreaker 'remote' state=open backend=ProtocolOnlyBackend()>"
    with pytest.raises(CircuitOpenError) as info:
        async with breaker:
            pass  # pragma: no cover - never runs
    assert info.value.retry_after == pytest.approx(5.0)
    clock.advance(5.0)
    for form in ("call", "with"):
        async with anyio.create_task_group() as tg:

            async def trial(form: str = form) -> None:
                if form == "call":
                    await breaker.call(anyio.sleep_forever)
                else:
                    async with breaker:
                        await anyio.sleep_forever()

            tg.start_soon(trial)
            await anyio.wait_all_tasks_blocked()
            assert (await breaker.status()).trials_in_flight == 1
            tg.cancel_scope.cancel()
        assert (await breaker.status()).trials_in_flight == 0
    assert backend.calls.count("settle:cancelled") == 2
    assert breaker.state is BreakerState.HALF_OPEN
    with capture_events() as events:
        assert await breaker.call(ok) == "ok"
    assert breaker.state is BreakerState.CLOSED
    assert [e.name for e in events] == ["state_changed", "call_executed"]
    await breaker.trip()
    assert breaker.state is BreakerState.OPEN
    await breaker.reset()
    assert (await breaker.status()).state is BreakerState.CLOSED


def test_memory_record_refuses_forcing_half_open() -> None:
    """Only CLOSED and OPEN can be forced."""
    record = MemoryBreakerBackend().record("x")
    with pytest.raises(ValueError, match="closed or open"):
        record.force(BreakerPolicy(1, 1.0, 1.0, 1), 0.0, BreakerState.HALF_OPEN)


async def test_memory_backend_async_protocol_methods() -> None:
    """MemoryBreakerBackend answers the async protocol from its records."""
    backend = MemoryBreakerBackend()
    policy = BreakerPolicy(1, 10.0, 5.0, 1)
    admission = await backend.breaker_admit("x", policy, 0.0)
    assert admission.ticket == Ticket(0, None)
    assert await backend.breaker_settle("x", policy, 1.0, admission.ticket, "failure") == Transition(
        BreakerState.CLOSED, BreakerState.OPEN
    )
    assert (await backend.breaker_snapshot("x", policy, 2.0)).retry_after == pytest.approx(4.0)
    assert await backend.breaker_force("x", policy, 3.0, BreakerState.CLOSED) is not None


async def test_handler_detached_mid_call_is_not_called(clock: FakeClock) -> None:
    """A call_executed handler detached while a call runs is not called for it."""
    breaker = make(clock)
    with capture_events() as events:
        async with breaker:
            events_seen = len(events)
            for info in telemetry.list_handlers(("seawall",)):
                telemetry.detach(info.id)
    assert events_seen == 0
    assert events == []
    assert breaker._inflight == {}


async def test_blocks_tracked_without_asyncio_tasks(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where asyncio has no current task (other anyio backends), blocks are keyed by anyio's task id."""

    def no_asyncio_task() -> None:
        raise RuntimeError("no running event loop")

    monkeypatch.setattr("seawall._breaker.asyncio.current_task", no_asyncio_task)
    breaker = make(clock, failure_threshold=1)
    await fail(breaker)
    clock.advance(5.0)
    async with breaker:
        assert list(breaker._inflight) == [anyio.get_current_task().id]
    assert breaker.state is BreakerState.CLOSED
    assert breaker._inflight == {}


async def test_fast_path_block_ending_while_another_task_is_tracked(clock: FakeClock) -> None:
    """A block that skipped bookkeeping still counts its failure while another task's block is tracked."""
    breaker = make(clock, failure_threshold=1)
    release = anyio.Event()

    async def tracked() -> None:
        async with breaker:
            await release.wait()

    with capture_events():
        async with anyio.create_task_group() as tg:
            tg.start_soon(tracked)
            await anyio.wait_all_tasks_blocked()
            assert len(breaker._inflight) == 1
            for info in telemetry.list_handlers(("seawall",)):
                telemetry.detach(info.id)
            with pytest.raises(Boom):
                async with breaker:
                    raise Boom
            assert breaker.state is BreakerState.OPEN
            release.set()
    assert breaker._inflight == {}


# -- admit_nowait / settle_nowait: the synchronous form of async with ---------


def run_nowait(breaker: CircuitBreaker, error: BaseException | None) -> float | None:
    """One call through admit_nowait/settle_nowait ending with ``error``; the rejection's retry_after, if any."""
    try:
        permit = breaker.admit_nowait()
    except CircuitOpenError as exc:
        return exc.retry_after
    breaker.settle_nowait(permit, error)
    return None


async def run_with(breaker: CircuitBreaker, error: BaseException | None) -> float | None:
    """The same call through ``async with``."""
    try:
        async with breaker:
            if error is not None:
                raise error
    except CircuitOpenError as exc:
        return exc.retry_after
    except BaseException as exc:
        if exc is not error:  # pragma: no cover - a failure of the test itself
            raise
    return None


async def test_nowait_pair_decides_exactly_as_async_with(clock: FakeClock) -> None:
    """On the same schedule of outcomes, admit/settle_nowait leave the breaker exactly where async with does."""
    sync = make(clock, exclude=BusinessError)
    wait = make(clock, exclude=BusinessError)
    rng = random.Random(11)
    states = set()
    for _ in range(300):
        error = rng.choice([None, None, Boom(), Boom(), BusinessError(), Interrupt()])
        assert run_nowait(sync, error) == await run_with(wait, error)
        mine, theirs = await sync.status(), await wait.status()
        assert mine == theirs
        states.add(mine.state)
        clock.advance(rng.choice([0.0, 0.5, 2.0, 5.0]))
    assert states == {BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN}


async def test_closed_admission_shares_one_permit_and_failures_still_count(clock: FakeClock) -> None:
    """Closed and unobserved: admit_nowait hands out one shared plain permit; a success needs no settling."""
    breaker = make(clock, exclude=BusinessError)
    permit = breaker.admit_nowait()
    assert permit.plain
    assert not permit.trial
    assert breaker.admit_nowait() is permit  # nothing allocated per call
    assert repr(permit) == "<BreakerPermit plain generation=0>"
    breaker.settle_nowait(permit)  # a no-op
    breaker.settle_nowait(permit, BusinessError())
    breaker.settle_nowait(permit, Interrupt())
    assert (await breaker.status()).failure_count == 0
    for _ in range(3):
        breaker.settle_nowait(breaker.admit_nowait(), Boom())  # shared: settled again and again
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpenError) as info:
        breaker.admit_nowait()
    assert info.value.retry_after == pytest.approx(5.0)
    assert info.value.name == "svc"


async def test_half_open_permits_hold_trial_slots_until_settled(clock: FakeClock) -> None:
    """Half-open: a permit holds a trial slot; a second is rejected; settling a success closes the breaker."""
    breaker = make(clock, failure_threshold=1)
    breaker.settle_nowait(breaker.admit_nowait(), Boom())
    clock.advance(5.0)
    permit = breaker.admit_nowait()
    assert permit is not None
    assert permit.trial
    assert repr(permit) == "<BreakerPermit trial=True open>"
    assert (await breaker.status()).trials_in_flight == 1
    with pytest.raises(CircuitOpenError):
        breaker.admit_nowait()
    breaker.settle_nowait(permit)
    assert repr(permit) == "<BreakerPermit trial=True settled>"
    assert breaker.state is BreakerState.CLOSED
    with pytest.raises(RuntimeError, match="settled already"):
        breaker.settle_nowait(permit)
    assert breaker.state is BreakerState.CLOSED


async def a_cancellation() -> BaseException:
    """A real cancellation of the running backend (trio's Cancelled has no public constructor)."""
    with anyio.CancelScope() as scope:
        scope.cancel()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class() as exc:
            caught = exc
            raise
    return caught


async def test_cancelled_trial_permit_frees_its_slot(clock: FakeClock) -> None:
    """A trial settled with a cancellation frees its slot and decides nothing."""
    breaker = make(clock, failure_threshold=1)
    breaker.settle_nowait(breaker.admit_nowait(), Boom())
    clock.advance(5.0)
    permit = breaker.admit_nowait()
    breaker.settle_nowait(permit, await a_cancellation())
    status = await breaker.status()
    assert (status.state, status.trials_in_flight) == (BreakerState.HALF_OPEN, 0)
    assert breaker.admit_nowait() is not None


async def test_observed_calls_get_a_permit_and_emit_call_executed(clock: FakeClock) -> None:
    """With a call_executed listener a closed call gets a permit, and settling it emits the event with its duration."""
    breaker = make(clock)
    with capture_events() as events:
        permit = breaker.admit_nowait()
        assert permit is not None
        assert not permit.trial
        clock.advance(0.25)
        breaker.settle_nowait(permit, Boom())
    (event,) = [e for e in events if e.name == "call_executed"]
    assert event.measurements == {"duration": 0.25}
    assert event.metadata == {"name": "svc", "success": False, "outcome": "failure", "trial": False}
    assert (await breaker.status()).failure_count == 1
    assert breaker._inflight == {}  # nothing kept per task


async def test_nowait_pair_would_block_on_a_shared_backend(clock: FakeClock) -> None:
    """With a protocol-only backend admit_nowait/settle_nowait raise WouldBlock and ask the store nothing."""
    backend = ProtocolOnlyBackend()
    breaker = CircuitBreaker("remote", backend=backend, clock=clock)
    with pytest.raises(anyio.WouldBlock):
        breaker.admit_nowait()
    with pytest.raises(anyio.WouldBlock):
        breaker.settle_nowait(None, Boom())
    breaker.settle_nowait(None)  # a closed success has nothing to tell any store
    assert backend.calls == []


# -- generations: an outcome counts only in the period it started in ----------------


async def call_in_form(breaker: CircuitBreaker, form: str, body: Any) -> Any:
    """Run ``await body()`` through ``breaker`` in one of its call forms."""
    if form == "with":
        async with breaker:
            return await body()
    if form == "decorated":
        return await breaker(body)()
    if form == "nowait":
        permit = breaker.admit_nowait()
        try:
            result = await body()
        except BaseException as exc:
            breaker.settle_nowait(permit, exc)
            raise
        breaker.settle_nowait(permit)
        return result
    return await breaker.call(body)


FORMS = ["with", "call", "decorated", "nowait"]


@pytest.mark.parametrize("form", FORMS)
async def test_call_admitted_before_an_outage_decides_nothing_after_recovery(clock: FakeClock, form: str) -> None:
    """A closed call that outlives an outage and a recovery fails without re-opening the breaker."""
    breaker = make(clock, failure_threshold=1)
    go = anyio.Event()

    async def late_failure() -> None:
        await go.wait()
        raise Boom

    async def slow() -> None:
        with pytest.raises(Boom):
            await call_in_form(breaker, form, late_failure)

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow)
        await anyio.wait_all_tasks_blocked()
        await fail(breaker)  # the outage
        clock.advance(5.0)
        assert await breaker.call(ok) == "ok"  # the trial closes it again
        go.set()
    status = await breaker.status()
    assert (status.state, status.failure_count) == (BreakerState.CLOSED, 0)


@pytest.mark.parametrize("form", FORMS)
async def test_closed_call_running_across_reset_decides_nothing(clock: FakeClock, form: str) -> None:
    """reset() of a closed breaker starts a new period: a call admitted before it does not count."""
    breaker = make(clock, failure_threshold=1)
    go = anyio.Event()

    async def late_failure() -> None:
        await go.wait()
        raise Boom

    async def slow() -> None:
        with pytest.raises(Boom):
            await call_in_form(breaker, form, late_failure)

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow)
        await anyio.wait_all_tasks_blocked()
        await breaker.reset()
        go.set()
    assert breaker.state is BreakerState.CLOSED
    await fail(breaker)  # a call of the new period still counts
    assert breaker.state is BreakerState.OPEN


@pytest.mark.parametrize("form", FORMS)
async def test_trial_running_across_reset_decides_nothing(clock: FakeClock, form: str) -> None:
    """A trial still running when reset() is called does not re-open the breaker when it fails."""
    breaker = make(clock, failure_threshold=1)
    await fail(breaker)
    clock.advance(5.0)
    go = anyio.Event()

    async def late_failure() -> None:
        await go.wait()
        raise Boom

    async def trial() -> None:
        with pytest.raises(Boom):
            await call_in_form(breaker, form, late_failure)

    async with anyio.create_task_group() as tg:
        tg.start_soon(trial)
        await anyio.wait_all_tasks_blocked()
        assert (await breaker.status()).trials_in_flight == 1
        await breaker.reset()
        go.set()
    status = await breaker.status()
    assert (status.state, status.failure_count) == (BreakerState.CLOSED, 0)
    assert breaker._inflight == {}


async def test_block_of_a_new_period_counts_while_an_older_one_runs(clock: FakeClock) -> None:
    """An ``async with`` block admitted after a state change counts its failure while a block from before still runs."""
    breaker = make(clock, failure_threshold=2)
    go = anyio.Event()

    tracked: list[bool] = []

    async def failing_block(wait: anyio.Event | None = None) -> None:
        async with breaker:
            tracked.append(bool(breaker._inflight))
            if wait is not None:
                await wait.wait()
            raise Boom

    async def old_block() -> None:
        with pytest.raises(Boom):
            await failing_block(go)

    async with anyio.create_task_group() as tg:
        tg.start_soon(old_block)
        await anyio.wait_all_tasks_blocked()
        await breaker.reset()  # a new period; the old block is still counted in the old one
        with pytest.raises(Boom):
            await failing_block()  # tracked: the counted blocks belong to the old period
        assert (await breaker.status()).failure_count == 1
        go.set()
    assert (await breaker.status()).failure_count == 1
    assert (breaker._inflight, breaker._blocks) == ({}, 0)
    with pytest.raises(Boom):
        await failing_block()  # back on the fast path
    assert tracked == [False, True, False]
    assert breaker.state is BreakerState.OPEN


async def test_calls_through_a_shared_store_follow_the_generations(clock: FakeClock) -> None:
    """A store known only through the protocol applies the same rule: a late failure after recovery is ignored."""
    breaker = CircuitBreaker(
        "remote", failure_threshold=1, recovery_time=5.0, backend=ProtocolOnlyBackend(), clock=clock
    )
    go = anyio.Event()

    async def late_failure() -> None:
        await go.wait()
        raise Boom

    async def slow() -> None:
        with pytest.raises(Boom):
            async with breaker:
                await late_failure()

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow)
        await anyio.wait_all_tasks_blocked()
        await fail(breaker)
        clock.advance(5.0)
        await breaker.call(ok)
        go.set()
    assert (await breaker.status()).state is BreakerState.CLOSED


def test_stale_and_unknown_tickets_in_the_record() -> None:
    """The record ignores tickets of other generations and judges negative or missing ones as current."""
    policy = BreakerPolicy(failure_threshold=1, window=60.0, recovery_time=5.0, half_open_max_calls=1)
    record = MemoryBreakerBackend().record("x")
    stale = record.admit(policy, 0.0).ticket
    assert record.force(policy, 0.0, BreakerState.CLOSED) is None  # a new period, the same state
    assert record.generation == 1
    assert record.settle(policy, 1.0, stale, "failure") is None
    assert record.settle(policy, 1.0, Ticket(-1, None), "failure") == Transition(BreakerState.CLOSED, BreakerState.OPEN)
    record.force(policy, 2.0, BreakerState.CLOSED)
    assert record.settle(policy, 3.0, None, "failure") is not None
    generation = record.generation
    assert record.force(policy, 4.0, BreakerState.OPEN) is None  # tripping an open breaker renews it too
    assert record.generation == generation + 1


@pytest.fixture(
    params=["memory", pytest.param("redis", marks=pytest.mark.asyncio_only("redis-py's client runs on asyncio only"))]
)
async def store(request: pytest.FixtureRequest) -> Any:
    """A breaker store: the in-memory one, or Redis (the shared server, under a throwaway prefix)."""
    if request.param == "memory":
        yield MemoryBreakerBackend()
        return
    import uuid

    import redis.asyncio as aioredis

    from seawall.backends import RedisBackend

    url = request.getfixturevalue("redis_url")
    prefix = f"seawall-test-{uuid.uuid4().hex}"
    async with RedisBackend.from_url(url, prefix=prefix, socket_timeout=5.0) as backend:
        yield backend
    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def test_stores_apply_one_generation_rule(store: BreakerBackend) -> None:
    """Memory and Redis: a stale plain call or trial decides nothing; reset() renews; a current call counts."""
    # recovery_time 1 us: the next round trip to Redis finds it past (memory is given the times).
    policy = BreakerPolicy(failure_threshold=1, window=60.0, recovery_time=1e-6, half_open_max_calls=1)
    closed, opened, half = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
    early = (await store.breaker_admit("g", policy, 0.0)).ticket
    assert early is not None
    assert early.trial is None
    # an outage and a recovery while ``early`` runs
    await store.breaker_force("g", policy, 1.0, opened)
    trial = (await store.breaker_admit("g", policy, 2.0)).ticket
    assert trial is not None
    assert trial.trial is not None
    assert await store.breaker_settle("g", policy, 2.0, trial, "success") == Transition(half, closed)
    assert await store.breaker_settle("g", policy, 3.0, early, "failure") is None
    # a trial running across reset()
    await store.breaker_force("g", policy, 4.0, opened)
    late = (await store.breaker_admit("g", policy, 5.0)).ticket
    assert late is not None
    assert late.trial is not None
    assert await store.breaker_force("g", policy, 5.0, closed) == Transition(half, closed)
    assert await store.breaker_settle("g", policy, 6.0, late, "failure") is None
    # reset() of a closed breaker is a new period too
    plain = (await store.breaker_admit("g", policy, 7.0)).ticket
    assert await store.breaker_force("g", policy, 7.0, closed) is None
    assert await store.breaker_settle("g", policy, 8.0, plain, "failure") is None
    snapshot = await store.breaker_snapshot("g", policy, 8.0)
    assert (snapshot.state, snapshot.failure_count) == (closed, 0)
    current = (await store.breaker_admit("g", policy, 9.0)).ticket
    assert await store.breaker_settle("g", policy, 9.0, current, "failure") == Transition(closed, opened)


# -- nesting: one call, one decision -------------------------------------------------


async def test_guarded_function_passed_to_call_counts_once(clock: FakeClock) -> None:
    """A @breaker function handed to breaker.call() counts one failure, not one per layer."""
    breaker = make(clock, failure_threshold=2)
    guarded = breaker(boom)
    with pytest.raises(Boom):
        await breaker.call(guarded)
    status = await breaker.status()
    assert (status.state, status.failure_count) == (BreakerState.CLOSED, 1)


async def test_guarded_function_passed_to_call_can_close_a_half_open_breaker(clock: FakeClock) -> None:
    """In half-open, call(@breaker fn) is one trial: its success closes the breaker."""
    breaker = make(clock, failure_threshold=1)
    guarded = breaker(ok)
    await fail(breaker)
    clock.advance(5.0)
    assert await breaker.call(guarded, "back") == "back"
    assert breaker.state is BreakerState.CLOSED


async def test_guarding_a_guarded_function_again_returns_it(clock: FakeClock) -> None:
    """Decorating a function this breaker (or one sharing its state) guards already adds no layer."""
    backend = MemoryBreakerBackend()
    breaker = CircuitBreaker("db", backend=backend, clock=clock)
    twin = CircuitBreaker("db", backend=backend, clock=clock)
    other = CircuitBreaker("cache", backend=backend, clock=clock)
    guarded = breaker(ok)
    assert breaker(guarded) is guarded
    assert twin(guarded) is guarded
    assert other(guarded) is not guarded
    assert guarded_by(guarded) is breaker
    assert guarded_by(ok) is None


@pytest.mark.parametrize(
    ("outer", "inner"),
    [
        (outer, inner)
        for outer in FORMS
        for inner in [*FORMS, "call(decorated)"]
        if (outer, inner) != ("nowait", "nowait")  # two permits of one task are two calls
    ],
)
async def test_layers_inside_a_trial_ride_on_it(clock: FakeClock, outer: str, inner: str) -> None:
    """Inside a half-open trial, layers of the same breaker in the same task take no slot; the trial decides once."""
    breaker = make(clock, failure_threshold=1)
    await fail(breaker)
    clock.advance(5.0)

    async def inner_ok() -> str:
        return "inner"

    async def inner_call() -> str:
        assert (await breaker.status()).trials_in_flight == 1
        if inner == "call(decorated)":
            return str(await breaker.call(breaker(inner_ok)))
        return str(await call_in_form(breaker, inner, inner_ok))

    assert await call_in_form(breaker, outer, inner_call) == "inner"
    assert breaker.state is BreakerState.CLOSED
    assert breaker._inflight == {}

    await fail(breaker)
    clock.advance(5.0)

    async def inner_failure() -> None:
        await call_in_form(breaker, inner if inner != "call(decorated)" else "call", boom)

    with pytest.raises(Boom):
        await call_in_form(breaker, outer, inner_failure)
    status = await breaker.status()
    assert (status.state, status.failure_count, status.retry_after) == (BreakerState.OPEN, 2, 5.0)
    assert breaker._inflight == {}


async def test_a_stale_trial_covers_nothing(clock: FakeClock) -> None:
    """After reset() the task's old trial no longer covers inner layers: they count in the new period."""
    breaker = make(clock, failure_threshold=1)
    await fail(breaker)
    clock.advance(5.0)
    async with breaker:  # the trial
        await breaker.reset()
        with pytest.raises(Boom):
            await breaker.call(boom)  # a call of the new period
        assert breaker.state is BreakerState.OPEN
    assert breaker.state is BreakerState.OPEN  # the stale trial's success decided nothing


async def test_other_tasks_inside_a_trial_still_need_a_slot(clock: FakeClock) -> None:
    """A trial covers its own task only: a task it starts is another call and is rejected while the slot is taken."""
    breaker = make(clock, failure_threshold=1)
    await fail(breaker)
    clock.advance(5.0)
    rejected: list[float] = []

    async def other() -> None:
        try:
            await breaker.call(ok)
        except CircuitOpenError as exc:
            rejected.append(exc.retry_after)

    async with breaker, anyio.create_task_group() as tg:
        tg.start_soon(other)
    assert rejected == [5.0]
    assert breaker.state is BreakerState.CLOSED


async def test_permits_and_blocks_ride_on_each_others_trials(clock: FakeClock) -> None:
    """A permit riding on a block's trial may be settled after the block ends; a block may ride on a permit's trial."""
    breaker = make(clock, failure_threshold=1)
    await fail(breaker)
    clock.advance(5.0)
    async with breaker:  # the trial; the permit rides on it
        permit = breaker.admit_nowait()
        assert not permit.trial
    breaker.settle_nowait(permit)
    assert breaker.state is BreakerState.CLOSED
    await fail(breaker)
    clock.advance(5.0)
    permit = breaker.admit_nowait()  # a trial of its own
    assert permit.trial
    async with breaker:  # rides on the permit's trial
        pass
    assert breaker._inflight
    breaker.settle_nowait(permit, Boom())
    assert breaker.state is BreakerState.OPEN
    assert breaker._inflight == {}


# -- the recovery boundary: one expression ---------------------------------------------


@pytest.mark.parametrize(
    ("start", "recovery", "steps"),
    [(0.7, 2.7, (0.1, 2.6)), (100.0, 0.3, (0.1, 0.2)), (1000.0, 0.3, (0.15, 0.15)), (0.7, 2.7, (2.7,))],
)
async def test_state_status_and_admission_agree_at_the_recovery_boundary(
    start: float, recovery: float, steps: tuple[float, ...]
) -> None:
    """Where float rounding puts "now" a hair either side of the boundary, state, status and admission agree."""
    clock = FakeClock(start)
    breaker = CircuitBreaker("edge", recovery_time=recovery, clock=clock)
    await breaker.trip()
    for step in steps:
        clock.advance(step)
    state = breaker.state
    status = await breaker.status()
    if state is BreakerState.OPEN:
        with pytest.raises(CircuitOpenError) as rejected:
            breaker.admit_nowait()
        assert status.state is BreakerState.OPEN
        assert rejected.value.retry_after == status.retry_after > 0
    else:
        assert breaker.admit_nowait().trial
        assert (state, status.state, status.retry_after) == (BreakerState.HALF_OPEN, BreakerState.HALF_OPEN, 0.0)
