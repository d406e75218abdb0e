"""Every ```python block in README.md and docs/ runs, as a standalone program.

A block whose first line is ``# requires: postgres`` (or ``redis``) runs only
where that service answers, and fails in CI when it does not (see conftest).
Snippets that are not meant to run are fenced as ``text`` or ``console``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
