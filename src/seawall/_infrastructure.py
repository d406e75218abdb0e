"""AsyncInfrastructure: rate limiter, breaker, pool and timeout, per key, in one call.

A key's configuration compiles to a :class:`~seawall._plan.Plan`; a protected
call (:class:`~seawall._protected_call.ProtectedCall`, the one call path of
both :meth:`AsyncInfrastructure.execute_protected` and
:meth:`AsyncInfrastructure.protect`) runs the plan's layers in a fixed order::

    rate limiter            (outside the timeout: a denial costs no scope)
    ┌ one anyio cancel scope with the call's timeout ───────────────┐
    │ circuit breaker  ->  pool checkout  ->  fn()                  │
    └───────────────────────────────────────────────────────────────┘

A denial never touches the breaker or the pool; a breaker rejection never
touches the pool. Expiry of the timeout raises :class:`ProtectionTimeout`,
which the breaker counts as a failure; a cancellation from outside stays a
cancellation.

This module holds the configuration (plans, what a reconfiguration keeps), the
lifecycle (the deadline timer task, the pools started here) and the status.
What a call needs of it is the narrow :class:`_Host` (``CallHost`` of
``_plan``, ``RegistryHost`` of ``_registries``), never this object.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.abc

from seawall._breaker import GUARDED_BY, BreakerLike, BreakerState, CircuitBreaker, unguarded
from seawall._chaos import Chaos
from seawall._checks import seconds as check_seconds
from seawall._clock import Clock, MonotonicClock, current_clock
from seawall._concurrency import ConcurrencyLimiterStatistics
from seawall._config import (
    DEFAULT_TIMEOUT,
    BreakerConfig,
    HedgeConfig,
    PoolConfig,
    ProtectionConfig,
    RateLimitConfig,
    RetryConfig,
    load_toml,
)
from seawall._deadline import DeadlineTimer, TimerStatistics
from seawall._errors import (
    ConfigurationError,
    ConfigurationTypeError,
    ProtectionKeyNotFound,
    ProtectionTimeout,
    Rejected,
    SeawallError,
)
from seawall._hedge import Hedge
from seawall._limiter import LimiterLike, MultiRateLimiter, RateLimiter, carry_over
from seawall._logging import Throttle
from seawall._plan import Plan, concurrency_for
from seawall._pool import ConnectionPool, PoolStatus
from seawall._protected_call import ProtectedCall, run_direct
from seawall._registries import (
    CircuitBreakerRegistry,
    ConnectionManager,
    RateLimiterRegistry,
    bucket_key,
    jsonable,
)
from seawall._retry import Retry
from seawall._scopes import allocates_plainly
from seawall._telemetry import ANY_HANDLER, INFRA_PROTECTION_TRIGGERED
from seawall.backends._breaker_memory import MemoryBreakerBackend

__all__ = ["AsyncInfrastructure", "InfrastructureStatistics", "KeyStatistics"]

T = TypeVar("T")

#: The entity whose bucket a call uses when it names none.
DEFAULT_ENTITY = "global"

#: Seconds a closing pool waits for checked-out workers (at least the key's timeout).
_CLOSE_GRACE = 10.0

#: Plans of unconfigured keys kept at most (they are cheap to rebuild).
_MAX_ADHOC = 1024
#: Entity plans kept per key (``protect(key, rate_limiter=entity)``) before they are dropped and rebuilt.
_MAX_ENTITY_PLANS = 1024
#: Per-call timeout plans kept per unconfigured key: up to ``_MAX_ADHOC`` such keys may each keep
#: this many, so it stays small (a key and a timeout both taken from requests must not pile up plans).
_MAX_ADHOC_TIMEOUTS = 16

#: Timeouts are logged once a second per key at most (each carries the count of those not logged).
_LOG = Throttle(1.0)

#: The values of ``infra.health()["status"]``, best first.
HEALTH_STATUSES = ("healthy", "degraded", "unhealthy")

#: The call options that pick layers other than the key's own.
_Options = tuple[str | tuple[str, str] | None, str | None, str | None, float | timedelta | None]


@dataclass(frozen=True, slots=True)
class KeyStatistics:
    """One configured key, from :meth:`AsyncInfrastructure.statistics`.

    Attributes:
        key: The protection key.
        timeout: Its calls' timeout in seconds.
        layers: Its layers in call order (``"rate_limiter"``, ``"circuit_breaker"``, ``"concurrency"``,
            ``"connection_pool"``).
        inflight: Calls that awaited before their checkout and are not done (a replaced pool waits for them).
        breaker_state: The state of its breaker as this process knows it (``None``: no breaker).
        pool: Its pool's counts (``None``: no pool).
        entity_plans: Call options (an entity, a timeout, or both) with a plan kept on the key.
        concurrency: Its concurrency limiter's figures (``None``: no concurrency layer).
    """

    key: str
    timeout: float
    layers: tuple[str, ...]
    inflight: int
    breaker_state: BreakerState | None
    pool: PoolStatus | None
    entity_plans: int
    concurrency: ConcurrencyLimiterStatistics | None = None


@dataclass(frozen=True, slots=True)
class InfrastructureStatistics:
    """A snapshot of an :class:`AsyncInfrastructure` (``infra.statistics()``), for tests and dashboards.

    Attributes:
        running: Whether ``async with infra`` is active.
        keys: Every configured key's figures, sorted by key.
        timer: The deadline timer's figures.
        unconfigured_keys: Unconfigured keys whose calls (timeout only) have a kept plan.
    """

    running: bool
    keys: tuple[KeyStatistics, ...]
    timer: TimerStatistics
    unconfigured_keys: int

    def key(self, name: str) -> KeyStatistics:
        """The figures of key ``name``.

        Raises:
            ProtectionKeyNotFound: ``name`` is not configured.
        """
        for found in self.keys:
            if found.key == name:
                return found
        raise ProtectionKeyNotFound(name=name)


class _Host:
    """The infrastructure as its calls (``CallHost``) and registries (``RegistryHost``) see it."""

    __slots__ = (
        "backend",
        "breaker_backend",
        "clock",
        "connections",
        "now",
        "pools",
        "register",
        "scope_bare",
        "scope_class",
        "task_group",
        "timer",
    )

    def __init__(self, backend: Any, clock: Clock) -> None:
        self.backend = backend
        # One breaker store for every breaker made here: a reconfigured key's
        # breaker of the same name finds its state (an open breaker stays open).
        self.breaker_backend = backend if backend is not None else MemoryBreakerBackend()
        self.clock = clock
        self.now = clock.now
        self.timer = DeadlineTimer(clock)
        self.register = self.timer.register  # (bound once: every call registers)
        # ``anyio.CancelScope()`` dispatches on the backend at every construction;
        # while running, the backend's own class is called directly (looked up at entry).
        self.scope_class: type[Any] = anyio.CancelScope
        self.scope_bare = False  # (anyio.CancelScope itself must be called: its __new__ dispatches)
        self.task_group: anyio.abc.TaskGroup | None = None
        self.pools: set[ConnectionPool[Any]] = set()  # every pool started here and not yet closed
        self.connections: ConnectionManager | None = None

    # -- CallHost (and ``register``, the timer's own, bound in __init__) --------

    def triggered(self, key: str, layer: str, exc: BaseException, metadata: Mapping[str, Any] | None = None) -> None:
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

    def timed_out(self, plan: Plan, *, overran: bool = False) -> ProtectionTimeout:
        error = ProtectionTimeout(key=plan.key, timeout=plan.timeout)
        self.triggered(plan.key, "timeout", error)
        if overran:
            _LOG.warning(
                "protection_overran",
                ("overran", plan.key),
                key=plan.key,
                timeout=plan.timeout,
                hint="the call finished after its deadline: its code could not be cancelled "
                "(it blocked the event loop, or waited on a thread); its result was returned",
            )
        else:
            _LOG.warning("protection_timeout", ("timeout", plan.key), key=plan.key, timeout=plan.timeout)
        return error

    # -- RegistryHost ----------------------------------------------------------

    def make_limiter(self, config: RateLimitConfig) -> RateLimiter:
        options: dict[str, Any] = {"algorithm": config.algorithm, "backend": self.backend}
        if not isinstance(self.clock, MonotonicClock):
            options["clock"] = self.clock
        return RateLimiter(config.limit, config.window, **options)

    def make_breaker(self, name: str, config: BreakerConfig) -> CircuitBreaker:
        return CircuitBreaker(name, **config.options(), backend=self.breaker_backend, clock=self.clock)

    async def start_pool(self, name: str, config: PoolConfig) -> ConnectionPool[Any]:
        pool: ConnectionPool[Any] = ConnectionPool(
            config.factory,
            size=config.size,
            max_overflow=config.max_overflow,
            timeout=config.timeout,
            max_waiting=config.max_waiting,
            name=name,
            clock=self.clock,
        )
        await pool.start()
        self.pools.add(pool)
        return pool

    async def close_pool(self, pool: ConnectionPool[Any], grace: float = _CLOSE_GRACE) -> None:
        self.pools.discard(pool)
        with anyio.CancelScope(shield=True):
            await pool.close(grace=grace)

    async def retire_pool(self, pool: ConnectionPool[Any], plan: Plan | None) -> None:
        """Close ``pool`` once the calls in flight on ``plan`` are done, without waiting here."""
        if plan is not None and plan.inflight and plan.drained is None:
            plan.drained = anyio.Event()
        if self.connections is not None and self.connections.holds(pool):
            return  # still registered under another name: it stays open
        # Calls holding a worker are waited for by close() itself, for up to
        # ``grace``: long enough for any of them to finish or time out.
        grace = max(_CLOSE_GRACE, plan.timeout) if plan is not None else _CLOSE_GRACE

        async def close_when_drained() -> None:
            if plan is not None and plan.drained is not None:
                await plan.drained.wait()
            await self.close_pool(pool, grace)

        if self.task_group is None:
            await close_when_drained()
        else:
            self.task_group.start_soon(close_when_drained)


class _KeyRetry:
    """A key's retry policy, with the plan of its first attempt when ``attempt_timeout`` is the shorter."""

    __slots__ = ("attempt_timeout", "first", "plan", "record", "retry")

    def __init__(self, retry: Retry, plan: Plan) -> None:
        self.retry = retry
        self.plan = plan  # the key's plan this entry was made for
        self.first: Plan | None = None  # its attempt plan (the attempt timeout), when that is shorter
        self.attempt_timeout = retry.attempt_timeout
        # A call starts: count its first attempt, read the clock (one call: the budget's, bound once).
        budget = retry.budget
        self.record: Callable[[], float] = budget.record_first if budget is not None else retry.clock.now

    def status(self) -> dict[str, Any]:
        """The ``"retry"`` section of the key's status: the policy's attempts and its budget's window."""
        policy = self.retry
        status: dict[str, Any] = {"attempts": policy.attempts, "attempt_timeout": policy.attempt_timeout}
        if policy.budget is not None:
            status["budget"] = policy.budget.statistics().to_dict()
        return status

    def __repr__(self) -> str:
        return f"<KeyRetry {self.retry!r}>"


