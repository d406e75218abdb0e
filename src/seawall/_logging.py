"""The ``seawall`` structlog logger, polite to the application's own setup.

A library must not configure structlog globally: that belongs to the
application. So the logger decides per call:

* If the application has configured structlog (``structlog.is_configured()``),
  seawall logs through ``structlog.get_logger("seawall")`` and the
  application's processors, renderers and filters apply.
* Otherwise seawall renders ``key=value`` lines into the standard library
  logger named ``seawall``, so ordinary ``logging`` configuration (levels,
  handlers) governs it; with no configuration at all only warnings and errors
  reach stderr, as for any library using ``logging``.

Logging happens on state changes, denials and timeouts, never on the success
path. ``debug`` is filtered by the stdlib level before any rendering.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

__all__ = ["logger"]

_stdlib_logger = logging.getLogger("seawall")


def _drop_exc_info(_logger: Any, _method: str, event_dict: Any) -> Any:
    # ``logger.exception`` of the stdlib appends the traceback itself; keeping
    # ``exc_info`` in the rendered line would print it twice.
    event_dict.pop("exc_info", None)
    return event_dict


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
                structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=True),
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
