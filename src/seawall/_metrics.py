"""Metrics from seawall's telemetry events, aggregated in the process.

An exporter (``seawall.integrations.opentelemetry``, ``seawall.integrations.prometheus``)
owns one :class:`Recorder`. The recorder attaches one handler per event it
needs; each handler adds to a plain dict or list (tens of nanoseconds), and the
exporter reads the totals when its backend collects. Nothing on a protected
call's path calls into a metrics SDK: one OpenTelemetry SDK ``Counter.add``
costs several microseconds, more than the whole protected call.

What is kept:

* counters: ``{label values: total}`` per metric, cumulative, never reset;
* durations: per series, exact bucket counts, sum and count over
  :data:`BOUNDS` (Prometheus's cumulative ``le`` buckets), and optionally a
  bounded uniform sample (reservoir, Algorithm R) of the values seen since the
  last :meth:`Durations.take`, for exporters that can only be handed single
  values (the OpenTelemetry SDK has no way to record a pre-aggregated histogram);
* gauges: read at collection from the infrastructures given
  (``infra.circuit_breaker.names()``/``find()``, ``infra.connection_manager``:
  public registry APIs; ``infra.statistics()`` for the concurrency limits),
  else from the last breaker state and limit seen in the events.

Labels are bounded by default: a protection key, a breaker or pool name, a
layer, an outcome. A rate-limit bucket's entity (one per client) is a label
only with ``entity_attributes=True``.

Collection may run in another thread (a periodic exporting reader): it copies
dicts and lists in single C-level operations under the GIL, so it never sees a
dict change size under it; the event loop never waits for it.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from random import random
from typing import TYPE_CHECKING, Any, Final, Literal

from seawall._checks import count as check_count
from seawall._errors import ConfigurationError, ConfigurationTypeError
from seawall._telemetry import Event, attach, detach

if TYPE_CHECKING:
    from seawall._infrastructure import AsyncInfrastructure

__all__ = [
    "BOUNDS",
    "METRICS",
    "UNMETERED_EVENTS",
    "Durations",
    "MetricSpec",
    "Recorder",
    "prometheus_name",
    "split_bucket",
]

Kind = Literal["counter", "histogram", "gauge", "updown"]
Labels = tuple[str, ...]

#: Histogram bucket upper bounds, in seconds (waits and calls of 100 us to 10 s).
BOUNDS: Final[tuple[float, ...]] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

KEY = "seawall.key"
OUTCOME = "seawall.outcome"
LAYER = "seawall.layer"
ENTITY = "seawall.entity"
STATE = "seawall.circuit_breaker.state"
PREVIOUS = "seawall.circuit_breaker.previous_state"
POOL_STATE = "seawall.connection_pool.state"
CONCURRENCY_REASON = "seawall.concurrency_limiter.reason"
ERROR_TYPE = "error.type"
CHAOS_KIND = "seawall.chaos.kind"
RETRY_LIMIT = "seawall.retry.limit"
HEDGE_WINNER = "seawall.hedge.winner"
BACKEND = "seawall.backend"
BACKEND_REASON = "seawall.backend.reason"
BACKEND_OPERATION = "seawall.backend.operation"

BREAKER_STATES: Final = ("closed", "open", "half_open")


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric: its OpenTelemetry name, kind, unit, description and label names."""

    name: str
    kind: Kind
    unit: str
    description: str
    labels: Labels
    #: Whether ``seawall.entity`` is appended to the labels under ``entity_attributes=True``.
    entity: bool = False

    def labels_for(self, entity_attributes: bool) -> Labels:
        """The label names of this metric's series."""
        return (*self.labels, ENTITY) if self.entity and entity_attributes else self.labels


