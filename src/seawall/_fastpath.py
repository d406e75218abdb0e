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

The coordinator also writes out the commonest case of the breaker's and the
pool's non-waiting forms instead of calling them (a closed breaker nobody
times; an idle worker lent and given back with nothing to test): the frame
was about half of each. :func:`breaker_record` hands it the breaker's state,
and ``ConnectionPool._fast_take``/``_fast_return`` say when the pool's cases
apply.
"""

from __future__ import annotations

from seawall._breaker import BreakerLike, CircuitBreaker
from seawall._limiter import RateLimiter
from seawall.backends._breaker_memory import BreakerRecord, MemoryBreakerBackend
from seawall.backends._breaker_protocol import BreakerState

__all__ = ["CLOSED", "breaker_record", "nowait_breaker", "nowait_limiter"]

#: ``BreakerState.CLOSED`` as a module constant (one global read on the hot paths).
CLOSED = BreakerState.CLOSED


def nowait_limiter(limiter: RateLimiter | None) -> RateLimiter | None:
    """``limiter`` if :meth:`~RateLimiter.acquire_nowait` decides for it (buckets in this process), else ``None``."""
    # ``resident_buckets`` is None exactly when the buckets are remote. (Not
    # ``isinstance(limiter.backend, LocalRateLimitBackend)``: a runtime
    # protocol check costs ~10 us, and a plan is built for every call that
    # names its own entity or timeout.)
    if limiter is not None and limiter.resident_buckets is not None:
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


def breaker_record(breaker: CircuitBreaker | None) -> BreakerRecord | None:
    """The in-process state record of a breaker that :func:`nowait_breaker` accepted, else ``None``.

    The record lives as long as its backend, and the breaker reads the same
    one: the coordinator tests ``record.state`` itself to admit a call to a
    closed breaker without :meth:`~CircuitBreaker.admit_nowait`'s frame.
    """
    if breaker is None:
        return None
    backend = breaker.backend
    assert isinstance(backend, MemoryBreakerBackend)
    return backend.record(breaker.name)
