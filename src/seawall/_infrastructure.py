"""AsyncInfrastructure: rate limiter, breaker, pool and timeout, per key, in one call.

A protected call goes through the key's layers in a fixed order::

    rate limiter            (outside the timeout: a denial costs no scope)
    ┌ one anyio cancel scope with the call's timeout ───────────────┐
    │ circuit breaker  ->  pool checkout  ->  fn()                  │
    └───────────────────────────────────────────────────────────────┘

A denial never touches the breaker or the pool; a breaker rejection never
touches the pool. Expiry of the timeout raises :class:`ProtectionTimeout`,
which the breaker counts as a failure.

The timeout is the expensive layer if done naively (an event-loop timer per
call), so the cancel scope is entered without a deadline and registered with
the infrastructure's :class:`~seawall._deadline.DeadlineTimer`, one task that
cancels expired scopes (see that module for the design and its granularity).
Outside ``async with AsyncInfrastructure()`` there is no timer task, and each
call falls back to an ordinary anyio deadline.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.abc
from anyio import WouldBlock

from seawall._breaker import BreakerLike, CircuitBreaker
from seawall._clock import Clock, MonotonicClock, default_clock
from seawall._config import DEFAULT_TIMEOUT, BreakerConfig, PoolConfig, ProtectionConfig, RateLimitConfig, load_toml
from seawall._deadline import DeadlineTimer, Slot
from seawall._errors import (
    ConfigurationError,
    ConfigurationTypeError,
    ProtectionKeyNotFound,
    ProtectionTimeout,
    SeawallError,
)
from seawall._fastpath import nowait_breaker, nowait_limiter
from seawall._limiter import RateLimiter
from seawall._logging import logger
from seawall._pool import ConnectionPool, PoolLease
from seawall._registries import (
    CircuitBreakerRegistry,
    ConnectionManager,
    RateLimiterRegistry,
    bucket_key,
    jsonable,
)
from seawall._telemetry import (
    ANY_HANDLER,
    INFRA_EXECUTE_EXCEPTION,
    INFRA_EXECUTE_START,
    INFRA_EXECUTE_STOP,
    INFRA_PROTECTION_TRIGGERED,
)

__all__ = ["AsyncInfrastructure"]

T = TypeVar("T")

#: The entity whose bucket a call uses when it names none.
DEFAULT_ENTITY = "global"

_CancelScopeClass: Any = None

#: Seconds a closing pool waits for checked-out workers (at least the key's timeout).
_CLOSE_GRACE = 10.0

#: Plans of unconfigured keys kept at most (they are cheap to rebuild).
_MAX_ADHOC = 1024


def _cancel_scope_class() -> Any:
    """The running backend's own CancelScope class.

    ``anyio.CancelScope()`` dispatches to the backend on every construction
    (measured: 40% of the scope's cost); the class it returns is the same
    every time, so it is looked up once and called directly.
    """
    global _CancelScopeClass
    if _CancelScopeClass is None:
        _CancelScopeClass = type(anyio.CancelScope())
    return _CancelScopeClass


_CancelledClass: type[BaseException] | None = None


def _cancelled_class() -> type[BaseException]:
    """The running backend's cancellation exception (looked up once)."""
    global _CancelledClass
    if _CancelledClass is None:
        _CancelledClass = anyio.get_cancelled_exc_class()
    return _CancelledClass


class _NoLoop:
    """Just enough of an event loop to construct an already-finished future."""

    def get_debug(self) -> bool:
        return False


# A future finished at import time. Awaiting a finished future returns its
# result at once, touching neither its loop nor the running one (asyncio's C
# and Python futures alike, under any anyio backend): what the synchronous
# ``Protection.__aenter__``/``__aexit__`` hand to ``async with``.
_READY: asyncio.Future[None] = asyncio.Future(loop=_NoLoop())  # type: ignore[arg-type]
_READY.set_result(None)


async def _ready(value: T) -> T:
    """An awaitable of ``value`` (a pool's connection handed to ``async with``)."""
    return value


#: The slot of one-call plans: never filled by a timer, so its ``open`` stays None.
_NO_SLOT = Slot(DEFAULT_TIMEOUT)


class _Plan:
    """The compiled layers of one key (or of one call's options)."""

    __slots__ = (
        "acquire",
        "breaker",
        "bucket",
        "config",
        "drained",
        "inflight",
        "key",
        "limiter",
        "nowait",
        "nowait_breaker",
        "nowait_limiter",
        "owner",
        "pool",
        "slot",
        "timeout",
    )

    def __init__(
        self,
        key: str,
        config: ProtectionConfig | None,
        limiter: RateLimiter | None,
        bucket: str,
        breaker: BreakerLike | None,
        pool: ConnectionPool[Any] | None,
        timeout: float,
    ) -> None:
        self.key = key
        self.config = config
        self.limiter = limiter
        self.bucket = bucket
        self.breaker = breaker
        self.pool = pool
        self.timeout = timeout
        # The key's plan, which counts this plan's calls (a call's options make a new plan).
        self.owner: _Plan = self
        # Calls in flight on this plan: a replaced pool closes once they finish.
        self.inflight = 0
        self.drained: anyio.Event | None = None
        # The timer's slot for this plan's timeout: set for the kept plans (a
        # configured or unconfigured key); a one-call plan's never ticks.
        self.slot: Slot = _NO_SLOT
        # The layers whose non-waiting form decides every call (see _fastpath);
        # None where a layer must be awaited every time.
        self.nowait_limiter = nowait_limiter(limiter)
        # Its bucket's pre-checked handle, bound: the call skips the argument checks.
        self.acquire: Callable[[], None] | None = (
            None if self.nowait_limiter is None else self.nowait_limiter.bucket(bucket).acquire_nowait
        )
        self.nowait_breaker = nowait_breaker(breaker)
        # Whether the limiter and the breaker both decide without awaiting (or are absent).
        self.nowait = (limiter is None or self.nowait_limiter is not None) and (
            breaker is None or self.nowait_breaker is not None
        )


class AsyncInfrastructure:
    """Per-key protection: rate limiting, circuit breaking, pooling and a timeout.

    Args:
        backend: Where rate-limit buckets and breaker state live; in memory
            when ``None`` (``seawall.backends.RedisBackend`` shares them).
        clock: The monotonic clock of the timeouts and of every primitive
            created here (``seawall.testing.FakeClock`` in tests).

    Use it as ``async with AsyncInfrastructure() as infra:``; on exit every
    pool it started is closed (also when the body raised or was cancelled)
    and its timer task stops.
    """

    __slots__ = (
        "_adhoc",
        "_backend",
        "_clock",
        "_entered",
        "_now",
        "_pending",
        "_plans",
        "_pools",
        "_task_group",
        "_timer",
        "circuit_breaker",
        "connection_manager",
        "rate_limiter",
    )

    def __init__(self, *, backend: Any = None, clock: Clock | None = None) -> None:
        self._backend = backend
        self._clock: Clock = clock if clock is not None else default_clock
        self._now = self._clock.now
        self._timer = DeadlineTimer(self._clock)
        self._plans: dict[str, _Plan] = {}
        # Plans of unconfigured keys (the timeout alone), kept so such calls allocate nothing.
        self._adhoc: dict[str, _Plan] = {}
        self._pools: set[ConnectionPool[Any]] = set()  # every pool started here and not yet closed
        self._task_group: anyio.abc.TaskGroup | None = None
        self._entered = False
        self._pending: dict[str, ProtectionConfig] = {}
        self.rate_limiter = RateLimiterRegistry(self)
        self.circuit_breaker = CircuitBreakerRegistry(self)
        self.connection_manager = ConnectionManager(self)

    # -- lifecycle -------------------------------------------------------

    @classmethod
    def from_toml(cls, path: str | Path, *, backend: Any = None, clock: Clock | None = None) -> AsyncInfrastructure:
        """An infrastructure configured from a TOML file, one table per key.

        The file is read and validated now (errors name the file and the
        option's full path); the keys are configured on ``async with``.
        """
        infra = cls(backend=backend, clock=clock)
        infra._pending = load_toml(path)
        return infra

    async def __aenter__(self) -> AsyncInfrastructure:
        if self._entered:
            raise RuntimeError("an AsyncInfrastructure can be entered only once")
        self._entered = True
        _cancel_scope_class()
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        try:
            await task_group.start(self._timer.run)
            pending, self._pending = self._pending, {}
            for key, config in pending.items():
                await self.configure_protection(key, config)
        except BaseException as exc:
            await self._shutdown(exc)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        return await self._shutdown(exc)

    async def _shutdown(self, exc: BaseException | None) -> bool | None:
        task_group, self._task_group = self._task_group, None
        try:
            with anyio.CancelScope(shield=True):
                # Pools first: their close waits for calls still holding workers.
                for pool in list(self._pools):
                    await self._close_pool(pool)
        finally:
            if task_group is not None:
                # Only the timer task runs in the group: stop it. The body's own
                # exception is not handed to the group, which would wrap it in
                # an ExceptionGroup; it propagates from our __aexit__ as itself.
                task_group.cancel_scope.cancel()
                await task_group.__aexit__(None, None, None)
        return None

    async def aclose(self) -> None:
        """Close every pool started here and stop the timer (what ``async with`` does on exit)."""
        await self._shutdown(None)

    # -- configuration ---------------------------------------------------

    async def configure_protection(self, key: str, config: Mapping[str, Any] | ProtectionConfig) -> ProtectionConfig:
        """Configure (or reconfigure) the protection of ``key``.

        Args:
            key: The name calls use.
            config: A mapping with optional ``rate_limiter``, ``circuit_breaker``,
                ``connection_pool`` sections and ``timeout``, or a
                :class:`ProtectionConfig`.

        Returns:
            The validated configuration now in force.

        Raises:
            ConfigurationError: Something is invalid; ``path`` names it in full
                (``key.section.option``). The earlier configuration of ``key``
                stays in force, as it does when the new pool fails to start.
        """
        if not isinstance(key, str) or not key:
            raise ConfigurationError(f"a protection key must be a non-empty str, got {key!r}", path="key")
        validated = ProtectionConfig.from_mapping(config, key)
        limiter = self.rate_limiter.limiter(validated.rate_limiter) if validated.rate_limiter else None
        breaker = self._make_breaker(key, validated.circuit_breaker) if validated.circuit_breaker else None
        pool = await self._start_pool(key, validated.connection_pool) if validated.connection_pool else None
        # Nothing can fail from here on: swap everything in at once.
        plan = _Plan(
            key,
            validated,
            limiter,
            bucket_key(key, DEFAULT_ENTITY),
            breaker,
            pool,
            validated.timeout if validated.timeout is not None else DEFAULT_TIMEOUT,
        )
        old = self._plans.get(key)
        plan.slot = self._timer.slot(plan.timeout)
        self._plans[key] = plan
        self.rate_limiter.bind(key, limiter)
        if old is not None and old.breaker is not None and self.circuit_breaker._breakers.get(key) is old.breaker:
            self.circuit_breaker._set(key, None)
        if breaker is not None:
            self.circuit_breaker._set(key, breaker)
        if old is not None and old.pool is not None and self.connection_manager._pools.get(key) is old.pool:
            self.connection_manager._set(key, None)
        if pool is not None:
            self.connection_manager._set(key, pool)
        if old is not None and old.pool is not None:
            await self._retire_pool(old.pool, old)
        return validated

    async def configure_from_mapping(self, configs: Mapping[str, Any]) -> dict[str, ProtectionConfig]:
        """Configure several keys from ``{key: config}``; all are validated before any is applied."""
        if not isinstance(configs, Mapping):
            raise ConfigurationError(f"expected a mapping of key -> config, got {configs!r}", path=None)
        validated = {key: ProtectionConfig.from_mapping(config, key) for key, config in configs.items()}
        for key, config in validated.items():
            await self.configure_protection(key, config)
        return validated

    async def configure_from_toml(self, path: str | Path) -> dict[str, ProtectionConfig]:
        """Configure the keys of a TOML file (see :meth:`from_toml`)."""
        return await self.configure_from_mapping(load_toml(path))

    async def remove_protection(self, key: str) -> None:
        """Forget ``key``; its pool closes once calls in flight on it finish.

        Raises:
            ProtectionKeyNotFound: ``key`` is not configured.
        """
        plan = self._plans.pop(key, None)
        if plan is None:
            raise ProtectionKeyNotFound(name=key)
        if self.rate_limiter.for_operation(key) is plan.limiter:
            self.rate_limiter.bind(key, None)
        if plan.breaker is not None and self.circuit_breaker._breakers.get(key) is plan.breaker:
            self.circuit_breaker._set(key, None)
        if plan.pool is not None:
            if self.connection_manager._pools.get(key) is plan.pool:
                self.connection_manager._set(key, None)
            await self._retire_pool(plan.pool, plan)

    def list_protection_keys(self) -> list[str]:
        """The configured keys, sorted."""
        return sorted(self._plans)

    # -- the protected call ----------------------------------------------

    async def execute_protected(
        self,
        key: str,
        fn: Callable[[], Awaitable[T]],
        *,
        rate_limiter: str | tuple[str, str] | None = None,
        circuit_breaker: str | None = None,
        connection_pool: str | None = None,
        timeout: float | timedelta | None = None,  # noqa: ASYNC109 - the contract's API; it is the scope's deadline
    ) -> T:
        """Run ``await fn()`` through ``key``'s layers and return its result.

        Args:
            key: The protection key; an unknown key with no options runs
                ``fn`` under the default timeout alone.
            fn: A zero-argument async callable.
            rate_limiter: The entity whose bucket is counted (default
                ``"global"``), or an ``(operation, entity_id)`` pair.
            circuit_breaker: A breaker registered on ``infra.circuit_breaker``
                to use instead of the key's own.
            connection_pool: A pool registered on ``infra.connection_manager``
                to use instead of the key's own.
            timeout: Seconds for everything after the rate-limit check;
                default the key's timeout, else 5 s.

        Raises:
            RateLimitExceeded: The bucket is full.
            CircuitOpenError: The breaker rejected the call.
            PoolTimeout: No connection became free within the pool's timeout.
            ProtectionTimeout: The call did not finish within ``timeout``.
            Exception: Whatever ``fn`` raised, unchanged.
        """
        # Plans are truthy; an unconfigured key finds its cached timeout-only plan.
        plan = self._plans.get(key) or self._adhoc.get(key)
        if (
            plan is None
            or rate_limiter is not None
            or circuit_breaker is not None
            or connection_pool is not None
            or timeout is not None
        ):
            plan = self._call_plan(key, self._plans.get(key), rate_limiter, circuit_breaker, connection_pool, timeout)
        # One attribute read tells whether any telemetry handler is attached at
        # all; only then are the execute_* topics looked at one by one.
        if ANY_HANDLER.attached and (
            INFRA_EXECUTE_START.handlers or INFRA_EXECUTE_STOP.handlers or INFRA_EXECUTE_EXCEPTION.handlers
        ):
            async with Protection(self, plan):
                return await fn()
        # The unobserved hot path, written out flat: every coroutine frame and
        # object saved here is a measurable share of the whole chain's cost.
        # ``Protection`` is the same logic spread over __aenter__/__aexit__.
        # Each layer uses its primitive's synchronous non-waiting form where it
        # can decide (see _fastpath), else the waiting form.
        #
        # A replaced pool stays open for the calls that fetched the old plan:
        # a call holding a worker is waited for by the pool's own close(), and a
        # call that awaits anything before its checkout is counted in
        # ``owner.inflight`` from just before that first await. When every
        # layer decides without awaiting, nothing is awaited before the worker
        # is taken: nothing to count.
        pool = plan.pool
        counted = False
        try:
            limiter = plan.limiter
            if limiter is not None:
                try:
                    acquire = plan.acquire
                    if acquire is not None:
                        acquire()
                    else:
                        if pool is not None:
                            counted = True
                            plan.owner.inflight += 1
                        await limiter.hit(plan.bucket)
                except SeawallError as exc:
                    self._triggered(plan.key, "rate_limiter", exc)
                    raise
            scope = (_CancelScopeClass or _cancel_scope_class())()
            group: dict[Any, Any] | None
            with scope:
                # While the timer ticks, a key's calls register in its slot with
                # no clock read (see _deadline); else exactly, or on anyio's clock.
                group = plan.slot.open
                if group is not None:
                    group[scope] = None
                else:
                    group = self._register(plan, scope)
                try:
                    breaker = plan.breaker
                    if breaker is not None:
                        sync_breaker = plan.nowait_breaker
                        permit = None
                        try:
                            if sync_breaker is not None:
                                permit = sync_breaker.admit_nowait()
                            else:
                                if pool is not None and not counted:
                                    counted = True
                                    plan.owner.inflight += 1
                                await breaker.__aenter__()
                        except SeawallError as exc:
                            self._triggered(plan.key, "circuit_breaker", exc)
                            raise
                    try:
                        if pool is None:
                            result = await fn()
                        else:
                            try:
                                lease = pool.checkout_nowait()
                            except WouldBlock:
                                lease = None
                            except SeawallError as exc:
                                self._triggered(plan.key, "connection_pool", exc)
                                raise
                            if lease is not None:
                                try:
                                    result = await fn()
                                except BaseException:
                                    try:
                                        pool.checkin_nowait(lease, raised=True)
                                    except WouldBlock:
                                        await pool.checkin(lease, raised=True)  # shielded inside
                                    raise
                                try:
                                    pool.checkin_nowait(lease)
                                except WouldBlock:
                                    await pool.checkin(lease)
                            else:
                                if not counted:
                                    counted = True
                                    plan.owner.inflight += 1
                                checkout = pool.checkout()
                                try:
                                    await checkout.__aenter__()
                                except SeawallError as exc:
                                    self._triggered(plan.key, "connection_pool", exc)
                                    raise
                                try:
                                    result = await fn()
                                except BaseException as exc:
                                    await checkout.__aexit__(type(exc), exc, exc.__traceback__)
                                    raise
                                await checkout.__aexit__(None, None, None)
                    except BaseException as exc:
                        if breaker is None:
                            raise
                        if scope.cancel_called and isinstance(exc, _cancelled_class()):
                            # Our deadline fired: the breaker must see a timeout, a failure.
                            timed_out = self._timed_out(plan)
                            if sync_breaker is not None:
                                sync_breaker.settle_nowait(permit, timed_out)
                            else:
                                await breaker.__aexit__(ProtectionTimeout, timed_out, None)
                            raise timed_out from None
                        if sync_breaker is not None:
                            sync_breaker.settle_nowait(permit, exc)
                        else:
                            await breaker.__aexit__(type(exc), exc, exc.__traceback__)
                        raise
                    if breaker is not None:
                        if sync_breaker is None:
                            await breaker.__aexit__(None, None, None)
                        elif permit is not None:  # a success without a permit changes nothing
                            sync_breaker.settle_nowait(permit)
                    return result
                finally:
                    if group is not None:
                        try:
                            del group[scope]
                        except KeyError:
                            pass  # the timer expired it (and cancelled the scope)
            # Only reached when the scope swallowed its own cancellation.
            raise self._timed_out(plan)
        finally:
            if counted:
                _uncount(plan)

    def _register(self, plan: _Plan, scope: Any) -> dict[Any, Any] | None:
        """Give ``scope`` the plan's deadline exactly; return the dict to delete it from when done.

        On the timer when it runs (and start it ticking if the plan has a
        slot, so the next calls need no clock read), else as the scope's own
        anyio deadline (no infrastructure task: ``None``).
        """
        timer = self._timer
        timeout = plan.timeout
        if not timer.running:
            scope.deadline = anyio.current_time() + timeout
            return None
        group = timer.groups.get(timeout)
        if group is None:  # (an empty group is falsy: test for None)
            group = timer.group(timeout)
        group[scope] = self._now() + timeout
        if plan.slot is not _NO_SLOT:
            timer.start_ticking()
        timer.wake_if_idle()
        return group

    def _timed_out(self, plan: _Plan) -> ProtectionTimeout:
        error = ProtectionTimeout(key=plan.key, timeout=plan.timeout)
        self._triggered(plan.key, "timeout", error)
        logger.warning("protection_timeout", key=plan.key, timeout=plan.timeout)
        return error

    def protect(
        self,
        key: str,
        *,
        rate_limiter: str | tuple[str, str] | None = None,
        circuit_breaker: str | None = None,
        connection_pool: str | None = None,
        timeout: float | timedelta | None = None,
    ) -> Protection:
        """``async with infra.protect(key) as conn:`` protects a block like :meth:`execute_protected`.

        Yields the pool's connection (``None`` without a pool). The options are
        those of :meth:`execute_protected`.
        """
        # Plans are truthy; an unconfigured key finds its cached timeout-only plan.
        plan = self._plans.get(key) or self._adhoc.get(key)
        if (
            plan is None
            or rate_limiter is not None
            or circuit_breaker is not None
            or connection_pool is not None
            or timeout is not None
        ):
            plan = self._call_plan(key, self._plans.get(key), rate_limiter, circuit_breaker, connection_pool, timeout)
        # Protection(self, plan) without the __init__ frame (a tenth of the block's cost).
        protection = _new_protection(Protection)
        protection._infra = self
        protection._plan = plan
        protection._scope = protection._group = protection._held = protection._started = None
        protection._permit = _OUT
        return protection

    def _call_plan(
        self,
        key: str,
        base: _Plan | None,
        rate_limiter: str | tuple[str, str] | None,
        circuit_breaker: str | None,
        connection_pool: str | None,
        timeout: float | timedelta | None,
    ) -> _Plan:
        """A one-call plan: the key's layers with the call's options applied."""
        if base is None and not isinstance(key, str):
            # Configured keys are str; an unknown non-str key must not run as a key of its own.
            raise ConfigurationTypeError(f"a protection key must be a str, got {key!r}", path="key")
        if (
            base is None
            and rate_limiter is None
            and circuit_breaker is None
            and connection_pool is None
            and timeout is None
        ):
            adhoc = self._adhoc.get(key)
            if adhoc is None:
                if len(self._adhoc) >= _MAX_ADHOC:
                    self._adhoc.clear()  # many one-off keys: start over rather than grow
                adhoc = self._adhoc[key] = _Plan(key, None, None, "", None, None, DEFAULT_TIMEOUT)
                adhoc.slot = self._timer.slot(DEFAULT_TIMEOUT)
            return adhoc
        limiter = base.limiter if base is not None else None
        bucket = base.bucket if base is not None else bucket_key(key, DEFAULT_ENTITY)
        if rate_limiter is not None:
            if isinstance(rate_limiter, str):
                bucket = bucket_key(key, rate_limiter)
            elif (
                isinstance(rate_limiter, tuple)
                and len(rate_limiter) == 2
                and all(isinstance(part, str) for part in rate_limiter)
            ):
                operation, entity = rate_limiter
                limiter = self.rate_limiter.for_operation(operation) or limiter
                bucket = bucket_key(operation, entity)
            else:
                raise ConfigurationError(
                    f"{key}.rate_limiter: expected an entity id (str) or an (operation, entity_id) pair, "
                    f"got {rate_limiter!r}",
                    path=f"{key}.rate_limiter",
                )
            if limiter is None:
                raise ConfigurationError(
                    f"{key}.rate_limiter: no rate limit is configured for this key or operation",
                    path=f"{key}.rate_limiter",
                )
        breaker = base.breaker if base is not None else None
        if circuit_breaker is not None:
            breaker = self.circuit_breaker.get(circuit_breaker)
        pool = base.pool if base is not None else None
        if connection_pool is not None:
            pool = self.connection_manager.get(connection_pool)
        if timeout is not None:
            seconds = _timeout(timeout, f"{key}.timeout")
        else:
            seconds = base.timeout if base is not None else DEFAULT_TIMEOUT
        if base is not None and _same(limiter, bucket, breaker, pool, seconds, base):
            return base
        plan = _Plan(key, None, limiter, bucket, breaker, pool, seconds)
        if base is not None:
            # Count the call against the key's plan, whose pool it may use.
            plan.owner = base
        return plan

    # -- status ----------------------------------------------------------

    async def get_protection_status(self, key: str) -> dict[str, Any]:
        """The state of each of ``key``'s layers as a JSON-ready dict.

        Raises:
            ProtectionKeyNotFound: ``key`` is not configured.
        """
        plan = self._plans.get(key)
        if plan is None:
            raise ProtectionKeyNotFound(name=key)
        status: dict[str, Any] = {"key": key, "timeout": plan.timeout}
        if plan.limiter is not None:
            status["rate_limiter"] = jsonable((await plan.limiter.status(plan.bucket)).to_dict())
        if plan.breaker is not None:
            status["circuit_breaker"] = jsonable((await plan.breaker.status()).to_dict())
        if plan.pool is not None:
            status["connection_pool"] = jsonable(plan.pool.status().to_dict())
        return status

    async def get_infrastructure_status(self) -> dict[str, Any]:
        """Health of everything: every pool and breaker, the keys, the timer; JSON-ready.

        ``"status"`` is ``"healthy"`` when every pool is open and every
        breaker closed, else ``"degraded"``.
        """
        pools: dict[str, Any] = {}
        for name in self.connection_manager.list_pools():
            pool = self.connection_manager.get(name)
            healthy = not pool.closed
            pools[name] = {"healthy": healthy, **jsonable(pool.status().to_dict())}
        breakers: dict[str, Any] = {}
        for name in self.circuit_breaker.names():
            snapshot = jsonable((await self.circuit_breaker.get(name).status()).to_dict())
            breakers[name] = {"healthy": snapshot.get("state") != "open", **snapshot}
        healthy = all(p["healthy"] for p in pools.values()) and all(b["healthy"] for b in breakers.values())
        return {
            "status": "healthy" if healthy else "degraded",
            "keys": len(self._plans),
            "protection_keys": self.list_protection_keys(),
            "pools": pools,
            "circuit_breakers": breakers,
            "timer": {"running": self._timer.running, "pending": self._timer.pending, "expired": self._timer.expired},
        }

    health = get_infrastructure_status

    # -- internals used by the registries and Protection -----------------------

    def _make_limiter(self, config: RateLimitConfig) -> RateLimiter:
        options: dict[str, Any] = {"algorithm": config.algorithm, "backend": self._backend}
        if not isinstance(self._clock, MonotonicClock):
            options["clock"] = self._clock
        return RateLimiter(config.limit, config.window, **options)

    def _make_breaker(self, name: str, config: BreakerConfig) -> CircuitBreaker:
        return CircuitBreaker(name, **config.options(), backend=self._backend, clock=self._clock)

    async def _start_pool(self, name: str, config: PoolConfig) -> ConnectionPool[Any]:
        pool: ConnectionPool[Any] = ConnectionPool(
            config.factory,
            size=config.size,
            max_overflow=config.max_overflow,
            timeout=config.timeout,
            name=name,
            clock=self._clock,
        )
        await pool.start()
        self._pools.add(pool)
        return pool

    async def _close_pool(self, pool: ConnectionPool[Any], grace: float = _CLOSE_GRACE) -> None:
        self._pools.discard(pool)
        with anyio.CancelScope(shield=True):
            await pool.close(grace=grace)

    async def _retire_pool(self, pool: ConnectionPool[Any], plan: _Plan | None) -> None:
        """Close ``pool`` once the calls in flight on ``plan`` are done, without waiting here."""
        if plan is not None and plan.inflight and plan.drained is None:
            plan.drained = anyio.Event()
        if pool in self.connection_manager._pools.values():
            return  # still registered under another name: it stays open
        task_group = self._task_group
        if task_group is None:
            if plan is not None and plan.drained is not None:
                await plan.drained.wait()
            await self._close_pool(pool, max(_CLOSE_GRACE, plan.timeout) if plan is not None else _CLOSE_GRACE)
            return

        # Calls holding a worker are waited for by close() itself, for up to
        # ``grace``: long enough for any of them to finish or time out.
        grace = max(_CLOSE_GRACE, plan.timeout) if plan is not None else _CLOSE_GRACE

        async def close_when_drained() -> None:
            if plan is not None and plan.drained is not None:
                await plan.drained.wait()
            await self._close_pool(pool, grace)

        task_group.start_soon(close_when_drained)

    def _triggered(self, key: str, layer: str, exc: BaseException, metadata: Mapping[str, Any] | None = None) -> None:
        """Report that ``layer`` stopped a call (telemetry; the layer logs it itself)."""
        if INFRA_PROTECTION_TRIGGERED.handlers:
            meta: dict[str, Any] = {
                "key": key,
                "layer": layer,
                "error_type": getattr(exc, "error_type", type(exc).__name__),
                "retry_after": getattr(exc, "retry_after", None),
            }
            if metadata:
                meta["metadata"] = dict(metadata)
            INFRA_PROTECTION_TRIGGERED.emit({}, meta)

    def __repr__(self) -> str:
        return (
            f"AsyncInfrastructure(keys={self.list_protection_keys()!r}, "
            f"running={self._task_group is not None}, timer={self._timer!r})"
        )


def _uncount(plan: _Plan) -> None:
    """A counted call on ``plan`` is over; wake a retirement waiting for the last one."""
    owner = plan.owner
    owner.inflight -= 1
    if owner.inflight == 0 and owner.drained is not None:
        owner.drained.set()


def _same(
    limiter: RateLimiter | None,
    bucket: str,
    breaker: BreakerLike | None,
    pool: ConnectionPool[Any] | None,
    timeout: float,
    base: _Plan,
) -> bool:
    return (
        limiter is base.limiter
        and bucket == base.bucket
        and breaker is base.breaker
        and pool is base.pool
        and timeout == base.timeout
    )


def _timeout(value: object, path: str) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
        raise ConfigurationError(f"{path}: must be a finite number of seconds above 0, got {value!r}", path=path)
    return float(value)


class _Out:
    """The type of ``_OUT``: a block that has not entered its breaker."""

    __slots__ = ()


#: ``Protection._permit`` before the breaker admitted the block (``None`` is an admission without a permit).
_OUT = _Out()

_new_protection = object.__new__


class Protection:
    """One protected block: ``async with infra.protect(key) as conn:``; single use.

    Entering runs the rate limiter, enters the cancel scope, the breaker and
    the pool checkout; leaving unwinds them in reverse, turning the scope's
    own cancellation into :class:`ProtectionTimeout` *inside* the breaker so
    that the breaker counts it as a failure. The layers take the same
    synchronous non-waiting forms as ``execute_protected``.

    ``__aenter__`` and ``__aexit__`` are plain methods returning an awaitable
    (``async with`` needs no more): when every layer decides without
    awaiting and no telemetry handler is attached, they do the work at once
    and return an already-finished future, which spares two coroutine
    objects and frames per block (measured: about 75 ns of the protocol's
    265). Anything else returns the coroutine of the general path
    (``_enter``/``_exit``). The state is kept to seven fields because each
    one is stored on every block.
    """

    __slots__ = ("_group", "_held", "_infra", "_permit", "_plan", "_scope", "_started")

    def __init__(self, infra: AsyncInfrastructure, plan: _Plan) -> None:
        # (AsyncInfrastructure.protect() sets these same fields itself.)
        self._infra = infra
        self._plan = plan
        self._scope: Any = None
        self._group: dict[Any, Any] | None = None
        # The pool's PoolLease (non-waiting checkout) or PoolCheckout (waited for), once taken.
        self._held: Any = None
        # _OUT until the breaker admitted the block; then its BreakerPermit or None.
        self._permit: Any = _OUT
        self._started: float | None = None

    def __aenter__(self) -> Awaitable[Any]:
        if self._scope is not None:
            raise RuntimeError("a Protection can be entered only once; call infra.protect() again")
        plan = self._plan
        if not plan.nowait or (
            ANY_HANDLER.attached
            and (INFRA_EXECUTE_START.handlers or INFRA_EXECUTE_STOP.handlers or INFRA_EXECUTE_EXCEPTION.handlers)
        ):
            return self._enter()
        acquire = plan.acquire
        if acquire is not None:
            try:
                acquire()
            except SeawallError as exc:
                self._infra._triggered(plan.key, "rate_limiter", exc)
                raise
        scope = self._scope = (_CancelScopeClass or _cancel_scope_class())()
        scope.__enter__()
        group = self._group = plan.slot.open  # see execute_protected
        if group is not None:
            group[scope] = None
        else:
            self._group = self._infra._register(plan, scope)
        pool = plan.pool
        if pool is not None:
            # In flight from here to the end of the block: a replaced pool stays open until then.
            plan.owner.inflight += 1
        try:
            breaker = plan.nowait_breaker
            if breaker is not None:
                try:
                    self._permit = breaker.admit_nowait()
                except SeawallError as exc:
                    self._infra._triggered(plan.key, "circuit_breaker", exc)
                    raise
            if pool is None:
                return _READY
            try:
                lease = self._held = pool.checkout_nowait()
            except WouldBlock:
                return self._checkout_waiting(pool)
            except SeawallError as exc:
                self._infra._triggered(plan.key, "connection_pool", exc)
                raise
            conn = lease.conn
            return _READY if conn is None else _ready(conn)
        except BaseException as exc:
            return self._fail_entry(exc)

    async def _checkout_waiting(self, pool: ConnectionPool[Any]) -> Any:
        """The checkout must wait (no idle worker)."""
        checkout = pool.checkout()
        try:
            try:
                conn = await checkout.__aenter__()
            except SeawallError as exc:
                self._infra._triggered(self._plan.key, "connection_pool", exc)
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

    async def _enter(self) -> Any:
        """The general entry: telemetry, and layers that may have to be awaited."""
        plan = self._plan
        infra = self._infra
        if ANY_HANDLER.attached and (  # see execute_protected
            INFRA_EXECUTE_START.handlers or INFRA_EXECUTE_STOP.handlers or INFRA_EXECUTE_EXCEPTION.handlers
        ):
            self._started = infra._now()
            if INFRA_EXECUTE_START.handlers:
                INFRA_EXECUTE_START.emit(
                    {"monotonic_time": self._started, "system_time": time.time()}, {"key": plan.key}
                )
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
                self._finish(exc)
                raise
        pool = plan.pool
        scope = self._scope = (_CancelScopeClass or _cancel_scope_class())()
        scope.__enter__()
        self._group = infra._register(plan, scope)
        if pool is not None:
            plan.owner.inflight += 1  # see __aenter__
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

    def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Awaitable[bool | None]:
        if exc_type is None and self._started is None:
            # A success: give back synchronously where every layer can.
            # (Fields nothing reads again are not reset: the block is over.)
            plan = self._plan
            held = self._held
            if held is not None:
                if type(held) is not PoolLease:  # a waited-for checkout
                    return self._exit(None, None, None)
                try:
                    plan.pool.checkin_nowait(held)  # type: ignore[union-attr] # a lease implies the pool
                except WouldBlock:  # the return awaits reset/check: the worker is still lent
                    return self._exit(None, None, None)
                self._held = None
            permit = self._permit
            if permit is not _OUT:
                breaker = plan.nowait_breaker
                if breaker is None:
                    return self._exit(None, None, None)
                if permit is not None:  # a success without a permit changes nothing
                    self._permit = _OUT
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
            if plan.pool is not None:
                owner = plan.owner  # _uncount(plan), inline
                owner.inflight -= 1
                if owner.inflight == 0 and owner.drained is not None:
                    owner.drained.set()
            scope.__exit__(None, None, None)
            return _READY
        return self._exit(exc_type, exc, tb)

    async def _fail_exit(self, exc: BaseException) -> bool:
        """The breaker failed to settle a success: leave the scope with that error."""
        await self._exit(None, None, None)  # nothing left to give back but the scope
        raise exc

    async def _exit(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        """The general exit: give back, turn our own deadline into a timeout, settle the breaker."""
        plan = self._plan
        scope = self._scope
        original = raised = exc
        try:
            # 1. give the connection back (a failing check-in replaces the block's outcome)
            held = self._held
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
            if exc is not None and scope.cancel_called and isinstance(exc, _cancelled_class()):
                raised = self._infra._timed_out(plan)
                exc_type, tb = ProtectionTimeout, None
            # 3. the breaker hears the outcome
            permit = self._permit
            if permit is not _OUT:
                self._permit = _OUT
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
            if plan.pool is not None:
                _uncount(plan)
        if scope.__exit__(exc_type, raised, tb):  # pragma: no cover - its cancellation was turned into a timeout
            raise AssertionError("the protection's cancel scope swallowed an exception")
        if self._started is not None:
            self._finish(raised)
        if raised is None or raised is original:
            return False
        raise raised from None

    def _finish(self, exc: BaseException | None) -> None:
        started = self._started
        if started is None:
            return
        duration = self._infra._now() - started
        key = self._plan.key
        if exc is not None and INFRA_EXECUTE_EXCEPTION.handlers:
            INFRA_EXECUTE_EXCEPTION.emit(
                {"duration": duration},
                {
                    "key": key,
                    "kind": type(exc).__name__,
                    "error_type": getattr(exc, "error_type", None),
                    "reason": exc,
                },
            )
        if INFRA_EXECUTE_STOP.handlers:
            INFRA_EXECUTE_STOP.emit({"duration": duration}, {"key": key, "success": exc is None})
