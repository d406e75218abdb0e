"""A Prometheus collector over seawall's metrics (extra ``prometheus``).

``instrument()`` attaches an in-process :class:`~seawall._metrics.Recorder` to
seawall's events and registers a ``prometheus_client`` collector that turns
its totals into metric families when Prometheus scrapes. The series are the
OpenTelemetry metrics of :mod:`seawall.integrations.opentelemetry`, spelled as
OpenTelemetry's Prometheus exporter spells them (dots become underscores,
counters end in ``_total``, durations in ``_seconds``), so one dashboard serves
both ways of exporting.

Why a collector of its own rather than OpenTelemetry's Prometheus exporter:
the histograms here are exact (every duration lands in its bucket in the
process; the SDK can only be handed single values, so the OpenTelemetry path
samples them beyond ``sample_size`` per collection), the exporter is a 0.x
beta whose naming rules have changed between releases, and this needs neither
the SDK nor a second HTTP server: ``prometheus_client`` alone, with the
application's own ``/metrics`` route.

Example::

    from seawall.integrations import prometheus as seawall_prometheus

    instrumentation = seawall_prometheus.instrument(infra)   # the default registry
    ...                                                       # GET /metrics shows seawall_* series
    instrumentation.uninstrument()
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

from seawall._errors import ConfigurationError, ConfigurationTypeError
from seawall._extras import missing_extra
from seawall._metrics import BOUNDS, METRICS, Detail, MetricSpec, Recorder, prometheus_name

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
    from prometheus_client.registry import Collector
except ModuleNotFoundError as exc:
    raise missing_extra(exc, __name__) from exc

if TYPE_CHECKING:
    from seawall._infrastructure import AsyncInfrastructure

__all__ = ["PrometheusInstrumentation", "SeawallCollector", "instrument"]

_ids = itertools.count(1)
_BUCKET_BOUNDS = [repr(bound) for bound in BOUNDS]


def _label_names(spec: MetricSpec, recorder: Recorder) -> list[str]:
    return [label.replace(".", "_") for label in spec.labels_for(recorder.entity_attributes)]


class SeawallCollector(Collector):
    """Turns a :class:`~seawall._metrics.Recorder`'s totals into Prometheus metric families at each scrape."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def describe(self) -> Iterator[Metric]:
        """The families without samples: what a registry checks for duplicates (even with ``auto_describe=False``)."""
        for spec in METRICS:
            yield self._family(spec)

    def collect(self) -> Iterator[Metric]:
        """One family per seawall metric."""
        recorder = self.recorder
        for spec in METRICS:
            family = self._family(spec)
            if isinstance(family, CounterMetricFamily):
                for values, total in recorder.counter_values(spec.name):
                    family.add_metric(list(values), total)
            elif isinstance(family, HistogramMetricFamily):
                for values, series in recorder.histogram_series(spec.name):
                    counts, _count, seconds = series.snapshot()
                    # The +Inf bucket from the same copy as the others: a scrape from another thread
                    # may land between two updates of a series, and buckets must never exceed the count.
                    cumulative = list(itertools.accumulate(counts))
                    buckets = [*zip(_BUCKET_BOUNDS, cumulative[:-1], strict=True), ("+Inf", cumulative[-1])]
                    family.add_metric(list(values), buckets, seconds)
            else:
                for values, reading in recorder.gauge_values(spec.name):
                    family.add_metric(list(values), reading)
            yield family

    def _family(self, spec: MetricSpec) -> CounterMetricFamily | HistogramMetricFamily | GaugeMetricFamily:
        name, labels = prometheus_name(spec), _label_names(spec, self.recorder)
        if spec.kind == "counter":
            return CounterMetricFamily(name, spec.description, labels=labels)
        if spec.kind == "histogram":
            return HistogramMetricFamily(name, spec.description, labels=labels, unit="seconds")
        return GaugeMetricFamily(name, spec.description, labels=labels)


class PrometheusInstrumentation:
    """The collector of one :func:`instrument` call; ``uninstrument()`` removes it.

    Attributes:
        recorder: The in-process aggregate.
        collector: The registered collector.
        registry: The registry it is registered with.
    """

    __slots__ = ("collector", "recorder", "registry")

    def __init__(self, recorder: Recorder, registry: CollectorRegistry) -> None:
        self.recorder = recorder
        self.registry = registry
        self.collector = SeawallCollector(recorder)

    @property
    def active(self) -> bool:
        """Whether the handlers are attached."""
        return self.recorder.attached

    def watch(self, infra: AsyncInfrastructure) -> None:
        """Report the breakers and pools of ``infra`` too (gauges)."""
        self.recorder.watch(infra)

    def uninstrument(self) -> None:
        """Detach from seawall's events and unregister the collector."""
        self.recorder.stop()
        try:
            self.registry.unregister(self.collector)
        except KeyError:
            pass  # unregistered already

    def __repr__(self) -> str:
        return f"<PrometheusInstrumentation {'active' if self.active else 'stopped'} recorder={self.recorder.name!r}>"


def instrument(
    infra: AsyncInfrastructure | None = None,
    /,
    *,
    registry: CollectorRegistry | None = None,
    detail: Detail = "calls",
    entity_attributes: bool = False,
) -> PrometheusInstrumentation:
    """Expose seawall's metrics to Prometheus through ``prometheus_client``.

    Args:
        infra: An infrastructure whose breakers and pools the gauges report
            (more with :meth:`PrometheusInstrumentation.watch`).
        registry: Where the collector is registered; ``prometheus_client.REGISTRY`` when ``None``.
        detail: ``"calls"`` (default) or ``"layers"``, as for
            :func:`seawall.integrations.opentelemetry.instrument`.
        entity_attributes: Also label rate-limit series with the bucket's entity.

    Returns:
        The :class:`PrometheusInstrumentation`; ``uninstrument()`` removes it.

    Raises:
        ConfigurationError: A bad argument (named in the message), or a
            registry that seawall's series are registered on already (each
            series would be exposed twice: use
            :meth:`PrometheusInstrumentation.watch`).
    """
    if registry is None:
        registry = REGISTRY
    elif not isinstance(registry, CollectorRegistry):
        raise ConfigurationTypeError(
            f"registry: expected a prometheus_client CollectorRegistry, got {registry!r}", path="registry"
        )
    recorder = Recorder(f"prometheus-{next(_ids)}", detail=detail, entity_attributes=entity_attributes, buckets=True)
    if infra is not None:
        recorder.watch(infra)
    instrumentation = PrometheusInstrumentation(recorder, registry)
    try:
        registry.register(instrumentation.collector)
    except ValueError as exc:  # prometheus_client's DuplicateTimeseries
        # Every recorder sees every event of the process: a second collector would repeat each series.
        raise ConfigurationError(
            "registry: seawall's series are registered on this registry already; call .watch(infra) on "
            "that instrumentation to report another infrastructure, or .uninstrument() it first",
            path="registry",
        ) from exc
    recorder.start()
    return instrumentation
