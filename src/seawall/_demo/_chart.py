"""The PNG timeline of the demo (matplotlib, drawn off-screen)."""

from __future__ import annotations

import math
from pathlib import Path

from seawall._demo._plan import PHASES
from seawall._demo._scenario import OUTCOMES, Recorder

__all__ = ["write_chart"]

_PHASE_COLOURS = {"healthy": "#e8f5e9", "failing": "#ffebee", "slow": "#fff8e1", "recovered": "#e3f2fd"}
_STATE_LEVEL = {"closed": 0, "half_open": 1, "open": 2}


def write_chart(recorder: Recorder, path: Path) -> Path:
    """Draw the run's series into a PNG at ``path`` and return the path.

    Three panels share the time axis: outcomes per tick, breaker state and
    pool usage, and latency p50/p99; the phases are shaded behind them.
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
        for outcome in OUTCOMES:
            series = [tick.counts[outcome] for tick in recorder.ticks]
            if any(series):
                counts.plot(times, series, label=outcome.replace("_", " "), marker=".")
        counts.set_ylabel(f"requests / {plan.tick:g}s")
        counts.legend(loc="upper left", fontsize=8, ncol=4)
        state.step(times, [_STATE_LEVEL[tick.breaker] for tick in recorder.ticks], where="mid", label="breaker")
        state.set_yticks([0, 1, 2], ["closed", "half open", "open"])
        pool_axis = state.twinx()
        pool_axis.plot(times, [tick.pool_in_use for tick in recorder.ticks], color="tab:purple", label="pool in use")
        pool_axis.set_ylim(0, plan.pool_size + 1)
        pool_axis.set_ylabel("pool in use", color="tab:purple")
        for label, quantile in (("p50", 0.5), ("p99", 0.99)):
            values = [tick.p50() if quantile == 0.5 else tick.p99() for tick in recorder.ticks]
            latency.plot(times, [math.nan if v is None else v * 1000 for v in values], label=label, marker=".")
        latency.set_ylabel("latency (ms)")
        latency.set_xlabel("seconds")
        latency.legend(loc="upper left", fontsize=8)
        figure.suptitle(f"seawall demo (seed {plan.seed}, {plan.duration:g}s)")
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)
    return path
