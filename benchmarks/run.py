"""Run seawall's benchmarks against its peers and publish the results.

Usage::

    python benchmarks/run.py                 # full run: results/latest.json + docs/benchmarks/
    python benchmarks/run.py --quick         # smoke run (< 60 s), writes under benchmarks/results/quick/
    python benchmarks/run.py --only limiter  # one module (repeatable), writes under benchmarks/results/partial/

Every ``benchmarks/bench_*.py`` module is run in its own event loop, in name
order; see ``_harness.py`` for what a module provides and how cases are timed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib
import importlib.metadata
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from _harness import BenchContext

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PACKAGES = [
    "seawall",
    "anyio",
    "aiolimiter",
    "aiobreaker",
    "pybreaker",
    "purgatory",
    "limits",
    "pyrate-limiter",
    "throttled-py",
    "asyncpg",
    "redis",
    "structlog",
    "stamina",
    "tenacity",
]


def _machine() -> dict[str, Any]:
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or "unknown"
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": model,
        "cores": os.cpu_count(),
        "versions": versions,
    }


def _modules(only: list[str]) -> list[str]:
    names = sorted(p.stem for p in HERE.glob("bench_*.py"))
    if only:
        names = [n for n in names if n.removeprefix("bench_") in only or n in only]
    return names


def write_reports(report: dict[str, Any], docs_dir: Path) -> None:
    """Write the markdown tables and the two charts of ``report`` into ``docs_dir``."""
    from _report import write_chart, write_markdown, write_ratio_chart

    docs_dir.mkdir(parents=True, exist_ok=True)
    write_markdown(report, docs_dir / "results.md")
    write_chart(report, docs_dir / "overhead.png")
    write_ratio_chart(report, docs_dir / "ratios.png")


def _default_out(quick: bool, partial: bool) -> Path:
    """Where a run writes ``latest.json`` unless told: never over the published run for a smoke or partial one."""
    if quick:
        return HERE / "results" / "quick"
    return HERE / "results" / "partial" if partial else HERE / "results"


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmark modules and write the result files."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke mode: few calls, for CI")
    parser.add_argument("--only", action="append", default=[], help="run only this module (e.g. limiter)")
    parser.add_argument("--out", type=Path, help="directory for latest.json (default depends on mode)")
    parser.add_argument("--docs", type=Path, help="directory for the markdown table and chart")
    parser.add_argument("--report", type=Path, metavar="JSON", help="only redraw the reports of a saved run")
    args = parser.parse_args(argv)
    if args.report:
        write_reports(json.loads(args.report.read_text()), args.docs or ROOT / "docs" / "benchmarks")
        return 0

    out_dir = args.out or _default_out(args.quick, bool(args.only))
    # Only a full run of every module is published: a smoke or partial run keeps its reports beside its JSON.
    docs_dir = args.docs or (out_dir if args.quick or args.only else ROOT / "docs" / "benchmarks")
    started = time.perf_counter()
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "quick" if args.quick else "full",
        "machine": _machine(),
        "modules": {},
    }
    failed = []
    for name in _modules(args.only):
        print(f"\n===== {name} =====", flush=True)
        ctx = BenchContext(quick=args.quick, module=name)
        try:
            module = importlib.import_module(name)
            asyncio.run(module.run(ctx))
        except Exception:
            traceback.print_exc()
            failed.append(name)
        report["modules"][name] = ctx.as_json()
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["failed"] = failed

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    write_reports(report, docs_dir)
    print(f"\nwrote {out_dir / 'latest.json'} and the reports in {docs_dir}")
    print(f"benchmarks took {report['seconds']} s; failed modules: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
