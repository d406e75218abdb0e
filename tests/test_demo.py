"""The demo behind `python -m seawall demo`: scenario, verdict, views, chart, upstream."""

from __future__ import annotations

import io
import logging
import re
import sys
from pathlib import Path

import anyio
import httpx
import pytest

from seawall._demo import run_demo
from seawall._demo._plan import Plan
from seawall._demo._scenario import Recorder, classify
from seawall._demo._upstream import Upstream
from seawall._demo._view import LEGEND, LiveView, PlainView, summary_rows


def test_short_plain_run_behaves_as_designed(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A 2 s run with --no-live exits 0, prints a line per tick, the checks, and writes the PNG."""
    chart = tmp_path / "timeline.png"
    level = logging.getLogger("seawall").level
    assert run_demo(duration=2, live=False, seed=1, chart=chart) == 0
    out = capsys.readouterr().out
    assert out.count("\nt=") >= 19
    assert "[ok] the breaker opened during the outage" in out
    assert "FAILED" not in out
    assert "scenario ran as designed" in out
    assert chart.read_bytes().startswith(b"\x89PNG")
    assert str(chart) in out
    assert logging.getLogger("seawall").level == level  # the demo's quieting is undone


def test_run_on_redis_shares_state_through_the_server(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, redis_url: str
) -> None:
    """With --redis the same scenario runs on the Redis backend and still behaves as designed."""
    import redis

    def evalsha_calls() -> int:
        client = redis.Redis.from_url(redis_url)
        try:
            stats = client.info("commandstats").get("cmdstat_evalsha", {})
            return int(stats.get("calls", 0))
        finally:
            client.close()

    before = evalsha_calls()
    assert run_demo(duration=3, live=False, seed=2, chart=tmp_path / "t.png", redis=redis_url) == 0
    out = capsys.readouterr().out
    assert "[ok] the breaker closed again after the outage" in out
    assert "scenario ran as designed" in out
    # Every limiter and breaker decision of the run went to the server as a script.
    assert evalsha_calls() - before > 100


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _visible_lines(text: str) -> list[str]:
    return [line.rstrip() for line in ANSI.sub("", text).splitlines()]


def test_live_view_runs_in_an_80x24_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """In an 80x24 terminal the live view and summary fit: no line wider than 80, no cell cut short."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("LINES", "24")
    # The layout is the point here; the scenario's verdict is test_short_plain_run_behaves_as_designed's
    # (a 2 s run on a slow machine may end with the breaker open again, which changes no width).
    assert run_demo(duration=2, live=True, seed=2, chart=tmp_path / "c.png") in (0, 1)
    out = capsys.readouterr().out
    assert "\x1b[" in out  # the live view ran (it redraws in place)
    lines = _visible_lines(out)
    assert max(len(line) for line in lines) <= 80
    assert "\u2026" not in out  # rich's ellipsis: a cell cut to fit
    assert "summary" in lines
    assert any(line.split()[:4] == ["t", "phase", "in", "429"] for line in lines)
    assert LEGEND[0] in lines


def _live_view_at(width: int, height: int) -> tuple[LiveView, io.StringIO, Recorder]:
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, width=width, height=height, force_terminal=True, color_system=None)
    recorder = _recorder_with([(3.0, "closed", "open")], "half_open", rate_limited=130, successes=13)
    tick = recorder.ticks[-1]
    tick.breaker, tick.latencies[:] = "half_open", [0.002, 0.312]
    view = LiveView(recorder.plan, lambda: "half_open", console=console)
    with view:
        for _ in range(30):
            view.tick(tick)
    view.summary(recorder, recorder.verdict())
    return view, out, recorder


def test_narrow_terminal_gets_the_compact_layout() -> None:
    """Below the full table's width: statuses as columns, a legend, as many ticks as the height allows."""
    _, out, _ = _live_view_at(80, 16)
    lines = _visible_lines(out.getvalue())
    assert max(len(line) for line in lines) <= 80
    assert "\u2026" not in out.getvalue()
    summary = lines.index("summary")
    assert lines[summary + 1].split() == [
        "phase",
        "sent",
        "in",
        "429",
        "503",
        "504",
        "502",
        "ok",
        "breaker",
        "pool",
        "p50",
        "p99",
    ]
    assert ["recovered", "143", "13", "130", "0", "0", "0", "13", "half_open", "0/3", "2ms", "312ms"] in [
        line.split() for line in lines
    ]
    # The last frame of the live view: its title, the header, the ticks the height leaves room for, the legend.
    title = max(i for i, line in enumerate(lines[:summary]) if line.startswith("seawall demo: breaker"))
    assert lines[title + 1].split()[:4] == ["t", "phase", "in", "429"]
    assert lines[summary - len(LEGEND) : summary] == list(LEGEND)
    assert summary - len(LEGEND) - (title + 2) == 16 - 6


