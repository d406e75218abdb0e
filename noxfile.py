"""Development sessions: ``nox -s tests lint typecheck bench docs stress``.

``tests`` runs on every supported Python (the classifiers': 3.11, 3.12,
3.13) that is installed; the run on ``COVERAGE_PYTHON`` records branch
coverage and holds the floor. The other sessions run on one Python.

A Python that is not installed is skipped on a laptop and is an error in CI
(where ``CI`` is set: nox's own default, spelled out below); nox never
downloads one. Under pyenv every installed one is found, active or not (see
``_pyenv_pythons``).

Each session installs what it needs from the package registry into its own
virtualenv; nothing else is fetched, so sessions re-run offline-friendly with
``nox -R`` (reuse the venvs, skip installs).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = "CI" in os.environ
nox.options.download_python = "never"
#: uv builds a session's virtualenv and installs into it in seconds where pip takes tens of
#: them (7 installs in .ci/run); nox falls back to virtualenv and pip where uv is missing.
nox.options.default_venv_backend = "uv|virtualenv"

#: Every supported Python: ``tests`` runs on each of them.
PYTHON = ["3.11", "3.12", "3.13"]
#: The one Python of every other session: the oldest supported, as mypy's ``python_version``.
DEFAULT_PYTHON = PYTHON[0]
#: The one test run that records coverage and holds the floor. src/seawall has no code that
#: differs between Pythons, so the runs' union would measure what one run does, and the tracer
#: costs 1.7x the suite's time on 3.11 but 2.4x on 3.12 and 3.13 (where sys.monitoring cannot
#: measure branches before 3.14); keeping it to one run keeps .ci/run within its time.
COVERAGE_PYTHON = "3.11"
#: pytest-xdist workers: one per core, at most 4. Half the suite's time is spent waiting (real
#: servers, timers), so two workers on two cores run it in 0.57x the time of one; more than 4
#: would only crowd the one PostgreSQL and Redis the tests share.
WORKERS = max(1, min(os.cpu_count() or 1, 4))


def _pyenv_pythons() -> None:
    """Let nox find every supported Python that pyenv installed, not only the active ones.

    pyenv's shims run only the versions its configuration activates (``pyenv
    global``/``local``/``shell``; a command run through a shim, as nox is, gets
    them in ``PYENV_VERSION``), and nox finds interpreters through the shims.
    The newest installed release of each supported Python that is not active is
    appended, after the active ones (so ``python`` stays what it was), for nox
    and its sessions, which run in their own virtualenvs anyway.
    """
    root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    if not Path(root, "versions").is_dir():
        return  # no pyenv: nox finds the Pythons on PATH
    active = [v for v in os.environ.get("PYENV_VERSION", "").split(":") if v]
    installed = [p.name for p in Path(root, "versions").glob("3.*") if re.fullmatch(r"\d+\.\d+\.\d+", p.name)]
    added = []
    for python in PYTHON:
        if any(v == python or v.startswith(f"{python}.") for v in active):
            continue
        releases = [v for v in installed if v.startswith(f"{python}.")]
        if releases:
            added.append(max(releases, key=lambda v: tuple(map(int, v.split(".")))))
    if added:
        if not active:  # (nox not run through a shim) pyenv's global choice stays first
            version_file = Path(root, "version")
            active = version_file.read_text().split() if version_file.is_file() else ["system"]
        os.environ["PYENV_VERSION"] = ":".join([*active, *added])


_pyenv_pythons()

BENCH_PEERS = [
    "trio",  # the limiter's waiting benchmark runs seawall on trio too
    "aiolimiter",
    "aiobreaker",
    "pybreaker",
    "purgatory",
    "limits[async-redis]",
    "pyrate-limiter",
    "throttled-py",
    "asyncpg",
    "stamina",  # bench_retry: the peers' chain retried by stamina...
    "tenacity",  # ...and by tenacity
    "opentelemetry-sdk",  # bench_observability: the instrumented chain, with the real SDK
]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite against the installed (non-editable) package; with coverage on COVERAGE_PYTHON."""
    session.install(".[all,dev]")
    coverage = ["--cov=seawall", "--cov-report=term", "--cov-fail-under=90"]
    workers = ["--numprocesses", str(WORKERS)]
    session.run("pytest", *workers, *(coverage if session.python == COVERAGE_PYTHON else []), *session.posargs)


@nox.session(python=DEFAULT_PYTHON)
def stress(session: nox.Session) -> None:
    """The heavy reliability runs: soak, large storms, state machines with many examples (needs the services)."""
    session.install(".[all,dev]")
    session.run("pytest", "-m", "stress", "tests/reliability", *session.posargs)


@nox.session(python=DEFAULT_PYTHON)
def lint(session: nox.Session) -> None:
    """Ruff lint and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "noxfile.py")


@nox.session(python=DEFAULT_PYTHON)
def typecheck(session: nox.Session) -> None:
    """Mypy --strict on src/ (and the typing tests, which are checked, never run)."""
    session.install(".[all,dev]")
    session.run("mypy", "--strict", "src/seawall", "tests/typing")


@nox.session(python=DEFAULT_PYTHON)
def demo(session: nox.Session) -> None:
    """Run the demo scenario; ``nox -s demo -- --no-live --duration 8`` is what CI runs."""
    session.install(".[all]")
    session.run("python", "-m", "seawall", "demo", *session.posargs)


@nox.session(python=DEFAULT_PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks against the peers; ``nox -s bench -- --quick`` for the smoke run."""
    session.install(".[all]", *BENCH_PEERS)
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session(python=DEFAULT_PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site (mkdocs-material + mkdocstrings) strictly."""
    session.install(".[all]", "mkdocs-material", "mkdocstrings[python]")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site")
