"""Use an existing ``aiolimiter.AsyncLimiter`` wherever seawall takes a rate limiter.

:func:`adapt` wraps it in an :class:`AiolimiterAdapter` with the surface the
coordinator uses of a :class:`seawall.RateLimiter` (``seawall._limiter.LimiterLike``):
``await hit(key, cost)``, ``await acquire(key, cost)``, ``async with
adapter(key, cost=..., wait=...)``, ``await status(key)``, ``limit``,
``window``, ``name``. aiolimiter still decides - its leaky bucket, its level,
its queue of waiters - and the wrapped limiter keeps working for the code
that already uses it: both draw on one bucket. Its semantics stay its own:

* An ``AsyncLimiter`` has no keys: it is one bucket. ``key`` only names it in
  statuses, errors and telemetry; every key (every entity) shares it.
* :meth:`~AiolimiterAdapter.hit` is aiolimiter's non-waiting idiom,
  ``if limiter.has_capacity(cost): await limiter.acquire(cost)``: admitted at
  once (``acquire`` does not suspend when there is capacity), or denied with
  :class:`~seawall.RateLimitExceeded` and the ``retry_after`` its level gives.
  As with ``has_capacity``, a hit does not queue behind tasks waiting in
  ``acquire()``: aiolimiter gives free capacity to whoever asks first.
* :meth:`~AiolimiterAdapter.acquire` is ``AsyncLimiter.acquire``: it waits in
  aiolimiter's order (the smallest amount first, then arrival), on asyncio's
  loop clock (``loop.time()``, which a seawall ``clock=`` cannot replace).
* No ``reset()``: aiolimiter has none.

seawall adds, at the boundary: checked arguments (a ``cost`` above the
limiter's ``max_rate`` is a :class:`~seawall.ConfigurationError`, not
aiolimiter's bare ``ValueError`` at wait time), statuses, denials with a retry
time, the ``request_allowed`` / ``request_denied`` telemetry (``algorithm``
``"aiolimiter"``) and the debug log of denials.

aiolimiter runs on asyncio only: under trio every method fails at once with
a :class:`~seawall.ConfigurationError` that says so. Requires the
``aiolimiter`` extra (``pip install '.[aiolimiter]'`` from a clone of seawall).
"""

from __future__ import annotations

import logging
import math
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NoReturn

from seawall._extras import missing_extra

try:
    import aiolimiter
except ModuleNotFoundError as exc:  # pragma: no cover - exercised in a subprocess without the package
    raise missing_extra(exc, __name__) from exc

from seawall._checks import number
from seawall._clock import require_asyncio
from seawall._errors import ConfigurationError, ConfigurationTypeError, RateLimitExceeded
from seawall._limiter import Admission, RateLimitStatus
from seawall._logging import logger
from seawall._registries import LIMITER_ADAPTERS
from seawall._telemetry import LIMITER_REQUEST_ALLOWED, LIMITER_REQUEST_DENIED

if TYPE_CHECKING:
    from seawall._limiter import LimiterLike

__all__ = ["AiolimiterAdapter", "adapt"]

#: The least ``retry_after`` of a denial, as for :class:`seawall.RateLimiter`.
_MIN_RETRY_AFTER: Final = 1e-6


def _asyncio_only(operation: str) -> None:
    # aiolimiter asks asyncio for the running loop, which trio does not have.
    require_asyncio(
        "an aiolimiter.AsyncLimiter",
        f"{operation}()",
        path="rate_limiter",
        instead="use seawall.RateLimiter, which runs on both",
    )


