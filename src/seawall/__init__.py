"""seawall: asyncio-native resilience - rate limiting, circuit breaking, pooling.

Public names only; each lives in a private module named after it.
"""

# The public submodules, reachable after a bare ``import seawall``
# (``seawall.errors.RateLimitExceeded``, ``seawall.telemetry.attach``).
from seawall import errors as errors
from seawall import telemetry as telemetry
from seawall._breaker import BreakerPermit, BreakerState, BreakerStatus, CircuitBreaker
from seawall._clock import Clock, FakeClock, MonotonicClock
from seawall._concurrency import ConcurrencyLimiter, ConcurrencyLimiterStatistics, ConcurrencySlot
from seawall._config import (
    BreakerConfig,
    ChaosConfig,
    ConcurrencyConfig,
    HedgeConfig,
    PoolConfig,
    ProtectionConfig,
    RateLimitConfig,
    RetryConfig,
)
from seawall._errors import (
    CircuitBreakerNotFound,
    CircuitOpenError,
    ConcurrencyLimitExceeded,
    ConfigurationError,
    ConfigurationTypeError,
    NotFound,
    PoolClosed,
    PoolNotFound,
    PoolTimeout,
    ProtectionKeyNotFound,
    ProtectionTimeout,
    RateLimiterError,
    RateLimitExceeded,
    Rejected,
    SeawallError,
)
from seawall._infrastructure import AsyncInfrastructure
from seawall._limiter import MultiRateLimiter, RateLimitBucket, RateLimiter, RateLimitStatus
from seawall._pool import ConnectionPool, PoolLease, PoolStatus
from seawall._retry import Retry, RetryAttempt, RetryBudget, RetryBudgetStatistics
from seawall._version import __version__

__all__ = [
    "AsyncInfrastructure",
    "BreakerConfig",
    "BreakerPermit",
    "BreakerState",
    "BreakerStatus",
    "ChaosConfig",
    "CircuitBreaker",
    "CircuitBreakerNotFound",
    "CircuitOpenError",
    "Clock",
    "ConcurrencyConfig",
    "ConcurrencyLimitExceeded",
    "ConcurrencyLimiter",
    "ConcurrencyLimiterStatistics",
    "ConcurrencySlot",
    "ConfigurationError",
    "ConfigurationTypeError",
    "ConnectionPool",
    "FakeClock",
    "HedgeConfig",
    "MonotonicClock",
    "MultiRateLimiter",
    "NotFound",
    "PoolClosed",
    "PoolConfig",
    "PoolLease",
    "PoolNotFound",
    "PoolStatus",
    "PoolTimeout",
    "ProtectionConfig",
    "ProtectionKeyNotFound",
    "ProtectionTimeout",
    "RateLimitBucket",
    "RateLimitConfig",
    "RateLimitExceeded",
    "RateLimitStatus",
    "RateLimiter",
    "RateLimiterError",
    "Rejected",
    "Retry",
    "RetryAttempt",
    "RetryBudget",
    "RetryBudgetStatistics",
    "RetryConfig",
    "SeawallError",
    "__version__",
]