#: Every metric seawall exports, in the order the docs list them.
METRICS: Final[tuple[MetricSpec, ...]] = (
    MetricSpec(
        "seawall.calls",
        "counter",
        "{call}",
        "Protected calls that finished, by outcome (success, error).",
        (KEY, OUTCOME),
    ),
    MetricSpec(
        "seawall.call.duration",
        "histogram",
        "s",
        "Duration of protected calls, rate-limit decision to return, by outcome.",
        (KEY, OUTCOME),
    ),
    MetricSpec(
        "seawall.call.errors",
        "counter",
        "{call}",
        "Protected calls that raised, by error type (seawall's error_type, else the exception class).",
        (KEY, ERROR_TYPE),
    ),
    MetricSpec(
        "seawall.protection.triggered",
        "counter",
        "{call}",
        "Calls a protection layer stopped, by layer (rate_limiter, circuit_breaker, concurrency, connection_pool,"
        " timeout).",
        (KEY, LAYER),
    ),
    MetricSpec(
        "seawall.rate_limiter.decisions",
        "counter",
        "{decision}",
        "Rate-limit decisions, by outcome (allowed, denied).",
        (KEY, OUTCOME),
        entity=True,
    ),
    MetricSpec(
        "seawall.rate_limiter.errors",
        "counter",
        "{error}",
        "Rate-limit backend failures, by the on_error policy that decided instead (allow, deny, local).",
        (KEY, OUTCOME),
    ),
    MetricSpec(
        "seawall.circuit_breaker.calls",
        "counter",
        "{call}",
        "Calls through a breaker, by outcome (success, failure, excluded, cancelled, rejected) and state.",
        (KEY, OUTCOME, STATE),
    ),
    MetricSpec(
        "seawall.circuit_breaker.transitions",
        "counter",
        "{transition}",
        "Breaker state changes, by new and previous state.",
        (KEY, STATE, PREVIOUS),
    ),
    MetricSpec(
        "seawall.circuit_breaker.state",
        "gauge",
        "{state}",
        "1 for the state each breaker is in (as this process knows it), 0 for the other states.",
        (KEY, STATE),
    ),
    MetricSpec(
        "seawall.connection_pool.connection.count",
        "updown",
        "{connection}",
        "Connections (workers) of each pool, by state (idle, used).",
        (KEY, POOL_STATE),
    ),
    MetricSpec(
        "seawall.connection_pool.connection.max",
        "updown",
        "{connection}",
        "The most connections each pool may hold (size + max_overflow).",
        (KEY,),
    ),
    MetricSpec(
        "seawall.connection_pool.pending_requests",
        "updown",
        "{request}",
        "Checkouts waiting for a connection.",
        (KEY,),
    ),
    MetricSpec(
        "seawall.connection_pool.timeouts",
        "counter",
        "{timeout}",
        "Checkouts that gave up waiting (PoolTimeout).",
        (KEY,),
    ),
    MetricSpec(
        "seawall.connection_pool.wait_time",
        "histogram",
        "s",
        "Time a checkout waited for a connection.",
        (KEY,),
    ),
    MetricSpec(
        "seawall.connection_pool.use_time",
        "histogram",
        "s",
        "Time a connection stayed checked out.",
        (KEY,),
    ),
    MetricSpec(
        "seawall.concurrency_limiter.rejections",
        "counter",
        "{call}",
        "Calls a concurrency limiter refused, by reason (limit, max_waiting, shed, timeout).",
        (KEY, CONCURRENCY_REASON),
    ),
    MetricSpec(
        "seawall.concurrency_limiter.limit",
        "gauge",
        "{call}",
        "The limit on calls in flight each concurrency limiter applies now.",
        (KEY,),
    ),
    MetricSpec(
        "seawall.chaos.injections",
        "counter",
        "{injection}",
        "Faults and latencies injected by a key's chaos section, by kind.",
        (KEY, CHAOS_KIND),
    ),
    MetricSpec(
        "seawall.retry.attempts",
        "counter",
        "{retry}",
        "Retries scheduled (attempts after the first).",
        (KEY,),
    ),
    MetricSpec(
        "seawall.retry.gave_up",
        "counter",
        "{call}",
        "Retrying calls that ran out of attempts or time, by limit (attempts, deadline).",
        (KEY, RETRY_LIMIT),
    ),
    MetricSpec(
        "seawall.retry.budget_exhausted",
        "counter",
        "{retry}",
        "Retries the retry budget refused.",
        (KEY,),
    ),
    MetricSpec(
        "seawall.hedge.started",
        "counter",
        "{hedge}",
        "Hedges started (attempts raced against a slow one).",
        (KEY,),
    ),
    MetricSpec(
        "seawall.hedge.won",
        "counter",
        "{call}",
        "Races with a hedge in them, by winner (first: the first attempt, hedge: a hedge).",
        (KEY, HEDGE_WINNER),
    ),
    MetricSpec(
        "seawall.backend.errors",
        "counter",
        "{error}",
        "Failures of a shared backend (Redis), by backend, reason (timeout, connection...) and operation.",
        (BACKEND, BACKEND_REASON, BACKEND_OPERATION),
    ),
)

