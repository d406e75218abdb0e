"""Typing checks of the public API: mypy checks this file, pytest never runs it."""

from __future__ import annotations

from typing import Any, assert_type

import seawall
from seawall import telemetry


def errors_are_typed() -> None:
    error = seawall.RateLimitExceeded(key="k", limit=1, window=1.0, retry_after=0.5)
    assert_type(error.retry_after, float | None)
    assert_type(error.error_type, str)
    assert_type(error.message, str)
    assert_type(seawall.CircuitOpenError(name="x").name, str | None)


def telemetry_is_typed() -> None:
    def handler(event: tuple[str, ...], measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        pass

    telemetry.attach("id", ("seawall", "rate_limiter", "request_allowed"), handler)
    assert_type(telemetry.detach("id"), bool)


def clock_is_typed() -> None:
    clock: seawall.Clock = seawall.FakeClock()
    assert_type(clock.now(), float)
