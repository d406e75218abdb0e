"""Which layers of a plan the coordinator can decide without awaiting.

Each primitive has a waiting form (``await limiter.hit()``, ``async with
breaker``, ``async with pool.checkout()``) and a synchronous non-waiting form
(:meth:`RateLimiter.acquire_nowait`, :meth:`CircuitBreaker.admit_nowait` /
:meth:`~CircuitBreaker.settle_nowait`, :meth:`ConnectionPool.checkout_nowait`
/ :meth:`~ConnectionPool.checkin_nowait`). A coroutine frame costs about as
much as a bare ``await noop()``, so the coordinator's hot path uses the
non-waiting forms, which make the same decisions (and emit the same
telemetry) as the waiting ones.

The limiter's and the breaker's non-waiting forms decide whenever their
state is in this process, which is fixed when they are built; this module
finds that out once per plan, from their public ``backend``, so a call never
pays for a :class:`anyio.WouldBlock` it could have known about. The pool's
answer depends on the moment (an idle worker or not; a ``reset`` to await),
so the coordinator asks it on every call and falls back on ``WouldBlock``.
"""

from __future__ import annotations

from seawall._breaker import BreakerLike, CircuitBreaker
from seawall._limiter import RateLimiter
from seawall.backends._breaker_memory import MemoryBreakerBackend
from seawall.backends._limiter_protocol import LocalRateLimitBackend

__all__ = ["nowait_breaker", "nowait_limiter"]


def nowait_limiter(limiter: RateLimiter | None) -> RateLimiter | None:
    """``limiter`` if :meth:`~RateLimiter.acquire_nowait` decides for it (buckets in this process), else ``None``."""
    if limiter is not None and isinstance(limiter.backend, LocalRateLimitBackend):
        return limiter
    return None


def nowait_breaker(breaker: BreakerLike | None) -> CircuitBreaker | None:
    """``breaker`` if it is a seawall breaker whose state is in this process, else ``None``.

    Such a breaker's :meth:`~CircuitBreaker.admit_nowait` never raises
    :class:`anyio.WouldBlock`; any other (a shared store, an adapted
    third-party breaker) is entered with ``async with``.
    """
    if isinstance(breaker, CircuitBreaker) and isinstance(breaker.backend, MemoryBreakerBackend):
        return breaker
    return None
