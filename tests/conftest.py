"""Shared fixtures: the anyio backend and access to the real services.

Tests that need PostgreSQL or Redis use the ``postgres_dsn`` / ``redis_url``
fixtures. When the service does not answer, the test is skipped with the
reason - unless ``SEAWALL_REQUIRE_SERVICES=1`` (set by ``.ci/run``), where a
missing service is a failure, never a silent skip.
"""

from __future__ import annotations

import os
import socket

import pytest

POSTGRES_HOST = os.environ.get("SEAWALL_TEST_PG_HOST", "127.0.0.1")
POSTGRES_PORT = int(os.environ.get("SEAWALL_TEST_PG_PORT", "5432"))
POSTGRES_DSN = os.environ.get(
    "SEAWALL_TEST_POSTGRES_DSN", f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/test"
)
REDIS_HOST = os.environ.get("SEAWALL_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("SEAWALL_TEST_REDIS_PORT", "6379"))
REDIS_URL = os.environ.get("SEAWALL_TEST_REDIS_URL", f"redis://{REDIS_HOST}:{REDIS_PORT}/0")


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio (seawall's supported backend)."""
    return "asyncio"


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _require(service: str, host: str, port: int) -> None:
    if _answers(host, port):
        return
    reason = f"{service} is not answering on {host}:{port}"
    if os.environ.get("SEAWALL_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}, and SEAWALL_REQUIRE_SERVICES=1 forbids skipping", pytrace=False)
    pytest.skip(f"{reason} (set SEAWALL_REQUIRE_SERVICES=1 to make this a failure)")


@pytest.fixture
def postgres_dsn() -> str:
    """DSN of the real PostgreSQL test database; skips (or fails in CI) without it."""
    _require("PostgreSQL", POSTGRES_HOST, POSTGRES_PORT)
    return POSTGRES_DSN


@pytest.fixture
def redis_url() -> str:
    """URL of the real Redis server; skips (or fails in CI) without it."""
    _require("Redis", REDIS_HOST, REDIS_PORT)
    return REDIS_URL
