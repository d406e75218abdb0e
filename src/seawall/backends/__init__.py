"""State stores for the primitives: in-memory (default) and Redis."""

from typing import TYPE_CHECKING, Any

# -- circuit breaker (issue 4) --
from seawall.backends._breaker_memory import MemoryBreakerBackend
from seawall.backends._breaker_protocol import (
    Admission,
    BreakerBackend,
    BreakerPolicy,
    BreakerSnapshot,
    Ticket,
    Transition,
)

# -- rate limiter (issue 3) --
from seawall.backends._limiter_memory import MemoryRateLimitBackend
from seawall.backends._limiter_protocol import (
    LocalRateLimitBackend,
    RateLimitBackend,
    RateLimitDecision,
    RateLimitRule,
)

__all__: list[str] = [
    "Admission",
    "BreakerBackend",
    "BreakerPolicy",
    "BreakerSnapshot",
    "LocalRateLimitBackend",
    "MemoryBreakerBackend",
    "MemoryRateLimitBackend",
    "RateLimitBackend",
    "RateLimitDecision",
    "RateLimitRule",
    "RedisBackend",
    "Ticket",
    "Transition",
]

# -- redis (imported on first use: importing seawall must not import redis) --
if TYPE_CHECKING:
    from seawall.backends.redis import RedisBackend


def __getattr__(name: str) -> Any:
    if name == "RedisBackend":
        from seawall.backends.redis import RedisBackend

        return RedisBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
