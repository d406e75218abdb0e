"""The command line: `python -m seawall` and its demo command."""

from __future__ import annotations

import subprocess
import sys

import pytest

import seawall
from seawall.__main__ import main


def test_version_flag_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`seawall --version` prints the package version."""
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == seawall.__version__


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a command the usage is shown."""
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out


def test_python_dash_m_runs_the_demo() -> None:
    """`python -m seawall demo --no-live` runs the scenario and exits 0."""
    result = subprocess.run(
        [sys.executable, "-m", "seawall", "demo", "--no-live", "--duration", "2", "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "seawall demo" in result.stdout