def test_wide_terminal_gets_the_full_layout() -> None:
    """Where the full table fits, every outcome has its own column and no legend is needed."""
    _, out, _ = _live_view_at(200, 40)
    text = ANSI.sub("", out.getvalue())
    assert "pool t/o" in text
    assert "upstr 5xx" in text
    assert LEGEND[0] not in text
    assert "\u2026" not in text


def test_piped_stdout_gets_plain_lines(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """With stdout not a terminal (a pipe, a file) the live view falls back to plain lines, no escape codes."""
    assert run_demo(duration=1.5, live=True, seed=2, chart=tmp_path / "c.png") == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out
    assert out.count("\nt=") >= 14
    assert "scenario ran as designed" in out


def test_degrades_without_rich_and_matplotlib(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without rich the view is plain lines; without matplotlib there is no chart, and the run still passes."""
    for module in ("rich", "rich.live", "rich.console", "matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal, where the live view would run
    assert run_demo(duration=1.5, live=True, seed=3, chart=tmp_path / "c.png") == 0
    out = capsys.readouterr().out
    assert "'rich' is not installed" in out
    assert "no chart" in out
    assert not (tmp_path / "c.png").exists()


def test_missing_web_dependencies_exit_2(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Without fastapi the demo says which extra to install and exits 2."""
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert run_demo(duration=2, live=False, seed=1) == 2
    err = capsys.readouterr().err
    assert "pip install '.[demo]'" in err
    assert "'fastapi'" in err


def test_invalid_duration_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A duration under one second is refused with exit status 2."""
    assert run_demo(duration=0.5, live=False, seed=1) == 2
    assert "--duration" in capsys.readouterr().err


def test_plan_scales_with_duration_and_seed() -> None:
    """Phases are fractions of the run; the seed fixes the clients; no seed draws one."""
    short, long = Plan.build(2, 7), Plan.build(20, 7)
    assert [short.phase_at(t) for t in (0.0, 0.6, 1.0, 1.3)] == ["healthy", "failing", "slow", "recovered"]
    assert long.phase_start("recovered") == 12.0
    assert short.clients == Plan.build(2, 7).clients
    assert short.clients != Plan.build(2, 8).clients
    assert short.recovery_time < long.recovery_time
    assert isinstance(Plan.build(2, None).seed, int)
    assert set(short.protections()) == {"api", "upstream"}


def _recorder_with(transitions: list[tuple[float, str, str]], final: str, **counts: int) -> Recorder:
    recorder = Recorder(Plan.build(10, 1))
    recorder.transitions = transitions
    recorder.breaker_state = final
    for outcome, count in counts.items():
        recorder.ticks[-1].counts[outcome] += count
    return recorder


def test_verdict_demands_every_part_of_the_story() -> None:
    """The run passes only if the breaker opened in the outage, closed after it, and denials happened."""
    story = [(3.0, "closed", "open"), (7.0, "half_open", "closed")]
    assert _recorder_with(story, "closed", rate_limited=3, successes=5).verdict().ok
    assert not _recorder_with([], "closed", rate_limited=3, successes=5).verdict().ok
    assert not _recorder_with(story[:1], "open", rate_limited=3, successes=5).verdict().ok
    assert not _recorder_with(story, "closed", successes=5).verdict().ok
    assert not _recorder_with(story, "closed", rate_limited=3, successes=5, errors=1).verdict().ok
    failed = dict(_recorder_with([], "open").verdict().checks)
    assert failed["the breaker opened during the outage"] is False


def test_breaker_series_steps_through_every_transition() -> None:
    """The chart's breaker line is the transitions over real time, from 0 to the end of the run."""
    from seawall._demo._chart import breaker_series

    story = [(3.0, "closed", "open"), (4.0, "open", "half_open"), (4.002, "half_open", "open")]
    assert breaker_series(_recorder_with(story, "open")) == ([0.0, 3.0, 4.0, 4.002, 10.0], [0, 2, 1, 2, 2])
    assert breaker_series(_recorder_with([], "closed")) == ([0.0, 10.0], [0, 0])


def _half_open_trials(seconds: list[float], levels: list[int], start: float, end: float) -> list[float]:
    """When the line dips from open to half open and back to open (a failed trial) within [start, end)."""
    return [
        seconds[i]
        for i in range(1, len(levels) - 1)
        if levels[i - 1 : i + 2] == [2, 1, 2] and start <= seconds[i] < end
    ]


def test_chart_shows_each_failed_half_open_trial_of_the_outage() -> None:
    """Through the outage the chart's breaker line dips to half open about once per recovery time.

    A tick is as long as the recovery time, so each tick of the outage holds an
    ``open``: a line of per-tick states showed one solid "open" here.
    """
    import matplotlib.pyplot as plt

    from seawall._demo._chart import breaker_series, build_figure
    from seawall._demo._scenario import run_scenario

    plan = Plan.build(4, 1)
    recorder = Recorder(plan)
    anyio.run(run_scenario, recorder, lambda tick: None, lambda url: None, None)
    seconds, levels = breaker_series(recorder)
    failing, slow = plan.phase_start("failing"), plan.phase_start("slow")
    trials = _half_open_trials(seconds, levels, failing, slow)
    assert len(trials) >= int((slow - failing) / (2 * plan.recovery_time)), (seconds, levels)
    opened = next(at for at, level in zip(seconds, levels, strict=True) if level == 2)
    # Each trial comes a recovery time after the breaker opened again, give or take the next request.
    gaps = [later - earlier for earlier, later in zip([opened, *trials], trials, strict=False)]
    assert all(0.9 * plan.recovery_time <= gap <= 2 * plan.recovery_time for gap in gaps), gaps
    # The per-tick figures name the trial too: "open/half_open" in the plain lines.
    assert any(tick.states_seen == "open/half_open" for tick in recorder.ticks if tick.phase == "failing")
    figure = build_figure(recorder)
    try:
        state = figure.axes[1]
        line = state.get_lines()[0]
        assert (list(line.get_xdata()), list(line.get_ydata())) == (seconds, levels)
        legend = state.get_legend()
        assert legend is not None
        assert [text.get_text() for text in legend.get_texts()] == ["breaker state", "half-open trial", "pool in use"]
        assert state.get_ylabel() == "breaker state"
        assert [axis.get_xlabel() for axis in figure.axes[:3]] == ["", "", "seconds"]
    finally:
        plt.close(figure)


def test_summary_and_plain_view(capsys: pytest.CaptureFixture[str]) -> None:
    """The summary has a row per phase and a total; the plain view prints FAILED for a failed check."""
    recorder = _recorder_with([], "closed", successes=2)
    recorder.ticks[0].latencies.extend([0.001, 0.003])
    rows = summary_rows(recorder)
    assert [row[0] for row in rows] == ["healthy", "failing", "slow", "recovered", "total"]
    view = PlainView(sys.stdout, recorder.pool_size)
    with view:
        view.tick(recorder.ticks[0])
        view.summary(recorder, recorder.verdict())
    out = capsys.readouterr().out
    assert "p50=1ms" in out or "p50=3ms" in out
    assert "[FAILED] the breaker opened during the outage" in out


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (200, {}, "successes"),
        (429, {"error": "rate_limit_exceeded"}, "rate_limited"),
        (503, {"error": "circuit_breaker_blown"}, "breaker_rejected"),
        (503, {"error": "checkout_timeout"}, "pool_timeouts"),
        (503, {"error": "rate_limiter_exception"}, "errors"),
        (504, {"error": "timeout"}, "timeouts"),
        (502, {"error": "upstream_error"}, "upstream_errors"),
        (500, {}, "errors"),
    ],
)
def test_classify(status: int, body: dict[str, str], outcome: str) -> None:
    """Each response of the demo app is sorted into the series it belongs to."""
    assert classify(httpx.Response(status, json=body)) == outcome


