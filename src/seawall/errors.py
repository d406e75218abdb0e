"""Public home of the exception tree (drawn in :mod:`seawall._errors`)."""

from seawall._errors import (
    CircuitBreakerNotFound,
    CircuitOpenError,
    ConfigurationError,
    ConfigurationTypeError,
    PoolClosed,
    PoolNotFound,
    PoolTimeout,
    ProtectionKeyNotFound,
    ProtectionTimeout,
    RateLimiterError,
    RateLimitExceeded,
    SeawallError,
)

__all__ = [
    "CircuitBreakerNotFound",
    "CircuitOpenError",
    "ConfigurationError",
    "ConfigurationTypeError",
    "PoolClosed",
    "PoolNotFound",
    "PoolTimeout",
    "ProtectionKeyNotFound",
    "ProtectionTimeout",
    "RateLimitExceeded",
    "RateLimiterError",
    "SeawallError",
]
