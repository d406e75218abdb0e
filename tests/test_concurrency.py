"""ConcurrencyLimiter: admission, waiting, priorities and shedding, adaptation, cancellation, bad input.

Every waiting test runs on a ``FakeClock`` (no sleeps) on both anyio backends.
The adaptive tests drive the limiter against a simulated upstream on the fake
clock: a server with ``C`` workers that queues the rest FIFO, so latency
grows with its queue (a discrete-event simulation, virtual time).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from typing import Any

import anyio
import pytest
from anyio import WouldBlock

from seawall import ConcurrencyLimiter, ConcurrencyLimiterStatistics, ConcurrencyLimitExceeded, Rejected, telemetry
from seawall._errors import ConfigurationError, ConfigurationTypeError
from seawall.testing import FakeClock, advance, capture_events

pytestmark = pytest.mark.anyio


def fixed(limit: int = 2, **options: Any) -> ConcurrencyLimiter:
    options.setdefault("clock", FakeClock())
    return ConcurrencyLimiter(limit=limit, algorithm="fixed", **options)


# -- admission --------------------------------------------------------------


async def test_admits_up_to_the_limit_then_refuses() -> None:
    """Below the limit a call is admitted at once; at it, a limiter that may not queue refuses."""
    limiter = fixed(2, name="db")
    limiter.acquire_nowait()
    limiter.acquire_nowait()
    with pytest.raises(ConcurrencyLimitExceeded) as caught:
        limiter.acquire_nowait()
    error = caught.value
    assert isinstance(error, Rejected)
    assert (error.limit, error.priority, error.name, error.error_type) == (2, 0, "db", "concurrency_limit_exceeded")
    limiter.release()
    limiter.acquire_nowait()
    assert limiter.in_flight == 2
    assert limiter.statistics().rejected == (1,)


async def test_release_without_a_call_in_flight_raises() -> None:
    """Releasing more than was acquired is a bug, reported at once."""
    limiter = fixed()
    with pytest.raises(RuntimeError):
        limiter.release()


async def test_async_with_holds_a_slot_for_the_block() -> None:
    """``async with limiter()`` holds one slot and gives it back on exit, also after an error."""
    limiter = fixed(1)
    async with limiter():
        assert limiter.in_flight == 1
    assert limiter.in_flight == 0
    with pytest.raises(KeyError):
        async with limiter():
            raise KeyError("boom")
    assert limiter.in_flight == 0


async def test_would_block_when_it_may_wait() -> None:
    """acquire_nowait raises WouldBlock (taking nothing) when the waiting form would wait."""
    limiter = fixed(1, max_waiting=1, timeout=1.0)
    limiter.acquire_nowait()
    with pytest.raises(WouldBlock):
        limiter.acquire_nowait()
    assert limiter.in_flight == 1
    assert limiter.statistics().rejected == (0,)


# -- waiting ----------------------------------------------------------------


async def test_a_waiter_gets_the_freed_slot() -> None:
    """A waiter is handed the slot of the next release, FIFO."""
    clock = FakeClock()
    limiter = fixed(1, max_waiting=5, timeout=10.0, clock=clock)
    ticket = limiter.acquire_nowait()
    order: list[int] = []

    async def waiter(n: int) -> None:
        async with limiter():
            order.append(n)
            await clock.sleep(1.0)

    async with anyio.create_task_group() as tg:
        for n in range(3):
            tg.start_soon(waiter, n)
            await anyio.wait_all_tasks_blocked()
        assert limiter.statistics().waiting == (3,)
        limiter.release(ticket)
        for _ in range(3):
            await advance(clock, 1.0)
    assert order == [0, 1, 2]
    assert limiter.in_flight == 0


async def test_a_waiter_times_out_on_the_clock() -> None:
    """No slot within ``timeout``: ConcurrencyLimitExceeded, and the waiter leaves the queue."""
    clock = FakeClock()
    limiter = fixed(1, max_waiting=1, timeout=2.0, clock=clock)
    limiter.acquire_nowait()
    outcome: list[BaseException] = []

    async def waiter() -> None:
        try:
            await limiter.acquire()
        except ConcurrencyLimitExceeded as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await advance(clock, 1.9)
        assert not outcome
        await advance(clock, 0.1)
    assert len(outcome) == 1
    stats = limiter.statistics()
    assert (stats.waiting, stats.timed_out, stats.in_flight) == ((0,), (1,), 1)


async def test_the_queue_is_bounded_by_max_waiting() -> None:
    """Beyond ``max_waiting`` waiters a call of the same priority is refused at once."""
    clock = FakeClock()
    limiter = fixed(1, max_waiting=1, timeout=5.0, clock=clock)
    limiter.acquire_nowait()
    async with anyio.create_task_group() as tg:
        tg.start_soon(limiter.acquire)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(ConcurrencyLimitExceeded):
            limiter.acquire_nowait()
        with pytest.raises(ConcurrencyLimitExceeded):
            await limiter.acquire()
        tg.cancel_scope.cancel()
    assert limiter.statistics().waiting == (0,)
    assert limiter.in_flight == 1


async def test_a_cancelled_waiter_takes_nothing() -> None:
    """A waiter cancelled while waiting leaves the queue; the next release goes to the next waiter."""
    clock = FakeClock()
    limiter = fixed(1, max_waiting=5, timeout=None, clock=clock)
    ticket = limiter.acquire_nowait()
    got: list[str] = []

    async def waiter(name: str) -> None:
        await limiter.acquire()
        got.append(name)

    first = anyio.CancelScope()

    async def cancelled_waiter() -> None:
        with first:
            await waiter("first")

    async with anyio.create_task_group() as tg:
        tg.start_soon(cancelled_waiter)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(waiter, "second")
        await anyio.wait_all_tasks_blocked()
        first.cancel()
        await anyio.wait_all_tasks_blocked()
        assert limiter.statistics().waiting == (1,)
        limiter.release(ticket)
    assert got == ["second"]
    assert limiter.in_flight == 1


async def test_a_waiter_cancelled_after_its_grant_passes_the_slot_on() -> None:
    """Handed a slot in the same instant it is cancelled, a waiter gives the slot to the next one."""
    clock = FakeClock()
    limiter = fixed(1, max_waiting=5, timeout=None, clock=clock)
    ticket = limiter.acquire_nowait()
    got: list[str] = []
    scope = anyio.CancelScope()

    async def first() -> None:
        with scope:
            await limiter.acquire()
            got.append("first")  # pragma: no cover - cancelled before it runs on

    async def second() -> None:
        await limiter.acquire()
        got.append("second")

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(second)
        await anyio.wait_all_tasks_blocked()
        limiter.release(ticket)  # granted to first ...
        scope.cancel()  # ... which is cancelled before it runs
    assert got == ["second"]
    assert limiter.in_flight == 1
    assert limiter.statistics().waiting == (0,)


# -- priorities ---------------------------------------------------------------


async def test_low_priority_cannot_take_the_reserve() -> None:
    """Priority p is admitted only below limit - floor(limit * p / (2 * priorities))."""
    limiter = fixed(8, priorities=2)
    for _ in range(6):
        limiter.acquire_nowait(1)
    with pytest.raises(ConcurrencyLimitExceeded):
        limiter.acquire_nowait(1)  # 8 - 8 // 4 = 6: the low class is full
    limiter.acquire_nowait(0)
    limiter.acquire_nowait(0)
    with pytest.raises(ConcurrencyLimitExceeded):
        limiter.acquire_nowait(0)


async def test_a_freed_slot_goes_to_the_most_important_waiter() -> None:
    """Waiters are served most important first, whatever their arrival order."""
    clock = FakeClock()
    limiter = fixed(2, priorities=2, max_waiting=5, timeout=None, clock=clock)
    tickets = [limiter.acquire_nowait(0), limiter.acquire_nowait(0)]
    order: list[int] = []

    async def waiter(priority: int) -> None:
        await limiter.acquire(priority)
        order.append(priority)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, 1)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(waiter, 0)
        await anyio.wait_all_tasks_blocked()
        limiter.release(tickets.pop())
        await anyio.wait_all_tasks_blocked()
        assert order == [0]
        limiter.release(tickets.pop())
    assert order == [0, 1]


async def test_a_full_queue_sheds_the_least_important_waiter() -> None:
    """When the queue is full an important call pushes out the newest least important waiter."""
    clock = FakeClock()
    limiter = fixed(1, priorities=3, max_waiting=2, timeout=None, clock=clock)
    limiter.acquire_nowait(0)
    shed: list[int] = []

    async def waiter(priority: int, name: int) -> None:
        try:
            await limiter.acquire(priority)
        except ConcurrencyLimitExceeded as exc:
            shed.append(name if exc.priority == priority else -1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, 2, 1)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(waiter, 2, 2)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(waiter, 0, 3)
        await anyio.wait_all_tasks_blocked()
        assert shed == [2]
        with pytest.raises(ConcurrencyLimitExceeded):
            await limiter.acquire(2)  # no one less important than 2 to push out
        stats = limiter.statistics()
        assert (stats.waiting, stats.shed, stats.rejected) == ((1, 0, 1), (0, 0, 1), (0, 0, 1))
        tg.cancel_scope.cancel()
    assert limiter.statistics().waiting == (0, 0, 0)


async def test_high_priority_is_admitted_under_3x_overload() -> None:
    """High priority at 0.5x capacity and low at 2.5x: at least 95% of high is admitted, low is shed."""
    clock = FakeClock()
    limit, duration, tick = 10, 1.0, 0.05
    limiter = fixed(limit, priorities=2, max_waiting=limit, timeout=1.0, clock=clock)
    capacity = limit / duration  # calls per second
    admitted = {0: 0, 1: 0}
    refused = {0: 0, 1: 0}

    async def call(priority: int) -> None:
        try:
            async with limiter(priority):
                admitted[priority] += 1
                await clock.sleep(duration)
        except ConcurrencyLimitExceeded:
            refused[priority] += 1

    owed = {0: 0.0, 1: 0.0}
    rates = {0: 0.5 * capacity, 1: 2.5 * capacity}
    async with anyio.create_task_group() as tg:
        for _ in range(int(30 / tick)):
            for priority, rate in rates.items():
                owed[priority] += rate * tick
                while owed[priority] >= 1.0:
                    owed[priority] -= 1.0
                    tg.start_soon(call, priority)
            await advance(clock, tick)
        for _ in range(int(3 / tick)):  # let the last calls end
            await advance(clock, tick)
    high = admitted[0] / (admitted[0] + refused[0])
    low = admitted[1] / (admitted[1] + refused[1])
    assert high >= 0.95, (admitted, refused)
    assert low < 0.5
    assert limiter.in_flight == 0
    assert sum(limiter.statistics().waiting) == 0


# -- adaptation ------------------------------------------------------------


def simulate(algorithm: str, start: int, *, capacity: int = 50, seconds: float = 30.0, drop_after: float | None = None):  # type: ignore[no-untyped-def]
    """Run a limiter against an upstream of ``capacity`` workers (FIFO queue) at 3x overload, in virtual time.

    Each call takes 20 ms of a worker; arrivals are refused when the limiter
    is full. Returns the limit at each second of virtual time.
    """
    clock = FakeClock()
    limiter = ConcurrencyLimiter(algorithm=algorithm, initial_limit=start, window=0.5, clock=clock)  # type: ignore[arg-type]
    return drive(limiter, clock, capacity=capacity, seconds=seconds, drop_after=drop_after)


def drive(
    limiter: ConcurrencyLimiter, clock: FakeClock, *, capacity: int, seconds: float, drop_after: float | None = None
) -> list[int]:
    """The simulation of :func:`simulate`, for a limiter on ``clock`` made by the caller."""
    service = 0.02
    gap = service / capacity / 3.0
    workers = [0.0] * capacity  # when each worker is free (a heap)
    done: list[tuple[float, int, float]] = []  # (end, seq, ticket)
    arrivals = int(seconds / gap)
    curve: list[int] = []
    seq = 0
    index = 0
    while index < arrivals or done:
        arrival = index * gap if index < arrivals else math.inf
        if done and done[0][0] <= arrival:
            end, _, ticket = heapq.heappop(done)
            clock.set(end)
            limiter.release(ticket, dropped=drop_after is not None and end - ticket > drop_after)
        else:
            clock.set(arrival)
            index += 1
            try:
                ticket = limiter.acquire_nowait()
            except ConcurrencyLimitExceeded:
                pass
            else:
                begin = max(arrival, heapq.heappop(workers))
                heapq.heappush(workers, begin + service)
                seq += 1
                heapq.heappush(done, (begin + service, seq, ticket))
        while len(curve) <= int(clock.now()):
            curve.append(limiter.limit)
    return curve


@pytest.mark.parametrize("algorithm", ["gradient2", "vegas"])
@pytest.mark.parametrize("start", [5, 500])
async def test_the_adaptive_limit_settles_near_the_capacity(algorithm: str, start: int) -> None:
    """Against an upstream of true capacity C, the limit settles within [C/2, 2C] within 30 s (virtual time)."""
    capacity = 50
    curve = simulate(algorithm, start, capacity=capacity)
    settled = curve[15:30]
    assert all(capacity / 2 <= limit <= 2 * capacity for limit in settled), curve


@pytest.mark.parametrize("start", [5, 500])
async def test_aimd_settles_on_drops(start: int) -> None:
    """AIMD, told of calls slower than 1.5x the service time (the client's deadline), settles within [C/2, 2C]."""
    capacity = 50
    curve = simulate("aimd", start, capacity=capacity, drop_after=0.03)
    assert all(capacity / 2 <= limit <= 2 * capacity for limit in curve[20:30]), curve


async def test_the_limit_is_updated_per_window_not_per_sample() -> None:
    """Within one window no sample moves the limit; the window's end runs the algorithm once."""
    clock = FakeClock()
    limiter = ConcurrencyLimiter(algorithm="aimd", initial_limit=10, window=1.0, clock=clock)
    for _ in range(50):
        tickets = [limiter.acquire_nowait() for _ in range(6)]
        clock.advance(0.01)
        for ticket in tickets:
            limiter.release(ticket)
    assert limiter.limit == 10
    clock.advance(0.6)
    tickets = [limiter.acquire_nowait() for _ in range(6)]
    for ticket in tickets:
        limiter.release(ticket)
    assert limiter.limit == 11  # one window, one step
    assert limiter.statistics().latency is not None


async def test_aimd_backs_off_on_a_drop() -> None:
    """A window with a dropped call shrinks an AIMD limit by 10%."""
    clock = FakeClock()
    limiter = ConcurrencyLimiter(algorithm="aimd", initial_limit=100, window=1.0, clock=clock)
    clock.advance(1.0)
    for index in range(10):
        limiter.release(limiter.acquire_nowait(), dropped=index == 0)
    assert limiter.limit == 90


async def test_aimd_backs_off_on_a_call_slower_than_its_timeout() -> None:
    """As Netflix's AIMDLimit (timeout 5 s): a window with a 5.1 s call and no drop shrinks the limit by 10%."""
    clock = FakeClock()
    slow = ConcurrencyLimiter(algorithm="aimd", initial_limit=100, window=1.0, clock=clock)
    within = ConcurrencyLimiter(algorithm="aimd", initial_limit=100, window=1.0, clock=clock)
    tickets = [(slow.acquire_nowait(), within.acquire_nowait())]
    clock.advance(4.9)
    tickets.append((slow.acquire_nowait(), within.acquire_nowait()))
    within.release(tickets[0][1])  # 4.9 s: within the timeout
    within.release(tickets[1][1])
    clock.advance(0.2)
    slow.release(tickets[0][0])  # 5.1 s
    slow.release(tickets[1][0])
    for limiter in (slow, within):
        for _ in range(9):
            limiter.release(limiter.acquire_nowait())
    assert slow.limit == 90
    assert within.limit == 100  # no drop; (the window barely used the limit: no growth either)


async def test_the_adaptive_limit_stays_in_its_bounds() -> None:
    """However the upstream behaves, the limit stays within [min_limit, max_limit] outside a probe."""
    clock = FakeClock()
    growing = ConcurrencyLimiter(algorithm="aimd", initial_limit=4, max_limit=6, window=0.1, clock=clock)
    for _ in range(20):
        clock.advance(0.1)
        tickets = [growing.acquire_nowait() for _ in range(growing.limit)]
        for _ in range(3):
            for ticket in tickets:
                growing.release(ticket)
            tickets = [growing.acquire_nowait() for _ in tickets]
        for ticket in tickets:
            growing.release(ticket)
    assert growing.limit == 6
    limiter = ConcurrencyLimiter(algorithm="aimd", initial_limit=4, min_limit=3, window=0.1, clock=clock)
    for _ in range(20):
        clock.advance(0.1)
        for _ in range(10):
            limiter.release(limiter.acquire_nowait(), dropped=True)
    assert limiter.limit == 3


async def test_statistics_is_a_frozen_snapshot() -> None:
    """statistics() reports the limit, the calls in flight and waiting, and converts to a dict."""
    limiter = fixed(3, priorities=2, name="api")
    limiter.acquire_nowait(1)
    stats = limiter.statistics()
    assert isinstance(stats, ConcurrencyLimiterStatistics)
    assert (stats.limit, stats.in_flight, stats.waiting, stats.name) == (3, 1, (0, 0), "api")
    assert stats.to_dict()["waiting"] == [0, 0]
    with pytest.raises(AttributeError):
        stats.limit = 4  # type: ignore[misc]
    assert "in_flight=1" in repr(limiter)


# -- bad input -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "path"),
    [
        ({"algorithm": "fixed"}, "limit"),
        ({"algorithm": "fixed", "limit": 0}, "limit"),
        ({"algorithm": "gradient2", "limit": 5}, "limit"),
        ({"algorithm": "tcp"}, "algorithm"),
        ({"initial_limit": 0}, "initial_limit"),
        ({"initial_limit": 5000}, "initial_limit"),
        ({"min_limit": 10, "max_limit": 5, "initial_limit": 7}, "max_limit"),
        ({"max_waiting": -1}, "max_waiting"),
        ({"timeout": -1.0}, "timeout"),
        ({"timeout": math.nan}, "timeout"),
        ({"priorities": 0}, "priorities"),
        ({"window": 0}, "window"),
        ({"name": 5}, "name"),
        ({"clock": object()}, "clock"),
        ({"initial_limit": True}, "initial_limit"),
    ],
)
async def test_bad_options_name_the_argument(options: dict[str, Any], path: str) -> None:
    """Every bad option raises ConfigurationError naming it."""
    with pytest.raises(ConfigurationError) as caught:
        ConcurrencyLimiter(**options)
    assert caught.value.path == path