@pytest.mark.anyio
async def test_upstream_answers_by_phase_and_rejects_garbage() -> None:
    """The upstream serves /quote by phase, 404s other paths, 400s bad request lines, and survives hang-ups."""
    phase = ["healthy"]
    upstream = Upstream(lambda: phase[0], slow_delay=0.0)
    async with anyio.create_task_group() as tasks:
        port = await tasks.start(upstream.serve)
        async with httpx.AsyncClient(base_url=upstream.url) as client:
            healthy = await client.get("/quote")
            phase[0] = "failing"
            failing = await client.get("/quote")
            missing = await client.get("/elsewhere")
            closing = await client.get("/quote", headers={"Connection": "close"})
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"NONSENSE\r\nContent-Length: 0\r\n\r\n")
            bad = await stream.receive()
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"X" * 20000)  # no end of head in sight: the server hangs up
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await stream.receive()
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"GET /quote HTTP/1.1\r\nContent-Length: x\r\n\r\n")  # ValueError: hung up
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await stream.receive()
        tasks.cancel_scope.cancel()
    assert healthy.json()["phase"] == "healthy"
    assert (failing.status_code, missing.status_code, closing.status_code) == (500, 404, 500)
    assert bad.startswith(b"HTTP/1.1 400")
    assert upstream.served == 5


def test_a_run_that_missed_its_design_exits_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """When a check fails the demo says so, shows the unexpected errors, and returns 1."""
    from seawall._demo import _conclude, _default_chart

    recorder = _recorder_with([], "open", errors=1)
    recorder.error_samples.append("client-1: ConnectError: refused")
    assert _conclude(recorder, PlainView(sys.stdout, recorder.pool_size), tmp_path / "c.png") == 1
    out = capsys.readouterr().out
    assert "unexpected client-1: ConnectError: refused" in out
    assert "did NOT run as designed" in out
    assert _default_chart(5).name == "seawall-demo-seed5.png"
