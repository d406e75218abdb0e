"""A key's compiled layers (:class:`Plan`) and the small helpers its protected calls share.

``AsyncInfrastructure`` compiles each key's configuration into a plan once;
``execute_protected`` and :class:`~seawall._protection.Protection` then run
a call from the plan alone, without looking anything up by name.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio

from seawall._breaker import BreakerLike
from seawall._config import DEFAULT_TIMEOUT, ProtectionConfig
from seawall._deadline import Slot
from seawall._fastpath import breaker_record, nowait_breaker, nowait_limiter
from seawall._limiter import RateLimiter
from seawall._pool import ConnectionPool

if TYPE_CHECKING:
    from seawall._infrastructure import AsyncInfrastructure

__all__ = ["NO_SLOT", "Plan", "cancel_scope_class", "cancelled_class", "scope_class", "uncount"]

#: The running backend's CancelScope class once looked up; hot paths call
#: ``(_plan.scope_class or cancel_scope_class())()`` to spare a frame.
scope_class: Any = None


def cancel_scope_class() -> Any:
    """The running backend's own CancelScope class.

    ``anyio.CancelScope()`` dispatches to the backend on every construction
    (measured: 40% of the scope's cost); the class it returns is the same
    every time, so it is looked up once and called directly.
    """
    global scope_class
    if scope_class is None:
        scope_class = type(anyio.CancelScope())
    return scope_class


_CancelledClass: type[BaseException] | None = None


def cancelled_class() -> type[BaseException]:
    """The running backend's cancellation exception (looked up once)."""
    global _CancelledClass
    if _CancelledClass is None:
        _CancelledClass = anyio.get_cancelled_exc_class()
    return _CancelledClass


#: The slot of one-call plans: never filled by a timer, so its ``open`` stays None.
NO_SLOT = Slot(DEFAULT_TIMEOUT)


class Plan:
    """The compiled layers of one key, of one entity's calls on a key, or of one call's options."""

    __slots__ = (
        "acquire",
        "breaker",
        "breaker_record",
        "bucket",
        "config",
        "drained",
        "entities",
        "inflight",
        "infra",
        "key",
        "limiter",
        "nowait",
        "nowait_breaker",
        "nowait_limiter",
        "owner",
        "pool",
        "slot",
        "timeout",
    )

    def __init__(
        self,
        infra: AsyncInfrastructure,
        key: str,
        config: ProtectionConfig | None,
        limiter: RateLimiter | None,
        bucket: str,
        breaker: BreakerLike | None,
        pool: ConnectionPool[Any] | None,
        timeout: float,
        *,
        one_call: bool = False,
    ) -> None:
        self.infra = infra
        self.key = key
        self.config = config
        self.limiter = limiter
        self.bucket = bucket
        self.breaker = breaker
        self.pool = pool
        self.timeout = timeout
        # The key's plan, which counts this plan's calls (a call's options make a new plan).
        self.owner: Plan = self
        # Calls in flight on this plan that await before their pool checkout:
        # a replaced pool closes once they finish (see uncount).
        self.inflight = 0
        self.drained: anyio.Event | None = None
        # A kept plan's plans for calls that name only their entity's bucket (see _call_plan).
        self.entities: dict[str, Plan] = {}
        # The timer's slot for this plan's timeout: set for the kept plans (a
        # configured or unconfigured key); a one-call plan's never ticks.
        self.slot: Slot = NO_SLOT
        # The layers whose non-waiting form decides every call (see _fastpath);
        # None where a layer must be awaited every time.
        self.nowait_limiter = nowait_limiter(limiter)
        # The bucket's acquire: a kept plan builds the bucket's fused function
        # (RateLimitBucket.acquire_nowait) once; a plan for one call's options
        # only binds acquire_nowait, a fifth of the cost to build.
        self.acquire: Callable[[], None] | None = None
        if self.nowait_limiter is not None:
            if one_call:
                self.acquire = partial(self.nowait_limiter.acquire_nowait, bucket)
            else:
                self.acquire = self.nowait_limiter.bucket(bucket).acquire_nowait
        self.nowait_breaker = nowait_breaker(breaker)
        self.breaker_record = breaker_record(self.nowait_breaker)
        # Whether the limiter and the breaker both decide without awaiting (or are absent).
        self.nowait = (limiter is None or self.nowait_limiter is not None) and (
            breaker is None or self.nowait_breaker is not None
        )


def uncount(plan: Plan) -> None:
    """A counted call on ``plan`` is over; wake a retirement waiting for the last one.

    When a key's pool is replaced, the old pool must stay open for the calls
    that already hold the old plan. A call that took its worker without
    awaiting anything first is covered by the pool itself (``close()`` waits
    for lent workers), so it is not counted; a call that awaits before its
    checkout (a remote limiter or breaker, a checkout that must wait) counts
    in ``owner.inflight`` from before that await, and the retirement waits
    for the count to reach zero before it closes the pool.
    """
    owner = plan.owner
    owner.inflight -= 1
    if owner.inflight == 0 and owner.drained is not None:
        owner.drained.set()
