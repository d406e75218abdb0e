"""One protected call: what ``async with infra.protect(key)`` enters and ``execute_protected`` runs ``fn`` in.

A :class:`ProtectedCall` takes its plan's layers in order, and gives them back
in reverse::

    rate limiter            (outside the timeout: a denial costs no scope)
    ┌ cancel scope, registered with the deadline timer ─────────────────────────┐
    │ circuit breaker  ->  concurrency slot  ->  pool checkout  ->  block / fn()  │
    └─────────────────────────────────────────────────────────────────────────────┘

There is one call path. ``execute_protected`` is ``async with
ProtectedCall(plan): return await fn()``, so the layer order, the telemetry
and the error mapping exist once, here. Each layer is asked through its
primitive's own non-waiting form first (``acquire_nowait`` of the limiter's
bucket, ``admit_nowait``/``settle_nowait`` of the breaker,
``acquire_nowait``/``release`` of the concurrency limiter (with the call's
``priority``), ``checkout_nowait``/``checkin_nowait`` of the pool), and only when that cannot
decide (``anyio.WouldBlock``: a remote store, a checkout that must wait, a
return that awaits ``reset``) through its waiting form. When every layer
decides at once, ``__aenter__`` and ``__aexit__`` are plain methods that do
the work and return a finished awaitable (``_awaitables.DONE``): no coroutine
is created for the block.

The outcome a breaker hears:

* the block's own exception (a failure unless the breaker excludes it);
* :class:`~seawall.ProtectionTimeout` when the call's own deadline fired: the
  cancel scope, and nobody else, decides that (its ``__exit__`` swallows the
  cancellation only when it was the scope's own). A cancellation from outside
  that lands in the same loop iteration as the deadline is the caller's: it
  propagates as cancellation and is no breaker outcome;
* a timeout as well when the block *finished* after its deadline because its
  code could not be cancelled (it blocked the loop, or waited on a thread):
  its result is returned (the work happened), the breaker counts a timeout,
  and a warning names the key.

The concurrency limiter's slot is given back after the pool's worker, with
what it says about the upstream: a success is a latency sample, a timeout
(the call's own deadline, or an overrun) a drop, anything else no sample.
A plan with a concurrency layer is never ``direct``: :func:`run_direct` does
not know the layer, and its calls take :class:`ProtectedCall`.

Cleanup survives cancellation: the pool's ``checkin`` shields itself, and a
remote breaker settling a cancelled call is shielded too (bounded by its
client's timeout), so a cancelled caller loses no worker and no trial slot.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import anyio
from anyio import WouldBlock

from seawall._awaitables import DONE, ready
from seawall._breaker import Unjudged
from seawall._concurrency import ConcurrencyLimiter
from seawall._errors import ConcurrencyLimitExceeded, ConfigurationTypeError, SeawallError
from seawall._plan import Plan, uncount
from seawall._pool import PoolLease
from seawall._telemetry import ANY_HANDLER, INFRA_EXECUTE_EXCEPTION, INFRA_EXECUTE_START, INFRA_EXECUTE_STOP

__all__ = ["OUT", "ProtectedCall", "run_direct", "watched"]

T = TypeVar("T")

#: Allocates a cancel scope of a class that ``_scopes.allocates_plainly`` approved (``host.scope_bare``).
_allocate = object.__new__


class _Out:
    """The type of ``OUT``: a call that has not entered its breaker."""

    __slots__ = ()


#: ``ProtectedCall._permit`` before the breaker admitted the call (``None`` is an admission without a permit).
OUT = _Out()


def watched() -> bool:
    """Whether a handler listens to ``execute_start``/``_stop``/``_exception``."""
    return bool(INFRA_EXECUTE_START.handlers or INFRA_EXECUTE_STOP.handlers or INFRA_EXECUTE_EXCEPTION.handlers)


# The stages of an entry, in the layers' order: what ``__aenter__`` takes next.
_LIMIT, _SCOPE, _BREAKER, _CONCURRENCY, _POOL, _ENTERED = range(6)
#: The layer a refusal at each stage comes from (telemetry's ``layer``).
_LAYERS = ("rate_limiter", "timeout", "circuit_breaker", "concurrency", "connection_pool", "connection_pool")


class ProtectedCall:
    """One protected call through a plan's layers; an async context manager, single use.

    ``async with`` yields the pool's connection (``None`` without a pool).
    Which awaits are checkpoints: entering checkpoints only where a layer must
    wait (a remote limiter or breaker, a pool checkout with no idle worker);
    leaving only where a layer must be awaited (a factory's ``reset``/``check``,
    a remote breaker) or the block failed.
    """

    __slots__ = (
        "_counted",
        "_general",
        "_group",
        "_held",
        "_observed",
        "_permit",
        "_plan",
        "_priority",
        "_scope",
        "_slot",
        "_stage",
        "_start",
    )

    def __init__(self, plan: Plan, priority: int = 0) -> None:
        if priority and (type(priority) is not int or priority < 0):
            # (A limiter checks the range against its own priorities; without one, only the type matters.)
            raise ConfigurationTypeError(
                f"priority: expected a non-negative integer, got {priority!r}", path="priority"
            )
        self._plan = plan
        self._priority = priority
        # The concurrency limiter's ticket while the call holds a slot (None: it holds none).
        self._slot: float | None = None
        self._stage = _LIMIT  # the next layer to take (see __aenter__)
        # (``_group`` and ``_start`` are set with ``_scope``, and read only once it is set:
        # two slot stores fewer per call.)
        self._scope: Any = None
        self._permit: Any = OUT
        # The pool's PoolLease (non-waiting checkout) or PoolCheckout (waited for).
        self._held: Any = None
        # Whether the call counts in plan.owner.inflight (it awaited before its checkout).
        self._counted = False
        # When an observed call (execute_* telemetry) started, else None.
        self._observed: float | None = None
        # Whether leaving must take the general (awaiting) path even after a success:
        # a layer is remote, the call counts in flight, or it is observed.
        self._general = not plan.nowait

    # -- entering ------------------------------------------------------------

    def __aenter__(self) -> Awaitable[Any]:
        """Take the layers from ``_stage`` on, each by its primitive's non-waiting form.

        Returns a finished awaitable of the pool's connection (``None``
        without a pool) when every layer decided at once; else a coroutine
        that awaits the layer at ``_stage`` (:meth:`_wait_and_resume`) and then
        comes back here for the rest. A refusal is reported and raised; a
        failure after the scope was entered unwinds what was taken.
        """
        plan = self._plan
        stage = self._stage
        if stage == _ENTERED:
            raise RuntimeError("a protected call can be entered only once; call infra.protect() again")
        try:
            if stage == _LIMIT:
                acquire = plan.acquire
                if acquire is not None and not ANY_HANDLER.attached:
                    acquire()
                elif plan.limiter is not None or ANY_HANDLER.attached:
                    return self._enter_limit()
                stage = _SCOPE
            if stage == _SCOPE:
                # The call's cancel scope, filed with the deadline timer at its exact deadline.
                host = plan.host
                if host.scope_bare:  # (see _scopes: the same scope, without two calls from C into Python)
                    scope = _allocate(host.scope_class)
                    scope.__init__()
                else:
                    scope = host.scope_class()
                self._scope = scope
                scope.__enter__()
                start = self._start = host.now()
                # (None: no timer runs, outside ``async with infra``; the scope got a deadline of its own)
                self._group = host.register(scope, start + plan.timeout, plan.timeout)
                stage = _BREAKER
            # (The breaker's and the pool's common cases are written out, not in methods:
            # a method call costs a tenth of what protect() adds to a block.)
            if stage == _BREAKER:
                breaker = plan.local_breaker
                if breaker is not None:
                    self._permit = breaker.admit_nowait()
                elif plan.breaker is not None:
                    self._stage = _BREAKER
                    return self._wait_and_resume()
            if plan.concurrency is not None and stage <= _CONCURRENCY:
                return self._enter_concurrency(plan.concurrency)
            stage = _POOL
            pool = plan.pool
            if pool is not None:
                try:
                    self._held = pool.checkout_nowait()
                except WouldBlock:
                    self._stage = _POOL
                    return self._wait_and_resume()
        except BaseException as exc:
            return self._entry_failed(exc, stage)
        self._stage = _ENTERED
        held = self._held
        if plan.chaos is not None:  # a key with fault injection (switched on or off at run time)
            return self._inject(held)
        conn = None if held is None else held.conn
        # (No pool, or a bulkhead's worker, which has no connection: DONE gives None with no coroutine.)
        return DONE if conn is None else ready(conn)

    def _enter_limit(self) -> Awaitable[Any]:
        """The limiter's stage when it is not one inline decision: the call is observed, or the limiter must wait.

        Called inside ``__aenter__``'s ``try``: a refusal raised here is reported there.
        """
        if ANY_HANDLER.attached:
            self._observe_start()
        plan = self._plan
        acquire = plan.acquire
        if acquire is not None:
            acquire()
        elif plan.limiter is not None:
            return self._wait_and_resume()  # (at _LIMIT)
        self._stage = _SCOPE
        return self.__aenter__()

    def _enter_concurrency(self, limiter: ConcurrencyLimiter) -> Awaitable[Any]:
        """Take a concurrency slot (its non-waiting form, else wait for one), then the rest of the entry."""
        try:
            self._slot = limiter.acquire_nowait(self._priority)
        except WouldBlock:
            self._stage = _CONCURRENCY
            return self._wait_and_resume()
        except BaseException as exc:
            return self._entry_failed(exc, _CONCURRENCY)
        self._stage = _POOL
        return self.__aenter__()

    async def _wait_and_resume(self) -> Any:
        """Await the layer at ``_stage`` (its waiting form), then take the rest without awaiting where it can."""
        try:
            conn = await self._wait()
        except BaseException as exc:
            if self._scope is None:  # refused by the rate limiter: nothing else was taken
                self._stage = _ENTERED  # (used: it cannot be entered again)
                self._uncount()
                self._finish(exc)
                raise
            await self._exit(type(exc), exc, exc.__traceback__)
            raise  # pragma: no cover - _exit raises the outcome of a failed entry
        if self._stage == _ENTERED:  # the waited-for checkout was the last layer
            return conn
        return await self.__aenter__()  # (it unwinds by itself if a later layer fails)

    async def _wait(self) -> Any:
        """Await the layer at ``_stage`` (its waiting form) and move past it; a checkout's connection."""
        plan = self._plan
        self._count()  # from the first await: a replaced pool stays open until the call ends
        stage = self._stage
        try:
            if stage == _LIMIT:
                assert plan.limiter is not None
                await plan.limiter.hit(plan.bucket)
                self._stage = _SCOPE
            elif stage == _BREAKER:
                await plan.breaker.__aenter__()  # type: ignore[union-attr]  # (a breaker is at this stage)
                self._permit = None
                self._stage = _CONCURRENCY
            elif stage == _CONCURRENCY:
                self._slot = await plan.concurrency.acquire(self._priority)  # type: ignore[union-attr]  # (at this stage)
                self._stage = _POOL
            else:
                checkout = plan.pool.checkout()  # type: ignore[union-attr]  # (a pool is at this stage)
                conn = await checkout.__aenter__()
                self._held = checkout
                self._stage = _ENTERED
                chaos = plan.chaos
                if chaos is not None and chaos.enabled:
                    await chaos.inject(plan.key)
                return conn
        except SeawallError as exc:
            plan.host.triggered(plan.key, _LAYERS[stage], exc)
            raise
        return None

    async def _inject(self, held: PoolLease[Any] | None) -> Any:
        """Fault injection (the key's ``"chaos"``): after every layer is taken, where a real fault would show.

        Returns the connection of ``held`` (the lease taken), ``None`` without a pool.
        """
        conn = None if held is None else held.conn
        plan = self._plan
        chaos = plan.chaos
        assert chaos is not None
        if not chaos.enabled:
            return conn
        try:
            await chaos.inject(plan.key)
        except BaseException as exc:
            await self._exit(type(exc), exc, exc.__traceback__)
            raise  # pragma: no cover - _exit raises the outcome of a failed entry
        return conn

    def _entry_failed(self, exc: BaseException, stage: int) -> Awaitable[Any]:
        """A layer refused (reported) or failed at ``stage``: raise, or unwind what was taken and raise."""
        plan = self._plan
        if isinstance(exc, SeawallError):
            plan.host.triggered(plan.key, _LAYERS[stage], exc)
        if self._scope is None:  # refused by the rate limiter: nothing else was taken
            self._stage = _ENTERED  # (used: it cannot be entered again)
            self._finish(exc)
            raise exc
        return self._fail_entry(exc)

    async def _fail_entry(self, exc: BaseException) -> None:
        """Unwind a synchronous entry that failed after its scope was entered, then raise."""
        await self._exit(type(exc), exc, exc.__traceback__)
        raise exc  # pragma: no cover - _exit raises the outcome of a failed entry

    # -- leaving -------------------------------------------------------------

    def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Awaitable[None]:
        """Give every layer back; synchronously after a success where each can, else in a coroutine."""
        plan = self._plan
        if exc_type is not None or self._general:
            return self._exit(exc_type, exc, tb)
        held = self._held
        if held is not None:
            if type(held) is not PoolLease:  # a waited-for checkout
                return self._exit(None, None, None)
            try:
                plan.pool.checkin_nowait(held)  # type: ignore[union-attr]  # (held implies a pool)
            except WouldBlock:  # the return awaits reset/check: the worker is still lent
                return self._exit(None, None, None)
            self._held = None
        scope = self._scope
        group = self._group
        if group is not None:
            group.pop(scope, None)  # (gone already if the timer expired it)
        scope.__exit__(None, None, None)
        if plan.host.now() - self._start >= plan.timeout:
            return self._settle_overrun()
        if self._slot is not None:
            self._release_slot(None)
        permit = self._permit
        if permit is not OUT:
            self._permit = OUT
            if not permit.plain:  # a closed call's shared permit: a success changes nothing
                try:
                    plan.local_breaker.settle_nowait(permit)  # type: ignore[union-attr]  # (a permit implies it)
                except BaseException as breaker_exc:
                    return self._raise(breaker_exc)
        return DONE

    async def _exit(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """The general exit: give back, let the scope tell our deadline from a cancellation, settle."""
        self._stage = _ENTERED  # (also after a failed entry: it cannot be entered again)
        original = exc
        try:
            exc = await self._give_back(exc)
        finally:
            self._close_scope()
        outcome, raised = self._leave_scope(exc)
        self._release_slot(outcome)
        raised = await self._settle(outcome, raised)
        self._uncount()
        self._finish(raised)
        if raised is None or raised is original:
            return  # (None: an exception of the block propagates as itself)
        raise raised

    async def _give_back(self, exc: BaseException | None) -> BaseException | None:
        """Return the worker; a failing check-in becomes the call's exception."""
        held = self._held
        if held is None:
            return exc
        self._held = None
        try:
            if type(held) is PoolLease:
                pool = self._plan.pool
                assert pool is not None
                try:
                    pool.checkin_nowait(held, exc is not None)
                except WouldBlock:
                    await pool.checkin(held, exc is not None)  # shielded inside
            else:
                await held.__aexit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)
        except BaseException as checkin_exc:
            return checkin_exc
        return exc

    def _close_scope(self) -> None:
        """Unfile the scope from the deadline timer (gone already if the timer expired it)."""
        if self._scope is None:  # never reached the scope: nothing is filed (and no _group is set)
            return
        group = self._group
        if group is not None:
            group.pop(self._scope, None)
            self._group = None

    def _leave_scope(self, exc: BaseException | None) -> tuple[BaseException | None, BaseException | None]:
        """Exit the cancel scope; return ``(what the breaker hears, what the caller gets)``."""
        plan = self._plan
        scope = self._scope
        if exc is None:
            scope.__exit__(None, None, None)  # (trio's returns True here: nothing to swallow)
            if plan.host.now() - self._start >= plan.timeout:
                return plan.host.timed_out(plan, overran=True), None
            return None, None
        try:
            swallowed = scope.__exit__(type(exc), exc, exc.__traceback__)
        except BaseException as scope_exc:  # the scope raised something else (e.g. a cancellation group)
            return scope_exc, scope_exc
        if swallowed:
            # Only the scope's own cancellation is swallowed, and only our timer
            # cancels it: this call's deadline fired.
            timeout = plan.host.timed_out(plan)
            return timeout, timeout
        return exc, exc

    async def _settle(self, outcome: BaseException | None, raised: BaseException | None) -> BaseException | None:
        """Tell the breaker how the call ended; a breaker that fails to settle replaces ``raised``."""
        permit = self._permit
        if permit is OUT:
            return raised
        self._permit = OUT
        if isinstance(outcome, ConcurrencyLimitExceeded):
            outcome = Unjudged()  # (load shedding says nothing of the dependency's health)
        plan = self._plan
        local = plan.local_breaker
        try:
            if local is not None:
                local.settle_nowait(permit, outcome)
            elif isinstance(outcome, Exception) or outcome is None:
                await plan.breaker.__aexit__(type(outcome) if outcome else None, outcome, None)  # type: ignore[union-attr]
            else:
                # A cancelled call frees its trial slot even while its caller is cancelled.
                with anyio.CancelScope(shield=True):
                    await plan.breaker.__aexit__(type(outcome), outcome, None)  # type: ignore[union-attr]
        except BaseException as breaker_exc:
            if breaker_exc is not outcome:
                return breaker_exc
        return raised

    def _settle_overrun(self) -> Awaitable[None]:
        """A success that finished after its deadline: the breaker counts a timeout; the result stands."""
        plan = self._plan
        timeout = plan.host.timed_out(plan, overran=True)
        self._release_slot(timeout)
        permit, self._permit = self._permit, OUT
        if permit is not OUT:
            breaker = plan.local_breaker
            assert breaker is not None
            try:
                breaker.settle_nowait(permit, timeout)
            except BaseException as breaker_exc:
                if breaker_exc is not timeout:
                    return self._raise(breaker_exc)
        return DONE

    @staticmethod
    async def _raise(exc: BaseException) -> None:
        raise exc

    def _release_slot(self, outcome: BaseException | None) -> None:
        """Give the concurrency slot back: a success is a latency sample, a timeout a drop, else no sample."""
        slot = self._slot
        if slot is None:
            return
        self._slot = None
        limiter = self._plan.concurrency
        assert limiter is not None
        if outcome is None:
            limiter.release(slot)
        elif isinstance(outcome, TimeoutError):
            limiter.release(slot, dropped=True)
        else:
            limiter.release(None)

    # -- bookkeeping ---------------------------------------------------------

    def _count(self) -> None:
        if self._plan.pool is not None and not self._counted:
            self._counted = self._general = True
            self._plan.owner.inflight += 1

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            uncount(self._plan)

    def _observe_start(self) -> None:
        """Start the ``execute_*`` telemetry of the call, if anyone listens (once)."""
        if self._observed is not None or not watched():
            return
        plan = self._plan
        started = self._observed = plan.host.now()
        self._general = True
        if INFRA_EXECUTE_START.handlers:
            INFRA_EXECUTE_START.emit({"monotonic_time": started, "system_time": time.time()}, {"key": plan.key})

    def _finish(self, exc: BaseException | None) -> None:
        """Emit ``execute_exception``/``execute_stop`` for an observed call."""
        started = self._observed
        if started is None:
            return
        plan = self._plan
        duration = plan.host.now() - started
        if exc is not None and INFRA_EXECUTE_EXCEPTION.handlers:
            INFRA_EXECUTE_EXCEPTION.emit(
                {"duration": duration},
                {
                    "key": plan.key,
                    "kind": type(exc).__name__,
                    "error_type": getattr(exc, "error_type", None),
                    "reason": exc,
                },
            )
        if INFRA_EXECUTE_STOP.handlers:
            INFRA_EXECUTE_STOP.emit({"duration": duration}, {"key": plan.key, "success": exc is None})

    @classmethod
    def _adopt(
        cls, plan: Plan, stage: int, scope: Any, group: Any, start: float, permit: Any, held: Any
    ) -> ProtectedCall:
        """A call whose layers up to ``stage`` :func:`run_direct` took already, to carry on from there."""
        call = cls(plan)
        call._stage = stage
        call._scope = scope
        call._group = group
        call._start = start
        call._permit = permit
        call._held = held
        return call

    def __repr__(self) -> str:
        state = "new" if self._scope is None else ("held" if self._held is not None else "open")
        return f"<ProtectedCall key={self._plan.key!r} {state}>"


