"""The interface between :class:`~seawall.RateLimiter` and the stores of its buckets.

A rate-limit backend answers one question atomically: *may bucket ``key``,
under rule ``rule``, give up ``cost`` now?* If yes the cost is taken; if not
nothing changes and the answer says when the same request would pass. That
single operation (:meth:`RateLimitBackend.take`) is all a store must provide,
plus :meth:`~RateLimitBackend.peek` and :meth:`~RateLimitBackend.reset`, so a
shared store such as Redis plugs in by running the operation as one
server-side script timed by the server's clock: one round trip per decision.

The methods are coroutines because a remote store needs a round trip. An
in-process store may additionally offer the synchronous
:class:`LocalRateLimitBackend` face; the limiter then decides without a
single suspension point and reads time from its own (injectable) clock, which
is what makes the in-memory limiter both fast and deterministic under test.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple, NoReturn, Protocol, runtime_checkable

from seawall._checks import number
from seawall._errors import ConfigurationError

__all__ = [
    "MAX_LIMIT",
    "MAX_WINDOW",
    "MIN_COST_SHARE",
    "MIN_WINDOW",
    "AcquireHooks",
    "Algorithm",
    "BucketTable",
    "LocalRateLimitBackend",
    "MultiRuleBackend",
    "RateLimitBackend",
    "RateLimitDecision",
    "RateLimitRule",
    "check_rule",
    "tolerance",
]

Algorithm = Literal["gcra", "fixed_window"]


@dataclass(frozen=True, slots=True)
class RateLimitRule:
    """A rule: at most ``limit`` per ``window`` seconds, counted per key.

    Buckets in a shared backend are namespaced by the whole rule, so two
    limiters with the same rule and ``name`` share their buckets (across
    processes too, with a shared store) and limiters with different rules
    never collide.

    Attributes:
        limit: The capacity of a bucket (hits per window).
        window: The window in seconds.
        algorithm: ``"gcra"`` (leaky bucket) or ``"fixed_window"``.
        name: An optional namespace for the buckets.
    """

    limit: float
    window: float
    algorithm: Algorithm = "gcra"
    name: str | None = None

    @property
    def interval(self) -> float:
        """Seconds for one unit of cost to drain from a GCRA bucket (``window / limit``)."""
        return self.window / self.limit


class RateLimitDecision(NamedTuple):
    """The outcome of one backend operation, and the bucket's state after it.

    Attributes:
        admitted: Whether ``cost`` was taken (always ``True`` for :meth:`RateLimitBackend.peek`
            when a hit of cost 1 would pass, ``False`` when it would not).
        retry_after: Seconds until the same request would be admitted; ``0.0`` when admitted.
        current_count: The bucket's level (GCRA) or the window's count (fixed window) after the operation.
        remaining: How many hits of cost 1 the bucket would admit right now.
        reset_after: Seconds until the bucket is back to empty.
        next_after: Seconds until a hit of cost 1 would be admitted; ``0.0`` if it would be now.
    """

    admitted: bool
    retry_after: float
    current_count: float
    remaining: int
    reset_after: float
    next_after: float


@runtime_checkable
class RateLimitBackend(Protocol):
    """Where a rate limiter keeps its buckets.

    Every method must be atomic with respect to every other caller of the
    same store: two processes taking the last unit of a bucket at once must
    see one admission and one denial.
    """

    async def take(self, key: str, cost: float, rule: RateLimitRule) -> RateLimitDecision:
        """Take ``cost`` from bucket ``key`` under ``rule`` if it fits now, else change nothing.

        Args:
            key: The bucket.
            cost: A finite positive amount, at most ``rule.limit`` (the limiter checks).
            rule: The rule the bucket obeys.

        Returns:
            Whether ``cost`` was taken, and the bucket's state after the operation.
        """
        ...

    async def peek(self, key: str, rule: RateLimitRule) -> RateLimitDecision:
        """Report bucket ``key`` as a hit of cost 1 would find it now, without taking anything."""
        ...

    async def reset(self, key: str, rule: RateLimitRule) -> None:
        """Empty bucket ``key`` (forget it)."""
        ...


@runtime_checkable
class MultiRuleBackend(Protocol):
    """A backend that decides several rules of one bucket at once (:class:`~seawall.MultiRateLimiter`)."""

    async def take_all(
        self, key: str, cost: float, rules: tuple[RateLimitRule, ...]
    ) -> tuple[bool, tuple[RateLimitDecision, ...]]:
        """Take ``cost`` from bucket ``key`` under every rule if it fits under all of them now, else from none.

        One atomic step (a Redis backend: one script; every rule's key in one
        cluster slot, which the caller's ``key`` arranges with a hash tag).

        Returns:
            Whether ``cost`` was taken, and each rule's decision: a rule that
            would have admitted the hit reads admitted with ``retry_after``
            ``0.0``, even when another rule denied it.
        """
        ...


class AcquireHooks(NamedTuple):
    """What a limiter lends the fused acquire of its pre-checked bucket (:meth:`BucketTable.acquirer`)."""

    #: The limiter's clock.
    now: Callable[[], float]
    #: Keys with tasks queued in ``acquire()``: a hit on one of them is refused (they go first).
    waiting: Container[str]
    #: ``refuse(key, cost, now)`` raises the limiter's denial of that hit (and reports it).
    refuse: Callable[[str, float, float], NoReturn]
    #: The admission topic (anything with ``handlers``): ``emit`` is called while it has some.
    admitted: Any
    #: ``emit(key, cost)`` reports an admitted hit.
    emit: Callable[[str, float], None]


class BucketTable(Protocol):
    """The synchronous buckets of one rule in an in-process backend.

    ``now`` is passed in by the limiter (read from its clock), so a table is a
    pure function of its calls; ``state`` is an opaque per-key value that
    :meth:`describe` turns into the numbers a status reports.
    """

    rule: RateLimitRule

    def take(self, key: str, cost: float, now: float) -> float | None:
        """Take ``cost`` if it fits at ``now``; return the new state, or ``None`` (nothing taken)."""
        ...

    def acquirer(self, key: str, cost: float, hooks: AcquireHooks) -> Callable[[], None]:
        """A function that takes ``cost`` from ``key`` at ``hooks.now()`` or raises ``hooks.refuse``.

        The whole of ``RateLimiter.acquire_nowait(key, cost)`` for a bucket
        whose key and cost were checked once: refused while tasks wait on
        ``key``, else :meth:`take`, refused when that takes nothing, and
        ``hooks.emit`` when admitted and observed.
        """
        ...

    def retry_after(self, key: str, cost: float, now: float) -> float:
        """Seconds after ``now`` until ``take(key, cost)`` would succeed."""
        ...

    def peek(self, key: str, now: float) -> float:
        """The state of ``key`` at ``now`` (that of an empty bucket for an unknown key)."""
        ...

    def describe(self, state: float, now: float) -> tuple[float, int, float, float]:
        """``(count, remaining, next_after, reset_after)`` of a bucket in ``state`` at ``now``."""
        ...

    def reset(self, key: str) -> None:
        """Forget ``key``."""
        ...

    def levels(self, prefix: str, now: float) -> list[tuple[str, float]]:
        """The non-empty buckets whose key starts with ``prefix``: ``(key, level / limit)`` at ``now``."""
        ...

    def fill(self, key: str, share: float, now: float) -> None:
        """Set bucket ``key`` to ``share`` of the rule's limit at ``now`` (a rule change carrying a level over)."""
        ...

    def __len__(self) -> int:
        """How many buckets are resident."""
        ...


@runtime_checkable
class LocalRateLimitBackend(RateLimitBackend, Protocol):
    """A backend in this process, with a synchronous fast path per rule."""

    def table(self, rule: RateLimitRule) -> BucketTable:
        """The (long-lived) bucket table of ``rule``."""
        ...


#: The bounds of a rule that every backend evaluates exactly (docs/rate-limiter.md, "Bounds").
#: Up to 1e12 units per window, the float arithmetic of a bucket (in memory, and
#: in Lua on Redis) resolves well under one unit, so admission is exact for
#: whole costs and within :func:`tolerance` for fractional ones.
MAX_LIMIT: Final = 1e12
#: Windows from a millisecond (the resolution of Redis's clock is a microsecond,
#: and a shorter fixed window would overflow ``now / window``) to about 31 years
#: (a bucket's expiry, in milliseconds, must stay far inside Redis's range).
MIN_WINDOW: Final = 1e-3
MAX_WINDOW: Final = 1e9
#: The smallest cost, as a share of the limit: a smaller one would vanish in a
#: bucket's float (its drain time rounded away), so it would be admitted for free.
MIN_COST_SHARE: Final = 2.0**-40


def tolerance(limit: float) -> float:
    """The relative slack of a rule's admission test (the same on every backend).

    Costs are added as floats, so a bucket filled to exactly ``limit`` may
    read a few ulps over, and a hit retried after exactly its ``retry_after``
    must still pass. The slack is a billionth of the limit, but never more than
    1e-4 units of cost (so a large limit never admits a whole extra hit: a
    relative slack alone let a limit of 1e9 admit one hit too many), and never
    less than 64 ulps.
    """
    return max(2.0**-46, min(1e-9, 1e-4 / limit))


def check_rule(rule: RateLimitRule) -> RateLimitRule:
    """Return ``rule`` if every backend can evaluate it exactly, else raise :class:`~seawall.ConfigurationError`."""
    number(rule.limit, "limit", maximum=MAX_LIMIT)
    number(rule.window, "window", what="a number of seconds", minimum=MIN_WINDOW, inclusive=True, maximum=MAX_WINDOW)
    if rule.algorithm not in ("gcra", "fixed_window"):
        raise ConfigurationError(
            f"algorithm: must be 'gcra' or 'fixed_window', got {rule.algorithm!r}", path="algorithm"
        )
    return rule
