"""The aiolimiter adapter: seawall's limiter surface over an aiolimiter bucket, with aiolimiter's own semantics."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from seawall import ConfigurationError, RateLimitExceeded, RateLimitStatus
from seawall.testing import capture_events

aiolimiter = pytest.importorskip("aiolimiter")

from seawall.integrations.aiolimiter import AiolimiterAdapter, adapt  # noqa: E402

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> Any:
    """Asyncio in debug mode: aiolimiter runs on asyncio only (trio is tested to fail at once, below)."""
    return ("asyncio", {"debug": True})


class LoopClock:
    """The running loop's time() moved forward at will: real time plus the sum of the advances.

    aiolimiter reads only ``loop.time()`` (its own tests patch it too). Real
    time keeps flowing underneath, so the loop's own timers - anyio's
    ``wait_all_tasks_blocked()`` polls with one - still come due; the
    figures are then exact to within the few milliseconds a test takes.
    """

    def __init__(self) -> None:
        self.offset = 1000.0

    def now(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
async def loop_clock(monkeypatch: pytest.MonkeyPatch) -> LoopClock:
    """The running loop's clock, advanced by the test instead of slept on."""
    clock = LoopClock()
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "time", clock.now)
    # Debug mode times every callback on loop.time(): an advance() inside one would read as a slow callback.
    monkeypatch.setattr(loop, "slow_callback_duration", float("inf"))
    return clock


#: Within what a figure read off the loop clock is exact (the real time a test takes).
NEAR = 0.05


async def settle() -> None:
    """Let the loop run the timers now due (aiolimiter's waker is one), then every task until all block."""
    # wait_all_tasks_blocked() alone may look before a due timer has run, and see every task blocked.
    await anyio.lowlevel.checkpoint()
    await anyio.wait_all_tasks_blocked()


async def denied(adapter: AiolimiterAdapter, key: str = "k", cost: float = 1) -> RateLimitExceeded:
    with pytest.raises(RateLimitExceeded) as info:
        await adapter.hit(key, cost)
    return info.value


async def test_hit_admits_a_burst_of_max_rate_then_denies_with_its_retry_time(loop_clock: LoopClock) -> None:
    """The bucket is aiolimiter's: max_rate at once, then the drain rate; a denial says when the level allows it."""
    adapter = adapt(aiolimiter.AsyncLimiter(4, 2.0))
    for _ in range(4):
        await adapter.hit("k")
    error = await denied(adapter)
    assert error.retry_after == pytest.approx(0.5, abs=NEAR)  # one unit drains in time_period / max_rate
    assert (error.key, error.limit, error.window) == ("k", 4.0, 2.0)
    loop_clock.advance(0.5)
    status = await adapter.hit("k")
    assert (status.key, status.remaining, status.allowed) == ("k", 0, False)
    assert status.current_count == pytest.approx(4.0, abs=NEAR)
    await denied(adapter)
    loop_clock.advance(1.0)
    await adapter.hit("k", 2)
    await denied(adapter)


async def test_a_denial_takes_nothing(loop_clock: LoopClock) -> None:
    """Denied hits leave aiolimiter's level as it was."""
    limiter = aiolimiter.AsyncLimiter(10, 1.0)
    adapter = adapt(limiter)
    await adapter.hit("k", 8)
    for _ in range(3):
        error = await denied(adapter, cost=3)
    assert error.retry_after == pytest.approx(0.1, abs=NEAR)
    assert (await adapter.status("k")).current_count == pytest.approx(8.0, abs=NEAR)
    assert limiter.has_capacity(2)


