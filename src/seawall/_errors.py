"""The exception tree of seawall.

Every error the toolkit raises derives from :class:`SeawallError`; exceptions
raised by the code it protects pass through unchanged, never wrapped::

    SeawallError (Exception)
    ├── Rejected .................. (a protection refused the call before it ran)
    │   ├── RateLimitExceeded ..... rate_limit_exceeded
    │   ├── CircuitOpenError ...... circuit_breaker_blown
    │   ├── PoolTimeout ........... checkout_timeout          (also TimeoutError)
    │   └── ConcurrencyLimitExceeded concurrency_limit_exceeded
    ├── NotFound .................. (a lookup by name failed; also LookupError)
    │   ├── CircuitBreakerNotFound  circuit_breaker_not_found
    │   ├── PoolNotFound .......... pool_not_found
    │   └── ProtectionKeyNotFound . protection_key_not_found
    ├── RateLimiterError .......... rate_limiter_exception
    ├── PoolClosed ................ pool_closed
    ├── ProtectionTimeout ......... timeout                   (also TimeoutError)
    └── ConfigurationError ........ invalid_config            (also ValueError)
        └── ConfigurationTypeError  invalid_config            (also TypeError)

The groups let a caller treat alike what it handles alike: ``except
Rejected`` catches every "not now, try later" answer (each with its
``retry_after`` where known), whichever layer gave it.

Each error carries a stable machine-readable ``error_type``, a human
``message`` and ``retry_after`` (seconds, or ``None`` when unknown), plus the
typed context of its kind (``key``, ``name``, ...). Errors pickle with all of
it, so they cross process boundaries intact.

Messages are built lazily: a breaker rejecting thousands of calls a second
should not pay for string formatting nobody reads.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "CircuitBreakerNotFound",
    "CircuitOpenError",
    "ConcurrencyLimitExceeded",
    "ConfigurationError",
    "ConfigurationTypeError",
    "NotFound",
    "PoolClosed",
    "PoolNotFound",
    "PoolTimeout",
    "ProtectionKeyNotFound",
    "ProtectionTimeout",
    "RateLimitExceeded",
    "RateLimiterError",
    "Rejected",
    "SeawallError",
]


def _rebuild(cls: type[SeawallError], message: str | None, context: dict[str, Any]) -> SeawallError:
    """Unpickle an error: call its constructor with the saved context."""
    return cls(message, **context)


class SeawallError(Exception):
    """Root of every error raised by seawall itself.

    Args:
        message: Human-readable explanation; a default is derived from the
            context when omitted.
        retry_after: Seconds after which the same call may succeed, if known.
    """

    error_type: ClassVar[str] = "seawall_error"
    #: Names of the keyword-only context attributes, in ``repr`` order.
    _context_fields: ClassVar[tuple[str, ...]] = ("retry_after",)

    def __init__(self, message: str | None = None, *, retry_after: float | None = None) -> None:
        # Subclasses assign their fields directly instead of chaining
        # ``super().__init__``: errors are raised on hot rejection paths, and
        # each chained call with keywords costs about as much as the raise.
        # ``BaseException.__new__`` has already initialised the exception.
        self._message = message
        self.retry_after = retry_after

    @property
    def message(self) -> str:
        """The human-readable explanation."""
        if self._message is None:
            self._message = self._default_message()
        return self._message

    def _default_message(self) -> str:
        return self.error_type.replace("_", " ")

    def _context(self) -> dict[str, Any]:
        return {field: getattr(self, field) for field in self._context_fields}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view: ``error_type``, ``message`` and the context."""
        return {"error_type": self.error_type, "message": self.message, **self._context()}

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        context = ", ".join(f"{key}={value!r}" for key, value in self._context().items() if value is not None)
        parts = [repr(self.message)] + ([context] if context else [])
        return f"{type(self).__name__}({', '.join(parts)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self._message, self._context()), None)


def _seconds(value: float | None) -> str:
    return "an unknown time" if value is None else f"{value:.3f}s"


class Rejected(SeawallError):
    """A protection refused the call before it ran: rate limit, open breaker, pool or concurrency limit.

    Nothing of the call happened, so it is safe to retry, after ``retry_after``
    where it is known.
    """

    error_type = "rejected"


class RateLimitExceeded(Rejected):
    """A hit was denied by a rate limiter; nothing was consumed.

    ``retry_after`` is the time after which the same hit would be admitted.
    """

    error_type = "rate_limit_exceeded"
    _context_fields = ("key", "limit", "window", "retry_after")

    def __init__(
        self,
        message: str | None = None,
        *,
        key: str | None = None,
        limit: float | None = None,
        window: float | None = None,
        retry_after: float | None = None,
    ) -> None:
        self._message = message
        self.retry_after = retry_after
        self.key = key
        self.limit = limit
        self.window = window

    def _default_message(self) -> str:
        return (
            f"rate limit of {self.limit} per {self.window}s exceeded for key {self.key!r}; "
            f"retry after {_seconds(self.retry_after)}"
        )


