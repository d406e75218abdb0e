"""The in-process rate-limit backend: plain dicts, bounded by sweeping.

One :class:`BucketTable` per rule holds the buckets of that rule:

* :class:`GcraTable` stores, per key, one float: the bucket's *theoretical
  arrival time* (GCRA's TAT), the instant at which the bucket will have drained
  back to empty. The level at time ``now`` is ``(tat - now) / interval``; a
  hit of ``cost`` fits when the level after it is at most ``limit``, i.e.
  when ``tat + cost * interval - now <= window``. This is exactly the leaky
  bucket of aiolimiter (capacity ``limit``, draining ``limit / window`` per
  second) in one number instead of two, so a bucket costs one dict entry and
  one float, and the retry time of a denial is one subtraction.
* :class:`FixedWindowTable` counts hits per key in the current aligned window
  (``[k * window, (k + 1) * window)`` on the caller's clock) and drops the
  whole dict when the window rolls over.

Memory stays bounded without a timer per key and without a pass over all
keys (which would stall the event loop for a second with a million of them):
a GCRA bucket is never more than ``window`` seconds from empty, so buckets
are kept in generations of a window and a generation nobody touched is
dropped whole (see :class:`GcraTable`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from seawall._clock import Clock, current_clock
from seawall.backends._limiter_protocol import (
    AcquireHooks,
    BucketTable,
    RateLimitDecision,
    RateLimitRule,
    check_rule,
    tolerance,
)

__all__ = ["FixedWindowTable", "GcraTable", "MemoryRateLimitBackend", "admission_slack", "take_all"]


class GcraTable:
    """The GCRA (leaky bucket) buckets of one rule.

    Buckets live in two generations of at least ``window`` seconds each: the
    current dict, where every admitted hit writes, and the previous one,
    read through when a key was not hit in the current generation yet. When
    a generation is over, the previous dict is dropped whole (a bucket that
    was not hit for a full generation is empty) and the current one becomes
    the previous. If the table has been idle for a window, both are dropped.
    So no bucket outlives its last hit by more than two windows, a run of
    one-off keys is gone one window after it ended, and the bookkeeping
    costs one comparison per hit - no timer per key, no pass over all keys.

    Each generation stores its TATs relative to the time it started, so the
    floats stay small and a burst of ``limit`` hits at one instant adds up
    exactly, whatever the magnitude of the monotonic clock.

    Args:
        rule: The rule; its ``algorithm`` is not consulted.
    """

    __slots__ = (
        "_buckets",
        "_epoch",
        "_horizon",
        "_interval",
        "_last",
        "_previous",
        "_previous_epoch",
        "_rotate_at",
        "_window",
        "rule",
    )

    def __init__(self, rule: RateLimitRule) -> None:
        self.rule = rule
        self._window = rule.window
        self._interval = rule.window / rule.limit
        # The admission test's slack (see tolerance()): the same on every backend.
        self._horizon = rule.window * (1.0 + tolerance(rule.limit))
        self._buckets: dict[str, float] = {}  # the current generation: key -> TAT - _epoch
        self._epoch = 0.0
        self._previous: dict[str, float] = {}  # the previous generation: key -> TAT - _previous_epoch
        self._previous_epoch = 0.0
        self._last = -math.inf  # when a hit was last admitted
        self._rotate_at = -math.inf  # the first take() starts the first generation

    def take(self, key: str, cost: float, now: float) -> float | None:
        """Take ``cost`` if it fits; return the backlog in seconds (the state), or ``None``."""
        if now >= self._rotate_at:
            self._rotate(now)
        relative = now - self._epoch
        buckets = self._buckets
        tat = buckets.get(key)
        if tat is None:
            tat = self._inherit(key, relative) if self._previous else relative
        elif tat < relative:
            tat = relative
        tat += cost * self._interval
        backlog = tat - relative
        if backlog > self._horizon:
            return None
        buckets[key] = tat
        self._last = now
        return backlog

    def acquirer(self, key: str, cost: float, hooks: AcquireHooks) -> Callable[[], None]:
        """See :meth:`BucketTable.acquirer`: :meth:`take`'s arithmetic written out in one function.

        A hit through the coordinator is this one call: a second frame (the
        limiter's checks, then :meth:`take`) measured a quarter of its cost.
        It must decide exactly as :meth:`take`; ``tests/test_limiter_properties.py``
        plays random hits through both.
        """
        now, waiting, refuse, admitted, emit = hooks
        step = cost * self._interval  # the same product take() computes
        horizon = self._horizon

        def acquire() -> None:
            at = now()
            if waiting and key in waiting:
                refuse(key, cost, at)
            if at >= self._rotate_at:
                self._rotate(at)
            relative = at - self._epoch
            buckets = self._buckets
            tat = buckets.get(key)
            if tat is None:
                tat = self._inherit(key, relative) if self._previous else relative
            elif tat < relative:
                tat = relative
            tat += step
            if tat - relative > horizon:
                refuse(key, cost, at)
            buckets[key] = tat
            self._last = at
            if admitted.handlers:
                emit(key, cost)

        return acquire

    def _inherit(self, key: str, relative: float) -> float:
        # The bucket as the previous generation left it, on the current epoch.
        # It stays there too (a denial must not lose it); the previous dict goes whole.
        tat = self._previous.get(key)
        if tat is None:
            return relative
        tat += self._previous_epoch - self._epoch
        return tat if tat > relative else relative

    def _rotate(self, now: float) -> None:
        if now - self._last >= self._window:
            # Idle for a window: every bucket of both generations is empty.
            self._previous = {}
        else:
            # Buckets only in the previous generation were not hit for a whole
            # generation (at least a window): they are empty, drop them all.
            self._previous = self._buckets
            self._previous_epoch = self._epoch
        self._buckets = {}
        self._epoch = now
        self._rotate_at = now + self._window

    def _backlog(self, key: str, now: float) -> float:
        relative = now - self._epoch
        tat = self._buckets.get(key)
        if tat is None:
            tat = self._inherit(key, relative)
        backlog = tat - relative
        return backlog if backlog > 0.0 else 0.0

    def retry_after(self, key: str, cost: float, now: float) -> float:
        wait = self._backlog(key, now) + cost * self._interval - self._window
        return wait if wait > 0.0 else 0.0

    def peek(self, key: str, now: float) -> float:
        return self._backlog(key, now)

    def level(self, key: str, now: float) -> float:
        """The bucket's level (units of cost) at ``now``, as aiolimiter counts it."""
        return self._backlog(key, now) / self._interval

    def describe(self, state: float, now: float) -> tuple[float, int, float, float]:
        # ``state`` is the backlog (seconds until empty) at the time it was read,
        # so ``now`` is not needed: the description is of that moment.
        interval = self._interval
        level = state / interval
        remaining = math.floor((self._horizon - state) / interval)
        # Judged against the horizon, as take() admits: a float-rounded backlog a hair past
        # the window still fits one more, and the status must say so.
        next_after = state + interval - self._horizon
        # Snapped so that a bucket drained by float time steps reads 2.0, not 1.9999999999998863
        # (round(level, 9) would do it too, at ten times the cost).
        whole = float(int(level + 0.5))
        if -1e-9 < level - whole < 1e-9:
            level = whole
        return (level, remaining if remaining > 0 else 0, next_after if next_after > 0.0 else 0.0, state)

    def levels(self, prefix: str, now: float) -> list[tuple[str, float]]:
        keys = {key for key in (*self._buckets, *self._previous) if key.startswith(prefix)}
        shares = ((key, self._backlog(key, now) / self._window) for key in keys)
        return [(key, share) for key, share in shares if share > 0.0]

    def fill(self, key: str, share: float, now: float) -> None:
        if now >= self._rotate_at:
            self._rotate(now)
        # A share of the window's backlog is the same share of the limit (level = backlog / interval).
        self._buckets[key] = now - self._epoch + min(share, 1.0) * self._window
        self._last = now

    def reset(self, key: str) -> None:
        self._buckets.pop(key, None)
        self._previous.pop(key, None)

    def __len__(self) -> int:
        """Resident buckets (a key in both generations counts twice)."""
        return len(self._buckets) + len(self._previous)

    def __repr__(self) -> str:
        return f"GcraTable({self.rule!r}, buckets={len(self)})"


class FixedWindowTable:
    """The fixed-window counters of one rule: a count per key in the current window.

    Args:
        rule: The rule; its ``algorithm`` is not consulted.
    """

    __slots__ = ("_counts", "_limit", "_window", "_window_end", "rule")

    def __init__(self, rule: RateLimitRule) -> None:
        self.rule = rule
        self._window = rule.window
        self._limit = rule.limit * (1.0 + tolerance(rule.limit))
        self._counts: dict[str, float] = {}
        self._window_end = -math.inf

    def window_end(self, now: float) -> float:
        """The end of the aligned window that contains ``now``."""
        window = self._window
        end = (math.floor(now / window) + 1) * window
        # ``now / window`` may round up across a boundary; the window must contain ``now``.
        return end if end > now else end + window

    def take(self, key: str, cost: float, now: float) -> float | None:
        """Count ``cost`` if the window has room; return the new count (the state), or ``None``."""
        if now >= self._window_end:
            # A new window: every count belongs to an old one, drop them all at once.
            self._counts = {}
            self._window_end = self.window_end(now)
        counts = self._counts
        count = counts.get(key, 0) + cost
        if count > self._limit:
            return None
        counts[key] = count
        return count

    def acquirer(self, key: str, cost: float, hooks: AcquireHooks) -> Callable[[], None]:
        """See :meth:`BucketTable.acquirer` (built on :meth:`take`)."""
        now, waiting, refuse, admitted, emit = hooks
        take = self.take

        def acquire() -> None:
            at = now()
            if waiting and key in waiting:
                refuse(key, cost, at)
            if take(key, cost, at) is None:
                refuse(key, cost, at)
            if admitted.handlers:
                emit(key, cost)

        return acquire

    def peek(self, key: str, now: float) -> float:
        return self._counts.get(key, 0) if now < self._window_end else 0

    def retry_after(self, key: str, cost: float, now: float) -> float:
        if self.peek(key, now) + cost <= self._limit:
            return 0.0
        return self.window_end(now) - now

    def describe(self, state: float, now: float) -> tuple[float, int, float, float]:
        until_end = self.window_end(now) - now
        remaining = max(math.floor(self._limit - state), 0)
        return (
            state,
            remaining,
            0.0 if remaining >= 1 else until_end,
            until_end if state > 0 else 0.0,
        )

    def levels(self, prefix: str, now: float) -> list[tuple[str, float]]:
        if now >= self._window_end:
            return []
        limit = self.rule.limit
        return [(key, count / limit) for key, count in self._counts.items() if key.startswith(prefix)]

    def fill(self, key: str, share: float, now: float) -> None:
        if now >= self._window_end:
            self._counts = {}
            self._window_end = self.window_end(now)
        self._counts[key] = min(share, 1.0) * self.rule.limit

    def reset(self, key: str) -> None:
        self._counts.pop(key, None)

    def __len__(self) -> int:
        return len(self._counts)

    def __repr__(self) -> str:
        return f"FixedWindowTable({self.rule!r}, buckets={len(self._counts)})"


def admission_slack(table: BucketTable) -> float:
    """The ``retry_after`` (seconds) under which :meth:`BucketTable.take` still admits: GCRA's tolerance, else 0.

    GCRA admits within :func:`tolerance` of its window, so a hit whose retry
    time is a few ulps fits now; a fixed window's retry time is already
    judged against its ceiling with that tolerance.
    """
    rule = table.rule
    return rule.window * tolerance(rule.limit) if isinstance(table, GcraTable) else 0.0


def take_all(tables: Sequence[BucketTable], key: str, cost: float, now: float) -> tuple[int, float] | None:
    """Take ``cost`` from bucket ``key`` of every table if it fits in all at ``now``, else from none.

    The decision of several rules on one bucket: every table is checked
    first and written only when all admit, so a denial consumes nothing.

    Returns:
        ``None`` when taken, else ``(index, wait)``: the table that waits
        longest and its ``retry_after``, the time the hit would pass every rule.
    """
    worst, wait = -1, 0.0
    for index, table in enumerate(tables):
        # Half the slack: a check that passes must leave take() no rounding to fail on.
        after = table.retry_after(key, cost, now)
        if after > admission_slack(table) * 0.5 and after > wait:
            worst, wait = index, after
    if worst >= 0:
        return worst, wait
    for table in tables:
        table.take(key, cost, now)
    return None


class MemoryRateLimitBackend:
    """Buckets in this process's memory (the default backend).

    Args:
        clock: The clock the coroutine methods read; a :class:`~seawall.RateLimiter`
            using this backend reads its own clock and uses the synchronous
            :meth:`table` fast path, so pass the same clock to both (or only
            to this backend: the limiter adopts it). By default the running
            event loop's, looked up when the backend is built (see ``seawall._clock``).
    """

    __slots__ = ("_tables", "clock")

    def __init__(self, *, clock: Clock | None = None) -> None:
        self.clock: Clock = current_clock() if clock is None else clock
        self._tables: dict[RateLimitRule, GcraTable | FixedWindowTable] = {}

    def table(self, rule: RateLimitRule) -> BucketTable:
        """The bucket table of ``rule``, created on first use."""
        found = self._tables.get(rule)
        if found is None:
            check_rule(rule)
            found = self._tables[rule] = GcraTable(rule) if rule.algorithm == "gcra" else FixedWindowTable(rule)
        return found

    async def take(self, key: str, cost: float, rule: RateLimitRule) -> RateLimitDecision:
        table = self.table(rule)
        now = self.clock.now()
        state = table.take(key, cost, now)
        if state is None:
            return decide(
                table, table.peek(key, now), now, admitted=False, retry_after=table.retry_after(key, cost, now)
            )
        return decide(table, state, now, admitted=True, retry_after=0.0)

    async def take_all(
        self, key: str, cost: float, rules: tuple[RateLimitRule, ...]
    ) -> tuple[bool, tuple[RateLimitDecision, ...]]:
        """See :meth:`~seawall.backends.MultiRuleBackend.take_all`: :func:`take_all` on this process's tables."""
        tables = [self.table(rule) for rule in rules]
        now = self.clock.now()
        admitted = take_all(tables, key, cost, now) is None
        decisions = []
        for table in tables:
            wait = 0.0 if admitted else table.retry_after(key, cost, now)
            state = table.peek(key, now)
            decisions.append(decide(table, state, now, admitted=admitted or wait == 0.0, retry_after=wait))
        return admitted, tuple(decisions)

    async def peek(self, key: str, rule: RateLimitRule) -> RateLimitDecision:
        table = self.table(rule)
        now = self.clock.now()
        state = table.peek(key, now)
        decision = decide(table, state, now, admitted=True, retry_after=0.0)
        return decision._replace(admitted=decision.next_after == 0.0)

    async def reset(self, key: str, rule: RateLimitRule) -> None:
        self.table(rule).reset(key)

    def __len__(self) -> int:
        """How many buckets are resident, over all rules."""
        return sum(len(table) for table in self._tables.values())

    def __repr__(self) -> str:
        return f"MemoryRateLimitBackend(rules={len(self._tables)}, buckets={len(self)}, clock={self.clock!r})"


def decide(table: BucketTable, state: float, now: float, *, admitted: bool, retry_after: float) -> RateLimitDecision:
    """Build the decision for a bucket of ``table`` in ``state`` at ``now``."""
    count, remaining, next_after, reset_after = table.describe(state, now)
    return RateLimitDecision(admitted, retry_after, count, remaining, reset_after, next_after)
