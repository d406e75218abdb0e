"""What the demo shows: plain log lines, a live ``rich`` view, and the summary table.

The live view has two layouts: the full one (a column per outcome, about 125
columns wide) and, when the terminal is narrower than the full table needs, a
compact one that fits 80x24: outcomes as the HTTP statuses the clients saw
(429, 503, 504, 502), a legend under the table, and as many recent ticks as
the terminal's height leaves room for. Piped output never gets the live view
(``run_demo`` falls back to plain lines when stdout is not a terminal).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TextIO

from seawall._demo._plan import PHASES, Plan
from seawall._demo._scenario import Recorder, Tick, Verdict

__all__ = ["LEGEND", "LiveView", "PlainView", "compact_summary_rows", "summary_rows"]

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

#: The compact layout's outcome columns: what the clients saw, by HTTP status (``in``: past the rate limit).
_COMPACT = (
    ("in", ("admitted",)),
    ("429", ("rate_limited",)),
    ("503", ("breaker_rejected", "pool_timeouts")),
    ("504", ("timeouts",)),
    ("502", ("upstream_errors",)),
    ("ok", ("successes",)),
)
#: What the compact columns mean, one line each at most 80 columns wide.
LEGEND = (
    "in: past the rate limit  429: rate limited  503: breaker open or pool full",
    "504: timed out  502: upstream 5xx  ok: succeeded  pool: peak slots in use",
)
_STYLE = {"open": "red", "half_open": "yellow", "closed": "green"}
#: Lines the live view needs besides its tick rows: title, header, legend, a margin for printed lines.
_CHROME = 6


def _compact_cells(tick: Tick) -> list[str]:
    def value(key: str) -> int:
        return tick.admitted if key == "admitted" else tick.counts[key]

    return [str(sum(value(key) for key in keys)) for _, keys in _COMPACT]


def compact_summary_rows(recorder: Recorder) -> list[list[str]]:
    """The summary rows in the compact layout's columns."""
    rows = []
    for phase, full in zip([name for name, _ in PHASES] + [None], summary_rows(recorder), strict=True):
        total = recorder.totals(phase)
        rows.append([full[0], full[1], *_compact_cells(total), *full[-4:]])
    return rows


_COMPACT_SUMMARY_HEADER = ["phase", "sent", *[title for title, _ in _COMPACT], "breaker", "pool", "p50", "p99"]


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
            f"t={tick.start:6.2f}s phase={tick.phase:<9} {counts} breaker={tick.states_seen} "
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
    """A live ``rich`` table of the last ticks, refreshed as each tick ends.

    The layout is chosen at each refresh from the console's size: the full
    table when it fits, else the compact one (see the module docstring).
    """

    __slots__ = ("_console", "_live", "_plan", "_rows", "_state")

    def __init__(self, plan: Plan, state: Callable[[], str], console: Any = None) -> None:
        from rich.console import Console
        from rich.live import Live

        self._plan = plan
        self._state = state
        self._console = Console() if console is None else console
        self._rows: list[Tick] = []
        self._live = Live(self._render(), console=self._console, auto_refresh=False, transient=False)

    def print(self, text: str) -> None:
        """Write a line above the live table."""
        self._console.print(text, highlight=False)

    def _fits(self, renderable: Any) -> bool:
        """Whether ``renderable`` fits the console's width without cutting a cell."""
        from rich.measure import Measurement

        unbounded = self._console.options.update(max_width=10_000)
        return bool(Measurement.get(self._console, unbounded, renderable).maximum <= self._console.width)

    def _table(self, header: list[str], *, compact: bool, title: str | None = None) -> Any:
        from rich.table import Table

        # Compact: no borders, one space each side of a cell (two between columns), none at the edges.
        options: dict[str, Any] = {"box": None, "pad_edge": False, "padding": (0, 1)} if compact else {}
        table = Table(title=title, title_justify="left", **options)
        for column in header:
            table.add_column(column, justify="left" if column in ("phase", "breaker") else "right", no_wrap=True)
        return table

    def _render(self) -> Any:
        full = self._ticks_table(compact=False)
        if self._fits(full):
            return full
        from rich.console import Group
        from rich.text import Text

        return Group(self._ticks_table(compact=True), *(Text(line, style="dim") for line in LEGEND))

    def _ticks_table(self, *, compact: bool) -> Any:
        title = f"seawall demo: breaker [bold]{self._state()}[/bold]"
        outcomes = [title for title, _ in (_COMPACT if compact else _COLUMNS)]
        table = self._table(["t", "phase", *outcomes, "breaker", "pool", "p50", "p99"], compact=compact, title=title)
        shown = max(3, min(12, self._console.height - _CHROME)) if compact else 12
        for tick in self._rows[-shown:]:
            table.add_row(
                f"{tick.start:.2f}s" if self._plan.tick < 0.5 else f"{tick.start:.1f}s",
                tick.phase,
                *(_compact_cells(tick) if compact else _cells(tick)),
                f"[{_STYLE.get(tick.breaker, 'white')}]{tick.breaker}[/]",
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
        """Show the summary table (compact when the full one does not fit) and the verdict."""
        table = self._table(_SUMMARY_HEADER, compact=False, title="summary")
        for row in summary_rows(recorder):
            table.add_row(*row)
        if not self._fits(table):
            table = self._table(_COMPACT_SUMMARY_HEADER, compact=True, title="summary")
            for row in compact_summary_rows(recorder):
                table.add_row(*row)
        self._console.print(table)
        for check, passed in verdict.checks:
            mark = "[green]ok[/green]" if passed else "[red]FAILED[/red]"
            self._console.print(f"[{mark}] {check}", highlight=False)
