"""The reliability suite's gate and fixtures.

Tests marked ``stress`` (the soak, the big storms, the state machines with many
examples) run only when asked for: ``pytest -m stress tests/reliability``
(``nox -s stress``), or ``SEAWALL_STRESS=1``. Otherwise they are skipped with
the reason, never failed, so ``nox -s tests`` and ``pytest tests`` run the fast
variants only. Skipping rather than deselecting keeps the exit code 0 even when
a run names stress tests alone.

Async tests here run on asyncio in debug mode; every record the ``asyncio``
logger writes at warning level or above (a task destroyed while pending, an
exception nobody retrieved, a callback that blocked the loop for five seconds) fails
the test that caused it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest

#: Seconds a callback may hold the loop before debug mode's warning fails the test.
SLOW_CALLBACK = 5.0
STRESS_REASON = "stress test: run with `pytest -m stress tests/reliability` (nox -s stress) or SEAWALL_STRESS=1"


def stress_selected(config: pytest.Config) -> bool:
    """Whether this run asked for stress tests (``-m`` naming them, or SEAWALL_STRESS=1)."""
    if os.environ.get("SEAWALL_STRESS") == "1":
        return True
    markexpr = config.getoption("markexpr", default="") or ""
    # "-m stress" selects them; "-m 'not stress'" deselects them itself: leave both to pytest.
    return "stress" in markexpr


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip stress-marked tests unless the run asked for them."""
    if stress_selected(config):
        return
    skip = pytest.mark.skip(reason=STRESS_REASON)
    for item in items:
        if item.get_closest_marker("stress") is not None:
            item.add_marker(skip)


def _debug_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    loop.set_debug(True)
    # A callback that holds the loop for seconds is a finding; 100 ms (the default) on a
    # shared 2-core machine running thousands of tasks, or a full collection of a long
    # hypothesis run's garbage landing in one step (measured: up to 1.9 s), is noise.
    loop.slow_callback_duration = SLOW_CALLBACK
    return loop


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """Asyncio in debug mode: slow callbacks, unawaited coroutines and leaked tasks are reported."""
    return "asyncio", {"debug": True, "loop_factory": _debug_loop}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def no_loop_warnings() -> Iterator[list[logging.LogRecord]]:
    """Fail the test if the asyncio logger warned (leaked task, lost exception, loop blocked for 1 s)."""
    handler = _Collect()
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        asyncio_logger.removeHandler(handler)
    problems = [f"{record.levelname}: {record.getMessage()}" for record in handler.records]
    assert not problems, "the event loop reported problems:\n" + "\n".join(problems)
