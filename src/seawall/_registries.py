"""The seed-style registries of an ``AsyncInfrastructure``.

``infra.rate_limiter``, ``infra.circuit_breaker`` and
``infra.connection_manager`` hold the named primitives. They share state with
the keyed configuration: configuring key ``"api"`` registers its breaker and
pool under the name ``"api"`` and its rate-limit buckets under the operation
``"api"``, and a breaker started with ``start_fuse_instance("db_breaker")``
can be named in ``execute_protected(..., circuit_breaker="db_breaker")``.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

from seawall._breaker import BreakerLike, BreakerStatus, CircuitBreaker
from seawall._config import BreakerConfig, PoolConfig, RateLimitConfig
from seawall._errors import (
    CircuitBreakerNotFound,
    CircuitOpenError,
    ConfigurationError,
    ConfigurationTypeError,
    PoolNotFound,
    ProtectionKeyNotFound,
)
from seawall._limiter import LimiterLike, MultiRateLimiter, RateLimiter, RateLimitStatus
from seawall._pool import ConnectionPool, PoolStatus

__all__ = [
    "BREAKER_ADAPTERS",
    "LIMITER_ADAPTERS",
    "CircuitBreakerRegistry",
    "ConnectionManager",
    "RateLimiterRegistry",
    "RegistryHost",
    "bucket_key",
    "jsonable",
]

T = TypeVar("T")


class RegistryHost(Protocol):
    """What the registries need from their infrastructure: making, starting and retiring primitives."""

    def make_limiter(self, config: RateLimitConfig) -> RateLimiter:
        """A limiter for ``config``'s rule on the infrastructure's backend and clock."""
        ...

    def make_breaker(self, name: str, config: BreakerConfig) -> CircuitBreaker:
        """A breaker named ``name`` on the infrastructure's backend and clock."""
        ...

    async def start_pool(self, name: str, config: PoolConfig) -> ConnectionPool[Any]:
        """Start a pool the infrastructure closes on exit."""
        ...

    async def close_pool(self, pool: ConnectionPool[Any]) -> None:
        """Close ``pool`` now (after its checked-out workers come back)."""
        ...

    async def retire_pool(self, pool: ConnectionPool[Any], plan: Any) -> None:
        """Close ``pool`` once the calls in flight on ``plan`` are done, unless it is still registered."""
        ...

    def triggered(self, key: str, layer: str, exc: BaseException, metadata: Mapping[str, Any] | None = None) -> None:
        """Report that ``layer`` stopped a call (telemetry)."""
        ...


#: Adapters of third-party breakers, registered by their integration modules on import:
#: each takes ``(breaker, name)`` and returns a seawall breaker, or ``None`` if it is not its kind.
BREAKER_ADAPTERS: list[Callable[[Any, str], BreakerLike | None]] = []
#: Adapters of third-party rate limiters (``seawall.integrations.aiolimiter`` registers one).
LIMITER_ADAPTERS: list[Callable[[Any, str], LimiterLike | None]] = []


def bucket_key(operation: str, entity_id: str) -> str:
    r"""The rate-limit bucket of ``entity_id`` doing ``operation``: ``"<operation>:<entity_id>"``.

    Keys with the same rule share a limiter, so the name must be unambiguous
    for any two strings: with a plain ``"api" + ":" + "admin:alice"`` key
    ``api`` and key ``api:admin`` would share the bucket of ``alice``. So a
    ``\`` or ``:`` inside the operation is escaped with a backslash, and the
    first unescaped ``:`` ends it (the entity, last, needs no escaping). The
    common case, an operation without either character, reads as Hammer
    names buckets.
    """
    if "\\" in operation or ":" in operation:
        operation = operation.replace("\\", "\\\\").replace(":", "\\:")
    return f"{operation}:{entity_id}"


