"""The demo's schedule: phases and protection settings, scaled to the run's duration.

Every figure is a fraction of ``duration`` (clamped to sensible bounds), so a
2 s smoke run in CI and the 20 s default tell the same story: healthy, an
outage that opens the breaker, a slow spell that times out and fills the
pool, and a recovery that closes the breaker again.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

__all__ = ["PHASES", "ClientSpec", "Plan"]

#: Phase names in order, with the fraction of the run at which each starts.
PHASES: tuple[tuple[str, float], ...] = (
    ("healthy", 0.0),
    ("failing", 0.25),
    ("slow", 0.45),
    ("recovered", 0.6),
)


def _clamp(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))


@dataclass(frozen=True, slots=True)
class ClientSpec:
    """One virtual client: its address (its rate-limit bucket) and request rate."""

    name: str
    address: str
    rate: float
    greedy: bool


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything the scenario needs to know, derived from the command line."""

    duration: float
    seed: int
    timeout: float
    slow_delay: float
    recovery_time: float
    tick: float
    per_client_limit: int
    per_client_window: float
    pool_size: int
    pool_timeout: float
    clients: tuple[ClientSpec, ...]

    @classmethod
    def build(cls, duration: float, seed: int | None) -> Plan:
        """Derive the plan for a run of ``duration`` seconds.

        Args:
            duration: Seconds of load; at least 1.
            seed: Seed of the clients' rates and jitter; random when ``None``.

        Returns:
            The plan.
        """
        if not (math.isfinite(duration) and duration >= 1.0):
            raise ValueError(f"--duration must be at least 1 second, got {duration!r}")
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
        rng = random.Random(seed)
        timeout = 0.3
        clients = []
        for index in range(6):
            greedy = index >= 4
            # Polite clients stay under their limit, greedy ones go well over it.
            rate = rng.uniform(10.0, 14.0) if greedy else rng.uniform(2.5, 4.0)
            clients.append(ClientSpec(f"client-{index + 1}", f"127.0.0.{index + 11}", rate, greedy))
        return cls(
            duration=float(duration),
            seed=seed,
            timeout=timeout,
            # Slow but within the timeout: calls succeed, yet hold their pool
            # slot so long that the bulkhead fills and callers time out waiting.
            slow_delay=0.85 * timeout,
            recovery_time=_clamp(0.05 * duration, 0.25, 1.0),
            tick=_clamp(duration / 20, 0.1, 1.0),
            per_client_limit=5,
            per_client_window=1.0,
            pool_size=3,
            pool_timeout=timeout / 3,
            clients=tuple(clients),
        )

    def phase_at(self, elapsed: float) -> str:
        """The upstream's phase ``elapsed`` seconds into the run."""
        current = PHASES[0][0]
        for name, start in PHASES:
            if elapsed >= start * self.duration:
                current = name
        return current

    def phase_start(self, name: str) -> float:
        """Seconds into the run at which phase ``name`` starts."""
        return dict(PHASES)[name] * self.duration

    def protections(self) -> dict[str, dict[str, Any]]:
        """The ``configure_protection`` mappings: the API in front, the upstream behind."""
        return {
            # The FastAPI route: one bucket per client address.
            "api": {
                "rate_limiter": {"limit": self.per_client_limit, "window": self.per_client_window},
                "timeout": 4 * self.timeout,
            },
            # The upstream service: breaker, bulkhead pool and a timeout.
            "upstream": {
                "circuit_breaker": {
                    "failure_threshold": 5,
                    "window": max(2.0, self.duration),
                    "recovery_time": self.recovery_time,
                },
                "connection_pool": {"size": self.pool_size, "max_overflow": 0, "timeout": self.pool_timeout},
                "timeout": self.timeout,
            },
        }
