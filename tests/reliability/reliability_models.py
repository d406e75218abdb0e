"""Reference models of the limiter and the breaker, shared by their machines and the coordinator's.

Each is the contract written as plainly as possible, in exact arithmetic where
time matters (``Fraction`` for buckets); the state machines compare the real
primitives with them step by step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any


@dataclass
class Bucket:
    tat: Fraction = Fraction(0)  # GCRA: when the bucket is empty again
    window_index: int = -1  # fixed window: the window the count belongs to
    count: Fraction = Fraction(0)


@dataclass
class LimiterModel:
    """The two algorithms of the contract, per key, exactly."""

    algorithm: str
    limit: int
    window: Fraction
    buckets: dict[str, Bucket] = field(default_factory=dict)
    last_hit: dict[str, Fraction] = field(default_factory=dict)

    @property
    def interval(self) -> Fraction:
        return self.window / self.limit

    def _bucket(self, key: str) -> Bucket:
        return self.buckets.setdefault(key, Bucket())

    def backlog(self, key: str, now: Fraction) -> Fraction:
        return max(self._bucket(key).tat - now, Fraction(0))

    def count(self, key: str, now: Fraction) -> Fraction:
        bucket = self._bucket(key)
        return bucket.count if bucket.window_index == math.floor(now / self.window) else Fraction(0)

    def window_end(self, now: Fraction) -> Fraction:
        return (math.floor(now / self.window) + 1) * self.window

    def take(self, key: str, cost: int, now: Fraction) -> Fraction | None:
        """Take ``cost`` if it fits; ``None`` when admitted, else the exact retry time."""
        bucket = self._bucket(key)
        if self.algorithm == "gcra":
            backlog = self.backlog(key, now) + cost * self.interval
            if backlog > self.window:
                return backlog - self.window
            bucket.tat = now + backlog
        else:
            count = self.count(key, now) + cost
            if count > self.limit:
                return self.window_end(now) - now
            bucket.window_index = math.floor(now / self.window)
            bucket.count = count
        self.last_hit[key] = now
        return None

    def fits(self, key: str, cost: int, now: Fraction) -> bool:
        if self.algorithm == "gcra":
            return self.backlog(key, now) + cost * self.interval <= self.window
        return self.count(key, now) + cost <= self.limit

    def reset(self, key: str) -> None:
        self.buckets.pop(key, None)
        self.last_hit.pop(key, None)

    def status(self, key: str, now: Fraction) -> tuple[Fraction, int, Fraction, Fraction]:
        """``(current_count, remaining, retry_after, reset_after)`` of a status read at ``now``."""
        if self.algorithm == "gcra":
            backlog = self.backlog(key, now)
            remaining = math.floor((self.window - backlog) / self.interval)
            return (
                backlog / self.interval,
                max(remaining, 0),
                max(backlog + self.interval - self.window, Fraction(0)),
                backlog,
            )
        count = self.count(key, now)
        until_end = self.window_end(now) - now
        remaining = max(math.floor(self.limit - count), 0)
        return count, remaining, Fraction(0) if remaining >= 1 else until_end, until_end if count > 0 else Fraction(0)

    def recent_keys(self, now: Fraction) -> int:
        """Keys whose bucket may still be resident right after a hit at ``now``.

        GCRA buckets live in two generations that each last from one to two
        windows, so a bucket is gone at most four windows after its last hit.
        """
        if self.algorithm == "gcra":
            return sum(1 for at in self.last_hit.values() if at > now - 4 * self.window)
        index = math.floor(now / self.window)
        return sum(1 for at in self.last_hit.values() if math.floor(at / self.window) == index)


@dataclass
class BreakerModel:
    threshold: int
    max_calls: int
    window: float = 10.0
    recovery: float = 5.0
    state: str = "closed"
    generation: int = 0
    failures: list[float] = field(default_factory=list)
    opened_at: float = 0.0
    trials: dict[int, float] = field(default_factory=dict)
    next_slot: int = 0

    def move(self, state: str, now: float) -> None:
        """A new period: the state (possibly the same one, for reset()/trip()) and a new generation."""
        if state == "open":
            self.opened_at = now
        if state == "closed":
            self.failures = []
        self.state = state
        self.generation += 1
        self.trials = {}

    def effective(self, now: float) -> str:
        if self.state == "open" and not self.opened_at + self.recovery - now > 0:
            return "half_open"
        return self.state

    def live_trials(self, now: float) -> list[float]:
        return [start for start in self.trials.values() if start + self.recovery - now > 0]

    def admit(self, now: float) -> tuple[str, Any]:
        """``("reject", retry_after)``, or ``("closed" | "trial", ticket)``."""
        if self.state == "open":
            if self.opened_at + self.recovery - now > 0:
                return "reject", self.opened_at + self.recovery - now
            self.move("half_open", now)
        if self.state == "half_open":
            live = self.live_trials(now)
            if len(live) >= self.max_calls:
                return "reject", min(live) + self.recovery - now
            self.trials = {slot: start for slot, start in self.trials.items() if start + self.recovery - now > 0}
            self.next_slot += 1
            self.trials[self.next_slot] = now
            return "trial", (self.generation, self.next_slot)
        return "closed", (self.generation, None)

    def settle(self, ticket: tuple[int, int | None], outcome: str, now: float) -> None:
        generation, slot = ticket
        if generation != self.generation:
            return  # admitted in an earlier period: decides nothing
        if slot is not None:
            self.trials.pop(slot, None)
            if outcome == "success":
                self.move("closed", now)
            elif outcome == "failure":
                self.failures.append(now)
                self.move("open", now)
            return
        if outcome == "failure":
            self.failures = [at for at in self.failures if at > now - self.window] + [now]
            if len(self.failures) >= self.threshold:
                self.move("open", now)

    def failure_count(self, now: float) -> int:
        return sum(1 for at in self.failures if at > now - self.window)

    def retry_after(self, now: float) -> float:
        state = self.effective(now)
        if state == "open":
            return self.opened_at + self.recovery - now
        if state == "half_open" and self.state == "half_open":
            live = self.live_trials(now)
            if len(live) >= self.max_calls:
                return min(live) + self.recovery - now
        return 0.0


@dataclass
class RateBreakerModel:
    """The rate modes of the contract, plainly: every closed outcome kept as an event, rates over the window.

    The window at ``now`` is the buckets ``window / 10`` wide from ``floor(now / width) - 10`` on (so an
    outcome leaves it at most 10% late); with at least ``minimum_calls`` events in it, the breaker opens
    when failures / calls >= ``failure_rate`` or slow / calls >= ``slow_call_rate``. ``failure_threshold``
    (``None``: off) counts failures within exactly ``window`` seconds, as in count mode. One trial at a time.
    """

    failure_threshold: int | None
    failure_rate: float | None
    slow_call_duration: float | None
    slow_call_rate: float | None
    minimum_calls: int
    window: float = 10.0
    recovery: float = 5.0
    state: str = "closed"
    opened_at: float = 0.0
    events: list[tuple[float, bool, bool]] = field(default_factory=list)

    def _bucket(self, at: float) -> int:
        return int(at // (self.window / 10))

    def in_window(self, now: float) -> list[tuple[float, bool, bool]]:
        first = self._bucket(now) - 10
        return [event for event in self.events if self._bucket(event[0]) >= first]

    def effective(self, now: float) -> str:
        if self.state == "open" and not self.opened_at + self.recovery - now > 0:
            return "half_open"
        return self.state

    def rates(self, now: float) -> tuple[int, float | None, float | None]:
        events = self.in_window(now)  # (kept while open: the rates that opened it; closing empties them)
        calls = len(events)
        if calls < self.minimum_calls:
            return calls, None, None
        slow = None if self.slow_call_rate is None else sum(e[2] for e in events) / calls
        return calls, sum(e[1] for e in events) / calls, slow

    def admit(self, now: float) -> str:
        """``"closed"``, ``"trial"`` or ``"reject"`` (one call in flight at a time)."""
        state = self.effective(now)
        if state == "open":
            return "reject"
        if state == "half_open":
            self.state = "half_open"
            return "trial"
        return "closed"

    def settle(self, kind: str, failed: bool, slow: bool, now: float) -> None:
        if kind == "trial":
            if failed or (slow and self.slow_call_rate is not None):
                self.state, self.opened_at = "open", now
            else:
                self.state, self.events = "closed", []
            return
        self.events.append((now, failed, slow))
        failures = [e for e in self.events if e[1] and e[0] > now - self.window]
        if failed and self.failure_threshold is not None and len(failures) >= self.failure_threshold:
            self.state, self.opened_at = "open", now
            return
        _, failure_rate, slow_rate = self.rates(now)
        failing = failure_rate is not None and self.failure_rate is not None and failure_rate >= self.failure_rate
        slow_enough = slow_rate is not None and self.slow_call_rate is not None and slow_rate >= self.slow_call_rate
        if failing or slow_enough:
            self.state, self.opened_at = "open", now

    def reset(self) -> None:
        self.state, self.events = "closed", []
