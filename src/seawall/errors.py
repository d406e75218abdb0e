"""Public home of the exception tree (drawn in :mod:`seawall._errors`)."""

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

__all__ = [
    "CircuitBreakerNotFound",
    "CircuitOpenError",
    "ConcurrencyLimitExceeded",
    "ConfigurationError",
    "ConfigurationTypeError",
    "NotFound",
    "PoolClosed",
    "PoolNotFound",
    "PoolTimeout",
    "ProtectionKeyNotFound",
    "ProtectionTimeout",
    "RateLimitExceeded",
    "RateLimiterError",
    "Rejected",
    "SeawallError",
]
