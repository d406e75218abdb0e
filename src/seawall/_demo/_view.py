"""What the demo shows: plain log lines, a live ``rich`` view, and the summary table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TextIO

from seawall._demo._plan import PHASES, Plan
from seawall._demo._scenario import Recorder, Tick, Verdict

__all__ = ["LiveView", "PlainView", "summary_rows"]

_COLUMNS = (
    ("admitted", "admitted"),
    ("limited", "rate_limited"),
    ("rejected", "breaker_rejected"),
    ("pool t/o", "pool_timeouts"),
    ("timeouts", "timeouts"),
    ("upstr 5xx", "upstream_errors"),
    ("ok", "successes"),
)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}ms"


def _cells(tick: Tick) -> list[str]:
    return [str(tick.admitted if key == "admitted" else tick.counts[key]) for _, key in _COLUMNS]


def summary_rows(recorder: Recorder) -> list[list[str]]:
    """One row per phase and a total: counts, worst breaker state, peak pool use, p50/p99."""
    rows = []
    for phase in [name for name, _ in PHASES] + [None]:
        total = recorder.totals(phase)
        rows.append(
            [
                phase or "total",
                str(total.sent),
                *_cells(total),
                total.breaker,
                f"{total.pool_in_use}/{recorder.pool_size}",
                _ms(total.p50()),
                _ms(total.p99()),
            ]
        )
    return rows


_SUMMARY_HEADER = ["phase", "sent", *[title for title, _ in _COLUMNS], "breaker", "pool", "p50", "p99"]


class PlainView:
    """One ``key=value`` line per tick: for CI logs and pipes (``--no-live``)."""

    __slots__ = ("_out", "_pool_size")

    def __init__(self, out: TextIO, pool_size: int) -> None:
        self._out = out
        self._pool_size = pool_size

    def print(self, text: str) -> None:
        """Write a line."""
        print(text, file=self._out, flush=True)

    def tick(self, tick: Tick) -> None:
        """Report a finished tick."""
        counts = " ".join(f"{key}={tick.admitted if key == 'admitted' else tick.counts[key]}" for _, key in _COLUMNS)
        self.print(
            f"t={tick.start:6.2f}s phase={tick.phase:<9} {counts} breaker={tick.breaker} "
            f"pool={tick.pool_in_use}/{self._pool_size} p50={_ms(tick.p50())} p99={_ms(tick.p99())}"
        )

    def __enter__(self) -> PlainView:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def summary(self, recorder: Recorder, verdict: Verdict) -> None:
        """Print the summary table and the verdict."""
        rows = [_SUMMARY_HEADER, *summary_rows(recorder)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(_SUMMARY_HEADER))]
        for row in rows:
            self.print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
        for check, passed in verdict.checks:
            self.print(f"[{'ok' if passed else 'FAILED'}] {check}")


class LiveView:
    """A live ``rich`` table of the last ticks, refreshed as each tick ends."""

    __slots__ = ("_console", "_live", "_plan", "_rows", "_state")

    def __init__(self, plan: Plan, state: Callable[[], str]) -> None:
        from rich.console import Console
        from rich.live import Live

        self._plan = plan
        self._state = state
        self._console = Console()
        self._rows: list[Tick] = []
        self._live = Live(self._render(), console=self._console, auto_refresh=False, transient=False)

    def print(self, text: str) -> None:
        """Write a line above the live table."""
        self._console.print(text, highlight=False)

    def _render(self) -> Any:
        from rich.table import Table

        title = f"seawall demo: breaker [bold]{self._state()}[/bold]"
        table = Table(title=title, title_justify="left")
        for column in ["t", "phase", *[title for title, _ in _COLUMNS], "breaker", "pool", "p50", "p99"]:
            table.add_column(column, justify="left" if column in ("phase", "breaker") else "right")
        style = {"open": "red", "half_open": "yellow", "closed": "green"}
        for tick in self._rows[-12:]:
            table.add_row(
                f"{tick.start:.2f}s" if self._plan.tick < 0.5 else f"{tick.start:.1f}s",
                tick.phase,
                *_cells(tick),
                f"[{style.get(tick.breaker, 'white')}]{tick.breaker}[/]",
                f"{tick.pool_in_use}/{self._plan.pool_size}",
                _ms(tick.p50()),
                _ms(tick.p99()),
            )
        return table

    def tick(self, tick: Tick) -> None:
        """Add a finished tick and refresh."""
        self._rows.append(tick)
        self._live.update(self._render(), refresh=True)

    def __enter__(self) -> LiveView:
        self._live.start(refresh=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._live.stop()

    def summary(self, recorder: Recorder, verdict: Verdict) -> None:
        """Show the summary table and the verdict."""
        from rich.table import Table

        table = Table(title="summary", title_justify="left")
        for column in _SUMMARY_HEADER:
            table.add_column(column, justify="left" if column in ("phase", "breaker") else "right")
        for row in summary_rows(recorder):
            table.add_row(*row)
        self._console.print(table)
        for check, passed in verdict.checks:
            mark = "[green]ok[/green]" if passed else "[red]FAILED[/red]"
            self._console.print(f"[{mark}] {check}", highlight=False)