@pytest.mark.parametrize("priority", [-1, 2, 1.0, True, "0", [0]])
async def test_a_bad_priority_is_a_configuration_error(priority: Any) -> None:
    """A priority outside 0..priorities-1 (or not an int) raises ConfigurationError naming it."""
    limiter = fixed(2, priorities=2)
    with pytest.raises(ConfigurationError) as caught:
        limiter.acquire_nowait(priority)
    assert caught.value.path == "priority"
    assert isinstance(caught.value, ConfigurationTypeError) == (not isinstance(priority, int) or priority is True)
    assert limiter.in_flight == 0


# -- telemetry ---------------------------------------------------------------

REJECTED = ("seawall", "concurrency_limiter", "call_rejected")
LIMIT_CHANGED = ("seawall", "concurrency_limiter", "limit_changed")


async def test_a_refusal_at_the_limit_reports_reason_limit() -> None:
    """A limiter that lets nobody wait refuses at its limit with reason "limit", its name and the counts."""
    limiter = fixed(1, name="db")
    with capture_events() as events:
        ticket = limiter.acquire_nowait()
        with pytest.raises(ConcurrencyLimitExceeded):
            limiter.acquire_nowait()
        limiter.release(ticket)
    assert [(event.event, event.measurements, event.metadata) for event in events] == [
        (
            REJECTED,
            {"limit": 1, "in_flight": 1, "waiting": 0},
            {"name": "db", "reason": "limit", "priority": 0, "algorithm": "fixed"},
        )
    ]


