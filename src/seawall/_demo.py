"""The demo scenario behind ``python -m seawall demo`` (grows with the primitives)."""

from __future__ import annotations

import anyio

from seawall import telemetry
from seawall._telemetry import LIMITER_REQUEST_ALLOWED


def run_demo(*, duration: float = 20.0, live: bool = True, seed: int | None = None) -> int:
    """Run the demo; return 0 when the scenario behaved as designed."""
    del duration, live, seed  # used once the full scenario lands

    async def main() -> int:
        seen: list[str] = []
        telemetry.attach("demo", LIMITER_REQUEST_ALLOWED.event, lambda e, m, md: seen.append(md["key"]))
        try:
            LIMITER_REQUEST_ALLOWED.emit({"count": 1}, {"key": "demo"})
        finally:
            telemetry.detach("demo")
        print(f"seawall demo: telemetry delivered {len(seen)} event(s)")
        return 0 if seen == ["demo"] else 1

    return anyio.run(main)
