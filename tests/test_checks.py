"""Every bad argument of a public constructor is a ConfigurationError that names it (seawall._checks)."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from seawall import CircuitBreaker, ConfigurationError, ConfigurationTypeError, ConnectionPool, RateLimiter
from seawall._checks import count, describe, number, seconds

HUGE_INT = 10**400

CONSTRUCTORS: dict[str, Callable[..., object]] = {
    "limiter": lambda **options: RateLimiter(**{"limit": 5, "window": 1.0, **options}),
    "breaker": lambda **options: CircuitBreaker("db", **options),
    "pool": lambda **options: ConnectionPool(None, **options),
}

HOSTILE_NUMBERS = [HUGE_INT, -HUGE_INT, math.inf, -math.inf, math.nan, 1e308 * 10, -0.0, 0, -1e-300]


@pytest.mark.parametrize(
    ("kind", "parameter"),
    [
        ("limiter", "limit"),
        ("limiter", "window"),
        ("breaker", "window"),
        ("breaker", "recovery_time"),
        ("breaker", "failure_threshold"),
        ("breaker", "half_open_max_calls"),
        ("pool", "size"),
        ("pool", "timeout"),
        ("pool", "max_idle"),
        ("pool", "max_lifetime"),
    ],
)
@pytest.mark.parametrize("value", HOSTILE_NUMBERS, ids=repr)
def test_hostile_numbers_are_configuration_errors_naming_the_parameter(kind: str, parameter: str, value: Any) -> None:
    """10**400, inf, nan, -0.0 and friends never escape as OverflowError or a bare TypeError."""
    with pytest.raises(ConfigurationError) as info:
        CONSTRUCTORS[kind](**{parameter: value})
    assert info.value.path == parameter
    assert parameter in info.value.message


@pytest.mark.parametrize(("kind", "parameter"), [("limiter", "limit"), ("breaker", "window"), ("pool", "size")])
@pytest.mark.parametrize("value", ["5", True, None, [1], b"1"], ids=repr)
def test_wrong_types_are_configuration_type_errors(kind: str, parameter: str, value: Any) -> None:
    """A value of the wrong type is a ConfigurationTypeError (so also a TypeError) naming the parameter."""
    with pytest.raises(ConfigurationTypeError) as info:
        CONSTRUCTORS[kind](**{parameter: value})
    assert info.value.path == parameter


def test_checks_accept_what_is_in_range() -> None:
    """The shared checks return floats and ints in range, timedeltas as seconds, and bounds inclusive where asked."""
    assert number(10**12, "limit") == 1e12
    assert seconds(timedelta(minutes=1), "window") == 60.0
    assert seconds(1e-3, "window", minimum=1e-3, inclusive=True) == 1e-3
    assert count(2**53, "size", minimum=0) == 2**53
    with pytest.raises(ConfigurationError, match="at most"):
        count(2**53 + 1, "size", minimum=0)
    with pytest.raises(ConfigurationError, match=r"above 0\.001"):
        seconds(1e-3, "window", minimum=1e-3)


def test_messages_stay_readable_for_huge_values() -> None:
    """An int too long to print, or a long repr, is shown shortened in the message, never raising itself."""
    assert "bits" in describe(10**5000)
    assert len(describe("x" * 10_000)) < 100