class RateLimiterError(SeawallError):
    """The rate limiter's backend failed and its policy is to deny."""

    error_type = "rate_limiter_exception"
    _context_fields = ("key", "retry_after")

    def __init__(self, message: str | None = None, *, key: str | None = None, retry_after: float | None = None) -> None:
        self._message = message
        self.retry_after = retry_after
        self.key = key

    def _default_message(self) -> str:
        return f"rate limiter backend failed for key {self.key!r}; denying by policy"


class CircuitOpenError(Rejected):
    """A circuit breaker rejected the call without running it."""

    error_type = "circuit_breaker_blown"
    _context_fields = ("name", "retry_after")

    def __init__(
        self, message: str | None = None, *, name: str | None = None, retry_after: float | None = None
    ) -> None:
        self._message = message
        self.retry_after = retry_after
        self.name = name

    def _default_message(self) -> str:
        return f"circuit breaker {self.name!r} is open; retry after {_seconds(self.retry_after)}"


class NotFound(SeawallError, LookupError):
    """A lookup by name failed (a breaker, a pool, a protection key); the message names what was looked for."""

    error_type = "not_found"

    _context_fields = ("name",)
    _what: ClassVar[str] = "entry"

    def __init__(self, message: str | None = None, *, name: str | None = None) -> None:
        self._message = message
        self.retry_after = None
        self.name = name

    def _default_message(self) -> str:
        return f"no {self._what} named {self.name!r}"


class CircuitBreakerNotFound(NotFound):
    """No circuit breaker is registered under that name."""

    error_type = "circuit_breaker_not_found"
    _what = "circuit breaker"


class PoolNotFound(NotFound):
    """No connection pool is registered under that name."""

    error_type = "pool_not_found"
    _what = "connection pool"


class ProtectionKeyNotFound(NotFound):
    """No protection is configured under that key."""

    error_type = "protection_key_not_found"
    _what = "protection key"


class PoolTimeout(Rejected, TimeoutError):
    """No worker could be checked out of a pool within the timeout."""

    error_type = "checkout_timeout"
    _context_fields = ("name", "timeout", "retry_after")

    def __init__(
        self,
        message: str | None = None,
        *,
        name: str | None = None,
        timeout: float | None = None,
        retry_after: float | None = None,
    ) -> None:
        self._message = message
        self.retry_after = retry_after
        self.name = name
        self.timeout = timeout

    def _default_message(self) -> str:
        return f"no worker of pool {self.name!r} became free within {_seconds(self.timeout)}"


class ConcurrencyLimitExceeded(Rejected):
    """A concurrency limiter had no slot for the call (at its limit, no room or no time to wait, or shed).

    ``limit`` is the limit in force when the call was refused, ``priority``
    the call's priority (0 is the most important), ``name`` the limiter's.
    ``retry_after`` is the limiter's latency estimate (about when a slot
    frees), or ``None`` before it has measured any call.
    """

    error_type = "concurrency_limit_exceeded"
    _context_fields = ("name", "limit", "priority", "retry_after")

    def __init__(
        self,
        message: str | None = None,
        *,
        name: str | None = None,
        limit: int | None = None,
        priority: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        self._message = message
        self.retry_after = retry_after
        self.name = name
        self.limit = limit
        self.priority = priority

    def _default_message(self) -> str:
        subject = "concurrency limiter" if self.name is None else f"concurrency limiter {self.name!r}"
        return (
            f"{subject} is at its limit of {self.limit} (priority {self.priority}); "
            f"retry after {_seconds(self.retry_after)}"
        )


class PoolClosed(SeawallError):
    """The pool is closed (or closing) and hands out nothing more."""

    error_type = "pool_closed"
    _context_fields = ("name",)

    def __init__(self, message: str | None = None, *, name: str | None = None) -> None:
        self._message = message
        self.retry_after = None
        self.name = name

    def _default_message(self) -> str:
        return f"connection pool {self.name!r} is closed"


class ProtectionTimeout(SeawallError, TimeoutError):
    """A protected call did not finish within its timeout and was cancelled."""

    error_type = "timeout"
    _context_fields = ("key", "timeout", "retry_after")

    def __init__(
        self,
        message: str | None = None,
        *,
        key: str | None = None,
        timeout: float | None = None,
        retry_after: float | None = None,
    ) -> None:
        self._message = message
        self.retry_after = retry_after
        self.key = key
        self.timeout = timeout

    def _default_message(self) -> str:
        return f"protected call for key {self.key!r} timed out after {_seconds(self.timeout)}"


class ConfigurationError(SeawallError, ValueError):
    """A configuration value is invalid; ``path`` names the offending option."""

    error_type = "invalid_config"
    _context_fields = ("path",)

    def __init__(self, message: str | None = None, *, path: str | None = None) -> None:
        self._message = message
        self.retry_after = None
        self.path = path

    def _default_message(self) -> str:
        return f"invalid configuration at {self.path!r}"


class ConfigurationTypeError(ConfigurationError, TypeError):
    """A value of the wrong type: a ``ConfigurationError`` that is also a ``TypeError``.

    The contract promises ``ValueError`` for bad input, and Python users also
    expect ``TypeError`` for a value of the wrong type; this error is both, so
    either ``except`` clause catches it.
    """
