"""ConnectionPool against a reference model: checkouts, returns, raising blocks, dead workers, cancellation, close().

The factory's every step can be made to wait (a create, a reset), so a task
can be cancelled at any await of the pool: while waiting for a worker, while
its worker is being created, while holding it, while its return awaits the
reset. Both kinds of cancellation are played: ``task.cancel()`` (native asyncio,
which cuts into shielded cleanup) and an anyio cancel scope (which the return
path's shield defers). The model follows the pool's documented rules (LIFO
idle stack, FIFO waiters, a returned worker to the oldest waiter first, surplus
overflow closed, dead workers never handed out) and says, after every step,
which worker each holder has, what every finished call raised, and what
``status()`` reads. Invariants: the counts equal the model's; no worker is
lent to two holders; a holder never gets a dead worker; every worker the
factory made is closed once ``close()`` is done; a cancelled caller consumes
nothing.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule
from reliability_support import LoopMachine, fast, heavy

from seawall import ConnectionPool, FakeClock, PoolClosed, PoolLease, PoolTimeout

pytestmark = pytest.mark.anyio

POOL_TIMEOUT = 2.0
GRACE = 5.0


class CreateFailed(Exception):
    """The factory could not make a worker."""


class ResetFailed(Exception):
    """The factory could not reset a returned worker."""


class Raised(Exception):
    """The block that held a worker raised."""


@dataclass(eq=False)
class Worker:
    id: int
    dead: bool = False  # the server closed it: is_closed() says so
    sick: bool = False  # only check() finds out
    closed: bool = False
    closes: int = 0


@dataclass(eq=False)
class Call:
    """One checkout, as the machine drives it and as the model sees it."""

    id: int
    timeout: float | None
    slow_create: bool
    create_fails: bool
    slow_reset: bool
    reset_fails: bool
    nowait: bool = False  # checkout_nowait()/checkin_nowait() first, as the coordinator takes a worker
    create_gate: asyncio.Event = field(default_factory=asyncio.Event)
    reset_gate: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Future[str] | None = None
    task: asyncio.Task[Any] | None = None
    scope: anyio.CancelScope | None = None
    # Seen by the task:
    conn: Worker | None = None
    handed_dead: bool = False
    # The model's view:
    phase: str = "new"  # waiting, creating, holding, returning, done
    worker: int | None = None
    deadline: float | None = None
    expect: str | None = None
    cancel: str | None = None  # "native" or "scope", once requested
    block: str | None = None  # how the block ended: "ok", "raise", or "cancel"
    doomed: bool = False  # a waiter cancelled in the loop iteration something is handed to it

    @property
    def raised(self) -> bool:
        """Whether the block that held the worker ended with an exception (the return then checks it)."""
        return self.block in ("raise", "cancel")


CURRENT: contextvars.ContextVar[Call | None] = contextvars.ContextVar("CURRENT", default=None)


class Factory:
    """Workers whose create and reset wait for the machine when the call asked them to.

    Without ``resets`` it has no ``reset`` at all: a return then awaits nothing, and the
    pool hands the worker on in the same step.
    """

    def __init__(self, resets: bool = True) -> None:
        self.workers: list[Worker] = []
        self.reset = self._reset if resets else None

    async def create(self) -> Worker:
        call = CURRENT.get()
        if call is not None and call.slow_create:
            await call.create_gate.wait()
        else:
            await anyio.lowlevel.checkpoint()
        if call is not None and call.create_fails:
            raise CreateFailed
        worker = Worker(len(self.workers) + 1)
        self.workers.append(worker)
        return worker

    async def close(self, worker: Worker) -> None:
        await anyio.lowlevel.checkpoint()
        worker.closed = True
        worker.closes += 1

    async def _reset(self, worker: Worker) -> None:
        call = CURRENT.get()
        if call is not None and call.slow_reset:
            await call.reset_gate.wait()
        else:
            await anyio.lowlevel.checkpoint()
        if call is not None and call.reset_fails:
            raise ResetFailed

    async def check(self, worker: Worker) -> bool:
        await anyio.lowlevel.checkpoint()
        return not (worker.dead or worker.sick)

    def is_closed(self, worker: Worker) -> bool:
        return worker.dead or worker.closed


class PoolModel:
    """The pool's rules over worker ids; every cascade of a step resolved at once."""

    def __init__(self, size: int, overflow: int, resets: bool = True, checks: bool = True) -> None:
        self.resets = resets
        self.checks = checks  # whether the factory has check() (awaited on the return of a raised block)
        self.size = size
        self.limit = size + overflow
        self.idle: list[int] = []
        self.total = 0
        self.waiters: deque[Call] = deque()
        self.open: set[int] = set()
        self.dead: set[int] = set()
        self.sick: set[int] = set()
        self.orphaned: set[int] = set()
        self.made = 0
        self.closed = False
        self.close_state = "open"  # open, draining, done
        self.close_deadline = 0.0
        self.holders: dict[int, Call] = {}  # worker -> the call holding or returning it

    # -- life cycle

    def start(self) -> None:
        for _ in range(self.size):
            self.made += 1
            self.open.add(self.made)
            self.idle.append(self.made)
        self.total = self.size

    def close(self, now: float) -> None:
        self.closed = True
        while self.waiters:
            self.done(self.waiters.popleft(), "closed")
        while self.idle:
            self.dispose(self.idle.pop())
        if self.busy():
            self.close_state = "draining"
            self.close_deadline = now + GRACE
        else:
            self.close_state = "done"

    def grace_over(self) -> None:
        for worker in list(self.holders):
            self.orphaned.add(worker)
            self.dispose(worker)
        self.close_state = "done"

    def busy(self) -> bool:
        return bool(self.holders.keys() - self.orphaned)

    # -- the rules

    def done(self, call: Call, outcome: str) -> None:
        call.phase = "done"
        call.expect = outcome
        if call.worker is not None and self.holders.get(call.worker) is call:
            del self.holders[call.worker]

    def hold(self, call: Call, worker: int) -> None:
        call.phase = "holding"
        call.worker = worker
        self.holders[worker] = call

    def dispose(self, worker: int) -> None:
        self.open.discard(worker)
        self.holders.pop(worker, None)
        self.total -= 1
        self.slot_freed()

    def next_waiter(self) -> Call | None:
        """The oldest waiter that will take what it is handed (a doomed one passes it on)."""
        while self.waiters:
            call = self.waiters.popleft()
            if not call.doomed:
                return call
            self.done(call, "cancelled")
        return None

    def slot_freed(self) -> None:
        call = self.next_waiter()
        if call is not None:
            self.total += 1
            self.begin_create(call)
            return
        if self.close_state == "draining" and not self.busy():
            self.close_state = "done"

    def checkout(self, call: Call, now: float) -> None:
        if self.closed:
            self.done(call, "closed")
            return
        while self.idle:
            worker = self.idle.pop()
            if worker not in self.dead:
                self.hold(call, worker)
                return
            self.dispose(worker)
        if self.total < self.limit:
            self.total += 1
            self.begin_create(call)
        else:
            call.phase = "waiting"
            call.deadline = now + (POOL_TIMEOUT if call.timeout is None else call.timeout)
            self.waiters.append(call)

    def begin_create(self, call: Call) -> None:
        call.phase = "creating"
        if not call.slow_create:
            self.finish_create(call)

    def finish_create(self, call: Call) -> None:
        if call.create_fails:
            self.total -= 1
            self.slot_freed()
            self.done(call, "create_failed")
            return
        self.made += 1
        self.open.add(self.made)
        if self.closed:
            self.dispose(self.made)
            self.done(call, "closed")
            return
        self.hold(call, self.made)

    def cancel_creating(self, call: Call) -> None:
        self.total -= 1
        self.slot_freed()
        self.done(call, "cancelled" if call.cancel == "native" else "scope")

    def give_back(self, worker: int) -> None:
        call = self.next_waiter()
        if call is not None:
            self.hold(call, worker)
            return
        if self.closed or self.total > self.size:
            self.dispose(worker)
            return
        self.idle.append(worker)

    def outcome(self, call: Call) -> str:
        """What the finished call's task shows."""
        if call.cancel == "native":
            return "cancelled"
        if call.block == "raise":
            return "raised"
        return "scope" if call.cancel == "scope" else "ok"

    def ret(self, call: Call) -> None:
        """The holder's block ended (``call.raised`` says how): the worker goes back."""
        worker = call.worker
        assert worker is not None
        if worker in self.orphaned:
            self.done(call, self.outcome(call))
            return
        dead = worker in self.dead or (call.raised and worker in self.sick)
        waiters = self.waiters
        if call.raised and self.checks:
            # The return awaits check() first: a waiter cancelled meanwhile has left by the time
            # the pool asks whether the worker is surplus.
            waiters = deque(waiter for waiter in waiters if not waiter.doomed)
        surplus = not waiters and self.total > self.size
        if not dead and not self.closed and not surplus and self.resets:
            if call.slow_reset:
                call.phase = "returning"
                return
            dead = call.reset_fails
        self.after_return(call, worker, dead)

    def after_return(self, call: Call, worker: int, dead: bool) -> None:
        del self.holders[worker]
        if dead:
            self.dispose(worker)
        else:
            self.give_back(worker)
        self.done(call, self.outcome(call))

    def finish_reset(self, call: Call) -> None:
        worker = call.worker
        assert worker is not None
        if worker in self.orphaned:
            self.done(call, self.outcome(call))
            return
        # Tested again once the reset is done: the server may have closed it meanwhile.
        self.after_return(call, worker, call.reset_fails or worker in self.dead)

    def cut_reset(self, call: Call) -> None:
        """A native cancel lands in the awaited reset: the worker is closed, not returned."""
        worker = call.worker
        assert worker is not None
        if worker in self.orphaned:
            self.done(call, "cancelled")
            return
        del self.holders[worker]
        self.dispose(worker)
        self.done(call, "cancelled")

    def time_passes(self, now: float) -> None:
        for call in [call for call in self.waiters if call.deadline is not None and call.deadline <= now]:
            self.waiters.remove(call)
            self.done(call, "timeout")
        if self.close_state == "draining" and now >= self.close_deadline:
            self.grace_over()


