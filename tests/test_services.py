"""The suite's service fixtures: a refused test database skips with the reason on a laptop and fails in CI."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

import redis_servers

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


def test_a_missing_redis_cli_skips_with_the_reason(monkeypatch: Any, tmp_path: Path) -> None:
    """No redis-cli on PATH on a laptop: the cluster tests skip, and the skip names the binary."""
    monkeypatch.setenv("PATH", str(tmp_path))  # (an empty directory: no redis-cli to find)
    monkeypatch.delenv("SEAWALL_REQUIRE_SERVICES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no redis-cli"):
        redis_servers.cli("--version")


def test_a_missing_redis_cli_fails_when_services_are_required(monkeypatch: Any, tmp_path: Path) -> None:
    """Under SEAWALL_REQUIRE_SERVICES=1 a missing redis-cli fails the cluster tests, as a missing server does."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("SEAWALL_REQUIRE_SERVICES", "1")
    # (BaseException: a skip raised here must fail this test, not skip it.)
    with pytest.raises(BaseException, match=r"no redis-cli.*forbids skipping") as from_cli:
        redis_servers.cli("--version")
    assert from_cli.type is pytest.fail.Exception
    with (
        pytest.raises(BaseException, match="no redis-cli") as from_cluster,
        redis_servers.cluster(tmp_path / "cluster"),
    ):
        pass  # pragma: no cover - the cluster is refused before any node starts
    assert from_cluster.type is pytest.fail.Exception
