"""RateLimiter against a reference model: GCRA and fixed window, hits, waiters, cancellations, resets.

The model keeps every bucket in exact arithmetic (``Fraction``); the limiter
runs on a ``FakeClock`` whose readings are exact binary fractions, so their
decisions must agree exactly, and their numbers to float precision. Waiters
(``acquire()``) take cost 1, so FIFO order is the whole rule for them; a hit on
a key with waiters is denied; a cancelled waiter takes nothing.

The Redis variant plays hits and resets against the same model on the real
clock: its scripts read the server's clock, so its windows are long (the
bucket drains a negligible amount during the test), and the fixed window is
placed so that no window boundary falls inside the run.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import dataclass
from fractions import Fraction

import pytest
import redis
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule, run_state_machine_as_test
from reliability_models import LimiterModel
from reliability_support import LoopMachine, fast, heavy

from seawall import FakeClock, RateLimiter, RateLimitExceeded, RateLimitStatus
from seawall.backends import RedisBackend
from seawall.backends._limiter_protocol import tolerance

pytestmark = pytest.mark.anyio

KEYS = ("a", "b", "a:b", "", "\x00\udcff")
#: Half the draws hit "a", so that calls meet on one key often.
KEY = st.one_of(st.just("a"), st.sampled_from(KEYS))
START = Fraction(1000)


@dataclass
class Waiter:
    key: str
    task: asyncio.Task[None]


class MemoryLimiterMachine(LoopMachine):
    """The in-memory limiter on a FakeClock, step by step against the model."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(float(START))
        self.now = START
        self.queues: dict[str, deque[Waiter]] = {}

    @initialize(
        algorithm=st.sampled_from(["gcra", "fixed_window"]),
        limit=st.sampled_from([1, 2, 3, 5]),
        window=st.sampled_from([Fraction(1), Fraction(4), Fraction(10)]),
    )
    def setup(self, algorithm: str, limit: int, window: Fraction) -> None:
        self.model = LimiterModel(algorithm, limit, window)
        self.limiter = RateLimiter(limit, float(window), algorithm=algorithm, clock=self.clock)  # type: ignore[arg-type]

    async def statuses(self) -> list[RateLimitStatus]:
        return [await self.limiter.status(key) for key in KEYS]

    def queued(self, key: str) -> deque[Waiter]:
        return self.queues.setdefault(key, deque())

    def serve_waiters(self) -> None:
        """The model's side of a settled loop: waiters that fit now are admitted, in FIFO order."""
        for key, queue in self.queues.items():
            while queue and self.model.fits(key, 1, self.now):
                waiter = queue.popleft()
                assert self.model.take(key, 1, self.now) is None
                assert waiter.task.done(), f"waiter on {key!r} should have been admitted at {self.now}"
                assert waiter.task.exception() is None

    @rule(key=KEY, cost=st.integers(1, 5))
    def hit(self, key: str, cost: int) -> None:
        self.check_hit(key, cost)

    @rule(eighths=st.integers(1, 48), key=KEY, cost=st.integers(1, 5))
    def advance_and_hit(self, eighths: int, key: str, cost: int) -> None:
        # The hit lands before the waiters the advance woke have run: they still go first.
        step = Fraction(eighths, 8)
        self.clock.advance(float(step))
        self.now += step
        self.check_hit(key, cost)
        self.settle()
        self.serve_waiters()

    def check_hit(self, key: str, cost: int) -> None:
        cost = min(cost, self.model.limit)
        queue = self.queued(key)
        try:
            self.limiter.hit_nowait(key, cost)
        except RateLimitExceeded as denied:
            admitted, retry_after = False, denied.retry_after
        else:
            admitted, retry_after = True, None
        if queue:
            # Waiters go first: a hit on their key is denied, whatever the bucket holds.
            assert not admitted
            assert retry_after is not None
            assert retry_after > 0
            return
        expected = self.model.take(key, cost, self.now)
        if expected is None:
            assert admitted, f"hit {key!r} cost {cost} at {self.now} should be admitted"
            assert self.limiter.resident_buckets is not None
            assert self.limiter.resident_buckets <= 2 * self.model.recent_keys(self.now)
        else:
            assert not admitted, f"hit {key!r} cost {cost} at {self.now} should be denied"
            assert retry_after == pytest.approx(float(max(expected, Fraction(1, 10**6))), rel=1e-9, abs=1e-9)

    @rule(key=KEY)
    def acquire(self, key: str) -> None:
        queue = self.queued(key)
        task = self.spawn(self.limiter.acquire(key))
        self.settle()
        if not queue and self.model.fits(key, 1, self.now):
            assert task.done(), "an acquire that fits with nobody waiting is admitted at once"
            assert self.model.take(key, 1, self.now) is None
        else:
            assert not task.done(), "an acquire that does not fit (or has waiters ahead) waits"
            queue.append(Waiter(key, task))

    @precondition(lambda self: any(self.queues.values()))
    @rule(data=st.data())
    def cancel_waiter(self, data: st.DataObject) -> None:
        waiting = [waiter for queue in self.queues.values() for waiter in queue]
        waiter = data.draw(st.sampled_from(waiting))
        waiter.task.cancel()
        self.settle()
        assert waiter.task.cancelled()
        self.queues[waiter.key].remove(waiter)
        self.serve_waiters()

    @rule(eighths=st.integers(0, 48))
    def advance(self, eighths: int) -> None:
        step = Fraction(eighths, 8)
        self.clock.advance(float(step))
        self.now += step
        self.settle()
        self.serve_waiters()

    @rule(key=KEY)
    def reset(self, key: str) -> None:
        self.run(self.limiter.reset(key))
        self.model.reset(key)
        self.settle()
        self.serve_waiters()

    @invariant()
    def statuses_agree(self) -> None:
        if not hasattr(self, "model"):
            return
        for key, status in zip(KEYS, self.run(self.statuses()), strict=True):
            count, remaining, retry_after, reset_after = self.model.status(key, self.now)
            assert status.current_count == pytest.approx(float(count), abs=1e-9), key
            assert status.remaining == remaining, key
            # A rule admits up to its tolerance past the window (the same slack on every backend).
            slack = 1e-9 + float(self.model.window) * tolerance(self.model.limit)
            assert status.retry_after == pytest.approx(float(retry_after), abs=slack), key
            assert status.reset_after == pytest.approx(float(reset_after), abs=1e-9), key
            assert status.allowed is (retry_after == 0), key

    @invariant()
    def waiters_wait(self) -> None:
        for queue in self.queues.values():
            for waiter in queue:
                assert not waiter.task.done(), "a waiter that does not fit yet is still waiting"


