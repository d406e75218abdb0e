"""Helpers for testing code that uses seawall.

* :class:`FakeClock`: inject it into a primitive (``clock=``) and move time
  with ``advance()`` instead of sleeping.
* :func:`capture_events`: collect the telemetry events emitted inside a
  ``with`` block, like structlog's ``capture_logs()``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from seawall._clock import FakeClock
from seawall._telemetry import ALL_EVENTS, Event, attach, detach

__all__ = ["CapturedEvent", "FakeClock", "capture_events"]

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
