"""OpenTelemetry metrics and span events from seawall's telemetry (extra ``otel``).

``instrument()`` attaches an in-process :class:`~seawall._metrics.Recorder` to
seawall's events and registers OpenTelemetry instruments that read it when the
meter provider collects:

* counters are observable counters: their callbacks hand over the recorder's
  cumulative totals, so a protected call never calls the SDK;
* gauges (breaker state, pool connections by state, waiting checkouts, pool
  capacity, concurrency limits) are observable gauges and up-down counters
  read from the watched infrastructures at collection;
* durations (call duration, checkout wait, connection use) are kept per series
  in the process and handed to SDK histograms at collection: every value while
  a series saw at most ``sample_size`` values since the last collection, else
  a uniform sample of ``sample_size`` of them (the SDK can only be handed one
  value at a time, at about 7 us each). The counters stay exact either way:
  read rates from ``seawall.calls``, shapes from ``seawall.call.duration``.

Span events are added to the current span (when it is recording) for rate-limit
denials, breaker rejections, checkout timeouts, concurrency-limit refusals,
protection timeouts and breaker state changes.

Example::

    from opentelemetry.sdk.metrics import MeterProvider
    from seawall.integrations import opentelemetry as seawall_otel

    instrumentation = seawall_otel.instrument(infra, meter_provider=MeterProvider(...))
    ...
    instrumentation.uninstrument()
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from seawall._errors import ConfigurationError, ConfigurationTypeError
from seawall._extras import missing_extra
from seawall._metrics import BOUNDS, METRICS, Detail, MetricSpec, Recorder, label_dict
from seawall._version import __version__

try:
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace as otel_trace
    from opentelemetry.metrics import CallbackOptions, Histogram, Observation
except ModuleNotFoundError as exc:
    raise missing_extra(exc, __name__) from exc

if TYPE_CHECKING:
    from opentelemetry.metrics import Meter, MeterProvider
    from opentelemetry.trace import TracerProvider

    from seawall._infrastructure import AsyncInfrastructure

__all__ = ["DEFAULT_SAMPLE_SIZE", "METRIC_NAMES", "Instrumentation", "instrument"]

#: Durations per histogram series handed over exactly between two collections (beyond: a uniform sample).
DEFAULT_SAMPLE_SIZE = 1000

#: The name of every instrument created, as listed in ``docs/observability.md``.
METRIC_NAMES: tuple[str, ...] = tuple(spec.name for spec in METRICS)

_ids = itertools.count(1)


def _add_span_event(name: str, attributes: dict[str, Any]) -> None:
    span = otel_trace.get_current_span()
    if span.is_recording():
        span.add_event(name, attributes)


class _Instruments:
    """The instruments seawall created on one meter provider, and the instrumentations they read.

    OpenTelemetry cannot remove an instrument, and a second instrument of the
    same name on a meter is the first one (callbacks and all): so each
    provider gets its instruments once, and their callbacks read the
    instrumentation that is active on that provider at collection (at most
    one: every recorder sees every event of the process, so two would count
    each call twice).
    """

    __slots__ = ("active", "histograms")

    def __init__(self, meter: Meter) -> None:
        self.active: list[Instrumentation] = []
        self.histograms: dict[str, Histogram] = {}
        first = True
        for spec in METRICS:
            if spec.kind == "histogram":
                self.histograms[spec.name] = meter.create_histogram(
                    spec.name,
                    unit=spec.unit,
                    description=spec.description,
                    explicit_bucket_boundaries_advisory=list(BOUNDS),
                )
                continue
            create: Callable[..., Any] = {
                "counter": meter.create_observable_counter,
                "gauge": meter.create_observable_gauge,
                "updown": meter.create_observable_up_down_counter,
            }[spec.kind]
            create(
                spec.name,
                callbacks=[self._callback(spec, hand_over=first)],
                unit=spec.unit,
                description=spec.description,
            )
            first = False

    def _callback(self, spec: MetricSpec, *, hand_over: bool) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            if hand_over:
                # The first callback of a collection runs before the SDK reads its
                # histograms: the durations handed over now are in this collection.
                for instrumentation in list(self.active):
                    self._hand_over(instrumentation.recorder)
            merged: dict[tuple[tuple[str, str], ...], float] = {}
            for instrumentation in list(self.active):
                recorder = instrumentation.recorder
                labels = spec.labels_for(recorder.entity_attributes)
                read = recorder.counter_values if spec.kind == "counter" else recorder.gauge_values
                for values, value in read(spec.name):
                    attributes = tuple(zip(labels, values, strict=True))
                    # One instrumentation per provider at a time (instrument() refuses a second); while
                    # one stops and another starts, their totals add up and a gauge read twice is one reading.
                    merged[attributes] = merged.get(attributes, 0) + value if spec.kind == "counter" else value
            return [Observation(value, dict(attributes)) for attributes, value in merged.items()]

        return observe

    def _hand_over(self, recorder: Recorder) -> None:
        for spec in METRICS:
            if spec.kind != "histogram":
                continue
            histogram = self.histograms[spec.name]
            labels = spec.labels_for(recorder.entity_attributes)
            for values, series in recorder.histogram_series(spec.name):
                sample, _seen = series.take()
                if sample:
                    attributes = label_dict(labels, values)
                    for value in sample:
                        histogram.record(value, attributes)


#: The instruments of each meter provider seen, by ``id`` (providers live as long as the process, as a rule).
_instruments: dict[int, tuple[object, _Instruments]] = {}
_instruments_lock = threading.Lock()


def _instruments_of(provider: object, meter: Meter) -> _Instruments:
    with _instruments_lock:
        found = _instruments.get(id(provider))
        if found is None or found[0] is not provider:
            found = _instruments[id(provider)] = (provider, _Instruments(meter))
        return found[1]


class Instrumentation:
    """What one :func:`instrument` call set up; ``uninstrument()`` stops it.

    Attributes:
        recorder: The in-process aggregate the instruments read.
    """

    __slots__ = ("_instruments", "recorder")

    def __init__(self, recorder: Recorder, instruments: _Instruments) -> None:
        self.recorder = recorder
        self._instruments = instruments

    @property
    def active(self) -> bool:
        """Whether the instrumentation still records and reports."""
        return self in self._instruments.active

    def watch(self, infra: AsyncInfrastructure) -> None:
        """Report the breakers and pools of ``infra`` too (gauges)."""
        self.recorder.watch(infra)

    def uninstrument(self) -> None:
        """Detach from seawall's events; the instruments stop reporting what this one recorded.

        OpenTelemetry cannot remove an instrument from a meter: the instruments
        stay (a later :func:`instrument` on the same provider reuses them) and
        report only what active instrumentations recorded.
        """
        self.recorder.stop()
        with _instruments_lock:
            if self in self._instruments.active:
                self._instruments.active.remove(self)

    def __repr__(self) -> str:
        return f"<Instrumentation {'active' if self.active else 'stopped'} recorder={self.recorder.name!r}>"


def instrument(
    infra: AsyncInfrastructure | None = None,
    /,
    *,
    meter_provider: MeterProvider | None = None,
    tracer_provider: TracerProvider | None = None,
    detail: Detail = "calls",
    entity_attributes: bool = False,
    span_events: bool = True,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
) -> Instrumentation:
    """Export seawall's metrics through OpenTelemetry, and add span events for rejections.

    Args:
        infra: An infrastructure whose breakers and pools the gauges report
            (more with :meth:`Instrumentation.watch`); without one the breaker
            state gauge follows the state changes seen in the events, and the
            pool gauges stay empty.
        meter_provider: Where the instruments are created; the global one when ``None``.
        tracer_provider: Accepted as OpenTelemetry instrumentors accept it;
            span events go to the current span, whichever provider made it.
        detail: ``"calls"`` (default): the protected calls, every rejection,
            timeout and state change, and the gauges, at about 2 us per
            protected call; ``"layers"``: also every allowed decision, every
            breaker outcome and the checkouts' wait and use times, at several
            microseconds more (what the primitives pay to emit those events).
        entity_attributes: Also label rate-limit series with the bucket's
            entity (``seawall.entity``): one series per client, so only for a
            bounded set of entities.
        span_events: Add span events to the current span (on by default).
        sample_size: Durations per histogram series handed over exactly
            between two collections; beyond that a uniform sample of that many.

    Returns:
        The :class:`Instrumentation`; call ``uninstrument()`` to stop it.

    Raises:
        ConfigurationError: A bad argument (named in the message), or a
            provider that an active instrumentation reports to already (each
            call would be counted twice: use :meth:`Instrumentation.watch`).
    """
    if meter_provider is not None and not callable(getattr(meter_provider, "get_meter", None)):
        raise ConfigurationTypeError(
            f"meter_provider: expected an OpenTelemetry MeterProvider, got {meter_provider!r}", path="meter_provider"
        )
    if tracer_provider is not None and not callable(getattr(tracer_provider, "get_tracer", None)):
        raise ConfigurationTypeError(
            f"tracer_provider: expected an OpenTelemetry TracerProvider, got {tracer_provider!r}",
            path="tracer_provider",
        )
    if not isinstance(span_events, bool):
        raise ConfigurationTypeError(f"span_events: expected a bool, got {span_events!r}", path="span_events")
    provider = meter_provider if meter_provider is not None else otel_metrics.get_meter_provider()
    recorder = Recorder(
        f"otel-{next(_ids)}",
        detail=detail,
        entity_attributes=entity_attributes,
        sample_size=sample_size,
        span_event=_add_span_event if span_events else None,
    )
    if infra is not None:
        recorder.watch(infra)
    instruments = _instruments_of(provider, provider.get_meter("seawall", __version__))
    instrumentation = Instrumentation(recorder, instruments)
    with _instruments_lock:
        if instruments.active:
            # Every recorder sees every event of the process: a second one would count each call twice.
            raise ConfigurationError(
                f"meter_provider: seawall is instrumented on this provider already ({instruments.active[0]!r}); "
                "call its .watch(infra) to report another infrastructure, or .uninstrument() it first",
                path="meter_provider",
            )
        instruments.active.append(instrumentation)
    try:
        recorder.start()
    except BaseException:
        instrumentation.uninstrument()  # detaches what was attached, and leaves the provider free again
        raise
    return instrumentation
