"""Public telemetry API: attach handlers to seawall's events.

See :mod:`seawall._telemetry` for the model; the event tuples are listed in
``ALL_EVENTS`` and in the README.
"""

from seawall._telemetry import (
    ALL_EVENTS,
    Event,
    Handler,
    HandlerInfo,
    attach,
    detach,
    execute,
    list_handlers,
)

__all__ = ["ALL_EVENTS", "Event", "Handler", "HandlerInfo", "attach", "detach", "execute", "list_handlers"]