class AiolimiterAdapter:
    """An ``aiolimiter.AsyncLimiter`` with the rate-limiter surface seawall's coordinator uses.

    Args:
        limiter: The aiolimiter limiter to wrap; it keeps working on its own too.
        name: The name in logs and telemetry; ``"aiolimiter"`` when omitted.

    Attributes:
        limit: The limiter's ``max_rate``.
        window: Its ``time_period``, in seconds.
        name: The adapter's name.
    """

    __slots__ = ("_limiter", "limit", "name", "window")

    def __init__(self, limiter: aiolimiter.AsyncLimiter, *, name: str | None = None) -> None:
        if not isinstance(limiter, aiolimiter.AsyncLimiter):
            raise ConfigurationTypeError(f"expected an aiolimiter.AsyncLimiter, got {limiter!r}", path="rate_limiter")
        if name is None:
            name = "aiolimiter"
        if not isinstance(name, str) or not name:
            raise ConfigurationTypeError(f"name: must be a non-empty str, got {name!r}", path="name")
        self._limiter = limiter
        self.name: Final[str] = name
        self.limit: Final = float(limiter.max_rate)
        self.window: Final = float(limiter.time_period)

    @property
    def limiter(self) -> aiolimiter.AsyncLimiter:
        """The wrapped aiolimiter limiter."""
        return self._limiter

    @property
    def resident_buckets(self) -> None:
        """``None``: nothing here decides without awaiting, so the coordinator awaits :meth:`hit`."""
        return None

    # -- deciding ---------------------------------------------------------

    async def hit(self, key: str = "default", cost: float = 1) -> RateLimitStatus:
        """Take ``cost`` now if the limiter has the capacity, else raise; never waits.

        Returns:
            The bucket's status after the hit.

        Raises:
            RateLimitExceeded: The limiter lacks the capacity now (nothing was
                taken); ``retry_after`` is when its level will have drained enough.
            ConfigurationError: ``key`` is not a str, ``cost`` not a number from
                ``0`` (excluded) to ``max_rate``, or the caller runs under trio.
        """
        cost = self._check(key, cost, "hit")
        limiter = self._limiter
        if not limiter.has_capacity(cost):
            self._deny(key, cost)
        await limiter.acquire(cost)  # capacity is there: aiolimiter takes it without suspending
        if LIMITER_REQUEST_ALLOWED.handlers:
            LIMITER_REQUEST_ALLOWED.emit({"cost": cost}, self._metadata(key, cost))
        return self._status(key)

    async def acquire(self, key: str = "default", cost: float = 1) -> None:
        """Wait (``AsyncLimiter.acquire``) until ``cost`` fits, then take it. Cancellable as aiolimiter is.

        Raises:
            ConfigurationError: ``key`` is not a str, ``cost`` not a number from
                ``0`` (excluded) to ``max_rate``, or the caller runs under trio.
        """
        cost = self._check(key, cost, "acquire")
        await self._limiter.acquire(cost)
        if LIMITER_REQUEST_ALLOWED.handlers:
            LIMITER_REQUEST_ALLOWED.emit({"cost": cost}, self._metadata(key, cost))

    def __call__(self, key: str = "default", *, cost: float = 1, wait: bool = True) -> Admission:
        """``async with adapter(key, cost=..., wait=...):`` waits (``acquire``) or denies (``hit``)."""
        return Admission(self, key, cost, wait)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    # -- inspecting -------------------------------------------------------

    async def status(self, key: str = "default") -> RateLimitStatus:
        """The limiter's bucket now, reported under ``key`` (every key shares it)."""
        self._check(key, 1, "status")
        return self._status(key)

    async def reset(self, key: str = "default") -> None:
        """Not supported: aiolimiter has no way to empty its bucket.

        Raises:
            NotImplementedError: Always.
        """
        raise NotImplementedError("an aiolimiter.AsyncLimiter has no reset(); its bucket only drains")

    # -- internals --------------------------------------------------------

    def _check(self, key: object, cost: object, operation: str) -> float:
        _asyncio_only(operation)
        if not isinstance(key, str):
            raise ConfigurationTypeError(f"key must be a str, got {key!r}", path="key")
        if cost == 1 and type(cost) is int:
            return 1.0
        value = number(cost, "cost")
        if value > self.limit:
            raise ConfigurationError(
                f"cost: {cost!r} is above the limiter's max_rate {self.limit!r}: it could never be admitted",
                path="cost",
            )
        return value

    def _level(self) -> float:
        # aiolimiter keeps its level private and only answers has_capacity();
        # has_capacity() drains it first (its _leak()), so this reads it as of now.
        self._limiter.has_capacity(0)
        level: float = self._limiter._level
        return level

    def _status(self, key: str) -> RateLimitStatus:
        level = self._level()
        rate = self.limit / self.window  # what drains per second
        next_after = max(level + 1.0 - self.limit, 0.0) / rate
        return RateLimitStatus(
            key,
            next_after == 0.0,
            level,
            self.limit,
            self.window,
            max(math.floor(self.limit - level), 0),
            next_after,
            level / rate,
        )

    def _deny(self, key: str, cost: float) -> NoReturn:
        retry_after = max((self._level() + cost - self.limit) / (self.limit / self.window), _MIN_RETRY_AFTER)
        if LIMITER_REQUEST_DENIED.handlers:
            LIMITER_REQUEST_DENIED.emit({"cost": cost, "retry_after": retry_after}, self._metadata(key, cost))
        if logger.is_enabled_for(logging.DEBUG):
            logger.debug(
                "rate_limit_denied", key=key, limit=self.limit, window=self.window, cost=cost, retry_after=retry_after
            )
        raise RateLimitExceeded(key=key, limit=self.limit, window=self.window, retry_after=retry_after)

    def _metadata(self, key: str, cost: float) -> dict[str, Any]:
        return {
            "key": key,
            "limit": self.limit,
            "window": self.window,
            "cost": cost,
            "algorithm": "aiolimiter",
            "name": self.name,
        }

    def __repr__(self) -> str:
        return f"<AiolimiterAdapter {self.name!r} limit={self.limit!r} window={self.window!r} of {self._limiter!r}>"


def adapt(limiter: aiolimiter.AsyncLimiter | AiolimiterAdapter, *, name: str | None = None) -> AiolimiterAdapter:
    """Wrap ``limiter`` for seawall; an adapter is returned as it is."""
    if isinstance(limiter, AiolimiterAdapter):
        return limiter
    return AiolimiterAdapter(limiter, name=name)


if TYPE_CHECKING:

    def _limiter_like(adapter: AiolimiterAdapter) -> LimiterLike:
        return adapter  # the type checker holds the adapter to the coordinator's seam


def _adapter_for(limiter: object, name: str) -> AiolimiterAdapter | None:
    """``infra.rate_limiter.register(name, limiter)``'s adapter for aiolimiter limiters."""
    if isinstance(limiter, aiolimiter.AsyncLimiter):
        return AiolimiterAdapter(limiter, name=name)
    return None


# Registered from this side (the registry imports no integration): importing this
# module lets infra.rate_limiter.register() accept aiolimiter limiters.
LIMITER_ADAPTERS.append(_adapter_for)
