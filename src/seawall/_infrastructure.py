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

from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.abc
from anyio import WouldBlock

from seawall import _plan
from seawall._breaker import BreakerLike, CircuitBreaker
from seawall._checks import seconds as check_seconds
from seawall._clock import Clock, MonotonicClock, default_clock
from seawall._config import DEFAULT_TIMEOUT, BreakerConfig, PoolConfig, ProtectionConfig, RateLimitConfig, load_toml
from seawall._deadline import DeadlineTimer
from seawall._errors import (
    ConfigurationError,
    ConfigurationTypeError,
    ProtectionKeyNotFound,
    ProtectionTimeout,
    SeawallError,
)
from seawall._fastpath import CLOSED
from seawall._limiter import RateLimiter
from seawall._logging import logger
from seawall._plan import NO_SLOT, Plan, cancel_scope_class, cancelled_class, uncount
from seawall._pool import ConnectionPool
from seawall._protection import NowaitProtection, Protection, watched
from seawall._registries import (
    CircuitBreakerRegistry,
    ConnectionManager,
    RateLimiterRegistry,
    bucket_key,
    jsonable,
)
from seawall._telemetry import (
    ANY_HANDLER,
    BREAKER_CALL_EXECUTED,
    INFRA_PROTECTION_TRIGGERED,
)

__all__ = ["AsyncInfrastructure"]

T = TypeVar("T")

#: The entity whose bucket a call uses when it names none.
DEFAULT_ENTITY = "global"

#: Seconds a closing pool waits for checked-out workers (at least the key's timeout).
_CLOSE_GRACE = 10.0

