"""What a protection key compiles to: its :class:`Plan`, built once per configuration.

``AsyncInfrastructure`` turns each key's configuration into a plan: the
layers in their order (rate limiter and bucket, breaker, pool), the timeout,
and which of the layers decide without awaiting. A protected call
(``_protected_call.ProtectedCall``) then runs from the plan alone, looking
nothing up by name; what it needs of the infrastructure besides is the
narrow :class:`CallHost` (the clock, the deadline timer, the telemetry of a
triggered protection), never the infrastructure itself.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import anyio

from seawall._breaker import BreakerLike, CircuitBreaker
from seawall._chaos import Chaos
from seawall._clock import Clock
from seawall._concurrency import ConcurrencyLimiter
from seawall._config import ConcurrencyConfig, ProtectionConfig
from seawall._errors import ProtectionTimeout
from seawall._limiter import LimiterLike, MultiRateLimiter, RateLimiter
from seawall._pool import ConnectionPool

__all__ = ["CallHost", "Plan", "concurrency_for", "uncount"]


class CallHost(Protocol):
    """What a protected call needs from the infrastructure that runs it."""

    #: Makes the call's cancel scope (the running backend's class while the infrastructure runs).
    scope_class: type[Any]
    #: Whether ``scope_class`` may be allocated with ``object.__new__`` and then ``__init__()``-ed (``_scopes``).
    scope_bare: bool

    def now(self) -> float:
        """The infrastructure's clock."""
        ...

    def register(self, scope: Any, deadline: float, timeout: float) -> dict[Any, float] | None:
        """File ``scope`` with the deadline timer (``None``: give it a deadline of its own)."""
        ...

    def triggered(self, key: str, layer: str, exc: BaseException) -> None:
        """Report that ``layer`` stopped a call of ``key`` (telemetry)."""
        ...

    def timed_out(self, plan: Plan, *, overran: bool = False) -> ProtectionTimeout:
        """The error of a call of ``plan`` that passed its deadline (reported and logged).

        ``overran``: the call finished after its deadline because its code
        could not be cancelled (it blocked the loop, or ran in a thread).
        """
        ...


class Plan:
    """The compiled layers of one key, of one entity's calls on a key, or of one call's options.

    Attributes:
        host: The infrastructure's :class:`CallHost`.
        key: The protection key.
        config: The key's configuration (``None`` for a plan of call options).
        limiter, bucket: The rate limiter and the bucket a call takes from.
        acquire: The bucket's ``acquire_nowait`` when the limiter decides in
            this process, else ``None`` (its ``hit()`` is awaited).
        breaker: The breaker, and ``local_breaker``: the same when its
            ``admit_nowait``/``settle_nowait`` decide (state in this process).
        concurrency: The concurrency limiter (between the breaker and the pool),
            or ``None``. A plan with one is not ``direct``.
        pool: The pool or bulkhead.
        timeout: Seconds for everything after the rate limit.
        nowait: Whether the limiter and the breaker both decide without awaiting.
        direct: Whether a call may take the written-out common case
            (``_protected_call.run_direct``): ``nowait`` and no fault injection.
        chaos: The key's fault injector (game days), or ``None``.
        owner: The key's plan, which counts the calls in flight (``inflight``)
            that awaited before their checkout: a replaced pool stays open for them.
        entities: A kept plan's plans for calls that name only their entity
            (by the entity), or a timeout (by ``(entity or None, seconds)``).
    """

    __slots__ = (
        "acquire",
        "breaker",
        "bucket",
        "chaos",
        "concurrency",
        "config",
        "direct",
        "drained",
        "entities",
        "host",
        "inflight",
        "key",
        "limiter",
        "local_breaker",
        "nowait",
        "owner",
        "pool",
        "timeout",
    )

    def __init__(
        self,
        host: CallHost,
        key: str,
        config: ProtectionConfig | None,
        limiter: LimiterLike | None,
        bucket: str,
        breaker: BreakerLike | None,
        pool: ConnectionPool[Any] | None,
        timeout: float,
        *,
        one_call: bool = False,
        chaos: Chaos | None = None,
        concurrency: ConcurrencyLimiter | None = None,
    ) -> None:
        self.host = host
        self.key = key
        self.config = config
        self.limiter = limiter
        self.bucket = bucket
        self.breaker = breaker
        self.pool = pool
        self.timeout = timeout
        self.chaos = chaos
        self.concurrency = concurrency
        self.owner: Plan = self
        self.inflight = 0
        self.drained: anyio.Event | None = None
        self.entities: dict[str | tuple[str | None, float], Plan] = {}
        # Each primitive owns its non-waiting decision; the plan only learns, once,
        # whether that decision is available (the state is in this process).
        self.acquire: Callable[[], None] | None = None
        if isinstance(limiter, RateLimiter | MultiRateLimiter) and limiter.resident_buckets is not None:
            # A kept plan builds the bucket's handle once; a plan for one call's
            # options only binds acquire_nowait, a fifth of the cost to build.
            self.acquire = (
                partial(limiter.acquire_nowait, bucket) if one_call else limiter.bucket(bucket).acquire_nowait
            )
        self.local_breaker = breaker if isinstance(breaker, CircuitBreaker) and breaker.decides_locally else None
        self.nowait = (limiter is None or self.acquire is not None) and (
            breaker is None or self.local_breaker is not None
        )
        # Whether execute_protected may run the call as ``run_direct`` (while no handler listens).
        # (run_direct has no concurrency stage: such plans take ProtectedCall.)
        self.direct = self.nowait and chaos is None and concurrency is None

    def same_layers(
        self,
        limiter: LimiterLike | None,
        bucket: str,
        breaker: BreakerLike | None,
        pool: ConnectionPool[Any] | None,
        timeout: float,
    ) -> bool:
        """Whether these layers are this plan's (a call's options that change nothing reuse it)."""
        return (
            limiter is self.limiter
            and bucket == self.bucket
            and breaker is self.breaker
            and pool is self.pool
            and timeout == self.timeout
        )

    def __repr__(self) -> str:
        pairs = (
            ("rate_limiter", self.limiter),
            ("circuit_breaker", self.breaker),
            ("concurrency", self.concurrency),
            ("pool", self.pool),
        )
        layers = [name for name, layer in pairs if layer is not None]
        return f"<Plan key={self.key!r} layers={layers} timeout={self.timeout!r}>"


def concurrency_for(
    key: str, config: ConcurrencyConfig | None, old: Plan | None, clock: Clock
) -> ConcurrencyLimiter | None:
    """A key's concurrency limiter: the old one while its options are unchanged (its limit and queue kept), else new."""
    if config is None:
        return None
    if old is not None and old.concurrency is not None and old.config is not None:  # noqa: SIM102
        if old.config.concurrency == config:
            return old.concurrency
    return ConcurrencyLimiter(**config.options(), name=key, clock=clock)


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
