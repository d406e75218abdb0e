"""``python -m seawall demo``: the whole toolkit against a local upstream, in one process.

A local HTTP service on 127.0.0.1 is healthy, then fails, then is slow,
then recovers; virtual clients call a small FastAPI app protected per client
with :func:`seawall.integrations.fastapi.protect`, whose route calls the
upstream through :class:`~seawall.integrations.httpx.ProtectedTransport`
(breaker, bulkhead pool, timeout). The run ends with a summary, a PNG
timeline and a verdict: exit status 0 only when the breaker opened during
the outage and closed after recovery, greedy clients were rate limited and
nothing unexpected happened.

Split into small modules: ``_plan`` (the schedule), ``_upstream`` (the local
service), ``_app`` (the FastAPI app), ``_scenario`` (load and figures),
``_view`` (terminal output) and ``_chart`` (the PNG).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from seawall._extras import install_hint

if TYPE_CHECKING:
    from seawall._demo._scenario import Recorder
    from seawall._demo._view import LiveView, PlainView

__all__ = ["run_demo"]

_MISSING = f"seawall demo: needs {{name!r}}, from seawall's 'demo' extra: {install_hint('demo')}"


def _default_chart(seed: int) -> Path:
    return Path(tempfile.gettempdir()) / f"seawall-demo-seed{seed}.png"


def run_demo(
    *,
    duration: float = 20.0,
    live: bool = True,
    seed: int | None = None,
    chart: str | Path | None = None,
    redis: str | None = None,
) -> int:
    """Run the demo scenario.

    Args:
        duration: Seconds of load (at least 1); the phases scale with it.
        live: Show a live ``rich`` view when stdout is a terminal (it fits 80x24);
            ``False``, or a stdout that is not a terminal, prints plain lines.
        seed: Seed of the clients' rates and jitter (random when ``None``).
        chart: Where to write the PNG timeline (default: the temp directory).
        redis: A Redis URL: keep rate-limit buckets and breaker state there
            (``RedisBackend``) instead of in memory.

    Returns:
        The exit status: 0 when the scenario behaved as designed, 1 when it
        did not, 2 when the demo's dependencies are missing or the options are
        invalid.
    """
    try:
        import anyio
        import fastapi
        import httpx

        del fastapi, httpx
    except ImportError as exc:
        print(_MISSING.format(name=exc.name), file=sys.stderr)
        return 2
    from seawall._demo._plan import Plan
    from seawall._demo._scenario import Recorder, run_scenario
    from seawall._demo._view import LiveView, PlainView

    try:
        plan = Plan.build(duration, seed)
    except ValueError as exc:
        print(f"seawall demo: {exc}", file=sys.stderr)
        return 2
    recorder = Recorder(plan)
    view: LiveView | PlainView = PlainView(sys.stdout, plan.pool_size)
    # A live view redraws in place: piped into a file or a pager it would leave escape codes, so
    # a stdout that is not a terminal gets the plain lines whatever ``live`` says.
    if live and sys.stdout.isatty():
        try:
            view = LiveView(plan, lambda: recorder.breaker_state)
        except ImportError:
            view.print(f"seawall demo: 'rich' is not installed, showing plain lines ({install_hint('demo')})")
    view.print(
        f"seawall demo: {len(plan.clients)} clients for {plan.duration:g}s (seed {plan.seed}); "
        f"per-client limit {plan.per_client_limit}/{plan.per_client_window:g}s, breaker threshold 5, "
        f"recovery {plan.recovery_time:g}s, pool {plan.pool_size}, timeout {plan.timeout:g}s"
    )

    def announce(url: str) -> None:
        view.print(f"seawall demo: upstream listening on {url}; phases healthy -> failing -> slow -> recovered")

    # The live view shows what seawall would log (state changes, denials,
    # timeouts); hundreds of warning lines would only bury it.
    seawall_logger = logging.getLogger("seawall")
    level = seawall_logger.level
    seawall_logger.setLevel(logging.CRITICAL)
    try:
        with view:
            anyio.run(run_scenario, recorder, view.tick, announce, redis)
    finally:
        seawall_logger.setLevel(level)
    return _conclude(recorder, view, Path(chart) if chart is not None else _default_chart(plan.seed))


def _conclude(recorder: Recorder, view: LiveView | PlainView, chart: Path) -> int:
    """Show the summary and the verdict, write the chart; return the exit status."""
    verdict = recorder.verdict()
    view.summary(recorder, verdict)
    for sample in recorder.error_samples:
        view.print(f"seawall demo: unexpected {sample}")
    try:
        from seawall._demo._chart import write_chart

        view.print(f"seawall demo: timeline chart written to {write_chart(recorder, chart)}")
    except ImportError:
        view.print(f"seawall demo: no chart ('matplotlib' is not installed: {install_hint('demo')})")
    view.print(f"seawall demo: {'scenario ran as designed' if verdict.ok else 'scenario did NOT run as designed'}")
    return 0 if verdict.ok else 1