async def run_direct(plan: Plan, fn: Callable[[], Awaitable[T]]) -> T:
    """``async with ProtectedCall(plan): return await fn()``, for a plan whose every layer decides at once.

    The one copy the hot path keeps (``execute_protected`` of a ``plan.direct``
    key while no telemetry handler is attached): :meth:`ProtectedCall.__aenter__`
    and ``__aexit__``'s common case written out in one frame, which measured
    22% fewer instructions per call than the object (no call object, no
    ``async with`` protocol). Only the common case is here: a refusal, a
    checkout or a return that must wait, ``fn`` raising, a breaker that fails
    to settle and a call that overran its deadline are handed to a
    :class:`ProtectedCall` holding what was taken (:meth:`ProtectedCall._adopt`),
    so each of those paths exists once. ``tests/test_protected_call_direct.py``
    runs both forms on the same cases.
    """
    acquire = plan.acquire
    if acquire is not None:
        try:
            acquire()
        except BaseException as exc:
            ProtectedCall(plan)._entry_failed(exc, _LIMIT)  # (raises: nothing else was taken)
            raise  # pragma: no cover
    host = plan.host
    if host.scope_bare:  # (as in ProtectedCall.__aenter__)
        scope = _allocate(host.scope_class)
        scope.__init__()
    else:
        scope = host.scope_class()
    scope.__enter__()
    start = host.now()
    group = host.register(scope, start + plan.timeout, plan.timeout)
    permit: Any = OUT
    breaker = plan.local_breaker
    pool = plan.pool
    lease = None
    try:
        if breaker is not None:
            permit = breaker.admit_nowait()
        if pool is not None:
            lease = pool.checkout_nowait()
    except BaseException as exc:
        call = ProtectedCall._adopt(plan, _POOL, scope, group, start, permit, None)
        if type(exc) is WouldBlock:  # a checkout that must wait
            return await _carry_on(call, fn, call._wait_and_resume())
        await call._entry_failed(exc, _BREAKER if permit is OUT and breaker is not None else _POOL)
        raise  # pragma: no cover - _entry_failed raises
    try:
        result = await fn()
    except BaseException as exc:
        await ProtectedCall._adopt(plan, _ENTERED, scope, group, start, permit, lease)._exit(
            type(exc), exc, exc.__traceback__
        )
        raise
    if lease is not None:
        try:
            pool.checkin_nowait(lease)  # type: ignore[union-attr]  # (a lease implies a pool)
        except WouldBlock:  # the return awaits reset/check: the worker is still lent
            await ProtectedCall._adopt(plan, _ENTERED, scope, group, start, permit, lease)._exit(None, None, None)
            return result
    if permit is not OUT and not permit.plain:
        # A permit whose settling changes the breaker (a trial): as the object leaves, from here on.
        await ProtectedCall._adopt(plan, _ENTERED, scope, group, start, permit, None).__aexit__(None, None, None)
        return result
    if group is not None:
        group.pop(scope, None)  # (gone already if the timer expired it)
    scope.__exit__(None, None, None)
    if host.now() - start >= plan.timeout:  # an overrun: the breaker counts a timeout; the result stands
        await ProtectedCall._adopt(plan, _ENTERED, scope, None, start, permit, None)._settle_overrun()
    return result


async def _carry_on(call: ProtectedCall, fn: Callable[[], Awaitable[T]], entry: Awaitable[Any]) -> T:
    """The rest of ``async with call: return await fn()`` once ``entry`` (the rest of its entry) is awaited."""
    await entry
    try:
        result = await fn()
    except BaseException as exc:
        await call.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    await call.__aexit__(None, None, None)
    return result
