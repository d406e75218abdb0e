"""``async with infra.protect(key) as conn:``: one protected block.

:class:`Protection` runs a block through its plan's layers in the order of
``execute_protected``: the rate limiter, then one cancel scope holding the
breaker, the pool checkout and the block. Leaving unwinds them in reverse
and turns the scope's own cancellation into :class:`ProtectionTimeout`
*inside* the breaker, so that the breaker counts it as a failure.

Two classes share that logic:

* :class:`Protection`, the general form: coroutine ``__aenter__`` and
  ``__aexit__`` that await whatever layer must be awaited and emit the
  ``execute_*`` telemetry.
* :class:`NowaitProtection`, for a plan whose limiter and breaker decide
  without awaiting (``Plan.nowait``) while nobody observes ``execute_*``:
  ``__aenter__`` and ``__aexit__`` are plain methods that do the work at once
  and return a finished awaitable (``_awaitables.DONE``), which spares two
  coroutine objects and frames per block. They write out the common cases of
  the breaker's ``admit_nowait`` (closed, nobody timing) and of the pool's
  ``checkout_nowait``/``checkin_nowait`` (see ``ConnectionPool._fast_take``)
  rather than call them: each of those frames is a measurable share of the
  chain. Whatever they cannot finish synchronously (a checkout that must
  wait, a return that awaits ``reset``, any exception) they hand to the
  general coroutines.

``AsyncInfrastructure.protect()`` picks the class. The block's state is kept
in as few fields as possible, because each one is stored on every block: the
fast path stores only those of the layers its plan has, and the shared
unwinding reads the others with their defaults.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from types import TracebackType
from typing import Any

from anyio import WouldBlock

from seawall import _plan
from seawall._awaitables import DONE, ready
from seawall._errors import ProtectionTimeout, SeawallError
from seawall._fastpath import CLOSED
from seawall._plan import Plan, cancel_scope_class, cancelled_class, uncount
from seawall._pool import ConnectionPool, PoolLease
from seawall._telemetry import (
    ANY_HANDLER,
    BREAKER_CALL_EXECUTED,
    INFRA_EXECUTE_EXCEPTION,
    INFRA_EXECUTE_START,
    INFRA_EXECUTE_STOP,
)

__all__ = ["OUT", "NowaitProtection", "Protection", "watched"]


class _Out:
    """The type of ``OUT``: a block that has not entered its breaker."""

    __slots__ = ()


#: ``Protection._permit`` before the breaker admitted the block (``None`` is an admission without a permit).
OUT = _Out()


def watched() -> bool:
    """Whether a handler listens to ``execute_start``/``_stop``/``_exception``.

    Callers test ``ANY_HANDLER.attached`` first: one attribute read when no
    handler is attached anywhere.
    """
    return bool(INFRA_EXECUTE_START.handlers or INFRA_EXECUTE_STOP.handlers or INFRA_EXECUTE_EXCEPTION.handlers)


class Protection:
    """One protected block: ``async with infra.protect(key) as conn:``; single use.

    Made by ``AsyncInfrastructure.protect()``, which sets ``_plan`` and
    ``_scope = None``. The other fields:

    * ``_scope``, ``_group``: the block's cancel scope and the timer's dict it
      is registered in (``None``: the scope carries its own deadline);
    * ``_held``: the pool's ``PoolLease`` (non-waiting checkout) or
      ``PoolCheckout`` (waited for), once taken;
    * ``_permit``: ``OUT`` until the breaker admitted the block, then its
      ``BreakerPermit`` or ``None``;
    * ``_counted``: whether the block counts in ``plan.owner.inflight``
      (it awaited something before its checkout);
    * ``_started``: when an observed block started (for ``execute_stop``).
    """

    __slots__ = ("_counted", "_group", "_held", "_permit", "_plan", "_scope", "_started")

    _plan: Plan
    _scope: Any
    _group: dict[Any, Any] | None
    _held: Any
    _permit: Any
    _counted: bool
    _started: float | None

    async def __aenter__(self) -> Any:
        """The general entry: telemetry, and layers that may have to be awaited."""
        if self._scope is not None:
            raise RuntimeError("a Protection can be entered only once; call infra.protect() again")
        plan = self._plan
        infra = plan.infra
        self._held = None
        self._permit = OUT
        self._counted = False
        self._started = None
        if ANY_HANDLER.attached and watched():
            self._started = infra._now()
            if INFRA_EXECUTE_START.handlers:
                INFRA_EXECUTE_START.emit(
                    {"monotonic_time": self._started, "system_time": time.time()}, {"key": plan.key}
                )
        pool = plan.pool
        if pool is not None:
            # In flight from before the first await: a replaced pool stays open until the block ends.
            self._counted = True
            plan.owner.inflight += 1
        limiter = plan.limiter
        if limiter is not None:
            try:
                if plan.acquire is not None:
                    plan.acquire()
                else:
                    await limiter.hit(plan.bucket)
            except BaseException as exc:
                if isinstance(exc, SeawallError):
                    infra._triggered(plan.key, "rate_limiter", exc)
                if self._counted:
                    self._counted = False
                    uncount(plan)
                self._finish(exc)
                raise
        scope = self._scope = (_plan.scope_class or cancel_scope_class())()
        scope.__enter__()
        self._group = infra._register(plan, scope)
        try:
            breaker = plan.breaker
            if breaker is not None:
                try:
                    sync_breaker = plan.nowait_breaker
                    if sync_breaker is not None:
                        self._permit = sync_breaker.admit_nowait()
                    else:
                        await breaker.__aenter__()
                        self._permit = None
                except SeawallError as exc:
                    infra._triggered(plan.key, "circuit_breaker", exc)
                    raise
            if pool is None:
                return None
            try:
                lease = self._held = pool.checkout_nowait()
            except WouldBlock:
                pass
            except SeawallError as exc:
                infra._triggered(plan.key, "connection_pool", exc)
                raise
            else:
                return lease.conn
            checkout = pool.checkout()
            try:
                conn = await checkout.__aenter__()
            except SeawallError as exc:
                infra._triggered(plan.key, "connection_pool", exc)
                raise
            self._held = checkout
            return conn
        except BaseException as exc:
            await self._exit(type(exc), exc, exc.__traceback__)
            raise  # pragma: no cover - _exit raises the outcome of a failed entry

    async def _exit(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        """The general exit: give back, turn our own deadline into a timeout, settle the breaker."""
        plan = self._plan
        scope = self._scope
        original = raised = exc
        try:
            # 1. give the connection back (a failing check-in replaces the block's outcome)
            held = getattr(self, "_held", None)
            if held is not None:
                self._held = None
                try:
                    if type(held) is PoolLease:
                        pool = plan.pool
                        assert pool is not None
                        try:
                            pool.checkin_nowait(held, exc is not None)
                        except WouldBlock:
                            await pool.checkin(held, exc is not None)  # shielded inside
                    else:
                        await held.__aexit__(exc_type, exc, tb)
                except BaseException as checkin_exc:
                    raised = exc = checkin_exc
                    exc_type, tb = type(checkin_exc), checkin_exc.__traceback__
            # 2. our own deadline fired (no one else holds this scope): a timeout
            if exc is not None and scope.cancel_called and isinstance(exc, cancelled_class()):
                raised = plan.infra._timed_out(plan)
                exc_type, tb = ProtectionTimeout, None
            # 3. the breaker hears the outcome
            permit: Any = getattr(self, "_permit", OUT)
            if permit is not OUT:
                self._permit = OUT
                breaker = plan.breaker
                assert breaker is not None
                sync_breaker = plan.nowait_breaker
                try:
                    if sync_breaker is None:
                        await breaker.__aexit__(exc_type, raised, tb)
                    elif raised is not None or permit is not None:  # a success without a permit changes nothing
                        sync_breaker.settle_nowait(permit, raised)
                except BaseException as breaker_exc:
                    if breaker_exc is not raised:
                        raised, exc_type, tb = breaker_exc, type(breaker_exc), breaker_exc.__traceback__
        finally:
            group = self._group
            if group is not None:
                group.pop(scope, None)
            if getattr(self, "_counted", False):
                self._counted = False
                uncount(plan)
        if scope.__exit__(exc_type, raised, tb):  # pragma: no cover - its cancellation was turned into a timeout
            raise AssertionError("the protection's cancel scope swallowed an exception")
        if getattr(self, "_started", None) is not None:
            self._finish(raised)
        if raised is None or raised is original:
            return False
        raise raised from None

    __aexit__ = _exit

    def _finish(self, exc: BaseException | None) -> None:
        """Emit ``execute_exception``/``execute_stop`` for an observed block."""
        started = self._started
        if started is None:
            return
        plan = self._plan
        duration = plan.infra._now() - started
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


class NowaitProtection(Protection):
    """A block whose layers are tried synchronously first (see the module doc).

    It stores only ``_scope``, ``_group``, and ``_permit``/``_held`` where its
    plan has a breaker/pool. It never counts in ``plan.owner.inflight``
    unless its checkout must wait: nothing is awaited before a synchronous
    checkout, so no pool swap can come between, and a replaced pool's own
    ``close()`` waits for the workers it lent (as in ``execute_protected``).
    """

    __slots__ = ()

    def __aenter__(self) -> Awaitable[Any]:  # type: ignore[override] # an awaitable, as async with needs
        if self._scope is not None:
            raise RuntimeError("a Protection can be entered only once; call infra.protect() again")
        plan = self._plan
        acquire = plan.acquire
        if acquire is not None:
            try:
                acquire()
            except SeawallError as exc:
                plan.infra._triggered(plan.key, "rate_limiter", exc)
                raise
        scope = self._scope = (_plan.scope_class or cancel_scope_class())()
        scope.__enter__()
        # While the timer ticks, a kept plan registers in its slot with no
        # clock read (see _deadline); else exactly, or on anyio's clock.
        group = self._group = plan.slot.open
        if group is not None:
            group[scope] = None
        else:
            self._group = plan.infra._register(plan, scope)
        try:
            record = plan.breaker_record
            if record is not None:
                # admit_nowait()'s common case inline (its frame is half its cost):
                # a closed breaker that nobody times admits with nothing to remember.
                if record.state is CLOSED and not BREAKER_CALL_EXECUTED.handlers:
                    self._permit = None
                else:
                    breaker = plan.nowait_breaker
                    assert breaker is not None
                    try:
                        self._permit = breaker.admit_nowait()
                    except SeawallError as exc:
                        plan.infra._triggered(plan.key, "circuit_breaker", exc)
                        raise
            pool = plan.pool
            if pool is None:
                return DONE
            idle = pool._idle
            if idle and pool._fast_take and not ANY_HANDLER.attached:
                # checkout_nowait()'s common case inline (see ConnectionPool._fast_take).
                lease = self._held = idle.pop()
                pool._busy.add(lease)
            else:
                try:
                    lease = self._held = pool.checkout_nowait()
                except WouldBlock:
                    return self._checkout_waiting(pool)
                except SeawallError as exc:
                    plan.infra._triggered(plan.key, "connection_pool", exc)
                    raise
            conn = lease.conn
            return DONE if conn is None else ready(conn)
        except BaseException as exc:
            return self._fail_entry(exc)

    async def _checkout_waiting(self, pool: ConnectionPool[Any]) -> Any:
        """The checkout must wait (no idle worker)."""
        plan = self._plan
        # From its first await the block counts: a replaced pool stays open until it ends.
        self._counted = True
        plan.owner.inflight += 1
        checkout = pool.checkout()
        try:
            try:
                conn = await checkout.__aenter__()
            except SeawallError as exc:
                plan.infra._triggered(plan.key, "connection_pool", exc)
                raise
        except BaseException as exc:
            await self._exit(type(exc), exc, exc.__traceback__)
            raise  # pragma: no cover - _exit raises the outcome of a failed entry
        self._held = checkout
        return conn

    async def _fail_entry(self, exc: BaseException) -> None:
        """Unwind a synchronous entry that failed after its scope was entered, then raise."""
        await self._exit(type(exc), exc, exc.__traceback__)
        raise exc  # pragma: no cover - _exit raises the outcome of a failed entry

    def __aexit__(  # type: ignore[override] # an awaitable, as async with needs
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Awaitable[bool | None]:
        if exc_type is not None:
            return self._exit(exc_type, exc, tb)
        # A success: give back synchronously where every layer can.
        plan = self._plan
        pool = plan.pool
        if pool is not None:
            held = self._held
            if type(held) is not PoolLease:  # a waited-for checkout
                return self._exit(None, None, None)
            if (
                pool._fast_return
                and held._lent_at is None
                and not pool._waiters
                and pool._total - pool._closing <= pool._size
            ):
                # checkin_nowait()'s common case inline (see ConnectionPool._fast_return).
                pool._busy.remove(held)
                pool._idle.append(held)
            else:
                try:
                    pool.checkin_nowait(held)
                except WouldBlock:  # the return awaits reset/check: the worker is still lent
                    return self._exit(None, None, None)
            self._held = None
        breaker = plan.nowait_breaker
        if breaker is not None:
            permit = self._permit
            if permit is not None:  # a success without a permit changes nothing
                self._permit = OUT
                try:
                    breaker.settle_nowait(permit)
                except BaseException as breaker_exc:
                    return self._fail_exit(breaker_exc)
        scope = self._scope
        group = self._group
        if group is not None:
            try:
                del group[scope]
            except KeyError:
                pass  # the timer expired it; the block ended anyway
        scope.__exit__(None, None, None)
        return DONE

    async def _fail_exit(self, exc: BaseException) -> bool:
        """The breaker failed to settle a success: leave the scope with that error."""
        await self._exit(None, None, None)  # nothing left to give back but the scope
        raise exc