def jsonable(value: Any) -> Any:
    """``value`` with enums replaced by their values, recursively (for ``json.dumps``)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


class RateLimiterRegistry:
    """``infra.rate_limiter``: per-operation rate limits on per-entity buckets.

    One :class:`~seawall.RateLimiter` serves each rule (``limit`` per
    ``window``); the bucket of an entity is ``"<operation>:<entity_id>"``.
    """

    __slots__ = ("_by_operation", "_configured", "_host", "_named", "_rules")

    def __init__(self, host: RegistryHost) -> None:
        self._host = host
        self._rules: dict[tuple[float, float, str], RateLimiter] = {}
        self._by_operation: dict[str, LimiterLike] = {}
        # Limiters registered by name (``register``), for keys configured with ``"rate_limiter": name``.
        self._named: dict[str, LimiterLike] = {}
        # Operations whose limiter a protection key's configuration bound:
        # ``check_rate`` must never swap their rule behind the key's back.
        self._configured: set[str] = set()

    def limiter(self, config: RateLimitConfig) -> RateLimiter:
        """The (shared) limiter enforcing ``config``'s rule, created on first use."""
        rule = (config.limit, config.window, config.algorithm)
        found = self._rules.get(rule)
        if found is None:
            found = self._rules[rule] = self._host.make_limiter(config)
        return found

    def register(self, name: str, limiter: Any) -> LimiterLike:
        """Register an existing limiter under ``name``; a key's config then uses it as ``"rate_limiter": name``.

        Args:
            name: The name a key's configuration refers to.
            limiter: A :class:`~seawall.RateLimiter`, or a third-party limiter an
                imported integration adapts (``import seawall.integrations.aiolimiter``
                for an ``aiolimiter.AsyncLimiter``).

        Returns:
            The registered limiter (the adapter, for an adapted one).

        Raises:
            ConfigurationError: ``name`` is empty or not a str, or ``limiter`` is none the registry knows.
        """
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"name: a limiter name must be a non-empty str, got {name!r}", path="name")
        registered: LimiterLike | None = limiter if isinstance(limiter, RateLimiter) else None
        for adapt in LIMITER_ADAPTERS:
            if registered is not None:
                break
            registered = adapt(limiter, name)
        if registered is None:
            hint = ""
            if type(limiter).__module__.split(".")[0] == "aiolimiter":
                hint = "; import seawall.integrations.aiolimiter first, which registers its adapter"
            raise ConfigurationTypeError(f"limiter: expected a rate limiter, got {limiter!r}{hint}", path="limiter")
        self._named[name] = registered
        return registered

    def named(self, name: str, path: str) -> LimiterLike:
        """The limiter registered as ``name``; a ConfigurationError at ``path`` if there is none."""
        found = self._named.get(name)
        if found is None:
            known = ", ".join(sorted(self._named)) or "none"
            raise ConfigurationError(f"{path}: no limiter is registered as {name!r} (registered: {known})", path=path)
        return found

    def bind(self, operation: str, limiter: LimiterLike | None) -> None:
        """Make ``limiter`` the one counting ``operation``'s buckets (``None`` forgets it)."""
        if limiter is None:
            self._by_operation.pop(operation, None)
            self._configured.discard(operation)
        else:
            self._by_operation[operation] = limiter
            self._configured.add(operation)

    def for_operation(self, operation: str) -> LimiterLike | None:
        """The limiter counting ``operation``'s buckets, if there is one."""
        return self._by_operation.get(operation)

    def _require(self, operation: str) -> LimiterLike:
        found = self._by_operation.get(operation)
        if found is None:
            raise ProtectionKeyNotFound(f"no rate limit is known for operation {operation!r}", name=operation)
        return found

    async def check_rate(
        self, entity_id: str, operation: str, limit: int, window: float, metadata: Mapping[str, Any] | None = None
    ) -> RateLimitStatus:
        """Count one hit of ``entity_id`` doing ``operation`` against ``limit`` per ``window``.

        Returns:
            The bucket's status after the hit.

        Raises:
            RateLimitExceeded: The bucket is full; nothing was counted.
            ConfigurationError: ``limit`` or ``window`` is invalid, ``entity_id``
                or ``operation`` is not a str, or ``operation`` is a configured
                protection key whose rule differs from ``limit`` per ``window``.
        """
        for name, value in (("entity_id", entity_id), ("operation", operation)):
            if not isinstance(value, str):
                raise ConfigurationTypeError(f"{name} must be a str, got {value!r}", path=name)
        limiter = self._limiter_for(operation, limit, window)
        try:
            return await limiter.hit(bucket_key(operation, entity_id))
        except Exception as exc:
            self._host.triggered(operation, "rate_limiter", exc, metadata)
            raise

    async def execute_with_limit(
        self,
        entity_id: str,
        operation: str,
        limit: int,
        window: float,
        fn: Callable[[], Awaitable[T]],
        metadata: Mapping[str, Any] | None = None,
    ) -> T:
        """Run ``await fn()`` if the hit is admitted, as :meth:`check_rate` decides."""
        await self.check_rate(entity_id, operation, limit, window, metadata)
        return await fn()

    async def get_status(self, entity_id: str, operation: str) -> RateLimitStatus:
        """The status of ``entity_id``'s bucket for ``operation`` (nothing is counted).

        Raises:
            ProtectionKeyNotFound: No limit was ever set for ``operation``.
        """
        return await self._require(operation).status(bucket_key(operation, entity_id))

    async def get_statuses(self, entity_id: str, operation: str) -> list[RateLimitStatus]:
        """The status of ``entity_id``'s bucket under each of ``operation``'s rules (one for a single rule).

        Raises:
            ProtectionKeyNotFound: No limit was ever set for ``operation``.
        """
        limiter = self._require(operation)
        key = bucket_key(operation, entity_id)
        if isinstance(limiter, MultiRateLimiter):
            return await limiter.statuses(key)
        return [await limiter.status(key)]

    async def reset(self, entity_id: str, operation: str) -> None:
        """Empty ``entity_id``'s bucket for ``operation``."""
        await self._require(operation).reset(bucket_key(operation, entity_id))

    def _limiter_for(self, operation: str, limit: int, window: float) -> LimiterLike:
        current = self._by_operation.get(operation)
        if current is not None and current.limit == limit and current.window == window:
            return current  # the common case: the same rule as last time, no validation
        if current is not None and operation in self._configured:
            raise ConfigurationError(
                f"operation {operation!r} is a configured protection key limited to {current.limit} per "
                f"{current.window}s; check_rate() with {limit} per {window}s would change the rule its calls "
                "run under (reconfigure the key, or use another operation name)",
                path=f"{operation}.rate_limiter",
            )
        limiter = self.limiter(RateLimitConfig.from_mapping({"limit": limit, "window": window}, operation))
        self._by_operation[operation] = limiter
        return limiter

    def __repr__(self) -> str:
        return f"RateLimiterRegistry(operations={sorted(self._by_operation)!r})"


