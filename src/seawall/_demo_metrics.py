"""``python -m seawall demo --metrics-port PORT``: the demo's metrics on a Prometheus endpoint.

The demo builds its infrastructure inside the scenario, so the collector is
not given one: the counters, histograms and the breaker-state gauge come from
the events (pool gauges need the infrastructure and stay empty here). The
endpoint is ``prometheus_client``'s own HTTP server, on 127.0.0.1, in a
thread, for as long as the demo runs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from seawall._checks import count
from seawall._extras import missing_extra

__all__ = ["serve_metrics"]


@contextmanager
def serve_metrics(port: int, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve seawall's Prometheus series on ``http://host:port/metrics`` inside the block; yields the URL."""
    count(port, "--metrics-port", minimum=1, maximum=65535)
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ModuleNotFoundError as exc:
        raise missing_extra(exc, "seawall.integrations.prometheus") from exc

    from seawall.integrations import prometheus as seawall_prometheus

    registry = CollectorRegistry()
    instrumentation = seawall_prometheus.instrument(registry=registry, detail="layers")
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except BaseException:
        instrumentation.uninstrument()  # e.g. the port is taken: leave no handler attached
        raise
    url = f"http://{host}:{port}/metrics"
    sys.stderr.write(f"seawall demo: Prometheus metrics on {url}\n")
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        instrumentation.uninstrument()
