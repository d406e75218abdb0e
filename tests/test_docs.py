"""Every ```python block in README.md and docs/ runs, as a standalone program.

A block whose first line is ``# requires: postgres`` (or ``redis``) runs only
where that service answers, and fails in CI when it does not (see conftest).
Snippets that are not meant to run are fenced as ``text`` or ``console``.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
REQUIRES = re.compile(r"^# requires: (\w+)")


def _examples() -> list[pytest.ParameterSet]:
    examples = []
    for document in DOCUMENTS:
        if not document.is_file():
            continue
        text = document.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            example_id = f"{document.relative_to(ROOT)}:{line}"
            examples.append(pytest.param(match.group(1), id=example_id))
    return examples


EXAMPLES = _examples()


def test_documentation_has_examples() -> None:
    """The README and docs carry runnable examples (so this suite cannot pass vacuously)."""
    assert EXAMPLES


@pytest.mark.parametrize("source", EXAMPLES)
def test_example_runs(source: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The example runs to completion with exit status 0."""
    required = REQUIRES.match(source)
    if required:
        fixture = {"postgres": "postgres_dsn", "redis": "redis_url"}[required.group(1)]
        request.getfixturevalue(fixture)
    script = tmp_path / "example.py"
    script.write_text(source)
    result = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    output = f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    assert result.returncode == 0, f"example failed:\n{source}\n{output}"


def _sphinx_roles() -> Any:
    spec = importlib.util.spec_from_file_location("sphinx_roles", ROOT / "docs" / "_ext" / "sphinx_roles.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sphinx_roles_become_optional_cross_references() -> None:
    """A docstring's `:meth:`/`:class:` role renders as a link to its target (`~` shows the last part only)."""
    rewrite = _sphinx_roles().rewrite
    assert rewrite("see :meth:`~seawall.RateLimiter.hit` now") == (
        'see <autoref identifier="seawall.RateLimiter.hit" optional><code>hit()</code></autoref> now'
    )
    assert rewrite(":class:`seawall.FakeClock`") == (
        '<autoref identifier="seawall.FakeClock" optional><code>seawall.FakeClock</code></autoref>'
    )
    private = {"seawall._breaker.BreakerPermit": "seawall.BreakerPermit"}
    assert 'identifier="seawall.BreakerPermit.plain"' in rewrite(
        ":attr:`seawall._breaker.BreakerPermit.plain`", None, private
    )


def test_every_role_in_the_sources_is_rewritten() -> None:
    """No Sphinx role form in src/ escapes the rewriting (it would render as literal text)."""
    roles = _sphinx_roles()
    anything = re.compile(r":[a-z:]+:`[^`]*`")
    for path in (ROOT / "src" / "seawall").rglob("*.py"):
        text = path.read_text()
        left = anything.findall(roles.ROLE.sub("", text))
        assert not left, f"{path.relative_to(ROOT)}: {left}"


TOML_FENCE = re.compile(r"^```toml[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def _toml_examples() -> list[pytest.ParameterSet]:
    examples = []
    for document in DOCUMENTS:
        text = document.read_text() if document.is_file() else ""
        for match in TOML_FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            examples.append(pytest.param(match.group(1), id=f"{document.relative_to(ROOT)}:{line}"))
    return examples


@pytest.mark.parametrize("source", _toml_examples())
def test_toml_example_is_a_valid_configuration(source: str, tmp_path: Path) -> None:
    """Every ```toml block in the docs is a configuration seawall accepts (from_toml validates it at once)."""
    from seawall import AsyncInfrastructure

    path = tmp_path / "seawall.toml"
    path.write_text(source)
    AsyncInfrastructure.from_toml(path)


def test_configuration_page_lists_every_option() -> None:
    """docs/configuration.md names every option of every config section (so a new option cannot go undocumented)."""
    from dataclasses import fields

    from seawall import _config

    page = (ROOT / "docs" / "configuration.md").read_text()
    missing = [
        f"{section}.{option.name}"
        for section, kind in _config._SECTIONS.items()
        for option in fields(kind)
        if f"`{section}.{option.name}`" not in page
    ]
    assert not missing, f"undocumented options: {missing}"
    assert "| `timeout` |" in page


def test_reference_renders_every_public_module() -> None:
    """docs/reference.md has a `::: module` block for every public module (integrations and backends included)."""
    page = (ROOT / "docs" / "reference.md").read_text()
    rendered = set(re.findall(r"^::: ([\w.]+)", page, re.MULTILINE))
    source = ROOT / "src"
    public = {
        ".".join(path.relative_to(source).with_suffix("").parts).removesuffix(".__init__")
        for path in (source / "seawall").rglob("*.py")
        if not any(part.startswith("_") and part != "__init__.py" for part in path.relative_to(source).parts)
    }
    # seawall.errors re-exports what `::: seawall` renders (again would duplicate every anchor);
    # seawall.integrations only holds the integration modules, each rendered on its own.
    assert public - rendered == {"seawall.errors", "seawall.integrations"}


def test_telemetry_page_lists_every_event() -> None:
    """docs/telemetry.md's events table has a row for every event in ALL_EVENTS (and no event seawall does not emit)."""
    from seawall.telemetry import ALL_EVENTS

    page = (ROOT / "docs" / "telemetry.md").read_text()
    listed = set()
    # A row names one event, or several sharing a prefix: ("seawall", "infrastructure", "a" / "b").
    for prefix, names in re.findall(r'^\| `\(("seawall", "\w+"), ((?:"\w+"(?: / )?)+)\)`', page, re.MULTILINE):
        for name in re.findall(r'"(\w+)"', names):
            listed.add((*re.findall(r'"(\w+)"', prefix), name))
    assert listed == set(ALL_EVENTS)
