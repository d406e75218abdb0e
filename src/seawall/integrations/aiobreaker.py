"""Use an existing ``aiobreaker.CircuitBreaker`` wherever seawall takes a breaker.

:func:`adapt` wraps it in an :class:`AiobreakerAdapter` with the surface of
:class:`seawall.CircuitBreaker`: ``async with``, ``await call(fn, ...)``,
``@adapter``, ``name``, ``state``, ``status()``, ``reset()``, ``trip()``.
aiobreaker's engine still decides (its counters, its storage) and its
listeners are still called; seawall adds, at the boundary:

* ``CircuitOpenError`` (``name``, ``retry_after``) instead of
  ``aiobreaker.CircuitBreakerError``, with ``retry_after`` computed in UTC
  throughout (aiobreaker's own ``time_remaining`` mixes local and UTC time);
* the caller's own exception when a failure trips the breaker (aiobreaker
  raises ``CircuitBreakerError`` from it instead);
* seawall telemetry and logs: ``fuse_installed`` when the adapter is made,
  ``call_executed``, ``call_rejected``, and ``state_changed`` through a
  listener added to the wrapped breaker.

One call is counted once, however many layers it passes through (the rule
of aiobreaker's own ``call()`` for functions its decorator made, extended to
every layer): the adapter keeps its calls per task, so a layer of the same
adapter entered inside one of its calls (``async with adapter`` around an
``@adapter`` function, ``adapter.call(guarded)``, the coordinator around
either) runs without deciding anything, and when aiobreaker itself decides
inside an adapter call - an ``@breaker`` function of the wrapped breaker, or
its ``call_async`` - the adapter's listener sees that outcome and the adapter
does not count the call again. An ``aiobreaker.CircuitBreakerError`` coming
out of the guarded code is the breaker's own verdict, never a failure.

aiobreaker's semantics stay its own: it counts consecutive failures, and it
lets every call through once its timeout has passed (no trial limit). Use
:class:`seawall.CircuitBreaker` where that matters. Requires the
``aiobreaker`` extra; once this module is imported,
``infra.circuit_breaker.register(name, breaker)`` adapts an aiobreaker breaker
by itself.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from seawall._extras import missing_extra

try:
    import aiobreaker
except ModuleNotFoundError as exc:
    raise missing_extra(exc, __name__) from exc

from seawall._breaker import BreakerState, BreakerStatus, _task_key
from seawall._clock import Clock, default_clock
from seawall._errors import CircuitOpenError
from seawall._logging import logger
from seawall._registries import BREAKER_ADAPTERS
from seawall._telemetry import (
    BREAKER_CALL_EXECUTED,
    BREAKER_CALL_REJECTED,
    BREAKER_FUSE_INSTALLED,
    BREAKER_STATE_CHANGED,
)

__all__ = ["AiobreakerAdapter", "adapt"]

P = ParamSpec("P")
T = TypeVar("T")

_STATES = {
    aiobreaker.CircuitBreakerState.CLOSED: BreakerState.CLOSED,
    aiobreaker.CircuitBreakerState.OPEN: BreakerState.OPEN,
    aiobreaker.CircuitBreakerState.HALF_OPEN: BreakerState.HALF_OPEN,
}


def _utcnow_naive() -> datetime:
    # aiobreaker stores ``opened_at`` as a naive UTC datetime (``utcnow()``);
    # compare like with like, without the deprecated ``utcnow()``.
    return datetime.now(UTC).replace(tzinfo=None)


class _StateListener(aiobreaker.CircuitBreakerListener):  # type: ignore[misc]
    """Reports the wrapped breaker's state changes as seawall logs and telemetry, and its verdicts to the adapter."""

    def __init__(self, adapter: AiobreakerAdapter) -> None:
        self.adapter = adapter

    def state_change(self, breaker: Any, old: Any, new: Any) -> None:
        self.adapter._changed(
            _STATES[old.state] if old is not None else None,
            _STATES[new.state],
        )

    # aiobreaker calls these when it has counted an outcome; inside an adapter
    # call that outcome is the call's, and the adapter must not count it again.
    def success(self, breaker: Any) -> None:
        self.adapter._decided()

    def failure(self, breaker: Any, exception: Exception) -> None:
        self.adapter._decided()


class _Call:
    """One adapter call in flight: the aiobreaker state it entered, when, and whether aiobreaker decided it."""

    __slots__ = ("decided", "start", "state")

    def __init__(self, state: Any, start: float) -> None:
        self.state = state
        self.start = start
        self.decided = False


