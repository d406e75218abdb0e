"""Telemetry events: attach handlers, emit events, at next to no cost when idle.

The model is Erlang's ``:telemetry``: an event is a tuple of strings such as
``("seawall", "rate_limiter", "request_allowed")``; a handler is any callable
``handler(event, measurements, metadata)`` attached under a unique id.

Each event has a :class:`Topic` whose ``handlers`` attribute is an immutable
tuple, replaced (never mutated) on attach/detach. That makes two things cheap
and safe:

* Primitives guard emission with ``if TOPIC.handlers:`` *before* they build
  the measurement dicts, so an event nobody listens to costs one attribute
  read (see ``benchmarks/bench_telemetry.py``).
* A hot path guarding several topics first reads ``ANY_HANDLER.attached``
  (``False`` while no handler is attached to anything), one attribute read.
* Emission iterates a snapshot, so a handler may attach or detach others (or
  itself) while an event is being delivered.

A handler that raises is detached and the failure logged; the emitting call
carries on as if nothing happened.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from seawall._logging import logger

__all__ = [
    "ALL_EVENTS",
    "ANY_HANDLER",
    "AnyHandler",
    "Event",
    "Handler",
    "HandlerInfo",
    "Topic",
    "attach",
    "detach",
    "execute",
    "list_handlers",
    "topic",
]

Event = tuple[str, ...]
Handler = Callable[[Event, dict[str, Any], dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class HandlerInfo:
    """One attached handler, as reported by :func:`list_handlers`."""

    id: str
    event: Event
    handler: Handler


class Topic:
    """The handlers of one event; ``if topic.handlers:`` is the idle-cost guard."""

    __slots__ = ("event", "handlers")

    def __init__(self, event: Event) -> None:
        self.event: Final = event
        self.handlers: tuple[tuple[str, Handler], ...] = ()

    def emit(self, measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        """Deliver the event to every handler attached when the call began."""
        for handler_id, handler in self.handlers:
            try:
                handler(self.event, measurements, metadata)
            except Exception:
                # A broken handler must never break the protected call; it is
                # removed so it cannot fail (and log) on every event after this.
                detach(handler_id)
                logger.exception("telemetry_handler_failed", handler_id=handler_id, telemetry_event=list(self.event))

    def __repr__(self) -> str:
        return f"Topic({self.event!r}, handlers={[handler_id for handler_id, _ in self.handlers]!r})"


class AnyHandler:
    """Whether any handler is attached to any event: ``if ANY_HANDLER.attached:``.

    For hot paths that guard several topics: one attribute read tells whether
    looking at each topic's ``handlers`` is worth it at all. Kept up to date
    by :func:`attach` and :func:`detach` (under their lock).
    """

    __slots__ = ("attached",)

    def __init__(self) -> None:
        self.attached = False

    def __repr__(self) -> str:
        return f"AnyHandler(attached={self.attached})"


#: The one :class:`AnyHandler`; read it, never assign to it.
ANY_HANDLER: Final = AnyHandler()

_lock = threading.Lock()  # attach/detach may come from any thread; emission takes no lock
_topics: dict[Event, Topic] = {}
_events_by_id: dict[str, tuple[Event, ...]] = {}


def _check_event(event: object) -> Event:
    if not (isinstance(event, tuple) and event and all(isinstance(part, str) for part in event)):
        raise TypeError(f"a telemetry event is a non-empty tuple of str, got {event!r}")
    return event


def topic(event: Event) -> Topic:
    """Return the (shared, long-lived) topic of ``event``, creating it if new."""
    found = _topics.get(event)
    if found is None:
        with _lock:
            found = _topics.setdefault(_check_event(event), Topic(event))
    return found


def attach(handler_id: str, events: Event | Iterable[Event], handler: Handler) -> None:
    """Call ``handler(event, measurements, metadata)`` whenever one of ``events`` is emitted.

    Args:
        handler_id: A unique id, used to detach the handler later.
        events: One event tuple, or an iterable of them.
        handler: The callable; it runs inline in the emitting task, so keep it fast.

    Raises:
        ValueError: ``handler_id`` is attached already.
        TypeError: an event is not a tuple of str, or ``handler`` is not callable.
    """
    if not isinstance(handler_id, str):
        raise TypeError(f"handler_id must be a str, got {handler_id!r}")
    if not callable(handler):
        raise TypeError(f"handler must be callable, got {handler!r}")
    event_list = [events] if isinstance(events, tuple) and all(isinstance(p, str) for p in events) else list(events)
    checked = tuple(dict.fromkeys(_check_event(event) for event in event_list))
    if not checked:
        raise ValueError(f"handler {handler_id!r} must be attached to at least one event")
    with _lock:
        if handler_id in _events_by_id:
            raise ValueError(f"a telemetry handler with id {handler_id!r} is attached already")
        _events_by_id[handler_id] = checked
        ANY_HANDLER.attached = True
        for event in checked:
            event_topic = _topics.setdefault(event, Topic(event))
            event_topic.handlers = (*event_topic.handlers, (handler_id, handler))


def detach(handler_id: str) -> bool:
    """Detach the handler attached under ``handler_id``; return whether there was one."""
    with _lock:
        events = _events_by_id.pop(handler_id, None)
        if events is None:
            return False
        ANY_HANDLER.attached = bool(_events_by_id)
        for event in events:
            event_topic = _topics[event]
            event_topic.handlers = tuple(pair for pair in event_topic.handlers if pair[0] != handler_id)
        return True


def execute(event: Event, measurements: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> None:
    """Emit ``event`` to its handlers (a no-op when none are attached)."""
    found = _topics.get(event)
    if found is not None and found.handlers:
        found.emit(dict(measurements), dict(metadata or {}))


def list_handlers(prefix: Event = ()) -> list[HandlerInfo]:
    """List attached handlers whose event starts with ``prefix`` (all by default)."""
    with _lock:
        return [
            HandlerInfo(handler_id, event_topic.event, handler)
            for event_topic in _topics.values()
            if event_topic.event[: len(prefix)] == prefix
            for handler_id, handler in event_topic.handlers
        ]


# The events seawall emits. Primitives import these topics once and guard on
# ``.handlers``; users attach to the tuples.
INFRA_EXECUTE_START: Final = topic(("seawall", "infrastructure", "execute_start"))
INFRA_EXECUTE_STOP: Final = topic(("seawall", "infrastructure", "execute_stop"))
INFRA_EXECUTE_EXCEPTION: Final = topic(("seawall", "infrastructure", "execute_exception"))
INFRA_PROTECTION_TRIGGERED: Final = topic(("seawall", "infrastructure", "protection_triggered"))
LIMITER_REQUEST_ALLOWED: Final = topic(("seawall", "rate_limiter", "request_allowed"))
LIMITER_REQUEST_DENIED: Final = topic(("seawall", "rate_limiter", "request_denied"))
LIMITER_EXCEPTION: Final = topic(("seawall", "rate_limiter", "rate_limiter_exception"))
BREAKER_CALL_EXECUTED: Final = topic(("seawall", "circuit_breaker", "call_executed"))
BREAKER_CALL_REJECTED: Final = topic(("seawall", "circuit_breaker", "call_rejected"))
BREAKER_FUSE_INSTALLED: Final = topic(("seawall", "circuit_breaker", "fuse_installed"))
BREAKER_STATE_CHANGED: Final = topic(("seawall", "circuit_breaker", "state_changed"))
POOL_CHECKOUT: Final = topic(("seawall", "connection_pool", "checkout"))
POOL_CHECKIN: Final = topic(("seawall", "connection_pool", "checkin"))
POOL_TIMEOUT: Final = topic(("seawall", "connection_pool", "timeout"))
CONCURRENCY_CALL_REJECTED: Final = topic(("seawall", "concurrency_limiter", "call_rejected"))
CONCURRENCY_LIMIT_CHANGED: Final = topic(("seawall", "concurrency_limiter", "limit_changed"))
CHAOS_INJECTED: Final = topic(("seawall", "chaos", "injected"))
BACKEND_ERROR: Final = topic(("seawall", "backend", "error"))
RETRY_ATTEMPT: Final = topic(("seawall", "retry", "attempt"))
RETRY_GAVE_UP: Final = topic(("seawall", "retry", "gave_up"))
RETRY_BUDGET_EXHAUSTED: Final = topic(("seawall", "retry", "budget_exhausted"))
HEDGE_STARTED: Final = topic(("seawall", "hedge", "started"))
HEDGE_WON: Final = topic(("seawall", "hedge", "won"))

#: Every event seawall itself emits, for attaching one handler to all of them.
ALL_EVENTS: Final[tuple[Event, ...]] = tuple(_topics)