#: The events that feed no metric: ``execute_stop`` carries the same call with its duration.
UNMETERED_EVENTS: Final[frozenset[Event]] = frozenset({("seawall", "infrastructure", "execute_start")})

_BY_NAME: Final = {spec.name: spec for spec in METRICS}


def prometheus_name(spec: MetricSpec) -> str:
    """The Prometheus name of ``spec``, as OpenTelemetry's Prometheus exporter would spell it."""
    base = spec.name.replace(".", "_")
    if spec.unit == "s":
        base += "_seconds"
    return base


def split_bucket(bucket: str) -> tuple[str | None, str]:
    r"""``(operation, entity)`` of a coordinator bucket key ``"<operation>:<entity>"`` (see ``bucket_key``).

    The operation's ``\`` and ``:`` are backslash-escaped; a key with no
    unescaped ``:`` (a standalone limiter's own key) has no operation.
    """
    if "\\" not in bucket:
        operation, colon, entity = bucket.partition(":")
        return (operation, entity) if colon else (None, bucket)
    chars: list[str] = []
    index = 0
    while index < len(bucket):
        char = bucket[index]
        if char == "\\" and index + 1 < len(bucket):
            chars.append(bucket[index + 1])
            index += 2
            continue
        if char == ":":
            return "".join(chars), bucket[index + 1 :]
        chars.append(char)
        index += 1
    return None, bucket


class Durations:
    """One histogram series: its count and sum, exact buckets over :data:`BOUNDS`, a bounded sample.

    Args:
        buckets: Keep bucket counts (what a Prometheus histogram exposes).
        sample_size: Keep a uniform sample of at most this many of the values
            observed since the last :meth:`take` (0: none); beyond that,
            Algorithm L (Li, 1994) picks which to keep with one decrement per value.
    """

    __slots__ = ("_skip", "_weight", "buckets", "count", "sample", "sample_size", "seen", "sum")

    def __init__(self, *, buckets: bool, sample_size: int) -> None:
        self.buckets: list[int] | None = [0] * (len(BOUNDS) + 1) if buckets else None  # the last one is +Inf
        self.count = 0
        self.sum = 0.0
        self.sample_size = sample_size
        self.sample: list[float] = []
        self.seen = 0
        self._skip = 0
        self._weight = 1.0

    def observe(self, value: float) -> None:
        """Add one duration (seconds)."""
        self.count += 1
        self.sum += value
        buckets = self.buckets
        if buckets is not None:
            buckets[bisect_left(BOUNDS, value)] += 1
        if self.sample_size:
            self.seen += 1
            sample = self.sample
            if len(sample) < self.sample_size:
                sample.append(value)
                if len(sample) == self.sample_size:
                    self._next_skip(first=True)
            elif self._skip:
                self._skip -= 1
            else:
                sample[int(random() * self.sample_size)] = value
                self._next_skip(first=False)

    def _next_skip(self, *, first: bool) -> None:
        # Algorithm L: the number of values to pass over before the next one kept.
        size = self.sample_size
        if first:
            self._weight = math.exp(math.log(random() or _TINY) / size)
        else:
            self._weight *= math.exp(math.log(random() or _TINY) / size)
        weight = self._weight
        self._skip = int(math.log(random() or _TINY) / math.log1p(-weight)) if weight < 1.0 else 0

    def take(self) -> tuple[list[float], int]:
        """The sample since the last take and how many values it stands for; starts a new one."""
        sample, seen = self.sample, self.seen
        self.sample = []
        self.seen = 0
        self._skip = 0
        return sample, seen

    def snapshot(self) -> tuple[list[int], int, float]:
        """Bucket counts (not cumulative; empty without buckets), count and sum, copied."""
        return list(self.buckets or ()), self.count, self.sum


_TINY = 1e-300


#: Bucket keys whose labels are cached at most (a cache of per-entity buckets must not grow forever).
_MAX_CACHED_BUCKETS = 4096