async def test_a_full_queue_reports_reason_max_waiting() -> None:
    """A call of the same priority finding the queue full is refused with reason "max_waiting", at once or awaited."""
    clock = FakeClock()
    limiter = fixed(1, max_waiting=1, timeout=5.0, name="db", clock=clock)
    limiter.acquire_nowait()
    async with anyio.create_task_group() as tg:
        tg.start_soon(limiter.acquire)
        await anyio.wait_all_tasks_blocked()
        with capture_events() as events:
            with pytest.raises(ConcurrencyLimitExceeded):
                limiter.acquire_nowait()
            with pytest.raises(ConcurrencyLimitExceeded):
                await limiter.acquire()
        tg.cancel_scope.cancel()
    assert [event.metadata["reason"] for event in events] == ["max_waiting", "max_waiting"]
    assert events[0].measurements == {"limit": 1, "in_flight": 1, "waiting": 1}


async def test_a_shed_waiter_is_reported_once_with_its_own_priority() -> None:
    """The waiter pushed out by a more important call is reported as "shed" with its priority; the newcomer is not."""
    clock = FakeClock()
    limiter = fixed(1, priorities=2, max_waiting=1, timeout=None, name="search", clock=clock)
    limiter.acquire_nowait(0)
    shed: list[ConcurrencyLimitExceeded] = []

    async def waiter(priority: int) -> None:
        try:
            await limiter.acquire(priority)
        except ConcurrencyLimitExceeded as exc:
            shed.append(exc)

    with capture_events() as events:
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter, 1)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(waiter, 0)
            await anyio.wait_all_tasks_blocked()
            assert [exc.priority for exc in shed] == [1]
            tg.cancel_scope.cancel()
    assert [(event.event, event.metadata) for event in events] == [
        (REJECTED, {"name": "search", "reason": "shed", "priority": 1, "algorithm": "fixed"})
    ]
    assert events[0].measurements == {"limit": 1, "in_flight": 1, "waiting": 0}


