"""``python -m seawall status``: keys, layers and rules from TOML; with Redis the fleet's breakers and buckets."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from seawall import AsyncInfrastructure, RateLimitExceeded
from seawall.__main__ import main

CONFIG = """
[api]
timeout = 2.5
[api.rate_limiter]
limit = 3
window = 60

[flaky.circuit_breaker]
failure_threshold = 1
recovery_time = 300

[db.connection_pool]
size = 4
max_overflow = 2
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "seawall.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A Redis key prefix unique to the test; every key under it is deleted afterwards (nothing else is touched)."""
    unique = f"seawall-status-test-{uuid.uuid4().hex}"
    yield unique

    async def clean() -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(redis_url)
        try:
            keys = [key async for key in client.scan_iter(match=f"{unique}:*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()

    anyio.run(clean)


def _status(*args: str) -> tuple[int, str]:
    """Exit status and standard output of ``seawall status ARGS``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["status", *args])
    return code, out.getvalue()


def test_keys_layers_and_rules_from_the_file(config: Path) -> None:
    """Without Redis: every key with its timeout and each layer's rule, and exit status 0."""
    code, text = _status("--config", str(config), "--json")
    assert code == 0
    report = json.loads(text)
    assert list(report["keys"]) == ["api", "flaky", "db"]
    api = report["keys"]["api"]
    assert api["timeout"] == 2.5
    assert api["layers"]["rate_limiter"] == {"limit": 3, "window": 60.0, "algorithm": "gcra"}
    assert report["keys"]["flaky"]["layers"]["circuit_breaker"]["failure_threshold"] == 1
    assert report["keys"]["db"]["layers"]["connection_pool"]["size"] == 4
    assert report["keys"]["db"]["layers"]["connection_pool"]["max_overflow"] == 2
    assert "fleet" not in api
    assert report["open_breakers"] == []


def test_table_output_names_every_key_and_layer(config: Path) -> None:
    """The table (rich when installed) shows each key and its layers."""
    code, text = _status("--config", str(config))
    assert code == 0
    for word in ("api", "flaky", "db", "rate_limiter", "circuit_breaker", "connection_pool", "limit=3"):
        assert word in text


def test_a_bad_file_is_exit_status_2_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid configuration prints seawall's ConfigurationError (naming the option) and exits with 2."""
    path = tmp_path / "bad.toml"
    path.write_text("[api.rate_limiter]\nlimt = 3\nwindow = 60\n")
    assert main(["status", "--config", str(path)]) == 2
    assert "api.rate_limiter.limt" in capsys.readouterr().err


async def _make_fleet_state(redis_url: str, prefix: str, config: Path) -> None:
    """What a fleet would leave in Redis: two hits on api's default bucket, one by alice, flaky's breaker open."""
    from seawall.backends import RedisBackend

    backend = RedisBackend.from_url(redis_url, prefix=prefix, socket_timeout=5.0)
    try:
        async with AsyncInfrastructure.from_toml(config, backend=backend) as infra:

            async def ok() -> None:
                return None

            async def boom() -> None:
                raise ValueError("down")

            await infra.execute_protected("api", ok)
            await infra.execute_protected("api", ok)
            await infra.execute_protected("api", ok, rate_limiter="alice")
            with pytest.raises(ValueError, match="down"):
                await infra.execute_protected("flaky", boom)
    finally:
        await backend.aclose()


@pytest.mark.redis
def test_fleet_state_from_redis_and_exit_status_1_when_a_breaker_is_open(
    redis_url: str, prefix: str, config: Path
) -> None:
    """With --redis: the breaker another process opened reads open (exit 1), and the buckets show their levels."""
    anyio.run(_make_fleet_state, redis_url, prefix, config)
    fleet = ("--redis", redis_url, "--prefix", prefix)
    code, text = _status("--config", str(config), *fleet, "--entity", "alice", "--json")
    assert code == 1
    report = json.loads(text)
    assert report["open_breakers"] == ["flaky"]
    flaky = report["keys"]["flaky"]["fleet"]["circuit_breaker"]
    assert flaky["state"] == "open"
    assert flaky["retry_after"] > 0
    buckets = report["keys"]["api"]["fleet"]["rate_limiter"]
    assert buckets["global"]["limit"] == 3
    assert round(buckets["global"]["current_count"]) == 2
    assert round(buckets["alice"]["current_count"]) == 1
    assert "fleet" not in report["keys"]["db"] or report["keys"]["db"]["fleet"] == {}

    code, text = _status("--config", str(config), "--redis", redis_url, "--prefix", prefix)
    assert code == 1
    assert "open" in text


@pytest.mark.redis
def test_exit_status_0_when_the_fleets_breakers_are_closed(redis_url: str, prefix: str, config: Path) -> None:
    """A prefix where no breaker is open gives exit status 0 and closed breakers, empty buckets."""
    code, text = _status("--config", str(config), "--redis", redis_url, "--prefix", prefix, "--json")
    assert code == 0
    report: dict[str, Any] = json.loads(text)
    assert report["keys"]["flaky"]["fleet"]["circuit_breaker"]["state"] == "closed"
    assert report["keys"]["api"]["fleet"]["rate_limiter"]["global"]["current_count"] == 0


@pytest.mark.redis
def test_status_never_denies_or_consumes(redis_url: str, prefix: str, config: Path) -> None:
    """Reading the fleet's state consumes nothing: the bucket is as full after ``status`` as before."""
    anyio.run(_make_fleet_state, redis_url, prefix, config)
    for _ in range(3):
        _status("--config", str(config), "--redis", redis_url, "--prefix", prefix, "--json")

    async def third_hit_still_fits() -> None:
        from seawall.backends import RedisBackend

        backend = RedisBackend.from_url(redis_url, prefix=prefix, socket_timeout=5.0)
        try:
            async with AsyncInfrastructure.from_toml(config, backend=backend) as infra:

                async def ok() -> None:
                    return None

                await infra.execute_protected("api", ok)  # the third of three
                with pytest.raises(RateLimitExceeded):
                    await infra.execute_protected("api", ok)
        finally:
            await backend.aclose()

    anyio.run(third_hit_still_fits)


def test_the_console_script_runs(config: Path) -> None:
    """``python -m seawall status`` works as a command (exit status and JSON on stdout)."""
    result = subprocess.run(
        [sys.executable, "-m", "seawall", "status", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)["keys"]) == {"api", "flaky", "db"}


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: nothing listens there


def test_an_unreachable_redis_is_exit_status_3_never_1(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A store that cannot be read prints the reason (password hidden) and exits 3, not "a breaker is open"."""
    url = f"redis://user:s3cret@127.0.0.1:{_closed_port()}/0"
    assert main(["status", "--config", str(config), "--redis", url]) == 3
    captured = capsys.readouterr()
    assert "cannot read the fleet's state from Redis redis://user:***@127.0.0.1:" in captured.err
    assert "s3cret" not in captured.err + captured.out
    assert "Traceback" not in captured.err


def test_a_malformed_redis_url_is_exit_status_2(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A --redis value that is no Redis URL is a bad command line: exit 2, naming --redis."""
    assert main(["status", "--config", str(config), "--redis", "cache:6379"]) == 2
    assert "--redis" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
        ("rediss://app:pw@[::1]:6380/2?ssl_cert_reqs=none", "rediss://app:***@[::1]:6380/2?ssl_cert_reqs=none"),
    ],
)
def test_the_redis_url_is_shown_without_its_password(url: str, shown: str) -> None:
    """The report and its messages show the URL with the password replaced."""
    from seawall._status import redact

    assert redact(url) == shown