#: Plans of unconfigured keys kept at most (they are cheap to rebuild).
_MAX_ADHOC = 1024
#: Entity plans kept per key (``protect(key, rate_limiter=entity)``) before they are dropped and rebuilt.
_MAX_ENTITY_PLANS = 1024


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
        self._plans: dict[str, Plan] = {}
        # Plans of unconfigured keys (the timeout alone), kept so such calls allocate nothing.
        self._adhoc: dict[str, Plan] = {}
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
        cancel_scope_class()
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
        plan = Plan(
            self,
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
        if old is not None and old.timeout != plan.timeout:
            self._release_slot(old.timeout)
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
        self._release_slot(plan.timeout)
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
        if ANY_HANDLER.attached and watched():
            block = Protection()
            block._plan = plan
            block._scope = None
            async with block:
                return await fn()
        # The unobserved hot path, written out flat: every coroutine frame and
        # object saved here is a measurable share of the whole chain's cost.
        # ``Protection``/``NowaitProtection`` are the same logic spread over
        # __aenter__/__aexit__ (see _protection). Each layer uses its primitive's synchronous non-waiting form where it
        # can decide (see _fastpath), else the waiting form.
        #
        # A replaced pool stays open for the calls that fetched the old plan
        # (uncount() in _plan): a call holding a worker is waited for by the
        # pool's own close(), and a call that awaits anything before its
        # checkout is counted in ``owner.inflight`` from just before that first
        # await. When every layer decides without awaiting, nothing is awaited
        # before the worker is taken: nothing to count.
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
            scope = (_plan.scope_class or cancel_scope_class())()
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
                        record = plan.breaker_record
                        # admit_nowait()'s common case inline (its frame is half its cost):
                        # a closed breaker that nobody times admits with nothing to remember.
                        if record is None or record.state is not CLOSED or BREAKER_CALL_EXECUTED.handlers:
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
                            idle = pool._idle
                            if idle and pool._fast_take and not ANY_HANDLER.attached:
                                # checkout_nowait()'s common case inline (see ConnectionPool._fast_take).
                                lease = idle.pop()
                                pool._busy.add(lease)
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
                                if (
                                    pool._fast_return
                                    and lease._lent_at is None
                                    and not pool._waiters
                                    and pool._total - pool._closing <= pool._size
                                ):
                                    # checkin_nowait()'s common case inline (see ConnectionPool._fast_return).
                                    pool._busy.remove(lease)
                                    pool._idle.append(lease)
                                else:
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
                        if scope.cancel_called and isinstance(exc, cancelled_class()):
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
                uncount(plan)

    def _register(self, plan: Plan, scope: Any) -> dict[Any, Any] | None:
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
        if plan.slot is not NO_SLOT:
            timer.start_ticking()
        timer.wake_if_idle()
        return group

    def _timed_out(self, plan: Plan) -> ProtectionTimeout:
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
        # The synchronous form unless a layer must be awaited or execute_* is observed.
        # (Protection has no __init__: its fields are set here, sparing a frame.)
        block = NowaitProtection() if plan.nowait and not (ANY_HANDLER.attached and watched()) else Protection()
        block._plan = plan
        block._scope = None
        return block

    def _call_plan(
        self,
        key: str,
        base: Plan | None,
        rate_limiter: str | tuple[str, str] | None,
        circuit_breaker: str | None,
        connection_pool: str | None,
        timeout: float | timedelta | None,
    ) -> Plan:
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
                adhoc = self._adhoc[key] = Plan(self, key, None, None, "", None, None, DEFAULT_TIMEOUT)
                adhoc.slot = self._timer.slot(DEFAULT_TIMEOUT)
            return adhoc
        # A bucket per entity (per user, per client address) is the commonest
        # call option: its plan is kept on the key's plan, so that the entity's
        # next call finds its bucket handle and timer slot ready. A reconfigured
        # key drops them with its old plan.
        kept_entity = (
            rate_limiter
            if isinstance(rate_limiter, str) and circuit_breaker is None and connection_pool is None and timeout is None
            else None
        )
        if base is not None and kept_entity is not None:
            kept = base.entities.get(kept_entity)
            if kept is not None:
                return kept
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
            seconds = check_seconds(timeout, f"{key}.timeout")
        else:
            seconds = base.timeout if base is not None else DEFAULT_TIMEOUT
        if base is not None and _same(limiter, bucket, breaker, pool, seconds, base):
            plan = base
        else:
            one_call = base is None or kept_entity is None
            plan = Plan(self, key, None, limiter, bucket, breaker, pool, seconds, one_call=one_call)
            if base is not None:
                # Count the call against the key's plan, whose pool it may use.
                plan.owner = base
        if base is not None and kept_entity is not None:
            plan.slot = base.slot
            if len(base.entities) >= _MAX_ENTITY_PLANS:
                base.entities.clear()  # many entities: start over rather than grow
            base.entities[kept_entity] = plan
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
        breaker closed, else ``"degraded"``. A breaker whose state cannot be
        read (its shared store is down) is reported with ``"state": "unknown"``
        and the error, and counts as unhealthy: a health check must answer.
        """
        pools: dict[str, Any] = {}
        for name in self.connection_manager.list_pools():
            pool = self.connection_manager.get(name)
            healthy = not pool.closed
            pools[name] = {"healthy": healthy, **jsonable(pool.status().to_dict())}
        breakers: dict[str, Any] = {}
        for name in self.circuit_breaker.names():
            breaker = self.circuit_breaker._breakers.get(name)
            if breaker is None:
                continue  # removed while an earlier breaker's status was awaited
            try:
                snapshot = jsonable((await breaker.status()).to_dict())
            except Exception as exc:  # any store failure is reported, not raised
                breakers[name] = {"healthy": False, "state": "unknown", "error": f"{type(exc).__name__}: {exc}"}
            else:
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

    def _release_slot(self, timeout: float) -> None:
        """A key stopped using ``timeout``: let the timer drop its slot if no other key uses it."""
        # (Unconfigured keys use DEFAULT_TIMEOUT's slot.)
        if timeout != DEFAULT_TIMEOUT and all(plan.timeout != timeout for plan in self._plans.values()):
            self._timer.release(timeout)

    async def _retire_pool(self, pool: ConnectionPool[Any], plan: Plan | None) -> None:
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


def _same(
    limiter: RateLimiter | None,
    bucket: str,
    breaker: BreakerLike | None,
    pool: ConnectionPool[Any] | None,
    timeout: float,
    base: Plan,
) -> bool:
    return (
        limiter is base.limiter
        and bucket == base.bucket
        and breaker is base.breaker
        and pool is base.pool
        and timeout == base.timeout
    )
