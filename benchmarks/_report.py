"""Turn a benchmark report (``latest.json``'s content) into markdown and a chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _cases(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    cases: dict[str, list[dict[str, Any]]] = {}
    for module in report["modules"].values():
        for row in module["per_call"]:
            cases.setdefault(row["case"], []).append(row)
    return cases


def write_markdown(report: dict[str, Any], path: Path) -> None:
    """Write the tables: per-call cases, other figures, targets."""
    machine = report["machine"]
    lines = [
        "# seawall benchmark results",
        "",
        f"Run of {report['date']} ({report['mode']} mode, {report['seconds']} s) on {machine['cpu']},",
        f"{machine['cores']} cores, Python {machine['python']} ({machine['platform']}).",
        "Each case runs seawall and its peers in one process, interleaved, after a warm-up;",
        "figures are medians of the repeats, with min..max. *Overhead* is the median",
        "per-repeat difference to the case's baseline (usually a bare `await noop()`).",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v),
        "",
    ]
    for module, date in report.get("reruns", {}).items():
        lines += [
            f"`{module}` was run again on its own at {date}; its figures are from that run. Compare them with the "
            "peers in the same tables (same run), not with other modules' absolute figures.",
            "",
        ]
    for case, rows in _cases(report).items():
        lines += [f"## {case}", "", "| variant | ns/call (median) | min..max | overhead ns |", "|---|---:|---:|---:|"]
        for r in rows:
            overhead = "" if r["overhead_ns"] is None else f"{r['overhead_ns']:.0f}"
            lines.append(f"| {r['label']} | {r['median_ns']:.0f} | {r['min_ns']:.0f}..{r['max_ns']:.0f} | {overhead} |")
        lines.append("")
    ratio_rows = ratios(report)
    if ratio_rows:
        lines += [
            "## Ratios to peers",
            "",
            "Peer's overhead divided by seawall's, same run (above 1: seawall is that many times faster).",
            "Where a case measures several layers, each peer is divided by seawall's variant of the same layer.",
            "",
            "| case | seawall variant | peer | ratio |",
            "|---|---|---|---:|",
        ]
        lines += [f"| {case} | {ours} | {peer} | {value:.2f}x |" for case, ours, peer, value in ratio_rows]
        lines.append("")
    figures = [f for m in report["modules"].values() for f in m["figures"]]
    if figures:
        lines += ["## Other figures", "", "| case | variant | value | unit |", "|---|---|---:|---|"]
        lines += [f"| {f['case']} | {f['label']} | {f['value']:,.2f} | {f['unit']} |" for f in figures]
        lines.append("")
    targets = [t for m in report["modules"].values() for t in m["targets"]]
    if targets:
        lines += ["## Targets", "", "| target | met | figure |", "|---|---|---|"]
        lines += [f"| {t['description']} | {'yes' if t['met'] else '**no**'} | {t['figure']} |" for t in targets]
        lines.append("")
    path.write_text("\n".join(lines))


def write_chart(report: dict[str, Any], path: Path) -> None:
    """Draw each per-call case's overheads as horizontal bars on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = {
        case: [r for r in rows if r["overhead_ns"] is not None and r["overhead_ns"] > 0]
        for case, rows in _cases(report).items()
    }
    cases = {case: rows for case, rows in cases.items() if rows}
    if not cases:
        fig, ax = plt.subplots(figsize=(6, 1))
        ax.text(0.5, 0.5, "no per-call cases", ha="center")
        ax.axis("off")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    heights = [max(1.2, 0.35 * len(rows) + 0.6) for rows in cases.values()]
    fig, axes = plt.subplots(len(cases), 1, figsize=(10, sum(heights)), gridspec_kw={"height_ratios": heights})
    axes_list = list(axes) if len(cases) > 1 else [axes]
    for ax, (case, rows) in zip(axes_list, cases.items(), strict=True):
        labels = [r["label"] for r in rows]
        values = [r["overhead_ns"] for r in rows]
        colors = ["tab:blue" if label.startswith("seawall") else "tab:gray" for label in labels]
        ax.barh(labels, values, color=colors)
        ax.set_xscale("log")
        ax.set_title(case, fontsize=10, loc="left")
        ax.tick_params(axis="y", labelsize=8)
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:.0f}", va="center", fontsize=7)
    axes_list[-1].set_xlabel("overhead over the baseline, ns per call (log scale; seawall in blue)")
    fig.suptitle(f"seawall vs peers - {report['date']}, {report['machine']['cpu']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=100)
    plt.close(fig)


#: Variants that are yardsticks, not peers: no library to compare with.
_REFERENCES = ("cheapest anyio scope", "empty yield dependency", "anyio.CancelScope() (no deadline)")

#: Cases that measure more than one layer: each peer's seawall counterpart, by label.
#: A case not listed here compares every peer with its first seawall variant; a peer
#: of a listed case that is not in its map is left out of the ratios (never paired
#: with whatever seawall variant happens to come first).
PAIRS: dict[str, dict[str, str]] = {
    "infrastructure: full chain (limiter + breaker + bulkhead + timeout)": {
        "peers: aiolimiter+aiobreaker+Semaphore+asyncio.timeout": "seawall execute_protected",
        "anyio.fail_after(5)": "seawall execute_protected, timeout only",
        "asyncio.timeout(5)": "seawall execute_protected, timeout only",
    },
    "infrastructure: each layer alone": {
        "aiolimiter AsyncLimiter": "seawall RateLimiter.hit",
        "aiobreaker call_async": "seawall CircuitBreaker (async with)",
        "asyncio.Semaphore": "seawall bulkhead checkout",
        "anyio.fail_after(5)": "seawall timeout (deadline timer)",
    },
}


def ratios(report: dict[str, Any]) -> list[tuple[str, str, str, float]]:
    """``(case, seawall variant, peer, peer overhead / seawall overhead)`` for every per-call case.

    Each peer is compared with its counterpart in ``PAIRS`` or, in a case not
    listed there, with the case's first seawall variant (the one the issue's
    target names); above 1 means seawall is that many times faster.
    """
    rows = []
    for case, results in _cases(report).items():
        baseline = next((r["label"] for r in results if r["overhead_ns"] == 0), None)
        # Over a bare await the overheads compare the layers. A case timed over a seawall
        # variant (what one more option costs, say a retry section) would set that option's
        # cost against a peer's whole chain: its ratios compare the medians instead.
        figure = "overhead_ns" if baseline in (None, "bare") else "median_ns"
        measured = {r["label"]: r for r in results if r["label"] != baseline and (r.get(figure) or 0) > 0}
        ours = [label for label in measured if label.startswith("seawall")]
        peers = [label for label in measured if not label.startswith(("seawall", "bare", *_REFERENCES))]
        if not ours:
            continue
        pairs = PAIRS.get(case, dict.fromkeys(peers, ours[0]))
        for peer in peers:
            counterpart = pairs.get(peer)
            if counterpart in measured:
                rows.append((case, counterpart, peer, measured[peer][figure] / measured[counterpart][figure]))
    return rows


def write_ratio_chart(report: dict[str, Any], path: Path) -> None:
    """Draw peer overhead / seawall overhead per case and peer (log scale; 1 = parity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ratios(report)
    fig, ax = plt.subplots(figsize=(15, max(2.0, 0.28 * len(rows) + 1.2)))
    if rows:
        labels = [f"{case}: {peer} / {ours}" for case, ours, peer, _ in rows]
        values = [value for *_, value in rows]
        colors = ["tab:green" if value >= 1 else "tab:red" for value in values]
        ax.barh(labels, values, color=colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.invert_yaxis()  # top to bottom in the order of the markdown table
        ax.tick_params(axis="y", labelsize=7)
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:.2f}x", va="center", fontsize=7)
    ax.set_xlabel("peer's overhead / seawall's overhead (log scale; right of 1 = seawall faster)")
    ax.set_title(f"seawall vs peers, ratios - {report['date']}", fontsize=10, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
