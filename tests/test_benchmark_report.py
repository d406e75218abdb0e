"""The benchmark report pairs each peer with seawall's variant of the same layer."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import _report  # noqa: E402  (benchmarks/ is not a package: found on the path set above)

LATEST = json.loads((BENCHMARKS / "results" / "latest.json").read_text())
EACH_LAYER = "infrastructure: each layer alone"


def _report_of(case: str, overheads: dict[str, float]) -> dict[str, Any]:
    rows = [{"case": case, "label": label, "overhead_ns": ns} for label, ns in overheads.items()]
    return {"modules": {"bench_x": {"per_call": rows}}}


def _pairs(report: dict[str, Any], case: str) -> dict[str, str]:
    return {peer: ours for row_case, ours, peer, _ in _report.ratios(report) if row_case == case}


def test_each_layer_alone_pairs_every_peer_with_the_same_layer() -> None:
    """In the published run, the breaker peer is divided by seawall's breaker, the semaphore by its bulkhead..."""
    assert _pairs(LATEST, EACH_LAYER) == {
        "aiolimiter AsyncLimiter": "seawall RateLimiter.hit",
        "aiobreaker call_async": "seawall CircuitBreaker (async with)",
        "asyncio.Semaphore": "seawall bulkhead checkout",
        "anyio.fail_after(5)": "seawall timeout (deadline timer)",
    }


def test_ratio_is_the_peer_overhead_over_its_counterpart() -> None:
    """Each ratio divides the peer's overhead by the overhead of the seawall variant it is paired with."""
    report = _report_of(
        EACH_LAYER,
        {
            "bare": 0.0,
            "seawall RateLimiter.hit": 100.0,
            "aiolimiter AsyncLimiter": 200.0,
            "seawall CircuitBreaker (async with)": 50.0,
            "aiobreaker call_async": 400.0,
        },
    )
    assert {peer: (ours, value) for _, ours, peer, value in _report.ratios(report)} == {
        "aiolimiter AsyncLimiter": ("seawall RateLimiter.hit", pytest.approx(2.0)),
        "aiobreaker call_async": ("seawall CircuitBreaker (async with)", pytest.approx(8.0)),
    }


def test_unlisted_case_compares_peers_with_its_first_seawall_variant() -> None:
    """A single-layer case needs no table: every peer is divided by the case's first seawall variant."""
    report = _report_of("limiter: x", {"bare": 0.0, "seawall a": 10.0, "seawall b": 5.0, "peer": 30.0})
    assert _report.ratios(report) == [("limiter: x", "seawall a", "peer", pytest.approx(3.0))]


def test_a_case_timed_over_a_seawall_baseline_compares_whole_calls() -> None:
    """What a retry section adds to seawall's chain is not set against a peer's whole chain: the totals are."""
    rows = [
        {"case": "retry: x", "label": "seawall key without retry", "median_ns": 3500.0, "overhead_ns": 0.0},
        {"case": "retry: x", "label": "seawall key with retry", "median_ns": 3700.0, "overhead_ns": 200.0},
        {"case": "retry: x", "label": "peers' chain in stamina.retry", "median_ns": 29600.0, "overhead_ns": 26100.0},
    ]
    report = {"modules": {"bench_x": {"per_call": rows}}}
    assert _report.ratios(report) == [
        ("retry: x", "seawall key with retry", "peers' chain in stamina.retry", pytest.approx(8.0))
    ]


def test_listed_case_leaves_out_a_peer_without_a_counterpart() -> None:
    """A new peer in a multi-layer case is not silently divided by another layer's figure."""
    report = _report_of(EACH_LAYER, {"bare": 0.0, "seawall RateLimiter.hit": 10.0, "some new peer": 30.0})
    assert _report.ratios(report) == []


def test_references_are_not_peers() -> None:
    """Yardsticks (a plain CancelScope, the cheapest scope) get no ratio."""
    case = "infrastructure: full chain (limiter + breaker + bulkhead + timeout)"
    assert set(_pairs(LATEST, case)) == {
        "peers: aiolimiter+aiobreaker+Semaphore+asyncio.timeout",
        "anyio.fail_after(5)",
        "asyncio.timeout(5)",
    }


@pytest.mark.parametrize("case", sorted(_report.PAIRS))
def test_pairs_name_variants_the_benchmarks_measure(case: str) -> None:
    """Every label in the pairing table is a variant of that case in the published run and in bench source."""
    published = {r["label"] for r in _report._cases(LATEST)[case]}
    sources = "".join(path.read_text() for path in BENCHMARKS.glob("bench_*.py"))
    for peer, ours in _report.PAIRS[case].items():
        assert {peer, ours} <= published
        assert f'"{peer}"' in sources
        assert f'"{ours}"' in sources


def test_only_a_full_run_writes_over_the_published_results() -> None:
    """A smoke or ``--only`` run keeps its JSON and reports out of results/latest.json and docs/benchmarks/."""
    import run  # (benchmarks/run.py, on the path set above)

    published = BENCHMARKS / "results"
    assert run._default_out(quick=False, partial=False) == published
    assert run._default_out(quick=True, partial=False) == published / "quick"
    assert run._default_out(quick=False, partial=True) == published / "partial"
    assert run._default_out(quick=True, partial=True) == published / "quick"
