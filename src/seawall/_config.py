"""Validated, typed protection configuration for :class:`AsyncInfrastructure`.

A protection is configured from a plain mapping (or a TOML table)::

    {"rate_limiter": {"limit": 100, "window": 60},
     "circuit_breaker": {"failure_threshold": 5, "recovery_time": 30},
     "connection_pool": {"size": 10, "max_overflow": 5, "factory": ...},
     "timeout": 5.0}

:meth:`ProtectionConfig.from_mapping` turns it into frozen dataclasses, or
raises :class:`~seawall.ConfigurationError` whose ``path`` names the
offending option in full (``external_api.circuit_breaker.failure_treshold``)
and whose message suggests the closest valid name for a misspelt one. The
dataclasses validate on construction too, so a config built in code is held
to the same rules as one read from a file.

Pool factories may be named by import string (``"package.module:Name"``),
which is how a TOML file refers to them; ``factory_options`` holds the
keyword arguments the named class (or callable) is called with.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from seawall._breaker import check_policy as check_breaker_policy
from seawall._checks import MAX_COUNT, MAX_SECONDS, count, describe, number, seconds
from seawall._clock import default_clock
from seawall._concurrency import ConcurrencyLimiter
from seawall._errors import ConfigurationError, ConfigurationTypeError
from seawall._hedge import check_policy as check_hedge_policy
from seawall._retry import check_policy
from seawall.backends._breaker_protocol import BreakerPolicy
from seawall.backends._limiter_protocol import MAX_LIMIT, MAX_WINDOW, MIN_WINDOW

__all__ = [
    "DEFAULT_TIMEOUT",
    "BreakerConfig",
    "ChaosConfig",
    "ConcurrencyConfig",
    "HedgeConfig",
    "PoolConfig",
    "ProtectionConfig",
    "RateLimitConfig",
    "RetryConfig",
    "load_toml",
    "resolve_factory",
]

#: The timeout of a protected call when neither the call nor its key sets one.
DEFAULT_TIMEOUT = 5.0

_ALGORITHMS = ("gcra", "fixed_window")


def _fail(path: str, problem: str) -> ConfigurationError:
    return ConfigurationError(f"{path}: {problem}", path=path)


def _exception_types(value: object, path: str) -> tuple[type[Exception], ...]:
    """A tuple of exception classes; import strings are resolved."""
    items = [value] if isinstance(value, str | type) else value
    if not isinstance(items, list | tuple):
        raise _fail(path, f"expected a list of exception classes, got {describe(value)}")
    resolved: list[type[Exception]] = []
    for index, item in enumerate(items):
        entry = _import_string(item, f"{path}[{index}]") if isinstance(item, str) else item
        # Exception, not BaseException: cancellation and exits are never failures,
        # so excluding them means nothing and CircuitBreaker refuses them too.
        if not (isinstance(entry, type) and issubclass(entry, Exception)):
            raise _fail(f"{path}[{index}]", f"expected an Exception subclass, got {describe(entry)}")
        resolved.append(entry)
    return tuple(resolved)


def _import_string(target: str, path: str) -> Any:
    """Resolve ``"package.module:attribute"`` (or ``package.module.attribute``)."""
    module_name, sep, attribute = target.partition(":")
    if not sep:
        module_name, _, attribute = target.rpartition(".")
    if not module_name or not attribute:
        raise _fail(path, f"expected an import string like 'package.module:Name', got {target!r}")
    if module_name.startswith("."):
        # A relative import has no package to be relative to here (importlib raises TypeError).
        raise _fail(path, f"expected an absolute import string like 'package.module:Name', got {target!r}")
    try:
        found: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raised while importing
        raise _fail(path, f"cannot import module {module_name!r} named in {target!r}: {exc!r}") from exc
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise _fail(path, f"module {module_name!r} has no attribute {attribute!r}") from None
    return found


def resolve_factory(factory: object, options: Mapping[str, Any] | None, path: str) -> object:
    """Turn a configured ``factory`` into the object a ``ConnectionPool`` takes.

    Args:
        factory: ``None`` (a bulkhead), a factory object, an async callable, or
            an import string naming one of those or a class to instantiate.
        options: Keyword arguments for the named class or callable.
        path: The option's full path, for error messages.

    Returns:
        The factory to hand to ``ConnectionPool``.
    """
    if isinstance(factory, str):
        factory = _import_string(factory, path)
    if options is None:
        if isinstance(factory, type):
            # A class named without options: instantiate it with its defaults.
            try:
                return factory()
            except Exception as exc:
                raise _fail(path, f"cannot create {factory.__name__}(): {exc}") from exc
        return factory
    if inspect.iscoroutinefunction(factory) or not callable(factory):
        raise _fail(
            f"{path}_options", f"options were given but {factory!r} is not a class or function to call with them"
        )
    try:
        return factory(**options)
    except Exception as exc:
        raise _fail(f"{path}_options", f"cannot create the factory with these options: {exc}") from exc


def _check_names(data: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> None:
    """Reject unknown option names, suggesting the closest valid one."""
    for name in data:
        if not isinstance(name, str):
            raise _fail(f"{path}.{name!r}" if path else repr(name), "option names must be strings")
        if name in allowed:
            continue
        full = f"{path}.{name}" if path else name
        close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid options are {', '.join(allowed)}"
        raise _fail(full, f"unknown option {name!r}{hint}")


def _section(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(path, f"expected a mapping (a TOML table) of options, got {describe(value)}")
    return value


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """The rate limiter of a protection: ``limit`` hits per ``window`` seconds, per bucket.

    Attributes:
        limit: Hits admitted per window (a positive integer).
        window: The window in seconds (``timedelta`` accepted).
        algorithm: ``"gcra"`` (a leaky bucket, the default) or ``"fixed_window"``.
    """

    limit: int
    window: float
    algorithm: Literal["gcra", "fixed_window"] = "gcra"

    section: ClassVar[str] = "rate_limiter"

    def __post_init__(self) -> None:
        self._validate(self.section)

    def _validate(self, path: str) -> None:
        # The bounds every backend evaluates exactly (backends/_limiter_protocol.py).
        object.__setattr__(self, "limit", count(self.limit, f"{path}.limit", minimum=1, maximum=int(MAX_LIMIT)))
        window = seconds(self.window, f"{path}.window", minimum=MIN_WINDOW, inclusive=True, maximum=MAX_WINDOW)
        object.__setattr__(self, "window", window)
        if self.algorithm not in _ALGORITHMS:
            raise _fail(f"{path}.algorithm", f"must be one of {', '.join(_ALGORITHMS)}, got {self.algorithm!r}")

    @classmethod
    def from_mapping(cls, data: object, path: str = "rate_limiter") -> RateLimitConfig:
        """Validate a mapping of options; errors name ``path`` and the option."""
        options = _section(data, path)
        _check_names(options, ("limit", "window", "algorithm"), path)
        for required in ("limit", "window"):
            if required not in options:
                raise _fail(f"{path}.{required}", "this option is required")
        return _build(cls, options, path)


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """The circuit breaker of a protection.

    Attributes:
        failure_threshold: Failures within ``window`` that open the breaker;
            ``None`` (or ``False``, TOML's spelling) counts none, with a rate mode.
        window: Seconds over which failures are counted.
        recovery_time: Seconds the breaker stays open before a trial call.
        half_open_max_calls: Concurrent trial calls allowed while half-open.
        exclude: Exception classes that are not failures (business errors);
            import strings are accepted.
        failure_rate: Open when failures / calls over ``window`` reaches this
            share (0 < rate <= 1), with at least ``minimum_calls`` calls.
        slow_call_duration: Seconds from which a call counts as slow (a
            timeout always does); needs ``slow_call_rate``.
        slow_call_rate: Open when slow calls / calls reaches this share.
        minimum_calls: Calls the window must hold before a rate decides.
    """

    failure_threshold: int | None = 5
    window: float = 60.0
    recovery_time: float = 30.0
    half_open_max_calls: int = 1
    exclude: tuple[type[BaseException], ...] = ()
    failure_rate: float | None = None
    slow_call_duration: float | None = None
    slow_call_rate: float | None = None
    minimum_calls: int = 10

    section: ClassVar[str] = "circuit_breaker"

    def __post_init__(self) -> None:
        self._validate(self.section)

    def _validate(self, path: str) -> None:
        set_ = object.__setattr__
        if self.failure_threshold is False:
            # TOML has no null: ``failure_threshold = false`` is the config's spelling of None (no count).
            set_(self, "failure_threshold", None)
        # The breaker's own checks (one set of rules), with the section's path.
        policy = check_breaker_policy(
            f"{path}.",
            **{name: getattr(self, name) for name in BreakerPolicy._fields},
        )
        for name in BreakerPolicy._fields:
            if name != "failure_threshold":
                set_(self, name, getattr(policy, name))
        set_(self, "exclude", _exception_types(self.exclude, f"{path}.exclude"))

    @classmethod
    def from_mapping(cls, data: object, path: str = "circuit_breaker") -> BreakerConfig:
        """Validate a mapping of options; errors name ``path`` and the option."""
        options = _section(data, path)
        _check_names(options, tuple(f.name for f in fields(cls)), path)
        return _build(cls, options, path)

    def options(self) -> dict[str, Any]:
        """The keyword arguments for ``CircuitBreaker(name, **options)``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """The connection pool (or, without a factory, the bulkhead) of a protection.

    Attributes:
        size: Workers created at start (concurrent slots of a bulkhead).
        max_overflow: Extra workers created under load and closed when idle.
        timeout: Seconds a checkout waits for a worker before ``PoolTimeout``.
        max_waiting: ``None`` (no bound), or how many checkouts may wait at
            once: one beyond that fails at once with ``PoolTimeout``.
        factory: ``None`` for a bulkhead; else a factory object, an async
            callable, or an import string (``"seawall.integrations.asyncpg:AsyncpgFactory"``).
        factory_options: Keyword arguments for the class or callable named by
            ``factory``.
    """

    size: int = 10
    max_overflow: int = 0
    timeout: float = 5.0
    max_waiting: int | None = None
    factory: Any = None
    factory_options: Mapping[str, Any] | None = field(default=None, compare=False)

    section: ClassVar[str] = "connection_pool"

    def __post_init__(self) -> None:
        self._validate(self.section)

    def _validate(self, path: str) -> None:
        object.__setattr__(self, "size", count(self.size, f"{path}.size", minimum=1))
        object.__setattr__(self, "max_overflow", count(self.max_overflow, f"{path}.max_overflow", minimum=0))
        object.__setattr__(self, "timeout", seconds(self.timeout, f"{path}.timeout"))
        if self.max_waiting is not None:
            object.__setattr__(self, "max_waiting", count(self.max_waiting, f"{path}.max_waiting", minimum=0))
        if self.factory_options is not None:
            _section(self.factory_options, f"{path}.factory_options")
            if self.factory is None:
                raise _fail(f"{path}.factory_options", "options were given without a factory")
            object.__setattr__(self, "factory_options", dict(self.factory_options))
        if isinstance(self.factory, str):
            # Resolved (imported, instantiated) now, so a typo fails at configuration time.
            resolved = resolve_factory(self.factory, self.factory_options, f"{path}.factory")
            object.__setattr__(self, "factory", resolved)
            object.__setattr__(self, "factory_options", None)
        elif self.factory_options is not None:
            resolved = resolve_factory(self.factory, self.factory_options, f"{path}.factory")
            object.__setattr__(self, "factory", resolved)
            object.__setattr__(self, "factory_options", None)
        elif self.factory is not None and not (callable(self.factory) or hasattr(self.factory, "create")):
            raise _fail(
                f"{path}.factory",
                f"expected a factory (an object with async create()/close(), an async callable "
                f"or an import string), got {describe(self.factory)}",
            )

    @classmethod
    def from_mapping(cls, data: object, path: str = "connection_pool") -> PoolConfig:
        """Validate a mapping of options; errors name ``path`` and the option."""
        options = _section(data, path)
        _check_names(options, tuple(f.name for f in fields(cls)), path)
        return _build(cls, options, path)


@dataclass(frozen=True, slots=True)
class ConcurrencyConfig:
    """The concurrency limiter of a protection (between its breaker and its pool).

    Attributes: the keyword arguments of :class:`~seawall.ConcurrencyLimiter`
    (``limit``, ``algorithm``, ``initial_limit``, ``min_limit``,
    ``max_limit``, ``max_waiting``, ``timeout``, ``priorities``, ``window``),
    held to the same rules.
    """

    limit: int | None = None
    algorithm: Literal["fixed", "aimd", "vegas", "gradient2"] = "gradient2"
    initial_limit: int = 20
    min_limit: int = 1
    max_limit: int = 1000
    max_waiting: int | None = 0
    timeout: float | None = 0.0
    priorities: int = 1
    window: float = 1.0

    section: ClassVar[str] = "concurrency"

    def __post_init__(self) -> None:
        self._validate(self.section)

    def _validate(self, path: str) -> None:
        # The limiter's own checks (one set of rules), reported with the section's path.
        try:
            limiter = ConcurrencyLimiter(**self.options(), clock=default_clock)
        except ConfigurationError as exc:
            raise type(exc)(f"{path}.{exc.message}", path=f"{path}.{exc.path}") from None
        object.__setattr__(self, "timeout", limiter.timeout)
        object.__setattr__(self, "window", seconds(self.window, f"{path}.window"))

    @classmethod
    def from_mapping(cls, data: object, path: str = "concurrency") -> ConcurrencyConfig:
        """Validate a mapping of options; errors name ``path`` and the option."""
        options = _section(data, path)
        _check_names(options, tuple(f.name for f in fields(cls)), path)
        return _build(cls, options, path)

    def options(self) -> dict[str, Any]:
        """The keyword arguments for ``ConcurrencyLimiter(**options)``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    """Fault injection for a protection (game days): latency and faults inside its calls.

    Attributes:
        enabled: Whether calls are injected from the start (``infra.set_chaos`` switches it).
        latency: Seconds an injected delay lasts.
        latency_rate: The share of calls delayed (0 to 1).
        fault_rate: The share of calls that fail with ``fault`` (0 to 1).
        fault: The exception class raised (import strings such as
            ``"builtins:ConnectionError"`` are accepted).
        seed: Seeds the draws, so a run replays exactly (``None``: a fresh seed).
    """

    enabled: bool = True
    latency: float = 0.0
    latency_rate: float = 0.0
    fault_rate: float = 0.0
    fault: type[Exception] = ConnectionError
    seed: int | None = None

    section: ClassVar[str] = "chaos"

    def __post_init__(self) -> None:
        self._validate(self.section)

    def _validate(self, path: str) -> None:
        set_ = object.__setattr__
        if not isinstance(self.enabled, bool):
            raise ConfigurationTypeError(
                f"{path}.enabled: expected true or false, got {describe(self.enabled)}", path=f"{path}.enabled"
            )
        latency = number(
            self.latency, f"{path}.latency", what="a number of seconds", inclusive=True, maximum=MAX_SECONDS
        )
        set_(self, "latency", latency)
        for rate in ("latency_rate", "fault_rate"):
            set_(self, rate, number(getattr(self, rate), f"{path}.{rate}", what="a share", inclusive=True, maximum=1.0))
        fault = _exception_types(self.fault, f"{path}.fault")
        if len(fault) != 1:
            raise _fail(f"{path}.fault", f"expected one exception class, got {describe(self.fault)}")
        set_(self, "fault", fault[0])
        if self.seed is not None:
            set_(self, "seed", count(self.seed, f"{path}.seed", minimum=-MAX_COUNT, maximum=MAX_COUNT))

    @classmethod
    def from_mapping(cls, data: object, path: str = "chaos") -> ChaosConfig:
        """Validate a mapping of options; errors name ``path`` and the option."""
        options = _section(data, path)
        _check_names(options, tuple(f.name for f in fields(cls)), path)
        return _build(cls, options, path)


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """The retries of a protection: each attempt runs the key's whole chain, all under its one timeout.

    Attributes:
        attempts: Attempts in all, the first included.
        initial: Seconds of backoff before the first retry (before jitter).
        maximum: The longest backoff in seconds (before jitter).
        multiplier: Growth of the backoff from one retry to the next.
        jitter: Share of the backoff drawn at random (1.0: full jitter).
        retry_on: Exception classes to retry (import strings accepted);
            ``None``: what the key's breaker counts as a failure, an attempt's
            ``ProtectionTimeout``, and a rejection whose ``retry_after`` fits
            before the deadline.
        exclude: Exception classes never retried (wins over ``retry_on``).
        budget_ratio: Retries allowed per first attempt over the last 10 s.
        budget_min_per_second: Retries allowed per second whatever the traffic.
        attempt_timeout: Seconds one attempt may take (``None``: the rest of the key's timeout).
    """

    attempts: int = 3
    initial: float = 0.1
    maximum: float = 5.0
    multiplier: float = 2.0
    jitter: float = 1.0
    retry_on: tuple[type[Exception], ...] | None = None
    exclude: tuple[type[Exception], ...] = ()
    budget_ratio: float = 0.2
    budget_min_per_second: float = 1.0
    attempt_timeout: float | None = None

    section: ClassVar[str] = "retry"

    def __post_init__(self) -> None:
        self._validate(self.section)

    def _validate(self, path: str) -> None:
        numbers = ("attempts", "initial", "maximum", "multiplier", "jitter", "budget_min_per_second", "attempt_timeout")
        checked = check_policy(f"{path}.", **{name: getattr(self, name) for name in numbers})
        # (a key's budget is always on: its point is that an outage never multiplies the load)
        checked["budget_ratio"] = number(self.budget_ratio, f"{path}.budget_ratio", inclusive=True, maximum=1e9)
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        if self.retry_on is not None:
            object.__setattr__(self, "retry_on", _exception_types(self.retry_on, f"{path}.retry_on"))
        object.__setattr__(self, "exclude", _exception_types(self.exclude, f"{path}.exclude"))

    @classmethod
    def from_mapping(cls, data: object, path: str = "retry") -> RetryConfig:
        """Validate a mapping of options; errors name ``path`` and the option."""
        options = _section(data, path)
        _check_names(options, tuple(f.name for f in fields(cls)), path)
        return _build(cls, options, path)

    def options(self) -> dict[str, Any]:
        """The keyword arguments for ``Retry(**options)``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class HedgeConfig:
    """The hedging of a protection: another concurrent attempt when the first is slow, the first success wins.

    Attributes:
        delay: Seconds an attempt runs alone before another starts, or a
            percentile (``"p95"``) of the key's successful latencies over the
            last 60 s (at most the last 1,000; no hedge until 20 are known).
        max_hedges: Attempts that may start besides the first, one every ``delay`` (1 to 10).
    """

    delay: float | str = "p95"
    max_hedges: int = 1

    section: ClassVar[str] = "hedge"

    def __post_init__(self) -> None:
        self._validate(self.section)

    def _validate(self, path: str) -> None:
        fixed, percentile, hedges = check_hedge_policy(self.delay, self.max_hedges, f"{path}.")
        if percentile is None:
            object.__setattr__(self, "delay", fixed)
        object.__setattr__(self, "max_hedges", hedges)

    @classmethod
    def from_mapping(cls, data: object, path: str = "hedge") -> HedgeConfig:
        """Validate a mapping of options; errors name ``path`` and the option."""
        options = _section(data, path)
        _check_names(options, tuple(f.name for f in fields(cls)), path)
        return _build(cls, options, path)

    def options(self) -> dict[str, Any]:
        """The keyword arguments for ``Hedge(**options)``."""
        return {"delay": self.delay, "max_hedges": self.max_hedges}


_Section = TypeVar(
    "_Section", RateLimitConfig, BreakerConfig, ConcurrencyConfig, PoolConfig, ChaosConfig, RetryConfig, HedgeConfig
)


def _build(cls: type[_Section], options: Mapping[str, Any], path: str) -> _Section:
    # Bypass __post_init__'s default path so errors carry the full one.
    instance = object.__new__(cls)
    for f in fields(cls):
        value = options.get(f.name, f.default)
        object.__setattr__(instance, f.name, value)
    instance._validate(path)
    return instance


def _rules(items: Sequence[object], path: str) -> RateLimitConfig | tuple[RateLimitConfig, ...]:
    """Several rate rules of one key (each a mapping or a :class:`RateLimitConfig`); one rule stays a section.

    Errors name the rule by its index, ``api.rate_limiter[1].limit``.
    """
    if not items:
        raise _fail(path, "a list of rate rules must hold at least one rule")
    rules: list[RateLimitConfig] = []
    for index, item in enumerate(items):
        at = f"{path}[{index}]"
        rule = item if isinstance(item, RateLimitConfig) else RateLimitConfig.from_mapping(item, at)
        if rule in rules:
            raise _fail(at, f"the same rule as {path}[{rules.index(rule)}] ({rule.limit} per {rule.window}s)")
        rules.append(rule)
    # One rule is the plain section: its key keeps the single-rule path (and its cost).
    return rules[0] if len(rules) == 1 else tuple(rules)


_SECTIONS: dict[str, Any] = {
    "rate_limiter": RateLimitConfig,
    "circuit_breaker": BreakerConfig,
    "concurrency": ConcurrencyConfig,
    "connection_pool": PoolConfig,
    "chaos": ChaosConfig,
    "retry": RetryConfig,
    "hedge": HedgeConfig,
}


@dataclass(frozen=True, slots=True)
class ProtectionConfig:
    """Everything that protects one key; every section is optional.

    Attributes:
        rate_limiter: The key's rate limit, several of them (a tuple: a call must
            pass every rule; a list in a mapping), the name of a limiter registered with
            ``infra.rate_limiter.register`` (an adapted ``aiolimiter.AsyncLimiter``, say), or ``None``.
        circuit_breaker: The key's breaker, or ``None``.
        concurrency: The key's concurrency limiter (after the breaker, before the pool), or ``None``.
        connection_pool: The key's pool or bulkhead, or ``None``.
        timeout: Seconds a protected call may take after its rate-limit check,
            or ``None`` for the default (5 s).
        chaos: Fault injection inside the key's calls (game days), or ``None``.
        retry: The key's retries (each attempt through every layer), or ``None``.
        hedge: The key's hedging (each attempt raced by later ones when slow), or ``None``.
    """

    rate_limiter: RateLimitConfig | tuple[RateLimitConfig, ...] | str | None = None
    circuit_breaker: BreakerConfig | None = None
    connection_pool: PoolConfig | None = None
    concurrency: ConcurrencyConfig | None = None
    timeout: float | None = None
    chaos: ChaosConfig | None = None
    retry: RetryConfig | None = None
    hedge: HedgeConfig | None = None

    def __post_init__(self) -> None:
        for name, kind in _SECTIONS.items():
            value = getattr(self, name)
            if name == "rate_limiter" and isinstance(value, str) and value:
                continue  # a limiter registered by name (infra.rate_limiter.register)
            if name == "rate_limiter" and isinstance(value, tuple):
                object.__setattr__(self, name, _rules(value, name))
                continue
            if value is not None and not isinstance(value, kind):
                raise _fail(name, f"expected a {kind.__name__} or None, got {describe(value)}")
        if self.timeout is not None:
            object.__setattr__(self, "timeout", seconds(self.timeout, "timeout"))

    @classmethod
    def from_mapping(cls, data: object, path: str = "") -> ProtectionConfig:
        """Validate a mapping (as in ``configure_protection``) into a config.

        Args:
            data: The mapping; sections may also be given as config objects.
            path: Prefix of error paths, normally the protection key.

        Raises:
            ConfigurationError: An unknown option, a wrong type or a value out
                of range; ``path`` names it in full.
        """
        if isinstance(data, ProtectionConfig):
            return data
        options = _section(data, path or "config")
        _check_names(options, (*_SECTIONS, "timeout"), path)
        sections: dict[str, Any] = {}
        for name, kind in _SECTIONS.items():
            value = options.get(name)
            full = f"{path}.{name}" if path else name
            if name == "rate_limiter" and isinstance(value, list | tuple):
                sections[name] = _rules(value, full)
            elif value is None or isinstance(value, kind) or (name == "rate_limiter" and isinstance(value, str)):
                if isinstance(value, str) and not value:
                    raise _fail(full, "a registered limiter's name must be a non-empty str")
                sections[name] = value  # (a str names a limiter registered on infra.rate_limiter)
            else:
                sections[name] = kind.from_mapping(value, full)
        timeout = options.get("timeout")
        if timeout is not None:
            timeout = seconds(timeout, f"{path}.timeout" if path else "timeout")
        return cls(timeout=timeout, **sections)


def load_toml(path: str | Path) -> dict[str, ProtectionConfig]:
    """Read protections from a TOML file: one table per key.

    Args:
        path: The file, e.g. ``seawall.toml`` with ``[external_api.rate_limiter]``
            tables; a top-level ``[protection]`` table, if present, holds the keys.

    Returns:
        The validated config of every key, in file order.

    Raises:
        ConfigurationError: The file cannot be read or parsed, or a key's
            config is invalid; the message starts with the file name.
    """
    file = Path(path)
    try:
        with file.open("rb") as stream:
            document = tomllib.load(stream)
    except OSError as exc:
        raise ConfigurationError(f"{file}: cannot read the configuration file: {exc}", path=None) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{file}: not valid TOML: {exc}", path=None) from exc
    tables = document.get("protection", document)
    prefix = "protection." if "protection" in document else ""
    if not isinstance(tables, dict):
        raise ConfigurationError(
            f"{file}: protection must be a table of keys, got {describe(tables)}", path="protection"
        )
    configs: dict[str, ProtectionConfig] = {}
    for key, table in tables.items():
        if not key:  # refused here, as configure_protection would refuse it later
            raise ConfigurationError(
                f"{file}: {prefix}a protection key must be a non-empty str", path=prefix[:-1] or None
            )
        try:
            configs[key] = ProtectionConfig.from_mapping(table, key)
        except ConfigurationError as exc:
            full = f"{prefix}{exc.path}" if exc.path else None
            raise ConfigurationError(f"{file}: {prefix}{exc.message}", path=full) from exc
    return configs