class CircuitBreakerRegistry:
    """``infra.circuit_breaker``: breakers by name (the seed's Fuse instances)."""

    __slots__ = ("_breakers", "_host")

    def __init__(self, host: RegistryHost) -> None:
        self._host = host
        self._breakers: dict[str, BreakerLike] = {}

    async def start_fuse_instance(self, name: str, **breaker_options: Any) -> CircuitBreaker:
        """Create (or replace) the breaker ``name`` with ``CircuitBreaker``'s options.

        Raises:
            ConfigurationError: An unknown or invalid option; ``path`` is
                ``<name>.<option>``, with a suggestion for a misspelt name.
        """
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"a circuit breaker name must be a non-empty str, got {name!r}", path="name")
        config = BreakerConfig.from_mapping(breaker_options, name)
        breaker = self._host.make_breaker(name, config)
        self._breakers[name] = breaker
        return breaker

    def register(self, name: str, breaker: Any) -> BreakerLike:
        """Register an existing breaker under ``name``.

        Args:
            name: The name calls use (``circuit_breaker=name``).
            breaker: A :class:`~seawall.CircuitBreaker`, anything else with its
                protocol, or an ``aiobreaker.CircuitBreaker`` (adapted through
                ``seawall.integrations.aiobreaker``).

        Returns:
            The registered breaker (the adapter, for an aiobreaker one).
        """
        for adapt in BREAKER_ADAPTERS:
            adapted = adapt(breaker, name)
            if adapted is not None:
                breaker = adapted
                break
        if not isinstance(breaker, BreakerLike):
            hint = ""
            if type(breaker).__module__.split(".")[0] == "aiobreaker":
                hint = "; import seawall.integrations.aiobreaker first, which registers its adapter"
            raise ConfigurationTypeError(
                f"breaker: expected a circuit breaker (async with, call(), status()), got {breaker!r}{hint}",
                path="breaker",
            )
        self._breakers[name] = breaker
        return breaker

    def get(self, name: str) -> BreakerLike:
        """The breaker registered as ``name``.

        Raises:
            CircuitBreakerNotFound: There is none.
        """
        try:
            return self._breakers[name]
        except KeyError:
            raise CircuitBreakerNotFound(name=name) from None

    async def execute(self, name: str, fn: Callable[[], Awaitable[T]], metadata: Mapping[str, Any] | None = None) -> T:
        """Run ``await fn()`` through the breaker ``name``."""
        breaker = self.get(name)
        ran = False

        @functools.wraps(fn)  # (so the breaker sees fn's own ``@breaker`` mark and counts it once)
        async def run() -> T:
            nonlocal ran
            ran = True
            return await fn()

        try:
            return await breaker.call(run)
        except CircuitOpenError as exc:
            if not ran:  # rejected by this breaker, not raised by fn
                self._host.triggered(name, "circuit_breaker", exc, metadata)
            raise

    async def get_status(self, name: str) -> BreakerStatus:
        """A snapshot of the breaker ``name``."""
        return await self.get(name).status()

    async def reset(self, name: str) -> None:
        """Close the breaker ``name`` and forget its failures."""
        await self.get(name).reset()

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._breakers)

    def find(self, name: str) -> BreakerLike | None:
        """The breaker registered as ``name``, or ``None``."""
        return self._breakers.get(name)

    def bind(self, name: str, breaker: BreakerLike) -> None:
        """Register ``breaker`` as ``name`` (a configured key's own breaker)."""
        self._breakers[name] = breaker

    def unbind(self, name: str, breaker: BreakerLike) -> None:
        """Forget ``name`` if ``breaker`` is what it names (a key's breaker going away)."""
        if self._breakers.get(name) is breaker:
            del self._breakers[name]

    def __repr__(self) -> str:
        return f"CircuitBreakerRegistry(names={self.names()!r})"