MemoryLimiterMachine.TestCase.settings = fast(80, stateful_step_count=40)
TestMemoryLimiterModel = MemoryLimiterMachine.TestCase


@pytest.mark.stress
@pytest.mark.timeout(1800)
class TestMemoryLimiterModelStress(MemoryLimiterMachine.TestCase):
    """The in-memory model run with many more, longer examples (stress run)."""

    settings = heavy(1500, stateful_step_count=60)


async def test_status_allowed_agrees_with_hit_at_the_boundary() -> None:
    """A status that says remaining=1 also says allowed=True with retry_after 0, as the next hit is admitted."""
    clock = FakeClock(1000.0)
    limiter = RateLimiter(3, 10.0, clock=clock)
    await limiter.hit("a")
    clock.advance(3.375)
    await limiter.hit("a")
    await limiter.hit("a")
    status = await limiter.status("a")
    await limiter.hit("a")  # admitted: the bucket had room for one more
    assert status.remaining == 1
    assert status.retry_after == 0.0
    assert status.allowed


# -- Redis: the same model, on the server's clock ------------------------------------

REDIS_WINDOW = 10**6  # seconds: a GCRA bucket drains 1/200000 of a unit per second at limit 5


class RedisLimiterMachine(LoopMachine):
    """RedisBackend against the model; hits and resets only (long windows: time stands nearly still)."""

    url = ""

    def __init__(self) -> None:
        super().__init__()
        self.prefix = f"seawall-reliability-{uuid.uuid4().hex}"
        self.backend = RedisBackend.from_url(self.url, prefix=self.prefix, socket_timeout=5.0)
        self.started = time.monotonic()

    @initialize(algorithm=st.sampled_from(["gcra", "fixed_window"]), limit=st.sampled_from([1, 2, 5]))
    def setup(self, algorithm: str, limit: int) -> None:
        self.model = LimiterModel(algorithm, limit, Fraction(REDIS_WINDOW))
        self.limiter = RateLimiter(limit, REDIS_WINDOW, algorithm=algorithm, backend=self.backend)  # type: ignore[arg-type]

    async def statuses(self) -> list[RateLimitStatus]:
        return list(await asyncio.gather(*(self.limiter.status(key) for key in KEYS)))

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @rule(key=KEY, cost=st.integers(1, 5))
    def hit(self, key: str, cost: int) -> None:
        cost = min(cost, self.model.limit)
        try:
            self.run(self.limiter.hit(key, cost))
        except RateLimitExceeded as denied:
            admitted, retry_after = False, denied.retry_after
        else:
            admitted, retry_after = True, None
        expected = self.model.take(key, cost, START)
        assert admitted is (expected is None), f"hit {key!r} cost {cost}"
        if expected is not None and self.model.algorithm == "gcra":
            # The bucket drained for the seconds the test has run.
            assert retry_after == pytest.approx(float(expected), abs=self.elapsed() + 1.0)

    @rule(key=KEY)
    def reset(self, key: str) -> None:
        self.run(self.limiter.reset(key))
        self.model.reset(key)

    @invariant()
    def statuses_agree(self) -> None:
        if not hasattr(self, "model"):
            return
        statuses = self.run(self.statuses())
        for key, status in zip(KEYS, statuses, strict=True):
            count, remaining, _retry, _reset = self.model.status(key, START)
            assert status.current_count == pytest.approx(float(count), abs=1e-3), key
            assert status.remaining == remaining, key

    def close_machine(self) -> None:
        async def clean() -> None:
            client = self.backend.client
            keys = [key async for key in client.scan_iter(match=f"{self.prefix}:*")]
            if keys:
                await client.delete(*keys)
            await self.backend.aclose()

        self.run(clean())


def _far_from_a_window_boundary(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        seconds, _micros = client.time()
    finally:
        client.close()
    into = seconds % REDIS_WINDOW
    if not 120 < into < REDIS_WINDOW - 600:  # pragma: no cover - once every ~12 days, for ten minutes
        pytest.skip("the Redis server's clock is within minutes of a fixed-window boundary")


@pytest.mark.redis
def test_redis_limiter_agrees_with_the_model(redis_url: str) -> None:
    """RedisBackend admits and reports exactly as the model, for both algorithms, under random hits and resets."""
    _far_from_a_window_boundary(redis_url)
    machine = type("RedisMachine", (RedisLimiterMachine,), {"url": redis_url})
    run_state_machine_as_test(machine, settings=fast(15, stateful_step_count=25))


@pytest.mark.redis
@pytest.mark.stress
@pytest.mark.timeout(1800)
def test_redis_limiter_agrees_with_the_model_at_length(redis_url: str) -> None:
    """The Redis model run with many more examples (stress run)."""
    _far_from_a_window_boundary(redis_url)
    machine = type("RedisMachine", (RedisLimiterMachine,), {"url": redis_url})
    run_state_machine_as_test(machine, settings=heavy(200, stateful_step_count=40))