async def test_a_wait_that_times_out_reports_reason_timeout() -> None:
    """A waiter with no slot within ``timeout`` is reported as "timeout" when the time runs out, not before."""
    clock = FakeClock()
    limiter = fixed(1, max_waiting=1, timeout=2.0, name="db", clock=clock)
    limiter.acquire_nowait()

    async def waiter() -> None:
        with pytest.raises(ConcurrencyLimitExceeded):
            await limiter.acquire()

    with capture_events() as events:
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await advance(clock, 1.9)
            assert events == []
            await advance(clock, 0.1)
    assert [(event.measurements, event.metadata) for event in events] == [
        (
            {"limit": 1, "in_flight": 1, "waiting": 0},
            {"name": "db", "reason": "timeout", "priority": 0, "algorithm": "fixed"},
        )
    ]
    assert limiter.statistics().timed_out == (1,)


async def test_admitted_waited_and_cancelled_calls_emit_nothing() -> None:
    """Admission, release, a wait that gets its slot and a cancelled wait are no refusals: no event."""
    clock = FakeClock()
    limiter = fixed(1, max_waiting=2, timeout=10.0, clock=clock)
    with capture_events() as events:
        ticket = limiter.acquire_nowait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(limiter.acquire)
            await anyio.wait_all_tasks_blocked()
            limiter.release(ticket)  # the waiter gets the slot
            await anyio.wait_all_tasks_blocked()
        async with anyio.create_task_group() as tg:
            tg.start_soon(limiter.acquire)
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()  # cancelled while it waits
        limiter.release()
    assert events == []
    assert limiter.in_flight == 0


