"""Helpers for testing code that uses seawall.

* :class:`FakeClock`: inject it into a primitive (``clock=``) and move time
  with ``advance()`` instead of sleeping.
* :func:`capture_events`: collect the telemetry events emitted inside a
  ``with`` block, like structlog's ``capture_logs()``.
* :func:`advance`: move a :class:`FakeClock` and let every task it wakes
  (an ``AsyncInfrastructure``'s timeout timer, a pool's checkout timeout, a
  limiter's waiter) run until all are blocked again.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from seawall._clock import FakeClock
from seawall._telemetry import ALL_EVENTS, Event, attach, detach

__all__ = ["CapturedEvent", "FakeClock", "advance", "capture_events"]

_capture_ids = itertools.count()


@dataclass(frozen=True, slots=True)
class CapturedEvent:
    """One telemetry event as it was emitted."""

    event: Event
    measurements: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The last part of the event tuple, e.g. ``"request_denied"``."""
        return self.event[-1]


@contextmanager
def capture_events(events: Iterable[Event] = ALL_EVENTS) -> Iterator[list[CapturedEvent]]:
    """Capture telemetry events emitted inside the block, in order.

    Args:
        events: The events to capture; every event seawall emits by default.

    Yields:
        The list that the captured events are appended to.
    """
    captured: list[CapturedEvent] = []
    handler_id = f"seawall.testing.capture_events-{next(_capture_ids)}"

    def handler(event: Event, measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        captured.append(CapturedEvent(event, dict(measurements), dict(metadata)))

    attach(handler_id, list(events), handler)
    try:
        yield captured
    finally:
        detach(handler_id)


async def advance(clock: FakeClock, seconds: float) -> None:
    """Advance ``clock`` by ``seconds`` once every task is blocked, then let the woken ones run.

    Args:
        clock: The fake clock injected into the code under test
            (``AsyncInfrastructure(clock=clock)``, ``RateLimiter(..., clock=clock)``).
        seconds: How far to move time.

    A timeout of an ``AsyncInfrastructure`` on a fake clock fires inside this
    call: its timer task wakes, cancels the expired call, and the call's task
    runs up to its next suspension before this returns.
    """
    await anyio.wait_all_tasks_blocked()
    clock.advance(seconds)
    await anyio.wait_all_tasks_blocked()
