"""The ``seawall`` structlog logger, polite to the application's own setup.

A library must not configure structlog globally: that belongs to the
application. So the logger decides per call:

* If the application has configured structlog (``structlog.is_configured()``),
  seawall logs through ``structlog.get_logger("seawall")`` and the
  application's processors, renderers and filters apply.
* Otherwise seawall renders ``key=value`` lines into the standard library
  logger named ``seawall``, so ordinary ``logging`` configuration (levels,
  handlers) governs it; with no configuration at all only warnings and errors
  reach stderr, as for any library using ``logging``. The fields also go to
  the record as ``extra=`` attributes (``record.key``, ``record.retry_after``),
  so a JSON formatter sees them as fields, not only inside the message; a
  field whose name a ``LogRecord`` uses already (``name``, ``msg``,
  ``args``...) is set as ``seawall_<field>`` instead (``record.seawall_name``).

Logging happens on state changes, denials and timeouts, never on the success
path. ``debug`` is filtered by the stdlib level before any rendering.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import structlog

__all__ = ["Throttle", "logger"]

_stdlib_logger = logging.getLogger("seawall")


def _drop_exc_info(_logger: Any, _method: str, event_dict: Any) -> Any:
    # ``logger.exception`` of the stdlib appends the traceback itself; keeping
    # ``exc_info`` in the rendered line would print it twice.
    event_dict.pop("exc_info", None)
    return event_dict


#: Attributes every ``LogRecord`` has: an ``extra=`` key among them would make ``logging`` raise.
_RESERVED: frozenset[str] = frozenset(
    {*vars(logging.LogRecord("", 0, "", 0, "", (), None)), "message", "asctime", "taskName"}
)
_render_key_values = structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=True)


def _render_with_extra(logger: Any, method: str, event_dict: Any) -> tuple[tuple[str], dict[str, Any]]:
    """The ``key=value`` message, and every field as an ``extra=`` record attribute too."""
    extra = {
        f"seawall_{field}" if field in _RESERVED else field: value
        for field, value in event_dict.items()
        if field != "level"  # the record's own levelname says it
    }
    return (_render_key_values(logger, method, event_dict),), {"extra": extra}


class _SeawallLogger:
    """Forward ``debug``/``info``/``warning``/``error``/``exception`` to the right backend."""

    __slots__ = ("_fallback",)

    def __init__(self) -> None:
        self._fallback: Any = structlog.wrap_logger(
            _stdlib_logger,
            processors=[
                structlog.stdlib.filter_by_level,
                structlog.processors.add_log_level,
                _drop_exc_info,
                _render_with_extra,
            ],
            wrapper_class=structlog.stdlib.BoundLogger,
            cache_logger_on_first_use=True,
        )

    def _target(self) -> Any:
        if structlog.is_configured():
            return structlog.get_logger("seawall")
        return self._fallback

    def is_enabled_for(self, level: int) -> bool:
        """Whether a record at ``level`` would be emitted (always true under structlog config)."""
        return structlog.is_configured() or _stdlib_logger.isEnabledFor(level)

    def debug(self, event: str, **fields: Any) -> None:
        self._target().debug(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._target().info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._target().warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._target().error(event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._target().exception(event, **fields)


logger = _SeawallLogger()


class Throttle:
    """At most one log line per ``every`` seconds for each ``group`` (a key, a backend), with a count.

    A burst of the same event (10,000 calls timing out at once, a Redis outage
    failing every request) must not turn into as many log lines: writing them
    would stall the event loop and delay the very timeouts being reported. The
    first event of a group is logged at once; later ones within ``every``
    seconds are counted, and the next line logged carries ``suppressed=N``.
    Telemetry still sees every event.
    """

    __slots__ = ("_every", "_groups", "_now")

    def __init__(self, every: float = 1.0, *, now: Callable[[], float] = time.monotonic) -> None:
        self._every = every
        self._now = now
        self._groups: dict[Any, list[float]] = {}  # group -> [last logged at, suppressed since]

    def warning(self, event: str, group: Any, **fields: Any) -> None:
        self._log("warning", event, group, fields)

    def error(self, event: str, group: Any, **fields: Any) -> None:
        self._log("error", event, group, fields)

    def _log(self, level: str, event: str, group: Any, fields: dict[str, Any]) -> None:
        now = self._now()
        state = self._groups.get(group)
        if state is not None and now - state[0] < self._every:
            state[1] += 1
            return
        suppressed = 0 if state is None else int(state[1])
        if len(self._groups) >= _MAX_THROTTLED_GROUPS:
            self._groups.clear()  # many groups (one-off keys): start over rather than grow
        self._groups[group] = [now, 0]
        if suppressed:
            fields["suppressed"] = suppressed
        getattr(logger, level)(event, **fields)


#: Groups a Throttle remembers at most.
_MAX_THROTTLED_GROUPS = 4096