async def cancel_scope(scope: anyio.CancelScope) -> None:
    """``scope.cancel()``, from inside the loop as anyio needs."""
    scope.cancel()


class PoolMachine(LoopMachine):
    """The pool on a FakeClock, every await of it made to wait or be cancelled, step by step against the model."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(50.0)
        self.factory = Factory()
        self.calls: list[Call] = []
        self.closer: asyncio.Task[None] | None = None

    # Small pools, mostly without overflow: holders and waiters meet often. A ``plain`` factory
    # has no reset, check or is_closed: the pool's returns then await nothing (its fast paths),
    # and nothing can find a worker dead.
    @initialize(
        size=st.sampled_from([1, 1, 2]),
        overflow=st.sampled_from([0, 0, 1, 2]),
        resets=st.booleans(),
        plain=st.booleans(),
    )
    def setup(self, size: int, overflow: int, resets: bool, plain: bool) -> None:
        self.plain = plain
        resets = resets and not plain
        self.factory.reset = self.factory.reset if resets else None
        if plain:
            self.factory.check = self.factory.is_closed = None  # type: ignore[assignment]
        self.model = PoolModel(size, overflow, resets, checks=not plain)
        self.pool: ConnectionPool[Worker] = ConnectionPool(
            self.factory, size=size, max_overflow=overflow, timeout=POOL_TIMEOUT, clock=self.clock
        )
        self.run(self.pool.start())
        self.model.start()

    def in_phase(self, *phases: str) -> list[Call]:
        return [call for call in self.calls if call.phase in phases]

    async def holder(self, call: Call) -> str:
        CURRENT.set(call)
        with anyio.CancelScope() as scope:
            call.scope = scope
            lease = self.lease_nowait() if call.nowait else None
            if lease is None:
                async with self.pool.checkout(call.timeout) as conn:
                    await self.use(call, conn)
            else:
                try:
                    await self.use(call, lease.conn)
                except BaseException:
                    await self.give_back(lease, raised=True)
                    raise
                await self.give_back(lease, raised=False)
            await anyio.lowlevel.checkpoint()  # where a deferred scope cancellation lands
            return "ok"
        return "scope"

    async def use(self, call: Call, conn: Worker) -> None:
        call.conn = conn
        call.handed_dead = conn.dead or conn.closed
        call.release = asyncio.get_running_loop().create_future()
        how = await call.release
        if how == "raise":
            raise Raised

    def lease_nowait(self) -> PoolLease[Worker] | None:
        try:
            return self.pool.checkout_nowait()
        except anyio.WouldBlock:
            return None  # a worker must be created or waited for: ``async with pool.checkout()``

    async def give_back(self, lease: PoolLease[Worker], *, raised: bool) -> None:
        try:
            self.pool.checkin_nowait(lease, raised)
        except anyio.WouldBlock:
            await self.pool.checkin(lease, raised)

    # -- rules

    @precondition(lambda self: hasattr(self, "model"))
    @rule(
        timeout=st.sampled_from([None, 1.0, 3.0]),
        slow_create=st.booleans(),
        create_fails=st.integers(0, 5).map(lambda n: n == 0),
        slow_reset=st.booleans(),
        reset_fails=st.integers(0, 5).map(lambda n: n == 0),
        nowait=st.booleans(),
    )
    def checkout(
        self,
        timeout: float | None,
        slow_create: bool,
        create_fails: bool,
        slow_reset: bool,
        reset_fails: bool,
        nowait: bool,
    ) -> None:
        call = Call(len(self.calls) + 1, timeout, slow_create, create_fails, slow_reset, reset_fails, nowait)
        self.calls.append(call)
        call.task = self.spawn(self.holder(call))
        self.settle()
        self.model.checkout(call, self.clock.now())

    @precondition(lambda self: any(call.phase == "creating" for call in self.calls))
    @rule(data=st.data())
    def creation_finishes(self, data: st.DataObject) -> None:
        call = data.draw(st.sampled_from(self.in_phase("creating")))
        call.create_gate.set()
        self.settle()
        self.model.finish_create(call)

    @precondition(lambda self: any(call.phase == "holding" and call.cancel is None for call in self.calls))
    @rule(data=st.data(), how=st.sampled_from(["ok", "raise"]))
    def block_ends(self, data: st.DataObject, how: str) -> None:
        call = data.draw(st.sampled_from([call for call in self.in_phase("holding") if call.cancel is None]))
        assert call.release is not None
        call.block = how
        call.release.set_result(how)
        self.settle()
        self.model.ret(call)

    def finishable_resets(self) -> list[Call]:
        # Including returns whose reset outlasted close()'s grace: they must then do nothing.
        return self.in_phase("returning")

    @precondition(lambda self: bool(self.finishable_resets()))
    @rule(data=st.data())
    def reset_finishes(self, data: st.DataObject) -> None:
        call = data.draw(st.sampled_from(self.finishable_resets()))
        call.reset_gate.set()
        self.settle()
        self.model.finish_reset(call)

    def cancellable(self) -> list[Call]:
        return [call for call in self.calls if call.phase != "done" and call.cancel is None]

    @precondition(lambda self: bool(self.cancellable()))
    @rule(data=st.data(), kind=st.sampled_from(["native", "scope"]))
    def cancel(self, data: st.DataObject, kind: str) -> None:
        call = data.draw(st.sampled_from(self.cancellable()))
        call.cancel = kind
        assert call.task is not None
        if kind == "native":
            call.task.cancel()
        else:
            assert call.scope is not None
            self.run(cancel_scope(call.scope))
        self.settle()
        model = self.model
        if call.phase == "waiting":
            model.waiters.remove(call)
            model.done(call, "cancelled" if kind == "native" else "scope")
        elif call.phase == "creating":
            model.cancel_creating(call)
        elif call.phase == "holding":
            call.block = "cancel"  # the block ends with the cancellation: a raising return
            model.ret(call)
        elif call.phase == "returning" and kind == "native":
            model.cut_reset(call)
        # (A scope cancellation of a returning call waits for the shielded return to finish.)

    @precondition(
        lambda self: (
            any(call.phase == "holding" and call.cancel is None for call in self.calls) and bool(self.model.waiters)
        )
    )
    @rule(data=st.data(), how=st.sampled_from(["ok", "raise"]))
    def block_ends_as_a_waiter_is_cancelled(self, data: st.DataObject, how: str) -> None:
        # In one loop iteration: the holder's block ends, and the oldest waiter, to which the
        # worker (or the slot) is handed if the return needs no await, is cancelled before it
        # runs: it must pass on what it was handed. (task.cancel() only: an anyio scope's
        # cancellation is not delivered to a task whose wait is already over, so that waiter
        # simply goes on, as anyio decides.)
        holder = data.draw(st.sampled_from([call for call in self.in_phase("holding") if call.cancel is None]))
        waiter = self.model.waiters[0]
        assert holder.release is not None
        assert waiter.task is not None
        holder.block = how
        waiter.cancel = "native"
        waiter.doomed = True
        holder.release.set_result(how)
        waiter.task.cancel()
        self.settle()
        self.model.ret(holder)
        if waiter in self.model.waiters:  # the return awaited its reset: the waiter left first
            self.model.waiters.remove(waiter)
            self.model.done(waiter, "cancelled")

    @precondition(
        lambda self: (
            any(call.phase == "holding" and call.cancel is None for call in self.calls)
            and any(waiter.deadline is not None for waiter in self.model.waiters)
            and self.closer is None
        )
    )
    @rule(data=st.data(), how=st.sampled_from(["ok", "raise"]))
    def block_ends_as_a_waiter_times_out(self, data: st.DataObject, how: str) -> None:
        # In one loop iteration: the oldest waiter's checkout timeout fires (the pool's timer
        # hands it its timeout) and a holder's block ends before that waiter has run. The
        # timed-out waiter is still queued: the returned worker must pass it by.
        holder = data.draw(st.sampled_from([call for call in self.in_phase("holding") if call.cancel is None]))
        deadline = min(waiter.deadline for waiter in self.model.waiters if waiter.deadline is not None)
        assert holder.release is not None
        holder.block = how
        self.clock.set(deadline)  # wakes the pool's timer; nothing runs until settle()
        holder.release.set_result(how)
        self.settle()
        self.model.time_passes(self.clock.now())
        self.model.ret(holder)

    def mortal(self) -> list[int]:
        # Including workers whose return awaits the reset: they must then not be handed on.
        return sorted(self.model.open)

    @precondition(lambda self: hasattr(self, "model") and not self.plain and bool(self.mortal()))
    @rule(data=st.data(), how=st.sampled_from(["dead", "sick"]))
    def worker_dies(self, data: st.DataObject, how: str) -> None:
        worker_id = data.draw(st.sampled_from(self.mortal()))
        worker = self.factory.workers[worker_id - 1]
        if how == "dead":
            worker.dead = True
            self.model.dead.add(worker_id)
        else:
            worker.sick = True
            self.model.sick.add(worker_id)

    @precondition(lambda self: hasattr(self, "model"))
    @rule(seconds=st.sampled_from([0.5, 1.0, 2.5, GRACE]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.settle()
        self.model.time_passes(self.clock.now())

    @precondition(lambda self: hasattr(self, "model") and self.closer is None)
    @rule()
    def close(self) -> None:
        self.closer = self.spawn(self.pool.close(grace=GRACE))
        self.settle()
        self.model.close(self.clock.now())

    # -- invariants

    @invariant()
    def agrees_with_model(self) -> None:
        if not hasattr(self, "model"):
            return
        model = self.model
        status = self.pool.status()
        assert status.idle == len(model.idle), status
        assert status.in_use == model.total - len(model.idle), status
        assert status.waiting == len(model.waiters), status
        assert status.overflow == max(0, model.total - model.size), status
        assert status.idle + status.in_use <= model.limit
        opened = {worker.id for worker in self.factory.workers if not worker.closed}
        assert opened == model.open, f"open workers {sorted(opened)} != model {sorted(model.open)}"
        assert all(worker.closes <= 1 for worker in self.factory.workers), "a worker was closed twice"
        if self.closer is not None:
            assert self.closer.done() is (model.close_state == "done"), model.close_state

    @invariant()
    def every_call_where_the_model_says(self) -> None:
        holders: dict[int, Call] = {}
        for call in self.calls:
            task = call.task
            assert task is not None
            if call.phase == "done":
                assert task.done(), f"call {call.id} should have ended ({call.expect})"
                self.check_outcome(call, task)
                continue
            assert not task.done(), f"call {call.id} ended early: {task!r}"
            if call.phase in ("holding", "returning"):
                assert call.conn is not None
                assert call.conn.id == call.worker, (call.id, call.conn, call.worker)
                assert not call.handed_dead, "a dead worker was handed out"
                assert call.worker not in holders, f"worker {call.worker} lent to two holders"
                holders[call.worker] = call  # type: ignore[index]

    def check_outcome(self, call: Call, task: asyncio.Task[Any]) -> None:
        expect = call.expect
        if expect == "cancelled":
            assert task.cancelled(), f"call {call.id}: expected cancelled, got {task!r}"
            return
        assert not task.cancelled(), f"call {call.id}: expected {expect}, was cancelled"
        error = task.exception()
        expected_errors = {
            "timeout": PoolTimeout,
            "closed": PoolClosed,
            "create_failed": CreateFailed,
            "raised": Raised,
        }
        if expect in expected_errors:
            assert isinstance(error, expected_errors[expect]), f"call {call.id}: expected {expect}, got {error!r}"
        else:
            assert error is None, f"call {call.id}: expected {expect}, got {error!r}"
            assert task.result() == expect, f"call {call.id}: expected {expect}, got {task.result()!r}"

    def release(self) -> None:
        for call in self.calls:
            call.create_gate.set()
            call.reset_gate.set()
            if call.release is not None and not call.release.done():
                call.release.set_result("ok")
        self.settle()

    def close_machine(self) -> None:
        if not hasattr(self, "pool"):
            return
        closer = self.spawn(self.pool.close(grace=GRACE))
        self.settle()
        self.clock.advance(GRACE)  # a worker still lent is closed under its holder
        self.settle()
        self.run(asyncio.wait([closer], timeout=5))
        assert closer.done(), "close() never finished"
        assert all(worker.closed for worker in self.factory.workers), "a worker outlived close()"


PoolMachine.TestCase.settings = fast(200, stateful_step_count=40)
TestPoolModel = PoolMachine.TestCase


@pytest.mark.stress
@pytest.mark.timeout(1800)
class TestPoolModelStress(PoolMachine.TestCase):
    """The pool model with many more, longer examples (stress run)."""

    settings = heavy(1500, stateful_step_count=60)


# -- defects found by the model, one example each ---------------------------------------


@pytest.mark.parametrize("end", ["reset finishes", "holder cancelled"])
async def test_a_return_outlasting_the_close_grace_is_not_counted_twice(end: str) -> None:
    """A worker closed under its holder by close() after the grace is not closed or freed again when its return ends."""
    clock = FakeClock(50.0)
    factory = Factory()
    pool: ConnectionPool[Worker] = ConnectionPool(factory, size=1, timeout=POOL_TIMEOUT, clock=clock)
    await pool.start()
    call = Call(1, None, slow_create=False, create_fails=False, slow_reset=True, reset_fails=False)

    async def hold() -> None:
        CURRENT.set(call)
        async with pool.checkout():
            pass  # the return's reset now waits for call.reset_gate

    holder = asyncio.create_task(hold())
    await anyio.wait_all_tasks_blocked()
    closer = asyncio.create_task(pool.close(grace=GRACE))
    await anyio.wait_all_tasks_blocked()
    clock.advance(GRACE)
    await anyio.wait_all_tasks_blocked()
    assert closer.done()
    assert factory.workers[0].closed, "close() closed the worker under its holder"
    if end == "reset finishes":
        call.reset_gate.set()
        await holder
    else:
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
    await anyio.wait_all_tasks_blocked()
    assert factory.workers[0].closes == 1
    assert pool.status().in_use == 0


async def test_a_worker_that_died_during_its_reset_is_not_handed_to_a_waiter() -> None:
    """A worker found closed once its return's reset is done is replaced, not handed to the waiter."""
    clock = FakeClock(50.0)
    factory = Factory()
    pool: ConnectionPool[Worker] = ConnectionPool(factory, size=1, timeout=POOL_TIMEOUT, clock=clock)
    await pool.start()
    first = Call(1, None, slow_create=False, create_fails=False, slow_reset=True, reset_fails=False)
    handed: list[Worker] = []

    async def hold(call: Call | None) -> None:
        CURRENT.set(call)
        async with pool.checkout() as conn:
            handed.append(conn)
            handed_dead = conn.dead or conn.closed
        assert not handed_dead, "a dead worker was handed out"

    holder = asyncio.create_task(hold(first))
    await anyio.wait_all_tasks_blocked()  # its return now waits in the reset
    waiter = asyncio.create_task(hold(None))
    await anyio.wait_all_tasks_blocked()
    assert pool.status().waiting == 1
    factory.workers[0].dead = True  # the server closes it while the reset runs
    first.reset_gate.set()
    await holder
    await waiter
    assert handed[1] is not factory.workers[0]
    await pool.close()


@pytest.mark.parametrize("kind", ["native", "scope"])
async def test_a_waiter_cancelled_as_it_is_handed_a_worker_passes_it_on(kind: str) -> None:
    """The worker handed to a waiter in the loop iteration it is cancelled in goes back: nothing is lost."""
    factory = Factory(resets=False)
    pool: ConnectionPool[Worker] = ConnectionPool(factory, size=1, timeout=POOL_TIMEOUT, clock=FakeClock(50.0))
    await pool.start()
    release: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    scopes: list[anyio.CancelScope] = []

    async def hold() -> None:
        async with pool.checkout():
            await release

    async def wait() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            async with pool.checkout():
                pass

    holder = asyncio.create_task(hold())
    await anyio.wait_all_tasks_blocked()
    waiter = asyncio.create_task(wait())
    await anyio.wait_all_tasks_blocked()
    release.set_result(None)  # the holder hands its worker to the waiter when it runs...
    if kind == "native":
        waiter.cancel()  # ...and the waiter is cancelled before it runs
    else:
        scopes[0].cancel()
    await holder
    await asyncio.wait([waiter])
    status = pool.status()
    assert (status.idle, status.in_use, status.waiting) == (1, 0, 0)
    await pool.close()
