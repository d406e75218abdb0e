"""Importing an integration without its extra says which extra to install, and how (seawall is not on PyPI)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from seawall._extras import EXTRAS, install_hint, missing_extra

ROOT = Path(__file__).resolve().parent.parent

#: The top-level packages each extra brings (blocked together to simulate the extra's absence).
PACKAGES = {
    "aiobreaker": ["aiobreaker"],
    "aiolimiter": ["aiolimiter"],
    "fastapi": ["fastapi", "starlette"],
    "http": ["httpx"],
    "otel": ["opentelemetry"],
    "postgres": ["asyncpg"],
    "prometheus": ["prometheus_client"],
    "redis": ["redis"],
}

# A fresh interpreter where the blocked packages cannot be found, as if never installed.
SCRIPT = """
import sys

BLOCKED = set(sys.argv[2].split(","))


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
import seawall  # the core never needs an extra

try:
    exec(sys.argv[1])
except ModuleNotFoundError as exc:
    print(type(exc).__name__, exc.name, str(exc), sep="\\n")
else:
    print("imported")
"""


def _import_without(statement: str, extra: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", SCRIPT, statement, ",".join(PACKAGES[extra])],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


INSTALLED = sorted(module for module in EXTRAS if importlib.util.find_spec(module) is not None)


@pytest.mark.parametrize("module", INSTALLED)
def test_import_without_extra_names_the_extra(module: str) -> None:
    """The error is a ModuleNotFoundError naming the missing package and `pip install '.[extra]'`."""
    extra = EXTRAS[module]
    kind, name, message = _import_without(f"import {module}", extra)
    assert kind == "ModuleNotFoundError"
    assert name in PACKAGES[extra]
    assert message.startswith(f"{module} needs {name!r}, from seawall's {extra!r} extra")
    assert f"pip install '.[{extra}]'" in message
    assert "seawall[" not in message


def test_lazy_redis_backend_names_the_extra() -> None:
    """`from seawall.backends import RedisBackend` (imported on first use) gives the same hint."""
    kind, name, message = _import_without("from seawall.backends import RedisBackend", "redis")
    assert (kind, name) == ("ModuleNotFoundError", "redis")
    assert "pip install '.[redis]'" in message


def test_every_extra_named_is_in_pyproject() -> None:
    """Each extra a hint names is one pyproject.toml defines, and every integration module has its entry."""
    defined = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS.values()) <= set(defined)
    assert set(EXTRAS.values()) == set(PACKAGES)
    modules = {
        f"seawall.integrations.{path.stem}"
        for path in (ROOT / "src" / "seawall" / "integrations").glob("*.py")
        if path.stem != "__init__"
    }
    assert modules <= set(EXTRAS)


def test_missing_extra_keeps_the_missing_name() -> None:
    """The translated error keeps `name`, so callers that check what is missing still can."""
    error = missing_extra(ModuleNotFoundError("No module named 'x'", name="x"), "seawall.integrations.httpx")
    assert error.name == "x"
    assert str(error) == f"seawall.integrations.httpx needs 'x', from seawall's 'http' extra: {install_hint('http')}"