#: The per-call events of the layers, recorded only with ``detail="layers"``.
LAYER_EVENTS: Final[tuple[Event, ...]] = (
    ("seawall", "rate_limiter", "request_allowed"),
    ("seawall", "circuit_breaker", "call_executed"),
    ("seawall", "connection_pool", "checkout"),
    ("seawall", "connection_pool", "checkin"),
)

#: The metrics fed only by :data:`LAYER_EVENTS` (empty with ``detail="calls"``).
LAYER_METRICS: Final = frozenset({"seawall.connection_pool.wait_time", "seawall.connection_pool.use_time"})

Detail = Literal["calls", "layers"]
_Handler = Callable[[Event, dict[str, Any], dict[str, Any]], None]


class Recorder:
    """Aggregates seawall's telemetry events for an exporter.

    Args:
        name: A name for the recorder's handler ids (``seawall.metrics.<name>.*``).
        detail: ``"calls"`` (default) records the protected calls (count,
            duration, errors), every rejection, denial, timeout and state
            change, and the gauges; ``"layers"`` also records every allowed
            rate-limit decision, every breaker outcome and every checkout's wait
            and use time. The layers' per-call events cost what the primitives
            pay to build them (several microseconds per call, see
            ``benchmarks/bench_observability.py``), so they are opt-in.
        entity_attributes: Label rate-limit series with the bucket's entity too.
        buckets: Keep exact bucket counts per histogram series (Prometheus).
        sample_size: Durations per series kept between two :meth:`Durations.take` (0: none).
        span_event: Called with ``(name, attributes)`` on rejections and state
            changes (``None``: nothing is called).
    """

    def __init__(
        self,
        name: str,
        *,
        detail: Detail = "calls",
        entity_attributes: bool = False,
        buckets: bool = False,
        sample_size: int = 0,
        span_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        if not isinstance(entity_attributes, bool):
            raise ConfigurationTypeError(
                f"entity_attributes: expected a bool, got {entity_attributes!r}", path="entity_attributes"
            )
        if detail not in ("calls", "layers"):
            raise ConfigurationError(f"detail: expected 'calls' or 'layers', got {detail!r}", path="detail")
        self.name = name
        self.detail: Detail = detail
        self.entity_attributes = entity_attributes
        self.buckets = buckets
        self.sample_size = check_count(sample_size, "sample_size", minimum=0, maximum=1_000_000)
        self._span_event = span_event
        self.counters: dict[str, dict[tuple[str, ...], int]] = {
            spec.name: {} for spec in METRICS if spec.kind == "counter"
        }
        self.histograms: dict[str, dict[tuple[str, ...], Durations]] = {
            spec.name: {} for spec in METRICS if spec.kind == "histogram"
        }
        self._sources: list[AsyncInfrastructure] = []
        self._breaker_states: dict[str, str] = {}
        self._concurrency_limits: dict[str, int] = {}
        self._bucket_labels: dict[tuple[str, str | None], tuple[str, ...]] = {}
        self._handler_ids: list[str] = []

    # -- lifecycle ---------------------------------------------------------

    def watch(self, infra: AsyncInfrastructure) -> None:
        """Read the breakers and pools of ``infra`` for the gauges."""
        from seawall._infrastructure import AsyncInfrastructure

        if not isinstance(infra, AsyncInfrastructure):
            raise ConfigurationTypeError(f"infra: expected an AsyncInfrastructure, got {infra!r}", path="infra")
        if all(found is not infra for found in self._sources):
            self._sources.append(infra)

    def start(self) -> None:
        """Attach the handlers (once)."""
        if self._handler_ids:
            return
        prefix = f"seawall.metrics.{self.name}"
        for event, handler in self._handlers():
            if self.detail == "calls" and event in LAYER_EVENTS:
                continue
            handler_id = f"{prefix}.{'.'.join(event[1:])}"
            attach(handler_id, event, handler)
            self._handler_ids.append(handler_id)

    def stop(self) -> None:
        """Detach the handlers; the totals so far stay readable."""
        for handler_id in self._handler_ids:
            detach(handler_id)
        self._handler_ids.clear()

    @property
    def attached(self) -> bool:
        """Whether the handlers are attached."""
        return bool(self._handler_ids)

    def _series(self, metric: str) -> Callable[[tuple[str, ...]], Durations]:
        """A function returning the (new or existing) series of histogram ``metric`` with those labels."""
        series = self.histograms[metric]
        buckets, sample_size = self.buckets, self.sample_size

        def get(labels: tuple[str, ...]) -> Durations:
            found = series.get(labels)
            if found is None:
                found = series[labels] = Durations(buckets=buckets, sample_size=sample_size)
            return found

        return get

    def _handlers(self) -> Iterator[tuple[Event, _Handler]]:
        # The per-call handlers are closures over their dicts: a handler is on
        # the protected call's path, so it does a few dict operations and nothing else.
        calls = self.counters["seawall.calls"]
        call_duration = self._series("seawall.call.duration")

        def on_execute_stop(_event: Event, measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
            labels = (metadata["key"], "success" if metadata["success"] else "error")
            calls[labels] = calls.get(labels, 0) + 1
            call_duration(labels).observe(measurements["duration"])

        decisions = self.counters["seawall.rate_limiter.decisions"]
        limiter_labels = self._limiter_labels

        def on_allowed(_event: Event, _measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
            labels = limiter_labels(metadata, "allowed")
            decisions[labels] = decisions.get(labels, 0) + 1

        breaker_calls = self.counters["seawall.circuit_breaker.calls"]

        def on_breaker_call(_event: Event, _measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
            labels = (metadata["name"], metadata["outcome"], "half_open" if metadata["trial"] else "closed")
            breaker_calls[labels] = breaker_calls.get(labels, 0) + 1

        wait_time = self._series("seawall.connection_pool.wait_time")
        use_time = self._series("seawall.connection_pool.use_time")

        def on_checkout(_event: Event, measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
            wait_time((metadata["pool"],)).observe(measurements["wait"])

        def on_checkin(_event: Event, measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
            use_time((metadata["pool"],)).observe(measurements["held"])

        yield ("seawall", "infrastructure", "execute_stop"), on_execute_stop
        yield ("seawall", "infrastructure", "execute_exception"), self._on_execute_exception
        yield ("seawall", "infrastructure", "protection_triggered"), self._on_triggered
        yield ("seawall", "rate_limiter", "request_allowed"), on_allowed
        yield ("seawall", "rate_limiter", "request_denied"), self._on_denied
        yield ("seawall", "rate_limiter", "rate_limiter_exception"), self._on_limiter_error
        yield ("seawall", "circuit_breaker", "call_executed"), on_breaker_call
        yield ("seawall", "circuit_breaker", "call_rejected"), self._on_breaker_rejected
        yield ("seawall", "circuit_breaker", "state_changed"), self._on_state_changed
        yield ("seawall", "circuit_breaker", "fuse_installed"), self._on_fuse_installed
        yield ("seawall", "connection_pool", "checkout"), on_checkout
        yield ("seawall", "connection_pool", "checkin"), on_checkin
        yield ("seawall", "connection_pool", "timeout"), self._on_pool_timeout
        yield ("seawall", "concurrency_limiter", "call_rejected"), self._on_concurrency_rejected
        yield ("seawall", "concurrency_limiter", "limit_changed"), self._on_concurrency_limit
        yield ("seawall", "chaos", "injected"), self._on_chaos
        yield ("seawall", "retry", "attempt"), self._on_retry_attempt
        yield ("seawall", "retry", "gave_up"), self._on_retry_gave_up
        yield ("seawall", "retry", "budget_exhausted"), self._on_retry_budget_exhausted
        yield ("seawall", "hedge", "started"), self._on_hedge_started
        yield ("seawall", "hedge", "won"), self._on_hedge_won
        yield ("seawall", "backend", "error"), self._on_backend_error

    # -- the handlers of rarer events --------------------------------------------

    def _add(self, metric: str, labels: tuple[str, ...]) -> None:
        totals = self.counters[metric]
        totals[labels] = totals.get(labels, 0) + 1

    def _on_execute_exception(self, _event: Event, _measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        self._add("seawall.call.errors", (metadata["key"], str(metadata.get("error_type") or metadata.get("kind"))))

    def _on_triggered(self, _event: Event, _measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        key, layer = str(metadata["key"]), str(metadata["layer"])
        self._add("seawall.protection.triggered", (key, layer))
        if layer == "timeout" and self._span_event is not None:
            # The primitives report their own rejections; the timeout is the coordinator's.
            self._span_event("seawall.timeout", {KEY: key, LAYER: layer})

    def _limiter_labels(self, metadata: dict[str, Any], outcome: str) -> tuple[str, ...]:
        bucket: str = metadata["key"]
        name: str | None = metadata.get("name")
        cached = self._bucket_labels.get((bucket, name))
        if cached is None:
            operation, entity = split_bucket(bucket)
            key = operation if operation is not None else (name or "rate_limiter")
            cached = (key, entity) if self.entity_attributes else (key,)
            if len(self._bucket_labels) >= _MAX_CACHED_BUCKETS:
                self._bucket_labels.clear()
            self._bucket_labels[bucket, name] = cached
        if self.entity_attributes:
            return (cached[0], outcome, cached[1])
        return (cached[0], outcome)

    def _on_denied(self, _event: Event, measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        labels = self._limiter_labels(metadata, "denied")
        self._add("seawall.rate_limiter.decisions", labels)
        if self._span_event is not None:
            attributes: dict[str, Any] = {KEY: labels[0], "seawall.retry_after": float(measurements["retry_after"])}
            if self.entity_attributes:
                attributes[ENTITY] = labels[2]
            self._span_event("seawall.rate_limiter.denied", attributes)

    def _on_limiter_error(self, _event: Event, _measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        operation = metadata.get("operation")
        key = operation if isinstance(operation, str) else self._limiter_labels(metadata, "")[0]
        self._add("seawall.rate_limiter.errors", (key, str(metadata.get("policy"))))

    def _on_breaker_rejected(self, _event: Event, measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        name, state = str(metadata["name"]), str(metadata["state"])
        self._add("seawall.circuit_breaker.calls", (name, "rejected", state))
        if self._span_event is not None:
            self._span_event(
                "seawall.circuit_breaker.rejected",
                {KEY: name, STATE: state, "seawall.retry_after": float(measurements.get("retry_after") or 0.0)},
            )

    def _on_state_changed(self, _event: Event, _measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        name, new, old = str(metadata["name"]), str(metadata["to"]), str(metadata["from"])
        self._breaker_states[name] = new
        self._add("seawall.circuit_breaker.transitions", (name, new, old))
        if self._span_event is not None:
            self._span_event("seawall.circuit_breaker.state_changed", {KEY: name, STATE: new, PREVIOUS: old})

    def _on_fuse_installed(self, _event: Event, _measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        self._breaker_states.setdefault(str(metadata["name"]), "closed")

    def _on_pool_timeout(self, _event: Event, measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        pool = str(metadata["pool"])
        self._add("seawall.connection_pool.timeouts", (pool,))
        if self._span_event is not None:
            wait = float(measurements["duration"])
            self._span_event("seawall.connection_pool.timeout", {KEY: pool, "seawall.wait": wait})

    def _on_concurrency_rejected(self, _event: Event, _measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        key, reason = _concurrency_key(metadata), str(metadata["reason"])
        self._add("seawall.concurrency_limiter.rejections", (key, reason))
        if self._span_event is not None:
            attributes = {KEY: key, CONCURRENCY_REASON: reason, "seawall.priority": int(metadata["priority"])}
            self._span_event("seawall.concurrency_limiter.rejected", attributes)

    def _on_concurrency_limit(self, _event: Event, measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        self._concurrency_limits[_concurrency_key(metadata)] = int(measurements["limit"])

    def _on_chaos(self, _event: Event, _measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        self._add("seawall.chaos.injections", (str(metadata["key"]), str(metadata["kind"])))

    def _on_retry_attempt(self, _event: Event, _measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        self._add("seawall.retry.attempts", (str(metadata["key"]),))

    def _on_retry_gave_up(self, _event: Event, _measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        self._add("seawall.retry.gave_up", (str(metadata["key"]), str(metadata.get("limit"))))

    def _on_retry_budget_exhausted(
        self, _event: Event, _measurements: dict[str, Any], metadata: dict[str, Any]
    ) -> None:
        self._add("seawall.retry.budget_exhausted", (str(metadata["key"]),))

    def _on_hedge_started(self, _event: Event, _measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        self._add("seawall.hedge.started", (str(metadata["key"]),))

    def _on_hedge_won(self, _event: Event, _measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        self._add("seawall.hedge.won", (str(metadata["key"]), "hedge" if metadata["attempt"] else "first"))

    def _on_backend_error(self, _event: Event, _measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        # No key: a limiter's bucket name holds its entity (unbounded); backend, reason and operation are few.
        labels = (str(metadata.get("backend")), str(metadata.get("reason")), str(metadata.get("operation")))
        self._add("seawall.backend.errors", labels)

    # -- collection ----------------------------------------------------------

    def counter_values(self, metric: str) -> list[tuple[tuple[str, ...], int]]:
        """``(label values, total)`` of every series of counter ``metric``."""
        return list(self.counters[metric].copy().items())

    def histogram_series(self, metric: str) -> list[tuple[tuple[str, ...], Durations]]:
        """``(label values, durations)`` of every series of histogram ``metric``."""
        return list(self.histograms[metric].copy().items())

    def breaker_states(self) -> dict[str, str]:
        """Each breaker's state: from the watched infrastructures, else the last one seen in the events."""
        states = self._breaker_states.copy()
        for infra in self._sources:
            registry = infra.circuit_breaker
            for name in registry.names():
                breaker = registry.find(name)
                if breaker is None:
                    continue
                try:
                    states[name] = breaker.state.value
                except RuntimeError:
                    # Read from another thread (a periodic exporter) under trio, whose
                    # clock only answers in its own thread: the last state seen stays.
                    states.setdefault(name, "closed")
        return states

    def pool_statuses(self) -> dict[str, Any]:
        """Each watched pool's :class:`~seawall.PoolStatus`, by the name it is registered under."""
        statuses: dict[str, Any] = {}
        for infra in self._sources:
            manager = infra.connection_manager
            for name in manager.list_pools():
                pool = manager.find(name)
                if pool is not None:
                    statuses[name] = pool.status()
        return statuses

    def concurrency_limits(self) -> dict[str, int]:
        """Each concurrency limiter's limit: from the watched infrastructures, else the last one seen in the events."""
        limits = self._concurrency_limits.copy()
        for infra in self._sources:
            try:
                keys = infra.statistics().keys
            except RuntimeError:
                # Read from another thread under trio (a breaker's state reads trio's clock,
                # which only answers in its own thread): the limits last seen in the events stay.
                continue
            for key in keys:
                if key.concurrency is not None:
                    limits[key.key] = key.concurrency.limit
        return limits

    def gauge_values(self, metric: str) -> list[tuple[tuple[str, ...], float]]:
        """``(label values, value)`` of gauge (or up-down) ``metric``, read now."""
        if metric == "seawall.concurrency_limiter.limit":
            return [((name,), float(limit)) for name, limit in sorted(self.concurrency_limits().items())]
        if metric == "seawall.circuit_breaker.state":
            return [
                ((name, state), 1.0 if state == current else 0.0)
                for name, current in sorted(self.breaker_states().items())
                for state in BREAKER_STATES
            ]
        pools = sorted(self.pool_statuses().items())
        if metric == "seawall.connection_pool.connection.count":
            return [
                ((name, state), float(value))
                for name, status in pools
                for state, value in (("idle", status.idle), ("used", status.in_use))
            ]
        if metric == "seawall.connection_pool.connection.max":
            return [((name,), float(status.size + status.max_overflow)) for name, status in pools]
        if metric == "seawall.connection_pool.pending_requests":
            return [((name,), float(status.waiting)) for name, status in pools]
        raise KeyError(metric)


def _concurrency_key(metadata: dict[str, Any]) -> str:
    """The ``seawall.key`` of a concurrency limiter's event: its name (the key in the coordinator)."""
    name = metadata.get("name")
    return "concurrency_limiter" if name is None else str(name)


def spec(name: str) -> MetricSpec:
    """The :class:`MetricSpec` named ``name``."""
    return _BY_NAME[name]


def label_dict(labels: Iterable[str], values: Iterable[str]) -> dict[str, str]:
    """``{label: value}`` of one series."""
    return dict(zip(labels, values, strict=True))