class ConnectionManager:
    """``infra.connection_manager``: named connection pools (and bulkheads)."""

    __slots__ = ("_host", "_pools")

    def __init__(self, host: RegistryHost) -> None:
        self._host = host
        self._pools: dict[str, ConnectionPool[Any]] = {}

    async def start_pool(self, name: str, factory: Any = None, **pool_options: Any) -> ConnectionPool[Any]:
        """Start the pool ``name`` (replacing any pool of that name once it drains).

        Args:
            name: The pool's name.
            factory: As in ``ConnectionPool``; ``None`` makes a bulkhead. An
                import string is accepted (with ``factory_options``).
            pool_options: ``size``, ``max_overflow``, ``timeout``,
                ``factory_options``.

        Raises:
            ConfigurationError: An unknown or invalid option, named as ``<name>.<option>``.
            Exception: The factory failed to create the first workers.
        """
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"a pool name must be a non-empty str, got {name!r}", path="name")
        config = PoolConfig.from_mapping({**pool_options, "factory": factory}, name)
        pool = await self._host.start_pool(name, config)
        old = self._pools.get(name)
        self._pools[name] = pool
        if old is not None and old is not pool:
            await self._host.retire_pool(old, None)
        return pool

    def get(self, name: str) -> ConnectionPool[Any]:
        """The pool registered as ``name``.

        Raises:
            PoolNotFound: There is none.
        """
        try:
            return self._pools[name]
        except KeyError:
            raise PoolNotFound(name=name) from None

    async def with_connection(
        self,
        name: str,
        fn: Callable[[Any], Awaitable[T]],
        timeout: float | None = None,  # noqa: ASYNC109 - the contract's name: the checkout's wait, not a scope
    ) -> T:
        """Check a connection out of pool ``name`` and return ``await fn(conn)``."""
        pool = self.get(name)
        async with pool.checkout(timeout) as conn:
            return await fn(conn)

    async def get_pool_status(self, name: str) -> PoolStatus:
        """A snapshot of pool ``name``'s counts."""
        return self.get(name).status()

    async def stop_pool(self, name: str) -> None:
        """Close pool ``name`` (after its checked-out connections come back) and forget it."""
        pool = self._pools.pop(name, None)
        if pool is None:
            raise PoolNotFound(name=name)
        await self._host.close_pool(pool)

    def list_pools(self) -> list[str]:
        """The names of the registered pools, sorted."""
        return sorted(self._pools)

    def find(self, name: str) -> ConnectionPool[Any] | None:
        """The pool registered as ``name``, or ``None``."""
        return self._pools.get(name)

    def holds(self, pool: ConnectionPool[Any]) -> bool:
        """Whether ``pool`` is registered under any name (then it must stay open)."""
        return any(found is pool for found in self._pools.values())

    def bind(self, name: str, pool: ConnectionPool[Any]) -> None:
        """Register ``pool`` as ``name`` (a configured key's own pool)."""
        self._pools[name] = pool

    def unbind(self, name: str, pool: ConnectionPool[Any]) -> None:
        """Forget ``name`` if ``pool`` is what it names (a key's pool going away)."""
        if self._pools.get(name) is pool:
            del self._pools[name]

    def __repr__(self) -> str:
        return f"ConnectionManager(pools={self.list_pools()!r})"
