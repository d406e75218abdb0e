"""The exception tree: types, codes, context, messages, pickling."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

import seawall
from seawall import errors

ALL_ERRORS: list[tuple[type[seawall.SeawallError], str, tuple[type[BaseException], ...]]] = [
    (seawall.RateLimitExceeded, "rate_limit_exceeded", (seawall.Rejected,)),
    (seawall.RateLimiterError, "rate_limiter_exception", ()),
    (seawall.CircuitOpenError, "circuit_breaker_blown", (seawall.Rejected,)),
    (seawall.CircuitBreakerNotFound, "circuit_breaker_not_found", (LookupError, seawall.NotFound)),
    (seawall.PoolNotFound, "pool_not_found", (LookupError, seawall.NotFound)),
    (seawall.PoolTimeout, "checkout_timeout", (TimeoutError, seawall.Rejected)),
    (seawall.ConcurrencyLimitExceeded, "concurrency_limit_exceeded", (seawall.Rejected,)),
    (seawall.PoolClosed, "pool_closed", ()),
    (seawall.ProtectionTimeout, "timeout", (TimeoutError,)),
    (seawall.ProtectionKeyNotFound, "protection_key_not_found", (LookupError, seawall.NotFound)),
    (seawall.ConfigurationError, "invalid_config", (ValueError,)),
    (seawall.ConfigurationTypeError, "invalid_config", (ValueError, TypeError)),
]


@pytest.mark.parametrize(("cls", "code", "bases"), ALL_ERRORS)
def test_error_codes_and_bases(cls: type[seawall.SeawallError], code: str, bases: tuple[type, ...]) -> None:
    """Each error has its contract code and derives from SeawallError plus its stdlib base."""
    error = cls()
    assert error.error_type == code
    assert isinstance(error, seawall.SeawallError)
    assert isinstance(error, Exception)
    for base in bases:
        assert isinstance(error, base)
    assert error.message  # a default message exists
    assert str(error) == error.message


@pytest.mark.parametrize(("cls", "code", "bases"), ALL_ERRORS)
def test_errors_pickle_with_their_context(cls: type[seawall.SeawallError], code: str, bases: object) -> None:
    """An error survives pickling with message, type and context intact."""
    context = {name: f"v-{name}" for name in cls._context_fields}
    error = cls("custom message", **context)
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is cls
    assert clone.message == "custom message"
    assert clone.to_dict() == error.to_dict()
    assert repr(clone) == repr(error)


def test_rate_limit_exceeded_carries_rule_and_retry_after() -> None:
    """RateLimitExceeded exposes key, limit, window and retry_after, and says them in the message."""
    error = seawall.RateLimitExceeded(key="user:1", limit=10, window=60.0, retry_after=1.5)
    assert (error.key, error.limit, error.window, error.retry_after) == ("user:1", 10, 60.0, 1.5)
    assert "user:1" in error.message
    assert "1.500s" in error.message
    assert error.to_dict() == {
        "error_type": "rate_limit_exceeded",
        "message": error.message,
        "key": "user:1",
        "limit": 10,
        "window": 60.0,
        "retry_after": 1.5,
    }


def test_repr_shows_class_message_and_known_context() -> None:
    """Repr names the class, the message and the context that is set, and omits unset context."""
    error = seawall.CircuitOpenError(name="payments", retry_after=2.0)
    assert repr(error) == (
        "CircuitOpenError(\"circuit breaker 'payments' is open; retry after 2.000s\", name='payments', retry_after=2.0)"
    )
    assert repr(seawall.PoolClosed()) == "PoolClosed('connection pool None is closed')"


def test_unknown_retry_time_is_said_plainly() -> None:
    """Without retry_after the message says the time is unknown rather than printing None."""
    assert "an unknown time" in seawall.CircuitOpenError(name="x").message


def test_errors_can_be_caught_by_stdlib_base() -> None:
    """A PoolTimeout is caught by `except TimeoutError`, as asyncio users write."""
    with pytest.raises(TimeoutError):
        raise seawall.PoolTimeout(name="db", timeout=1.0)


def test_errors_module_exports_the_same_tree() -> None:
    """seawall.errors re-exports exactly the classes of the top-level package."""
    for name in errors.__all__:
        assert getattr(errors, name) is getattr(seawall, name)
    assert set(errors.__all__) == {cls.__name__ for cls, _, _ in ALL_ERRORS} | {"SeawallError", "Rejected", "NotFound"}


def test_only_refusals_are_rejected() -> None:
    """Rejected groups the refusals made before the call ran; failures of seawall itself are not in it."""
    rejected = {cls for cls, _, _ in ALL_ERRORS if issubclass(cls, seawall.Rejected)}
    assert rejected == {
        seawall.RateLimitExceeded,
        seawall.CircuitOpenError,
        seawall.PoolTimeout,
        seawall.ConcurrencyLimitExceeded,
    }
    not_found = {cls for cls, _, _ in ALL_ERRORS if issubclass(cls, seawall.NotFound)}
    assert not_found == {seawall.CircuitBreakerNotFound, seawall.PoolNotFound, seawall.ProtectionKeyNotFound}


def test_a_bare_import_reaches_the_public_submodules() -> None:
    """`import seawall` alone makes seawall.errors and seawall.telemetry usable (a fresh interpreter)."""
    code = (
        "import seawall\n"
        "assert seawall.errors.RateLimitExceeded is seawall.RateLimitExceeded\n"
        "assert callable(seawall.telemetry.attach)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
