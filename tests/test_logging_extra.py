"""The stdlib fallback of the seawall logger hands its fields to the record as ``extra=`` attributes."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from seawall._logging import Throttle, logger


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def test_fields_are_record_attributes_as_well_as_in_the_message(caplog: pytest.LogCaptureFixture) -> None:
    """Each field is an attribute of the LogRecord (what JSON formatters read), and still in the text."""
    with caplog.at_level(logging.INFO, logger="seawall"):
        logger.warning("protection_timeout", key="api", timeout=2.0)
    (record,) = caplog.records
    assert record.__dict__["event"] == "protection_timeout"
    assert record.__dict__["key"] == "api"
    assert record.__dict__["timeout"] == 2.0
    assert "level" not in record.__dict__  # levelname says it already
    assert record.getMessage() == "event='protection_timeout' key='api' level='warning' timeout=2.0"


def test_fields_named_like_record_attributes_get_a_prefix(caplog: pytest.LogCaptureFixture) -> None:
    """A field such as `name` (a breaker's) cannot overwrite the record's own: it becomes `seawall_name`."""
    with caplog.at_level(logging.INFO, logger="seawall"):
        logger.info("circuit_breaker_closed", name="db", args=3, previous="half_open")
    (record,) = caplog.records
    assert record.name == "seawall"
    assert record.__dict__["seawall_name"] == "db"
    assert record.__dict__["seawall_args"] == 3
    assert record.__dict__["previous"] == "half_open"


def test_a_json_formatter_sees_the_fields(caplog: pytest.LogCaptureFixture) -> None:
    """A formatter that dumps the record's extra attributes gets seawall's fields as JSON fields."""
    standard = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

    class JsonFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            fields = {k: v for k, v in vars(record).items() if k not in standard}
            return json.dumps({"level": record.levelname, **fields}, sort_keys=True)

    with caplog.at_level(logging.INFO, logger="seawall"):
        Throttle(1.0, now=lambda: 0.0).warning("pool_checkout_timeout", "db", pool="db", timeout=1.0)
    (record,) = caplog.records
    assert json.loads(JsonFormatter().format(record)) == {
        "event": "pool_checkout_timeout",
        "level": "WARNING",
        "pool": "db",
        "timeout": 1.0,
    }


def test_exception_keeps_its_traceback_and_fields(caplog: pytest.LogCaptureFixture) -> None:
    """logger.exception still attaches the traceback once, and its fields are attributes too."""
    with caplog.at_level(logging.ERROR, logger="seawall"):
        try:
            raise KeyError("boom")
        except KeyError:
            logger.exception("telemetry_handler_failed", handler_id="h1")
    (record,) = caplog.records
    assert record.exc_info is not None
    assert record.__dict__["handler_id"] == "h1"
    assert "exc_info" not in record.__dict__ or record.__dict__["exc_info"] is record.exc_info
