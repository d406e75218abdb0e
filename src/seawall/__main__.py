"""``python -m seawall`` / the ``seawall`` console script.

``demo`` runs a short, self-contained scenario in this process: no external
service needed.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command; return the exit status."""
    parser = argparse.ArgumentParser(prog="seawall", description="seawall: asyncio-native resilience toolkit")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command")
    demo = commands.add_parser("demo", help="run the demo scenario")
    demo.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    demo.add_argument("--no-live", action="store_true", help="plain log lines instead of a live view")
    demo.add_argument("--seed", type=int, default=None, help="seed for a reproducible scenario")
    demo.add_argument("--chart", default=None, metavar="PATH", help="PNG timeline path (default: temp dir)")
    demo.add_argument("--redis", default=None, metavar="URL", help="share buckets and breaker state through this Redis")
    args = parser.parse_args(argv)
    if args.version:
        from seawall import __version__

        print(__version__)
        return 0
    if args.command == "demo":
        from seawall._demo import run_demo

        return run_demo(
            duration=args.duration, live=not args.no_live, seed=args.seed, chart=args.chart, redis=args.redis
        )
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
