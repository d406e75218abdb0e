"""Shared fixtures: the anyio backends and access to the real services.

Every async test (``pytest.mark.anyio``) runs twice, on asyncio in debug mode
and on trio, as anyio's own suite does: the ``anyio_backend`` fixture below is
parametrized over both (ids ``asyncio`` and ``trio``). A test of something
only asyncio has (redis-py, asyncpg, a native ``Task.cancel()``,
``asyncio.timeout``, the loop's internals) is marked
``@pytest.mark.asyncio_only("why")``, on the test or as a module's
``pytestmark``; its trio run is deselected, and the reason is required. A test
that needs a particular backend parametrizes ``anyio_backend`` itself (e.g.
trio with ``MockClock(autojump_threshold=0)``) and runs as it says, also in
an ``asyncio_only`` module (that is how such a module tests that its code
fails at once under trio).

Tests that need PostgreSQL or Redis use the ``postgres_dsn`` / ``redis_url``
fixtures. When the service does not answer - or PostgreSQL answers but refuses
the test database (no database ``test``, no user ``postgres``, a password it
wants) - the test is skipped with the reason, unless
``SEAWALL_REQUIRE_SERVICES=1`` (set by ``.ci/run``), where a missing service
is a failure, never a silent skip. CONTRIBUTING.md says how to provide them
and which ``SEAWALL_TEST_*`` variables point the suite elsewhere.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import threading
from typing import Any

import pytest

POSTGRES_HOST = os.environ.get("SEAWALL_TEST_PG_HOST", "127.0.0.1")
POSTGRES_PORT = int(os.environ.get("SEAWALL_TEST_PG_PORT", "5432"))
POSTGRES_DSN = os.environ.get(
    "SEAWALL_TEST_POSTGRES_DSN", f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/test"
)
REDIS_HOST = os.environ.get("SEAWALL_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("SEAWALL_TEST_REDIS_PORT", "6379"))
REDIS_URL = os.environ.get("SEAWALL_TEST_REDIS_URL", f"redis://{REDIS_HOST}:{REDIS_PORT}/0")


#: The backends of the ``anyio_backend`` fixture: asyncio in debug mode (slow callbacks, unawaited coroutines
#: and leaked tasks reported), and trio.
BACKENDS = [
    pytest.param(("asyncio", {"debug": True}), id="asyncio"),
    pytest.param("trio", id="trio"),
]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """Both anyio backends, asyncio in debug mode (as anyio's own suite does)."""
    return request.param


def pytest_configure(config: pytest.Config) -> None:
    """Declare the ``asyncio_only`` marker."""
    config.addinivalue_line(
        "markers",
        "asyncio_only(reason): the test needs asyncio itself (the reason says what); its trio run is deselected "
        "(a test that parametrizes anyio_backend itself runs as it says)",
    )


def _default_backend_name(item: pytest.Item) -> str | None:
    """The backend of the ``anyio_backend`` fixture's run, ``None`` if the test names its backend itself."""
    callspec = getattr(item, "callspec", None)
    if callspec is None or "anyio_backend" not in callspec.params:
        return None
    for marker in item.iter_markers("parametrize"):
        names = marker.args[0] if marker.args else marker.kwargs.get("argnames", ())
        if "anyio_backend" in ([n.strip() for n in names.split(",")] if isinstance(names, str) else names):
            return None  # explicitly parametrized: it runs where it says
    backend = callspec.params["anyio_backend"]
    return str(backend[0] if isinstance(backend, tuple) else backend)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the trio runs of tests marked ``asyncio_only`` (which must give a reason)."""
    kept: list[pytest.Item] = []
    deselected: list[pytest.Item] = []
    for item in items:
        marker = item.get_closest_marker("asyncio_only")
        if marker is not None:
            reason = marker.args[0] if marker.args else marker.kwargs.get("reason")
            if not reason:
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.asyncio_only needs a reason (what asyncio has)")
            if _default_backend_name(item) == "trio":
                deselected.append(item)
                continue
        kept.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _missing(reason: str) -> None:
    """Skip with ``reason`` on a laptop; fail under ``SEAWALL_REQUIRE_SERVICES=1``."""
    if os.environ.get("SEAWALL_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}, and SEAWALL_REQUIRE_SERVICES=1 forbids skipping", pytrace=False)
    pytest.skip(f"{reason} (set SEAWALL_REQUIRE_SERVICES=1 to make this a failure)")


def _require(service: str, host: str, port: int) -> None:
    if not _answers(host, port):
        _missing(f"{service} is not answering on {host}:{port}")


@functools.cache
def postgres_refusal(dsn: str) -> str | None:
    """Why the PostgreSQL server behind ``dsn`` refuses a connection to it, or ``None`` when it accepts one.

    Asked once per DSN and session, in a thread of its own (so never inside a
    test's event loop); the reason names the error, never the DSN (which may
    hold a password).
    """
    try:
        import asyncpg
    except ModuleNotFoundError:
        return "asyncpg is not installed (the 'postgres' extra)"

    async def connect() -> None:
        connection = await asyncpg.connect(dsn, timeout=5)
        await connection.close()

    refusals: list[str] = []

    def attempt() -> None:
        try:
            asyncio.run(connect())
        except Exception as exc:  # any refusal is the reason to report
            refusals.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=attempt, name="seawall-test-postgres-probe")
    thread.start()
    thread.join()
    return refusals[0] if refusals else None


@pytest.fixture
def postgres_dsn() -> str:
    """DSN of the real PostgreSQL test database; skips (or fails in CI) without it."""
    _require("PostgreSQL", POSTGRES_HOST, POSTGRES_PORT)
    refusal = postgres_refusal(POSTGRES_DSN)
    if refusal is not None:
        _missing(
            f"PostgreSQL answers on {POSTGRES_HOST}:{POSTGRES_PORT} but refuses the test database ({refusal}); "
            "create it (createdb -U postgres test) or point SEAWALL_TEST_POSTGRES_DSN at one"
        )
    return POSTGRES_DSN


@pytest.fixture
def postgres_probe() -> Any:
    """:func:`postgres_refusal` itself, for tests of the probe.

    A fixture rather than ``from conftest import ...``: ``tests/reliability``
    has a ``conftest.py`` of its own, and once pytest has collected it the
    module named ``conftest`` is that one, so the import fails in a full run.
    """
    return postgres_refusal


@pytest.fixture
def redis_url() -> str:
    """URL of the real Redis server; skips (or fails in CI) without it."""
    _require("Redis", REDIS_HOST, REDIS_PORT)
    return REDIS_URL