@pytest.mark.parametrize("algorithm", ["gradient2", "vegas", "aimd"])
async def test_limit_changes_are_reported_once_per_window_with_the_new_limit(algorithm: str) -> None:
    """Under a load that moves the limit each event carries the limit statistics() reports, at most once per window."""
    clock = FakeClock()
    window = 0.5
    limiter = ConcurrencyLimiter(algorithm=algorithm, initial_limit=5, window=window, name="api", clock=clock)  # type: ignore[arg-type]
    seen: list[tuple[float, dict[str, Any], dict[str, Any], int]] = []

    def record(_event: Any, measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        seen.append((clock.now(), measurements, metadata, limiter.statistics().limit))

    telemetry.attach("test-limit-changed", LIMIT_CHANGED, record)
    try:
        drive(limiter, clock, capacity=50, seconds=10.0, drop_after=0.03 if algorithm == "aimd" else None)
    finally:
        telemetry.detach("test-limit-changed")
    assert len(seen) >= 3, seen
    previous = 5
    for _, measurements, metadata, limit in seen:
        assert measurements["limit"] == limit != measurements["previous_limit"] == previous
        assert (metadata["name"], metadata["algorithm"]) == ("api", algorithm)
        previous = limit
    assert previous == limiter.statistics().limit
    updates = [at for at, _, metadata, _ in seen if metadata["cause"] == "update"]
    assert all(later - earlier >= window for earlier, later in itertools.pairwise(updates))
    causes = [metadata["cause"] for _, _, metadata, _ in seen]
    if algorithm == "aimd":
        assert set(causes) == {"update"}
    else:  # the first window's probe drops the limit to 3 and gives it back
        probe = causes.index("probe")
        assert seen[probe][1]["limit"] == 3
        assert "probe_done" in causes[probe:]


async def test_no_limit_event_while_the_limit_stays() -> None:
    """Windows that leave the limit where it is (app-limited ones; any fixed limiter) emit no limit_changed."""
    clock = FakeClock()
    adaptive = ConcurrencyLimiter(algorithm="aimd", initial_limit=10, window=1.0, clock=clock)
    still = fixed(10, clock=clock)
    with capture_events() as events:
        for _ in range(5):  # five windows of two calls at a time: app-limited, so the limit never grows
            clock.advance(1.0)
            for _ in range(10):
                tickets = [adaptive.acquire_nowait(), adaptive.acquire_nowait(), still.acquire_nowait()]
                clock.advance(0.01)
                for ticket in tickets[:2]:
                    adaptive.release(ticket)
                still.release(tickets[2])
    assert events == []
    assert adaptive.statistics().latency is not None  # the windows did run
    assert adaptive.limit == 10


async def test_refusals_and_limit_changes_are_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    """With the seawall logger at DEBUG a refusal and a limit change are logged with their fields; at INFO, nothing."""
    clock = FakeClock()
    limiter = ConcurrencyLimiter(algorithm="aimd", initial_limit=1, window=1.0, name="db", clock=clock)
    with caplog.at_level(logging.INFO, logger="seawall"):
        ticket = limiter.acquire_nowait()
        with pytest.raises(ConcurrencyLimitExceeded):
            limiter.acquire_nowait()
    assert caplog.records == []
    with caplog.at_level(logging.DEBUG, logger="seawall"):
        with pytest.raises(ConcurrencyLimitExceeded):
            limiter.acquire_nowait()
        limiter.release(ticket)
        clock.advance(1.0)
        for _ in range(10):  # a window that used the limit, with no drop: 1 -> 2
            limiter.release(limiter.acquire_nowait())
    assert [(r.getMessage().split()[0], r.__dict__.get("reason"), r.__dict__.get("limit")) for r in caplog.records] == [
        ("event='concurrency_limit_rejected'", "limit", 1),
        ("event='concurrency_limit_changed'", None, 2),
    ]
    assert caplog.records[1].__dict__["previous_limit"] == 1
