"""State stores for the primitives: in-memory (default) and Redis."""

# -- rate limiter (issue 3) --
from seawall.backends._limiter_memory import MemoryRateLimitBackend
from seawall.backends._limiter_protocol import (
    LocalRateLimitBackend,
    RateLimitBackend,
    RateLimitDecision,
    RateLimitRule,
)

__all__: list[str] = [
    "LocalRateLimitBackend",
    "MemoryRateLimitBackend",
    "RateLimitBackend",
    "RateLimitDecision",
    "RateLimitRule",
]
