"""Synchronous fast paths of the in-memory primitives, for the coordinator's hot path.

Each primitive's public API is async (``await limiter.hit()``, ``async with
breaker``, ``async with pool.checkout()``), and each coroutine frame costs
about as much as a bare ``await noop()``. In the common case - in-memory
state, nothing to wait for, nobody listening to telemetry - every one of these
decisions is pure bookkeeping that never suspends. The coordinator makes that
bookkeeping inline, and goes through the public API whenever any condition
of the fast path does not hold, so behaviour is identical either way:

* rate limiter: ``take(bucket, 1, now)`` on the limiter's in-process table,
  when no task waits on the limiter and nobody listens to ``request_allowed``;
  a denial (``None``) is re-decided by ``hit()``, which raises it.
* circuit breaker: a CLOSED in-memory record with no ``call_executed``
  listener admits without recording anything (exactly the breaker's own
  ``__aenter__`` fast path); ``__aexit__`` is still called on every failure
  and whenever another call is in its slow path (``inflight``).
* pool: an idle worker is popped and given back with the pool's own
  bookkeeping, for pools whose return path awaits nothing (no reset, no
  lifetime, no liveness probe) and with no checkout/checkin listener; any
  failure goes through the pool's shielded ``_check_in``.

These read private attributes of sibling modules of this package, found once
per plan here (a primitive without them, e.g. an adapted third-party breaker
or a Redis-backed limiter, simply has no fast path). The public ``nowait``
forms they stand for are listed in the closing note of issue 6.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from seawall._breaker import BreakerLike, BreakerState, CircuitBreaker
from seawall._limiter import RateLimiter
from seawall._pool import ConnectionPool

__all__ = ["CLOSED", "breaker_fast_path", "limiter_fast_path", "pool_fast_path"]

CLOSED = BreakerState.CLOSED


def limiter_fast_path(
    limiter: RateLimiter | None,
) -> tuple[Callable[[str, float, float], Any] | None, Callable[[], float] | None, dict[str, Any] | None]:
    """``(take, now, waiting)`` of an in-process limiter, else ``(None, None, None)``."""
    take = getattr(limiter, "_take", None)
    now = getattr(limiter, "_now", None)
    waiting = getattr(limiter, "_waiting", None)
    if take is None or now is None or not isinstance(waiting, dict):
        return None, None, None
    return take, now, waiting


def breaker_fast_path(breaker: BreakerLike | None) -> tuple[Any, dict[object, Any] | None]:
    """``(record, inflight)`` of an in-memory seawall breaker, else ``(None, None)``."""
    if not isinstance(breaker, CircuitBreaker):
        return None, None
    record = getattr(breaker, "_record", None)
    inflight = getattr(breaker, "_inflight", None)
    if record is None or not hasattr(record, "state") or not isinstance(inflight, dict):
        return None, None
    return record, inflight


def pool_fast_path(pool: ConnectionPool[Any] | None) -> ConnectionPool[Any] | None:
    """``pool`` if its checkout and return can be pure bookkeeping, else ``None``."""
    if not isinstance(pool, ConnectionPool):
        return None
    if not getattr(pool, "_plain_return", False) or getattr(pool, "_is_closed", True) is not None:
        return None
    if not all(hasattr(pool, name) for name in ("_idle", "_busy", "_closed", "_give_back", "_check_in")):
        return None
    return pool
