"""The PNG timeline of the demo (matplotlib, drawn off-screen)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from seawall._demo._plan import PHASES
from seawall._demo._scenario import OUTCOMES, Recorder

__all__ = ["breaker_series", "build_figure", "write_chart"]

_PHASE_COLOURS = {"healthy": "#e8f5e9", "failing": "#ffebee", "slow": "#fff8e1", "recovered": "#e3f2fd"}
_STATE_LEVEL = {"closed": 0, "half_open": 1, "open": 2}


def breaker_series(recorder: Recorder) -> tuple[list[float], list[int]]:
    """The breaker panel's step line: seconds and state levels (0 closed, 1 half open, 2 open).

    Drawn from the recorded transitions, not from the ticks: a tick is as long
    as the recovery time, so every tick of an outage holds an ``open`` and a
    per-tick state would hide each half-open trial behind it.
    """
    steps = recorder.breaker_steps()
    return [at for at, _ in steps], [_STATE_LEVEL[state] for _, state in steps]


def write_chart(recorder: Recorder, path: Path) -> Path:
    """Draw the run's series into a PNG at ``path`` and return the path."""
    figure = build_figure(recorder)
    import matplotlib.pyplot as plt

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)
    return path


def build_figure(recorder: Recorder) -> Any:
    """The chart as a matplotlib figure (the caller closes it with ``pyplot.close``).

    Three panels share the time axis: outcomes per tick, breaker state and
    pool usage, and latency p50/p99; the phases are shaded behind them, and
    each panel has its legend.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and no GUI event loop
    import matplotlib.pyplot as plt

    plan = recorder.plan
    times = [tick.start + plan.tick / 2 for tick in recorder.ticks]
    figure, (counts, state, latency) = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    try:
        for axis in (counts, state, latency):
            for index, (phase, start) in enumerate(PHASES):
                end = PHASES[index + 1][1] if index + 1 < len(PHASES) else 1.0
                axis.axvspan(start * plan.duration, end * plan.duration, color=_PHASE_COLOURS[phase], zorder=0)
        for phase, start in PHASES:
            counts.text(start * plan.duration, 1.02, phase, transform=counts.get_xaxis_transform(), fontsize=9)
        _draw_counts(counts, recorder, times)
        _draw_breaker(state, recorder)
        pool_axis = state.twinx()
        pool_axis.plot(times, [tick.pool_in_use for tick in recorder.ticks], color="tab:purple", label="pool in use")
        pool_axis.set_ylim(0, plan.pool_size + 1)
        pool_axis.set_ylabel("pool in use", color="tab:purple")
        # One legend for both of the panel's axes (the pool's is a twin on the right).
        handles, labels = state.get_legend_handles_labels()
        pool_handles, pool_labels = pool_axis.get_legend_handles_labels()
        state.legend(handles + pool_handles, labels + pool_labels, loc="upper left", fontsize=8, ncol=3)
        for label, quantile in (("p50", 0.5), ("p99", 0.99)):
            values = [tick.p50() if quantile == 0.5 else tick.p99() for tick in recorder.ticks]
            latency.plot(times, [math.nan if v is None else v * 1000 for v in values], label=label, marker=".")
        latency.set_ylabel("latency (ms)")
        latency.set_xlabel("seconds")
        latency.legend(loc="upper left", fontsize=8)
        figure.suptitle(f"seawall demo (seed {plan.seed}, {plan.duration:g}s)")
        figure.tight_layout()
    except BaseException:
        plt.close(figure)
        raise
    return figure


def _draw_counts(axis: Any, recorder: Recorder, times: list[float]) -> None:
    """One line per outcome that occurred, counted per tick."""
    for outcome in OUTCOMES:
        series = [tick.counts[outcome] for tick in recorder.ticks]
        if any(series):
            axis.plot(times, series, label=outcome.replace("_", " "), marker=".")
    axis.set_ylabel(f"requests / {recorder.plan.tick:g}s")
    # Headroom above the highest count, so the legend covers no point.
    highest = max([1, *(count for tick in recorder.ticks for count in tick.counts.values())])
    axis.set_ylim(-0.5, 1.35 * highest)
    axis.legend(loc="upper left", fontsize=8, ncol=4)


def _draw_breaker(axis: Any, recorder: Recorder) -> None:
    """The breaker's state as a step line over real time, each half-open trial marked."""
    seconds, levels = breaker_series(recorder)
    axis.step(seconds, levels, where="post", color="tab:red", label="breaker state")
    # A trial lasts one request (milliseconds): a dot makes each one visible at any run length.
    trials = [at for at, level in zip(seconds, levels, strict=True) if level == _STATE_LEVEL["half_open"]]
    if trials:
        axis.plot(trials, [_STATE_LEVEL["half_open"]] * len(trials), "o", color="tab:orange", label="half-open trial")
    axis.set_yticks([0, 1, 2], ["closed", "half open", "open"])
    # Room above "open" for the legend.
    axis.set_ylim(-0.3, 3.0)
    axis.set_ylabel("breaker state")
