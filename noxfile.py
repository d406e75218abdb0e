"""Development sessions: ``nox -s tests lint typecheck bench docs stress``.

Each session installs what it needs from the package registry into its own
virtualenv; nothing else is fetched, so sessions re-run offline-friendly with
``nox -R`` (reuse the venvs, skip installs).
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYTHON = ["3.11"]
BENCH_PEERS = [
    "aiolimiter",
    "aiobreaker",
    "pybreaker",
    "purgatory",
    "limits[async-redis]",
    "pyrate-limiter",
    "throttled-py",
    "asyncpg",
]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite against the installed (non-editable) package, with coverage."""
    session.install(".[all,dev]")
    session.run(
        "pytest",
        "--cov=seawall",
        "--cov-report=term",
        "--cov-fail-under=90",
        *session.posargs,
    )


@nox.session(python=PYTHON)
def stress(session: nox.Session) -> None:
    """The heavy reliability runs: soak, large storms, state machines with many examples (needs the services)."""
    session.install(".[all,dev]")
    session.run("pytest", "-m", "stress", "tests/reliability", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Ruff lint and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "noxfile.py")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """Mypy --strict on src/ (and the typing tests, which are checked, never run)."""
    session.install(".[all,dev]")
    session.run("mypy", "--strict", "src/seawall", "tests/typing")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Run the demo scenario; ``nox -s demo -- --no-live --duration 8`` is what CI runs."""
    session.install(".[all]")
    session.run("python", "-m", "seawall", "demo", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks against the peers; ``nox -s bench -- --quick`` for the smoke run."""
    session.install(".[all]", *BENCH_PEERS)
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site (mkdocs-material + mkdocstrings) strictly."""
    session.install(".[all]", "mkdocs-material", "mkdocstrings[python]")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site")