async def test_the_bucket_is_shared_with_the_limiters_other_users_and_every_key(loop_clock: LoopClock) -> None:
    """One AsyncLimiter is one bucket: code using it directly and every key through the adapter draw on it."""
    limiter = aiolimiter.AsyncLimiter(3, 3.0)
    adapter = adapt(limiter, name="api")
    async with limiter:  # the limiter's own users
        pass
    await adapter.hit("alice")
    await adapter.hit("bob")
    assert not limiter.has_capacity()
    await denied(adapter, "carol")
    status = await adapter.status("anyone")
    assert isinstance(status, RateLimitStatus)
    assert (status.key, status.allowed, status.limit, status.window, status.remaining) == ("anyone", False, 3, 3.0, 0)
    assert (status.current_count, status.retry_after, status.reset_after) == pytest.approx((3.0, 1.0, 3.0), abs=NEAR)


async def test_acquire_waits_as_aiolimiter_does(loop_clock: LoopClock) -> None:
    """acquire() waits for the level to drain on the loop's clock, in aiolimiter's order (smallest amount first)."""
    adapter = adapt(aiolimiter.AsyncLimiter(2, 2.0))  # one unit drains per second
    await adapter.hit("k", 2)
    seconds = 0  # whole seconds advanced so far
    order: list[tuple[str, int]] = []

    async def waiter(name: str, cost: float) -> None:
        await adapter.acquire("k", cost)
        order.append((name, seconds))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "big", 2)
        await settle()
        tg.start_soon(waiter, "small", 1)
        await settle()
        for seconds in range(1, 5):  # noqa: B007 - the waiters read it
            loop_clock.advance(1.0)
            await settle()
    # Unlike seawall's FIFO line, aiolimiter serves the smaller amount first.
    assert order == [("small", 1), ("big", 3)]


async def test_a_cancelled_acquire_takes_nothing(loop_clock: LoopClock) -> None:
    """Cancelling a waiting acquire() leaves the level untouched (aiolimiter's own cancellation)."""
    adapter = adapt(aiolimiter.AsyncLimiter(1, 1.0))
    await adapter.hit("k")
    with anyio.move_on_after(0) as scope:
        await adapter.acquire("k")
    assert scope.cancelled_caught
    assert (await adapter.status("k")).current_count == pytest.approx(1.0, abs=NEAR)


async def test_context_manager_forms(loop_clock: LoopClock) -> None:
    """`async with adapter`, adapter(key) and adapter(key, wait=False) behave as a RateLimiter's forms."""
    adapter = adapt(aiolimiter.AsyncLimiter(1, 1.0))
    async with adapter:
        pass
    with pytest.raises(RateLimitExceeded):
        async with adapter("k", wait=False):
            pytest.fail("the block must not run")  # pragma: no cover
    loop_clock.advance(1.0)
    async with adapter("k", cost=1):
        pass
    assert (await adapter.status()).current_count == pytest.approx(1.0, abs=NEAR)


async def test_telemetry_and_logs(loop_clock: LoopClock, caplog: pytest.LogCaptureFixture) -> None:
    """request_allowed / request_denied carry the adapter's name and algorithm "aiolimiter"; denials are logged."""
    adapter = adapt(aiolimiter.AsyncLimiter(1, 1.0), name="api")
    with capture_events() as events, caplog.at_level(logging.DEBUG, logger="seawall"):
        await adapter.hit("k")
        await denied(adapter)
        loop_clock.advance(1.0)
        await adapter.acquire("k")
    assert [event.name for event in events] == ["request_allowed", "request_denied", "request_allowed"]
    assert events[0].metadata == {
        "key": "k",
        "limit": 1.0,
        "window": 1.0,
        "cost": 1.0,
        "algorithm": "aiolimiter",
        "name": "api",
    }
    assert events[1].measurements["retry_after"] == pytest.approx(1.0, abs=NEAR)
    assert any("rate_limit_denied" in record.getMessage() for record in caplog.records)


async def test_arguments_are_checked_at_the_boundary(loop_clock: LoopClock) -> None:
    """A non-str key or a cost that is not in (0, max_rate] is a ConfigurationError, before aiolimiter sees it."""
    adapter = adapt(aiolimiter.AsyncLimiter(5, 1.0))
    for call in (adapter.hit, adapter.acquire):
        with pytest.raises(TypeError, match="key must be a str"):
            await call(3)  # type: ignore[arg-type]
        for bad in (0, -1, float("nan"), True):
            with pytest.raises(ConfigurationError, match="cost"):
                await call("k", bad)
        with pytest.raises(ConfigurationError, match="above the limiter's max_rate"):
            await call("k", 6)
    assert await adapter.hit("k", 0.5)  # fractional costs, as aiolimiter takes them
    assert (await adapter.status("k")).current_count == pytest.approx(0.5, abs=NEAR)


