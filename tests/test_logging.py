"""The seawall logger: stdlib logging by default, the application's structlog when configured."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import capture_logs

from seawall._logging import logger


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def test_unconfigured_structlog_logs_key_values_to_stdlib_seawall_logger(caplog: pytest.LogCaptureFixture) -> None:
    """Without app config, records go to the `seawall` stdlib logger as key=value text."""
    with caplog.at_level(logging.INFO, logger="seawall"):
        logger.warning("breaker_opened", name="db", failures=3)
    (record,) = caplog.records
    assert record.name == "seawall"
    assert record.levelno == logging.WARNING
    assert "event='breaker_opened'" in record.getMessage()
    assert "name='db'" in record.getMessage()


def test_debug_is_filtered_by_the_stdlib_level(caplog: pytest.LogCaptureFixture) -> None:
    """Debug records are dropped (and report disabled) when the seawall logger is at INFO."""
    with caplog.at_level(logging.INFO, logger="seawall"):
        logger.debug("noisy")
        assert not logger.is_enabled_for(logging.DEBUG)
    assert caplog.records == []


def test_exception_logs_traceback_once(caplog: pytest.LogCaptureFixture) -> None:
    """logger.exception attaches the traceback to the record exactly once."""
    with caplog.at_level(logging.ERROR, logger="seawall"):
        try:
            raise KeyError("boom")
        except KeyError:
            logger.exception("failed")
    (record,) = caplog.records
    assert record.exc_info is not None
    assert "exc_info" not in record.getMessage()


def test_configured_structlog_is_used_as_is() -> None:
    """Once the application configures structlog, seawall logs through it."""
    structlog.configure(processors=[structlog.processors.KeyValueRenderer()])
    assert logger.is_enabled_for(logging.DEBUG)
    with capture_logs() as logs:
        logger.info("breaker_closed", name="db")
        logger.error("pool_failed", name="db")
    assert logs == [
        {"event": "breaker_closed", "name": "db", "log_level": "info"},
        {"event": "pool_failed", "name": "db", "log_level": "error"},
    ]
