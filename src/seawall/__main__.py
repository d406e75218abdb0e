"""``python -m seawall`` / the ``seawall`` console script.

``demo`` runs a short, self-contained scenario in this process: no external
service needed (``--metrics-port`` also serves its Prometheus metrics).
``status --config FILE.toml [--redis URL] [--json]`` shows the keys, their
layers and rules and, with Redis, the fleet's breakers and buckets; it exits
with 1 when a breaker is open.
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
    demo.add_argument(
        "--metrics-port", type=int, default=None, metavar="PORT", help="serve Prometheus metrics on this port"
    )
    status = commands.add_parser(
        "status", help="show a configuration's keys, layers and rules (and, with Redis, the fleet's state)"
    )
    status.add_argument("--config", required=True, metavar="FILE.toml", help="the protections, one table per key")
    status.add_argument("--redis", default=None, metavar="URL", help="read breaker states and bucket levels here")
    status.add_argument("--prefix", default="seawall", help="the RedisBackend prefix of the fleet (default seawall)")
    status.add_argument(
        "--entity", action="append", default=[], metavar="NAME", help="also show this entity's bucket (repeatable)"
    )
    status.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.version:
        from seawall import __version__

        print(__version__)
        return 0
    if args.command == "demo":
        from seawall._demo import run_demo

        if args.metrics_port is not None:
            from seawall._demo_metrics import serve_metrics

            with serve_metrics(args.metrics_port):
                return run_demo(
                    duration=args.duration, live=not args.no_live, seed=args.seed, chart=args.chart, redis=args.redis
                )
        return run_demo(
            duration=args.duration, live=not args.no_live, seed=args.seed, chart=args.chart, redis=args.redis
        )
    if args.command == "status":
        from seawall._status import run_status

        return run_status(args.config, redis=args.redis, prefix=args.prefix, entities=args.entity, as_json=args.json)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