class AiobreakerAdapter:
    """An ``aiobreaker.CircuitBreaker`` with :class:`seawall.CircuitBreaker`'s surface.

    Args:
        breaker: The aiobreaker breaker to wrap; it keeps working on its own too.
        name: The name used in errors, logs and telemetry; the breaker's own
            ``name`` when omitted, else ``"aiobreaker"``.
        clock: Times ``call_executed`` durations (the decisions are aiobreaker's).
    """

    __slots__ = ("_breaker", "_calls", "_clock", "_listener", "name")

    def __init__(self, breaker: aiobreaker.CircuitBreaker, *, name: str | None = None, clock: Clock | None = None):
        if not isinstance(breaker, aiobreaker.CircuitBreaker):
            raise TypeError(f"expected an aiobreaker.CircuitBreaker, got {breaker!r}")
        if name is None:
            name = breaker.name or "aiobreaker"
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        self._breaker = breaker
        self.name: str = name
        self._clock = default_clock if clock is None else clock
        # Per task: its outermost adapter call, then None for each layer of
        # this adapter entered inside it (they ride on that call).
        self._calls: dict[object, list[_Call | None]] = {}
        self._listener = _StateListener(self)
        breaker.add_listener(self._listener)
        if BREAKER_FUSE_INSTALLED.handlers:
            BREAKER_FUSE_INSTALLED.emit(
                {},
                {
                    "name": name,
                    "failure_threshold": breaker.fail_max,
                    "recovery_time": breaker.timeout_duration.total_seconds(),
                    "engine": "aiobreaker",
                },
            )

    @property
    def breaker(self) -> aiobreaker.CircuitBreaker:
        """The wrapped aiobreaker breaker."""
        return self._breaker

    def detach(self) -> None:
        """Remove the adapter's listener from the wrapped breaker."""
        if self._listener in self._breaker.listeners:
            self._breaker.remove_listener(self._listener)

    # -- state -----------------------------------------------------------

    def _retry_after(self) -> float:
        """Seconds until aiobreaker admits a call to its OPEN storage; ``0.0`` when it would now.

        The same test as aiobreaker's ``before_call``: it rejects only while
        ``opened_at`` is set and its timeout has not run out, so storage that
        is OPEN with no ``opened_at`` admits the next call.
        """
        opened_at = getattr(self._breaker._state_storage, "opened_at", None)
        if not opened_at:
            return 0.0
        remaining: float = (opened_at + self._breaker.timeout_duration - _utcnow_naive()).total_seconds()
        return max(remaining, 0.0)

    @property
    def state(self) -> BreakerState:
        """The state a call arriving now would meet (OPEN that aiobreaker would let through is HALF_OPEN)."""
        state = _STATES[self._breaker.current_state]
        if state is BreakerState.OPEN and self._retry_after() == 0.0:
            return BreakerState.HALF_OPEN
        return state

    async def status(self) -> BreakerStatus:
        """A snapshot; ``failure_count`` is aiobreaker's consecutive-failure counter.

        ``window`` and ``half_open_max_calls`` are ``None``: aiobreaker has no
        rolling window and no trial limit.
        """
        state = self.state
        retry_after = self._retry_after() if state is BreakerState.OPEN else 0.0
        return BreakerStatus(
            name=self.name,
            state=state,
            failure_count=self._breaker.fail_counter,
            failure_threshold=self._breaker.fail_max,
            recovery_time=self._breaker.timeout_duration.total_seconds(),
            retry_after=retry_after,
            window=None,
            half_open_max_calls=None,
        )

    async def reset(self) -> None:
        """Close the wrapped breaker (its failure counter is cleared)."""
        self._breaker.close()

    async def trip(self) -> None:
        """Open the wrapped breaker now."""
        self._breaker.open()

    # -- the guarded call --------------------------------------------------

    def _enter(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # aiobreaker's call_async() wraps a function, not a block; these are
        # the same steps, so ``async with`` works and listeners see each call.
        breaker = self._breaker
        state = breaker.state
        if state.state is aiobreaker.CircuitBreakerState.OPEN:
            try:
                state.before_call(fn, *args, **kwargs)
            except aiobreaker.CircuitBreakerError as exc:
                retry_after = self._retry_after()
                if BREAKER_CALL_REJECTED.handlers:
                    BREAKER_CALL_REJECTED.emit(
                        {"retry_after": retry_after}, {"name": self.name, "state": BreakerState.OPEN.value}
                    )
                raise CircuitOpenError(name=self.name, retry_after=retry_after) from exc
            breaker.half_open()
            state = breaker.state
        state.before_call(fn, *args, **kwargs)
        for listener in breaker.listeners:
            listener.before_call(breaker, fn, *args, **kwargs)
        return state

    def _exit(self, call: _Call, exc: BaseException | None) -> None:
        state = call.state
        outcome = "success"
        if isinstance(exc, aiobreaker.CircuitBreakerError):
            # The wrapped breaker's own verdict from inside the call (a layer
            # of it rejected, or reported the trip it counted): no outcome.
            outcome = "cancelled"
        elif call.decided:
            # aiobreaker counted this call itself (see _StateListener).
            if exc is not None:
                outcome = "failure" if self._breaker.is_system_error(exc) else "success"
        elif exc is None:
            state._handle_success()
        elif isinstance(exc, Exception):
            outcome = "failure" if self._breaker.is_system_error(exc) else "success"
            traceback = exc.__traceback__
            try:
                # Counts the failure (or, for an excluded error, a success) and
                # re-raises it, or a CircuitBreakerError from it when it trips
                # the breaker; the caller gets their own exception instead.
                state._handle_error(None, exc)
            except Exception:
                pass
            finally:
                exc.__traceback__ = traceback
        else:
            outcome = "cancelled"  # neither success nor failure, as in aiobreaker
        if BREAKER_CALL_EXECUTED.handlers:
            BREAKER_CALL_EXECUTED.emit(
                {"duration": self._clock.now() - call.start},
                {
                    "name": self.name,
                    "success": outcome == "success" if outcome != "cancelled" else None,
                    "outcome": outcome,
                    "trial": state.state is aiobreaker.CircuitBreakerState.HALF_OPEN,
                },
            )

    def _begin(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[object, _Call | None]:
        """Enter one layer: the task's key and its new call, or ``None`` inside a call it has already."""
        # One adapter serves every concurrent call: they are kept by task.
        key = _task_key()
        stack = self._calls.get(key)
        if stack:
            stack.append(None)  # a layer inside this task's call: it decides nothing
            return key, None
        call = _Call(self._enter(fn, args, kwargs), self._clock.now())
        self._calls[key] = [call]
        return key, call

    def _end(self, key: object, exc: BaseException | None) -> None:
        stack = self._calls[key]
        call = stack.pop()
        if not stack:
            del self._calls[key]
        if call is not None:
            # Popped first: the outcome aiobreaker reports now is the adapter's own.
            self._exit(call, exc)

    def _decided(self) -> None:
        """Mark the task's adapter call decided: aiobreaker has just counted an outcome inside it."""
        if self._calls:
            stack = self._calls.get(_task_key())
            if stack and stack[0] is not None:
                stack[0].decided = True

    async def __aenter__(self) -> None:
        self._begin(None, (), {})

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._end(_task_key(), exc)

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``await fn(*args, **kwargs)`` through the wrapped breaker.

        Raises:
            CircuitOpenError: the wrapped breaker is open; ``fn`` was not called.
        """
        key, _ = self._begin(fn, args, kwargs)
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            self._end(key, exc)
            raise
        self._end(key, None)
        return result

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an async function so every call goes through the wrapped breaker."""
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@{type(self).__name__} decorates async functions, got {fn!r}")
        call = self.call

        @functools.wraps(fn)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            return await call(fn, *args, **kwargs)

        return guarded

    def _changed(self, old: BreakerState | None, new: BreakerState) -> None:
        previous = old.value if old is not None else None
        if new is BreakerState.OPEN:
            logger.warning("circuit_breaker_opened", name=self.name, previous=previous, engine="aiobreaker")
        elif new is BreakerState.CLOSED:
            logger.info("circuit_breaker_closed", name=self.name, previous=previous, engine="aiobreaker")
        else:
            logger.info("circuit_breaker_half_open", name=self.name, previous=previous, engine="aiobreaker")
        if BREAKER_STATE_CHANGED.handlers:
            BREAKER_STATE_CHANGED.emit({}, {"name": self.name, "from": previous, "to": new.value})

    def __repr__(self) -> str:
        return (
            f"<AiobreakerAdapter {self.name!r} state={self.state.value} "
            f"failures={self._breaker.fail_counter}/{self._breaker.fail_max}>"
        )


def adapt(breaker: aiobreaker.CircuitBreaker | AiobreakerAdapter, *, name: str | None = None) -> AiobreakerAdapter:
    """Wrap ``breaker`` for seawall; an adapter is returned as it is."""
    if isinstance(breaker, AiobreakerAdapter):
        return breaker
    return AiobreakerAdapter(breaker, name=name)


def _adapter_for(breaker: object, name: str) -> AiobreakerAdapter | None:
    """``infra.circuit_breaker.register(name, breaker)``'s adapter for aiobreaker breakers."""
    if isinstance(breaker, aiobreaker.CircuitBreaker):
        return AiobreakerAdapter(breaker, name=name)
    return None


# Registered from this side (the registry imports no integration): importing
# this module lets the coordinator's registry accept aiobreaker breakers.
BREAKER_ADAPTERS.append(_adapter_for)
