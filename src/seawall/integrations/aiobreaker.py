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

aiobreaker's semantics stay its own: it counts consecutive failures, and it
lets every call through once its timeout has passed (no trial limit). Use
:class:`seawall.CircuitBreaker` where that matters. Requires the
``aiobreaker`` extra; ``infra.circuit_breaker.register(name, breaker)``
adapts an aiobreaker breaker through this module by itself.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import aiobreaker

from seawall._breaker import BreakerState, BreakerStatus, _task_key
from seawall._clock import Clock, default_clock
from seawall._errors import CircuitOpenError
from seawall._logging import logger
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
    """Reports the wrapped breaker's state changes as seawall logs and telemetry."""

    def __init__(self, adapter: AiobreakerAdapter) -> None:
        self.adapter = adapter

    def state_change(self, breaker: Any, old: Any, new: Any) -> None:
        self.adapter._changed(
            _STATES[old.state] if old is not None else None,
            _STATES[new.state],
        )


class AiobreakerAdapter:
    """An ``aiobreaker.CircuitBreaker`` with :class:`seawall.CircuitBreaker`'s surface.

    Args:
        breaker: The aiobreaker breaker to wrap; it keeps working on its own too.
        name: The name used in errors, logs and telemetry; the breaker's own
            ``name`` when omitted, else ``"aiobreaker"``.
        clock: Times ``call_executed`` durations (the decisions are aiobreaker's).
    """

    __slots__ = ("_blocks", "_breaker", "_clock", "_listener", "name")

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
        self._blocks: dict[object, list[tuple[Any, float]]] = {}
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

    def _retry_after(self) -> float | None:
        opened_at = getattr(self._breaker._state_storage, "opened_at", None)
        if not isinstance(opened_at, datetime):
            return None
        remaining: float = (opened_at + self._breaker.timeout_duration - _utcnow_naive()).total_seconds()
        return max(remaining, 0.0)

    @property
    def state(self) -> BreakerState:
        """The state a call arriving now would meet (OPEN past its timeout is HALF_OPEN)."""
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
        retry_after = (self._retry_after() or 0.0) if state is BreakerState.OPEN else 0.0
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

    def _exit(self, state: Any, exc: BaseException | None, start: float) -> None:
        outcome = "success"
        if exc is None:
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
                {"duration": self._clock.now() - start},
                {
                    "name": self.name,
                    "success": outcome == "success" if outcome != "cancelled" else None,
                    "outcome": outcome,
                    "trial": state.state is aiobreaker.CircuitBreakerState.HALF_OPEN,
                },
            )

    async def __aenter__(self) -> None:
        state = self._enter(None, (), {})
        # One adapter serves every concurrent block: remember each block's
        # state object and start time by task (a stack, for nesting).
        key = _task_key()
        self._blocks.setdefault(key, []).append((state, self._clock.now()))

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        key = _task_key()
        stack = self._blocks[key]
        state, start = stack.pop()
        if not stack:
            del self._blocks[key]
        self._exit(state, exc, start)

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``await fn(*args, **kwargs)`` through the wrapped breaker.

        Raises:
            CircuitOpenError: the wrapped breaker is open; ``fn`` was not called.
        """
        state = self._enter(fn, args, kwargs)
        start = self._clock.now()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            self._exit(state, exc, start)
            raise
        self._exit(state, None, start)
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
