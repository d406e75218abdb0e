"""State stores for the primitives: in-memory (default) and Redis."""

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
    "Ticket",
    "Transition",
]