def _falls_back(exc: Exception, plan: Plan) -> bool:
    """Whether a failed call runs its ``fallback``: a rejection, a timeout, or a failure of the key's breaker."""
    if isinstance(exc, Rejected | ProtectionTimeout):
        return True
    if isinstance(exc, SeawallError):
        return False  # a misconfiguration, a missing name, a closed pool: a fallback would hide it
    return not isinstance(exc, getattr(plan.breaker, "exclude", ()))


class AsyncInfrastructure:
    """Per-key protection: rate limiting, circuit breaking, pooling and a timeout.

    Args:
        backend: Where rate-limit buckets and breaker state live; in memory
            when ``None`` (``seawall.backends.RedisBackend`` shares them).
        clock: The monotonic clock of the timeouts and of every primitive
            created here (``seawall.testing.FakeClock`` in tests); by default
            the running loop's, found when the infrastructure is built
            (``seawall._clock.current_clock``: ``time.monotonic`` on asyncio).

    Use it as ``async with AsyncInfrastructure() as infra:``; on exit every
    pool it started is closed (also when the body raised or was cancelled)
    and its timer task stops.
    """

    __slots__ = (
        "_adhoc",
        "_entered",
        "_hedges",
        "_host",
        "_pending",
        "_plans",
        "_retries",
        "circuit_breaker",
        "connection_manager",
        "rate_limiter",
    )

    def __init__(self, *, backend: Any = None, clock: Clock | None = None) -> None:
        self._host = _Host(backend, clock if clock is not None else current_clock())
        self._plans: dict[str, Plan] = {}
        # Plans of unconfigured keys (the timeout alone), kept so such calls allocate nothing.
        self._adhoc: dict[str, Plan] = {}
        self._entered = False
        self._pending: dict[str, ProtectionConfig] = {}
        # The keys with a "retry" section (empty: a call pays one truth test for retries).
        self._retries: dict[str, _KeyRetry] = {}
        # The keys with a "hedge" section (empty: a call pays one truth test for hedging).
        self._hedges: dict[str, Hedge] = {}
        self.rate_limiter = RateLimiterRegistry(self._host)
        self.circuit_breaker = CircuitBreakerRegistry(self._host)
        self.connection_manager = self._host.connections = ConnectionManager(self._host)

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
        host = self._host
        # The running backend's own CancelScope class (the dispatch is 40% of a scope's cost).
        scope_class = host.scope_class = type(anyio.CancelScope())
        host.scope_bare = allocates_plainly(scope_class)
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        host.task_group = task_group
        try:
            await task_group.start(host.timer.run)
            # A shared backend checks its server: a misconfiguration raises ConfigurationError here,
            # a server that does not answer is an outage (start-up goes on; the check runs when it answers).
            verify = getattr(host.backend, "verify", None)
            if verify is not None:
                await verify()
            pending, self._pending = self._pending, {}
            for key, config in pending.items():
                await self.configure_protection(key, config)
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        await self._shutdown()
        return None

    async def _shutdown(self) -> None:
        host = self._host
        task_group, host.task_group = host.task_group, None
        try:
            with anyio.CancelScope(shield=True):
                # Pools first: their close waits for calls still holding workers.
                for pool in list(host.pools):
                    await host.close_pool(pool)
        finally:
            host.scope_class = anyio.CancelScope
            host.scope_bare = False
            if task_group is not None:
                # Only the timer task (and pool retirements) run in the group: stop
                # them. The body's own exception is not handed to the group, which
                # would wrap it in an ExceptionGroup; it propagates as itself.
                task_group.cancel_scope.cancel()
                await task_group.__aexit__(None, None, None)

    async def aclose(self) -> None:
        """Close every pool started here and stop the timer (what ``async with`` does on exit)."""
        await self._shutdown()

    # -- configuration ---------------------------------------------------

    async def configure_protection(self, key: str, config: Mapping[str, Any] | ProtectionConfig) -> ProtectionConfig:
        """Configure (or reconfigure) the protection of ``key``.

        Reconfiguring keeps what it can: a breaker keeps its state (an open
        breaker stays open, under its new options), and the pool is kept when
        its options did not change (else the old one closes once the calls in
        flight on it are done).

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
        old = self._plans.get(key)
        host = self._host
        limiter = self._limiter_for(key, validated.rate_limiter)
        breaker = self._breaker_for(key, validated.circuit_breaker, old)
        pool = await self._pool_for(key, validated.connection_pool, old)
        # Nothing can fail from here on: swap everything in at once.
        timeout = validated.timeout if validated.timeout is not None else DEFAULT_TIMEOUT
        chaos = Chaos(validated.chaos, host.clock) if validated.chaos is not None else None
        bucket = bucket_key(key, DEFAULT_ENTITY)
        concurrency = concurrency_for(key, validated.concurrency, old, host.clock)
        plan = self._plans[key] = Plan(
            host, key, validated, limiter, bucket, breaker, pool, timeout, chaos=chaos, concurrency=concurrency
        )
        self._set_retry(key, validated.retry, old, plan)
        self._set_hedge(key, validated.hedge, old)
        self.rate_limiter.bind(key, limiter)
        old_limiter = old.limiter if old is not None else None
        if limiter is not None and old_limiter is not limiter:
            # A changed rule: the key's buckets keep their level, scaled to the new rule.
            carry_over(limiter, old_limiter, bucket_key(key, ""))
        if old is not None and old.breaker is not None and old.breaker is not breaker:
            self.circuit_breaker.unbind(key, old.breaker)
        if breaker is not None:
            self.circuit_breaker.bind(key, breaker)
        if old is not None and old.pool is not None and old.pool is not pool:
            self.connection_manager.unbind(key, old.pool)
            await host.retire_pool(old.pool, old)
        if pool is not None:
            self.connection_manager.bind(key, pool)
        return validated

    def _set_retry(self, key: str, config: RetryConfig | None, old: Plan | None, plan: Plan) -> None:
        """Install the key's retry policy (unchanged options keep the old one, and its budget)."""
        if config is None:
            self._retries.pop(key, None)
            return
        kept = self._retries.get(key)
        unchanged = kept is not None and old is not None and old.config is not None and old.config.retry == config
        if kept is not None and unchanged:
            retry = kept.retry
        else:
            retry = Retry(**config.options(), name=key, clock=self._host.clock)
        entry = self._retries[key] = _KeyRetry(retry, plan)
        if retry.attempt_timeout is not None and retry.attempt_timeout < plan.timeout:
            entry.first = self._call_plan(key, (None, None, None, retry.attempt_timeout))

    def _set_hedge(self, key: str, config: HedgeConfig | None, old: Plan | None) -> None:
        """Install the key's hedging (unchanged options keep the old policy, and the latencies it learnt)."""
        if config is None:
            self._hedges.pop(key, None)
            return
        kept = self._hedges.get(key)
        if kept is not None and old is not None and old.config is not None and old.config.hedge == config:
            return
        self._hedges[key] = Hedge(**config.options(), clock=self._host.clock)

    def _limiter_for(
        self, key: str, config: RateLimitConfig | tuple[RateLimitConfig, ...] | str | None
    ) -> LimiterLike | None:
        """The key's limiter: the shared one of its rule (of each of its rules), or one registered by name."""
        if isinstance(config, str):
            return self.rate_limiter.named(config, f"{key}.rate_limiter")
        if isinstance(config, tuple):
            return MultiRateLimiter(tuple(self.rate_limiter.limiter(rule) for rule in config))
        return self.rate_limiter.limiter(config) if config is not None else None

    def _breaker_for(self, key: str, config: BreakerConfig | None, old: Plan | None) -> CircuitBreaker | None:
        """The key's breaker: the old one if its options are unchanged, else a new one on the same store."""
        if config is None:
            return None
        unchanged = old is not None and old.config is not None and old.config.circuit_breaker == config
        if unchanged and isinstance(old.breaker, CircuitBreaker):  # type: ignore[union-attr]  # (old is set)
            return old.breaker  # type: ignore[union-attr]
        try:
            return self._host.make_breaker(key, config)
        except ConfigurationError as exc:  # valid options its store refuses (rate modes on a store without them)
            raise type(exc)(f"{key}.circuit_breaker.{exc.message}", path=f"{key}.circuit_breaker.{exc.path}") from None

    async def _pool_for(self, key: str, config: PoolConfig | None, old: Plan | None) -> ConnectionPool[Any] | None:
        """The key's pool: the old one if its options are unchanged (and it is open), else a new one."""
        if config is None:
            return None
        if old is not None and old.pool is not None and not old.pool.closed and old.config is not None:  # noqa: SIM102
            if old.config.connection_pool == config:  # (unchanged options: the same pool, its workers kept)
                return old.pool
        return await self._host.start_pool(key, config)

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
        self._retries.pop(key, None)
        self._hedges.pop(key, None)
        if self.rate_limiter.for_operation(key) is plan.limiter:
            self.rate_limiter.bind(key, None)
        if plan.breaker is not None:
            self.circuit_breaker.unbind(key, plan.breaker)
        if plan.pool is not None:
            self.connection_manager.unbind(key, plan.pool)
            await self._host.retire_pool(plan.pool, plan)

    async def set_chaos(self, key: str, *, enabled: bool) -> None:
        """Switch the fault injection of ``key`` on or off at run time (its ``"chaos"`` section).

        Calls already past their injection point are not affected; the next
        calls are. The draws go on from where they were (the seed's sequence
        is not restarted).

        Raises:
            ProtectionKeyNotFound: ``key`` is not configured.
            ConfigurationError: ``key`` has no ``"chaos"`` section, or
                ``enabled`` is not a bool.
        """
        plan = self._plans.get(key)
        if plan is None:
            raise ProtectionKeyNotFound(name=key)
        if not isinstance(enabled, bool):
            raise ConfigurationTypeError(f"enabled: expected true or false, got {enabled!r}", path="enabled")
        if plan.chaos is None:
            raise ConfigurationError(
                f"{key}.chaos: the key has no chaos section to switch; configure one first", path=f"{key}.chaos"
            )
        plan.chaos.enabled = enabled

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
        fallback: Callable[[Exception], Awaitable[T]] | None = None,
        priority: int = 0,
    ) -> T:
        """Run ``await fn()`` through ``key``'s layers and return its result.

        It is ``async with infra.protect(key, ...): return await fn()``: one
        call path for both. A key with a ``"retry"`` section makes more
        attempts, each through every layer again (rate limiter, breaker,
        pool), all of them and the waits between them within the one
        ``timeout``; when it gives up the last attempt's own exception is raised.
        A key with a ``"hedge"`` section races each attempt (each retry's
        too) with up to ``max_hedges`` more, started ``delay`` apart, each
        through every layer; the first success is returned and the others
        are cancelled. Hedges do not draw on the retry budget; when every
        attempt of a race fails, the first one's exception is that attempt's.

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
                default the key's timeout, else 5 s. With retries: for every
                attempt and wait together.
            fallback: An async callable taking the exception, awaited when the
                call fails with a :class:`~seawall.Rejected` error, a
                :class:`ProtectionTimeout` or an exception the key's breaker
                counts as a failure (after the retries, if any); its result is
                returned instead. Any other exception propagates.
            priority: The call's priority at the key's ``"concurrency"``
                limiter (``0``, the default, is the most important).

        Raises:
            RateLimitExceeded: The bucket is full.
            CircuitOpenError: The breaker rejected the call.
            PoolTimeout: No connection became free within the pool's timeout.
            ProtectionTimeout: The call did not finish within ``timeout``.
            Exception: Whatever ``fn`` raised, unchanged.
        """
        plan = self._plans.get(key) or self._adhoc.get(key)  # (plans are truthy)
        if (
            plan is None
            or rate_limiter is not None
            or circuit_breaker is not None
            or connection_pool is not None
            or timeout is not None
        ):
            plan = self._call_plan(key, (rate_limiter, circuit_breaker, connection_pool, timeout))
        if fallback is not None:
            return await self._with_fallback(
                plan, fn, (rate_limiter, circuit_breaker, connection_pool, timeout), fallback, priority
            )
        if plan.breaker is not None and getattr(fn, GUARDED_BY, None) is not None:
            fn = unguarded(plan.breaker, fn)  # ``@breaker`` of the key's own breaker: one layer counts it
        retry = self._retries.get(key) if self._retries else None
        attempt = plan
        if retry is not None:
            start = retry.record()
            if retry.attempt_timeout is not None:
                attempt = self._first_attempt_plan(plan, retry, (rate_limiter, circuit_breaker, connection_pool))
        try:
            # The (first) attempt: _attempt's dispatch written out, the one copy of it. Its frame
            # would double what a retry section costs a success, and cost every plain call too.
            hedge = self._hedges.get(key) if self._hedges else None
            if hedge is not None:
                return await self._hedged(
                    hedge, attempt, fn, (rate_limiter, circuit_breaker, connection_pool, timeout), priority
                )
            if attempt.direct and not priority and not ANY_HANDLER.attached:
                return await run_direct(attempt, fn)  # the same call, its common case in one frame
            async with ProtectedCall(attempt, priority):
                return await fn()
        except Exception as exc:
            if retry is None:
                raise
            failed = exc  # (retried outside this handler: a later attempt's error must not chain to it)
        options = (rate_limiter, circuit_breaker, connection_pool, timeout)
        return await self._retry(plan, fn, options, retry.retry, failed, start + plan.timeout, priority)

    async def _with_fallback(
        self,
        plan: Plan,
        fn: Callable[[], Awaitable[T]],
        options: _Options,
        fallback: Callable[[Exception], Awaitable[T]],
        priority: int = 0,
    ) -> T:
        """The call (with its retries) without ``fallback``; a failure the fallback answers returns its result."""
        rate_limiter, circuit_breaker, connection_pool, timeout = options
        try:
            return await self.execute_protected(
                plan.key,
                fn,
                rate_limiter=rate_limiter,
                circuit_breaker=circuit_breaker,
                connection_pool=connection_pool,
                timeout=timeout,
                priority=priority,
            )
        except Exception as exc:
            if not _falls_back(exc, plan):
                raise
            return await fallback(exc)

    def _first_attempt_plan(self, plan: Plan, retry: _KeyRetry, options: tuple[Any, Any, Any]) -> Plan:
        """The plan of a first attempt under ``attempt_timeout`` (the key's kept one, or one for this call)."""
        limit = retry.attempt_timeout
        if limit is None or limit >= plan.timeout:
            return plan
        if plan is retry.plan and retry.first is not None:
            return retry.first
        return self._call_plan(plan.key, (*options, limit))

    async def _retry(
        self,
        plan: Plan,
        fn: Callable[[], Awaitable[T]],
        options: _Options,
        retry: Retry,
        failed: Exception,
        deadline: float,
        priority: int = 0,
    ) -> T:
        """Attempts 2, 3, ... after the first failed with ``failed``, each through ``plan``'s layers.

        Each attempt runs under the rest of the call's time (or
        ``attempt_timeout``, when shorter), as a plan of its own, so that its
        deadline is its scope's and becomes a ``ProtectionTimeout`` the breaker
        counts; the waits never pass ``deadline`` (the clock's time).
        """
        now = self._host.now
        not_failures = getattr(plan.breaker, "exclude", ())
        attempt = 1
        while True:
            wait = retry.schedule(failed, attempt, deadline - now(), not_failures=not_failures, key=plan.key)
            if wait is None:
                raise failed
            await retry.clock.sleep(wait)
            attempt += 1
            limit = deadline - now()
            if limit <= 0.0:  # the wait overran into the deadline (a real clock): no time for an attempt
                raise failed
            if retry.attempt_timeout is not None and retry.attempt_timeout < limit:
                limit = retry.attempt_timeout
            attempt_plan = plan if limit >= plan.timeout else self._call_plan(plan.key, (*options[:3], limit))
            try:
                return await self._attempt(attempt_plan, fn, options, priority)
            except Exception as exc:
                failed = exc

    async def _attempt(self, plan: Plan, fn: Callable[[], Awaitable[T]], options: _Options, priority: int) -> T:
        """One attempt of a retrying call: hedged when the key has a ``"hedge"`` section."""
        hedge = self._hedges.get(plan.key) if self._hedges else None
        if hedge is not None:
            return await self._hedged(hedge, plan, fn, options, priority)
        if plan.direct and not priority and not ANY_HANDLER.attached:
            return await run_direct(plan, fn)
        async with ProtectedCall(plan, priority):
            return await fn()

    async def _hedged(
        self, hedge: Hedge, plan: Plan, fn: Callable[[], Awaitable[T]], options: _Options, priority: int
    ) -> T:
        """One attempt raced by hedges: each a whole protected call under what is left of ``plan``'s timeout."""

        async def attempt(index: int, remaining: float) -> T:
            # A hedge starts later: its plan's timeout ends where the first attempt's does.
            own = plan if index == 0 else self._call_plan(plan.key, (*options[:3], remaining))
            async with ProtectedCall(own, priority):
                return await fn()

        return await hedge.run(attempt, plan.timeout, plan.key)

    def protect(
        self,
        key: str,
        *,
        rate_limiter: str | tuple[str, str] | None = None,
        circuit_breaker: str | None = None,
        connection_pool: str | None = None,
        timeout: float | timedelta | None = None,
        priority: int = 0,
    ) -> ProtectedCall:
        """``async with infra.protect(key) as conn:`` protects a block like :meth:`execute_protected`.

        Yields the pool's connection (``None`` without a pool). The options are
        those of :meth:`execute_protected` (``priority`` included), without ``fallback``. A block
        cannot be run again, so a key with a ``"retry"`` or ``"hedge"`` section makes one
        attempt here, never retried nor hedged (use :meth:`execute_protected` for those).
        """
        plan = self._plans.get(key) or self._adhoc.get(key)  # (plans are truthy)
        if (
            plan is None
            or rate_limiter is not None
            or circuit_breaker is not None
            or connection_pool is not None
            or timeout is not None
        ):
            plan = self._call_plan(key, (rate_limiter, circuit_breaker, connection_pool, timeout))
        return ProtectedCall(plan, priority)

    def _call_plan(self, key: str, options: _Options) -> Plan:
        """The plan of one call's options: the key's layers with them applied (kept where it pays)."""
        base = self._plans.get(key)
        rate_limiter, circuit_breaker, connection_pool, timeout = options
        if base is None and not isinstance(key, str):
            # Configured keys are str; an unknown non-str key must not run as a key of its own.
            raise ConfigurationTypeError(f"a protection key must be a str, got {key!r}", path="key")
        if base is None and options == (None, None, None, None):
            return self._adhoc_plan(key)
        # A bucket per entity (per user, per client address) and a timeout per
        # call are the commonest call options: their plans are kept on the
        # key's plan (an unconfigured key's: its timeout-only plan), so that the
        # next such call finds its plan, and its bucket handle, ready. A
        # reconfigured key drops them with its old plan.
        kept_as = self._kept_as(key, options)
        if kept_as is not None:
            if base is None:
                base = self._adhoc_plan(key)  # (the same layers as none: a timeout alone)
            kept = base.entities.get(kept_as)
            if kept is not None:
                return kept
        limiter, bucket = self._bucket_for(key, base, rate_limiter)
        breaker = self.circuit_breaker.get(circuit_breaker) if circuit_breaker is not None else None
        pool = self.connection_manager.get(connection_pool) if connection_pool is not None else None
        if base is not None:
            breaker = base.breaker if breaker is None else breaker
            pool = base.pool if pool is None else pool
        if timeout is not None:
            seconds = check_seconds(timeout, f"{key}.timeout")
        else:
            seconds = base.timeout if base is not None else DEFAULT_TIMEOUT
        if base is not None and base.same_layers(limiter, bucket, breaker, pool, seconds):
            return base
        chaos = base.chaos if base is not None else None
        plan = Plan(
            self._host,
            key,
            None,
            limiter,
            bucket,
            breaker,
            pool,
            seconds,
            one_call=kept_as is None,
            chaos=chaos,
            concurrency=base.concurrency if base is not None else None,
        )
        if base is not None:
            plan.owner = base  # the call counts against the key's plan, whose pool it may use
            if kept_as is not None:
                bound = _MAX_ENTITY_PLANS if key in self._plans else _MAX_ADHOC_TIMEOUTS
                if len(base.entities) >= bound:
                    base.entities.clear()  # many entities or timeouts: start over rather than grow
                base.entities[kept_as] = plan
        return plan

    @staticmethod
    def _kept_as(key: str, options: _Options) -> str | tuple[str | None, float] | None:
        """What a call's plan is kept under on its key's plan (``None``: built for the one call).

        Options naming only an entity are kept under the entity, with a
        timeout under ``(entity or None, seconds)``; a breaker or pool option
        is never kept, since what it names can be replaced in its registry.
        """
        rate_limiter, circuit_breaker, connection_pool, timeout = options
        if circuit_breaker is not None or connection_pool is not None:
            return None
        if rate_limiter is not None and not isinstance(rate_limiter, str):
            return None
        if timeout is None:
            return rate_limiter
        return rate_limiter, check_seconds(timeout, f"{key}.timeout")

    def _adhoc_plan(self, key: str) -> Plan:
        """The kept timeout-only plan of an unconfigured key."""
        adhoc = self._adhoc.get(key)
        if adhoc is None:
            if len(self._adhoc) >= _MAX_ADHOC:
                self._adhoc.clear()  # many one-off keys: start over rather than grow
            adhoc = self._adhoc[key] = Plan(self._host, key, None, None, "", None, None, DEFAULT_TIMEOUT)
        return adhoc

    def _bucket_for(
        self, key: str, base: Plan | None, rate_limiter: str | tuple[str, str] | None
    ) -> tuple[LimiterLike | None, str]:
        """The limiter and bucket a call's ``rate_limiter=`` option names."""
        limiter = base.limiter if base is not None else None
        if rate_limiter is None:
            return limiter, base.bucket if base is not None else bucket_key(key, DEFAULT_ENTITY)
        path = f"{key}.rate_limiter"
        if isinstance(rate_limiter, str):
            bucket = bucket_key(key, rate_limiter)
        elif (
            isinstance(rate_limiter, tuple) and len(rate_limiter) == 2 and all(isinstance(p, str) for p in rate_limiter)
        ):
            operation, entity = rate_limiter
            limiter = self.rate_limiter.for_operation(operation) or limiter
            bucket = bucket_key(operation, entity)
        else:
            raise ConfigurationError(
                f"{path}: expected an entity id (str) or an (operation, entity_id) pair, got {rate_limiter!r}",
                path=path,
            )
        if limiter is None:
            raise ConfigurationError(f"{path}: no rate limit is configured for this key or operation", path=path)
        return limiter, bucket

    # -- status ----------------------------------------------------------

    def statistics(self) -> InfrastructureStatistics:
        """A frozen snapshot of the keys, the deadline timer and each key's layers (no I/O)."""
        keys = tuple(self._key_statistics(plan) for _, plan in sorted(self._plans.items()))
        host = self._host
        return InfrastructureStatistics(
            running=host.task_group is not None,
            keys=keys,
            timer=host.timer.statistics(),
            unconfigured_keys=len(self._adhoc),
        )

    @staticmethod
    def _key_statistics(plan: Plan) -> KeyStatistics:
        layers = tuple(
            name
            for name, layer in (
                ("rate_limiter", plan.limiter),
                ("circuit_breaker", plan.breaker),
                ("concurrency", plan.concurrency),
                ("connection_pool", plan.pool),
            )
            if layer is not None
        )
        return KeyStatistics(
            key=plan.key,
            timeout=plan.timeout,
            layers=layers,
            inflight=plan.inflight,
            breaker_state=plan.breaker.state if plan.breaker is not None else None,
            pool=plan.pool.status() if plan.pool is not None else None,
            entity_plans=len(plan.entities),
            concurrency=plan.concurrency.statistics() if plan.concurrency is not None else None,
        )

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
        if plan.concurrency is not None:
            status["concurrency"] = jsonable(plan.concurrency.statistics().to_dict())
        if plan.pool is not None:
            status["connection_pool"] = jsonable(plan.pool.status().to_dict())
        retry = self._retries.get(key)
        if retry is not None:
            status["retry"] = retry.status()
        hedge = self._hedges.get(key)
        if hedge is not None:
            status["hedge"] = {"delay": hedge.delay(), "max_hedges": hedge.max_hedges, "samples": hedge.samples}
        return status

    async def get_infrastructure_status(self) -> dict[str, Any]:
        """Health of everything: every pool and breaker, the keys, the timer; JSON-ready.

        ``"status"`` is one of :data:`HEALTH_STATUSES`: ``"healthy"`` when
        every pool is open and every breaker closed; ``"degraded"`` when a
        breaker is open, a pool is closed, or a breaker's state cannot be read
        (its shared store is down: ``"reachable": false``, or an error) under ``on_error="allow"``/``"local"``;
        ``"unhealthy"`` when the infrastructure cannot serve: not started or
        closed, or a store that is down under ``on_error="deny"``. A breaker
        on Redis that cannot be read reports its process's own view with
        ``"reachable": false``; one whose ``status()`` raises is reported with
        ``"state": "unknown"`` and the error: a health check must answer.
        """
        pools: dict[str, Any] = {}
        for name in self.connection_manager.list_pools():
            pool = self.connection_manager.get(name)
            pools[name] = {"healthy": not pool.closed, **jsonable(pool.status().to_dict())}
        breakers: dict[str, Any] = {}
        for name in self.circuit_breaker.names():
            breaker = self.circuit_breaker.find(name)
            if breaker is None:
                continue  # removed while an earlier breaker's status was awaited
            breakers[name] = await _breaker_health(breaker)
        healthy = all(p["healthy"] for p in pools.values()) and all(b["healthy"] for b in breakers.values())
        timer = self._host.timer.statistics()
        return {
            "status": self._health_status(healthy, breakers),
            "running": self._host.task_group is not None,
            "keys": len(self._plans),
            "protection_keys": self.list_protection_keys(),
            "pools": pools,
            "circuit_breakers": breakers,
            "timer": {"running": timer.running, "pending": timer.pending, "expired": timer.expired},
        }

    health = get_infrastructure_status

    def _health_status(self, healthy: bool, breakers: Mapping[str, Any]) -> str:
        if self._host.task_group is None:
            return "unhealthy"  # not started, or closed: no call can be served
        if healthy:
            return "healthy"
        store_down = any(b.get("state") == "unknown" or b.get("reachable") is False for b in breakers.values())
        if store_down and getattr(self._host.backend, "on_error", None) == "deny":
            return "unhealthy"  # every call that needs the store is refused
        return "degraded"

    def __repr__(self) -> str:
        host = self._host
        return (
            f"AsyncInfrastructure(keys={self.list_protection_keys()!r}, "
            f"running={host.task_group is not None}, timer={host.timer!r})"
        )


async def _breaker_health(breaker: BreakerLike) -> dict[str, Any]:
    try:
        snapshot = jsonable((await breaker.status()).to_dict())
    except Exception as exc:  # any store failure is reported, not raised
        return {"healthy": False, "state": "unknown", "error": f"{type(exc).__name__}: {exc}"}
    # A store that cannot be read leaves the process's own view: not healthy (degraded, or worse under "deny").
    return {"healthy": snapshot.get("state") != "open" and snapshot.get("reachable", True), **snapshot}