def test_construction_and_adapt() -> None:
    """The adapter wraps an AsyncLimiter only; adapt() passes an adapter through; the rule is exposed."""
    limiter = aiolimiter.AsyncLimiter(10, 60)
    adapter = AiolimiterAdapter(limiter)
    assert (adapter.limit, adapter.window, adapter.name, adapter.limiter) == (10.0, 60.0, "aiolimiter", limiter)
    assert adapter.resident_buckets is None  # the coordinator awaits hit()
    assert adapt(adapter) is adapter
    assert "limit=10.0" in repr(adapter)
    with pytest.raises(TypeError, match=r"aiolimiter\.AsyncLimiter"):
        AiolimiterAdapter(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name"):
        AiolimiterAdapter(limiter, name="")


async def test_reset_is_not_supported() -> None:
    """An AsyncLimiter has no way to empty its bucket, so neither has the adapter."""
    with pytest.raises(NotImplementedError, match="no reset"):
        await adapt(aiolimiter.AsyncLimiter(1, 1.0)).reset("k")


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_under_trio_every_call_fails_at_once_saying_so() -> None:
    """Under trio (aiolimiter needs asyncio's loop) the adapter raises a ConfigurationError naming the reason."""
    adapter = adapt(aiolimiter.AsyncLimiter(1, 1.0))
    for call in (adapter.hit, adapter.acquire, adapter.status):
        with pytest.raises(ConfigurationError, match="asyncio only") as info:
            await call("k")
        assert info.value.path == "rate_limiter"


def test_import_seawall_needs_no_aiolimiter() -> None:
    """Every other seawall module imports without aiolimiter; the adapter module says which extra it needs."""
    script = """
import sys
sys.modules["aiolimiter"] = None  # as if it were not installed
import seawall, seawall.testing, seawall.backends, seawall.integrations
assert "aiolimiter" not in {name for name, module in sys.modules.items() if module is not None}
limiter = seawall.RateLimiter(1, 1.0)
try:
    import seawall.integrations.aiolimiter
except ImportError as exc:
    assert "pip install '.[aiolimiter]'" in str(exc), exc
else:
    raise AssertionError("the adapter imported without aiolimiter")
"""
    result = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


async def test_a_registered_async_limiter_serves_as_a_keys_rate_limiter() -> None:
    """infra.rate_limiter.register(name, AsyncLimiter) and ``"rate_limiter": name`` put it in front of the key."""
    from seawall import AsyncInfrastructure, ConfigurationError, RateLimitExceeded

    async def work() -> str:
        return "done"

    shared = aiolimiter.AsyncLimiter(2, 60)
    async with AsyncInfrastructure() as infra:
        adapter = infra.rate_limiter.register("partner-api", shared)
        assert isinstance(adapter, AiolimiterAdapter)
        await infra.configure_protection("partner", {"rate_limiter": "partner-api", "circuit_breaker": {}})
        assert await infra.execute_protected("partner", work) == "done"
        async with infra.protect("partner"):
            pass
        with pytest.raises(RateLimitExceeded):
            await infra.execute_protected("partner", work)
        assert not shared.has_capacity()  # the AsyncLimiter's own level: it decided
        status = await infra.get_protection_status("partner")
        assert status["rate_limiter"]["remaining"] == 0
        with pytest.raises(ConfigurationError) as info:
            await infra.configure_protection("other", {"rate_limiter": "no-such-limiter"})
        assert info.value.path == "other.rate_limiter"
        assert "partner-api" in info.value.message
        with pytest.raises(ConfigurationError):
            infra.rate_limiter.register("bad", object())
