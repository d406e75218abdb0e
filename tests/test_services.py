"""The suite's service fixtures: a refused test database skips with the reason on a laptop and fails in CI."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# A test that needs nothing of PostgreSQL but the postgres_dsn fixture's verdict.
PROBE = "tests/test_infrastructure.py::test_seed_asyncpg_full_chain"


def _run_probe(postgres_dsn: str, *, require: bool) -> subprocess.CompletedProcess[str]:
    # The same server, a database that does not exist there: what a laptop without `createdb test` has.
    missing = postgres_dsn.rsplit("/", 1)[0] + f"/seawall_missing_{uuid.uuid4().hex[:12]}"
    env = {**os.environ, "SEAWALL_TEST_POSTGRES_DSN": missing}
    env.pop("SEAWALL_REQUIRE_SERVICES", None)
    if require:
        env["SEAWALL_REQUIRE_SERVICES"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rsE", "-p", "no:cacheprovider", "-k", "asyncio", PROBE],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )


def test_missing_database_skips_with_the_reason(postgres_dsn: str) -> None:
    """PostgreSQL up but no such database: the test is skipped, and the skip says why and what to do."""
    result = _run_probe(postgres_dsn, require=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert "refuses the test database (InvalidCatalogNameError" in result.stdout
    assert "createdb -U postgres test" in result.stdout


def test_missing_database_fails_when_services_are_required(postgres_dsn: str) -> None:
    """Under SEAWALL_REQUIRE_SERVICES=1 the same run is an error, never a silent skip."""
    result = _run_probe(postgres_dsn, require=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 error" in result.stdout
    assert "SEAWALL_REQUIRE_SERVICES=1 forbids skipping" in result.stdout


def test_a_reachable_database_is_accepted(postgres_dsn: str, postgres_probe: Any) -> None:
    """The probe accepts the real test database (so the two tests above measure the missing one)."""
    assert postgres_probe(postgres_dsn) is None
