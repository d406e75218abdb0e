"""Telemetry: attach, detach, emit, list, and failing handlers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from seawall import telemetry
from seawall._telemetry import ANY_HANDLER, LIMITER_REQUEST_ALLOWED, topic
from seawall.testing import capture_events

EVENT = ("tests", "telemetry", "ping")
OTHER = ("tests", "telemetry", "pong")


@pytest.fixture(autouse=True)
def _detach_test_handlers() -> Iterator[None]:
    yield
    for info in telemetry.list_handlers(("tests",)):
        telemetry.detach(info.id)


def test_attached_handler_receives_event_measurements_and_metadata() -> None:
    """A handler gets the event tuple and the emitted dicts."""
    received: list[tuple[Any, ...]] = []
    telemetry.attach("h1", EVENT, lambda e, m, md: received.append((e, m, md)))
    telemetry.execute(EVENT, {"duration": 0.5}, {"key": "k"})
    assert received == [(EVENT, {"duration": 0.5}, {"key": "k"})]


def test_handler_attached_to_several_events_gets_each() -> None:
    """One handler id may listen to a list of events."""
    names: list[str] = []
    telemetry.attach("h1", [EVENT, OTHER], lambda e, m, md: names.append(e[-1]))
    telemetry.execute(EVENT, {}, {})
    telemetry.execute(OTHER, {}, {})
    telemetry.execute(("tests", "telemetry", "unrelated"), {}, {})
    assert names == ["ping", "pong"]


def test_attaching_the_same_id_twice_is_an_error() -> None:
    """A duplicate handler id raises and leaves the first handler in place."""
    calls: list[int] = []
    telemetry.attach("dup", EVENT, lambda e, m, md: calls.append(1))
    with pytest.raises(ValueError, match="'dup' is attached already"):
        telemetry.attach("dup", OTHER, lambda e, m, md: calls.append(2))
    telemetry.execute(EVENT, {}, {})
    telemetry.execute(OTHER, {}, {})
    assert calls == [1]


def test_detach_stops_delivery_and_reports_whether_it_was_attached() -> None:
    """After detach the handler gets nothing; detaching twice returns False."""
    calls: list[int] = []
    telemetry.attach("h", EVENT, lambda e, m, md: calls.append(1))
    assert telemetry.detach("h") is True
    assert telemetry.detach("h") is False
    telemetry.execute(EVENT, {}, {})
    assert calls == []


def test_raising_handler_is_detached_logged_and_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    """A failing handler is removed and logged; the emitting call and other handlers carry on."""
    calls: list[str] = []

    def broken(event: Any, measurements: Any, metadata: Any) -> None:
        raise RuntimeError("handler bug")

    telemetry.attach("broken", EVENT, broken)
    telemetry.attach("good", EVENT, lambda e, m, md: calls.append("good"))
    with caplog.at_level(logging.ERROR, logger="seawall"):
        telemetry.execute(EVENT, {}, {})  # must not raise
    assert calls == ["good"]
    assert [info.id for info in telemetry.list_handlers(EVENT)] == ["good"]
    assert "telemetry_handler_failed" in caplog.text
    assert "broken" in caplog.text
    assert "handler bug" in caplog.text


def test_list_handlers_filters_by_prefix() -> None:
    """list_handlers(prefix) returns only handlers of events under that prefix."""
    telemetry.attach("a", EVENT, lambda e, m, md: None)
    telemetry.attach("b", ("tests", "other", "x"), lambda e, m, md: None)
    assert {i.id for i in telemetry.list_handlers(("tests", "telemetry"))} == {"a"}
    assert {i.id for i in telemetry.list_handlers(("tests",))} == {"a", "b"}


@pytest.mark.parametrize(
    ("events", "handler", "error"),
    [
        ("not-a-tuple", lambda e, m, md: None, TypeError),
        ([("ok",), ("bad", 1)], lambda e, m, md: None, TypeError),
        ([], lambda e, m, md: None, ValueError),
        (EVENT, "not callable", TypeError),
    ],
)
def test_attach_rejects_bad_input(events: Any, handler: Any, error: type[Exception]) -> None:
    """Events must be tuples of str, the handler callable, and at least one event given."""
    with pytest.raises(error):
        telemetry.attach("bad", events, handler)
    assert telemetry.detach("bad") is False


def test_attach_rejects_non_str_id() -> None:
    """Handler ids are strings."""
    with pytest.raises(TypeError, match="handler_id"):
        telemetry.attach(1, EVENT, lambda e, m, md: None)  # type: ignore[arg-type]


def test_handler_may_detach_itself_during_delivery() -> None:
    """Delivery iterates a snapshot, so a handler detaching itself mid-emit is safe."""
    calls: list[str] = []

    def once(event: Any, measurements: Any, metadata: Any) -> None:
        calls.append("once")
        telemetry.detach("once")

    telemetry.attach("once", EVENT, once)
    telemetry.attach("after", EVENT, lambda e, m, md: calls.append("after"))
    telemetry.execute(EVENT, {}, {})
    telemetry.execute(EVENT, {}, {})
    assert calls == ["once", "after", "after"]


def test_topic_guard_is_false_without_handlers_and_true_with() -> None:
    """The cheap guard primitives use reflects attachment exactly."""
    event_topic = topic(("tests", "telemetry", "guard"))
    assert not event_topic.handlers
    telemetry.attach("g", event_topic.event, lambda e, m, md: None)
    assert event_topic.handlers
    telemetry.detach("g")
    assert not event_topic.handlers


def test_any_handler_flag_follows_attach_and_detach() -> None:
    """ANY_HANDLER.attached is True exactly while some handler is attached to some event."""
    assert telemetry.list_handlers() == []
    assert ANY_HANDLER.attached is False
    telemetry.attach("a", EVENT, lambda e, m, md: None)
    telemetry.attach("b", OTHER, lambda e, m, md: None)
    assert ANY_HANDLER.attached is True
    assert repr(ANY_HANDLER) == "AnyHandler(attached=True)"
    telemetry.detach("a")
    assert ANY_HANDLER.attached is True
    assert telemetry.detach("missing") is False
    telemetry.detach("b")
    assert ANY_HANDLER.attached is False
    with capture_events():
        assert ANY_HANDLER.attached is True
    assert ANY_HANDLER.attached is False


def test_attach_from_many_threads_keeps_every_handler() -> None:
    """Concurrent attaches from threads lose no handler."""

    def attach_one(i: int) -> None:
        telemetry.attach(f"t{i}", EVENT, lambda e, m, md: None)

    threads = [threading.Thread(target=attach_one, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(telemetry.list_handlers(EVENT)) == 50


def test_capture_events_collects_seawall_events_and_detaches_after() -> None:
    """testing.capture_events records events emitted inside the block only."""
    with capture_events() as events:
        LIMITER_REQUEST_ALLOWED.emit({"count": 1}, {"key": "k"})
    LIMITER_REQUEST_ALLOWED.emit({"count": 2}, {"key": "k"})
    assert [(e.name, e.measurements, e.metadata) for e in events] == [("request_allowed", {"count": 1}, {"key": "k"})]
    assert not LIMITER_REQUEST_ALLOWED.handlers


def test_every_contract_event_is_known() -> None:
    """ALL_EVENTS lists each event the contract names."""
    expected = {
        ("seawall", "infrastructure", name)
        for name in ("execute_start", "execute_stop", "execute_exception", "protection_triggered")
    }
    expected |= {
        ("seawall", "rate_limiter", name) for name in ("request_allowed", "request_denied", "rate_limiter_exception")
    }
    expected |= {
        ("seawall", "circuit_breaker", name)
        for name in ("call_executed", "call_rejected", "fuse_installed", "state_changed")
    }
    expected |= {("seawall", "connection_pool", name) for name in ("checkout", "checkin", "timeout")}
    expected |= {("seawall", "concurrency_limiter", name) for name in ("call_rejected", "limit_changed")}
    expected |= {("seawall", "chaos", "injected")}
    expected |= {("seawall", "retry", name) for name in ("attempt", "gave_up", "budget_exhausted")}
    expected |= {("seawall", "hedge", name) for name in ("started", "won")}
    expected |= {("seawall", "backend", "error")}  # a shared backend's failure, with its reason (Redis for fleets)
    assert set(telemetry.ALL_EVENTS) == expected
