"""The in-memory breaker store: the default, and the reference for the rules.

Each breaker name maps to a :class:`BreakerRecord`. The record's methods are
synchronous - a process-local decision needs no await - and
:class:`MemoryBreakerBackend` wraps them in the async
:class:`~seawall.backends._breaker_protocol.BreakerBackend` protocol for
callers that only know the protocol. :class:`~seawall.CircuitBreaker` holds
its record directly and peeks at ``state``, ``generation`` and ``opened_at``
so that its closed path reads no clock and its open rejection takes no
backend call.

Rate modes count in :class:`_Buckets`: the current bucket's counts as three
integers and the 10 buckets before it in a ring, with running totals, so a
call costs an index computation and a few additions (a bucket that falls out
of the window is subtracted once, when time moves past it).

A plain closed success - the common call of a rated breaker - goes through a
:class:`SuccessLane` instead, the breaker's own: one comparison with the
current bucket's end and one integer decrement (see :meth:`SuccessLane.succeed`).
"""

from __future__ import annotations

import itertools
import math
from collections import deque

from seawall.backends._breaker_protocol import (
    Admission,
    BreakerPolicy,
    BreakerSnapshot,
    BreakerState,
    Outcome,
    Ticket,
    Transition,
)

__all__ = ["BreakerRecord", "MemoryBreakerBackend", "SuccessLane"]

#: Buckets per window (each ``window / 10`` wide); the window is the current one and this many before it.
BUCKETS = 10

#: The most successes a :class:`SuccessLane` counts before it asks the record
#: again: CPython keeps the integers up to 256 preallocated, so its countdown
#: allocates nothing (a growing count allocates an int per call past 256).
CREDIT = 256

_CLOSED = BreakerState.CLOSED
_OPEN = BreakerState.OPEN
_HALF_OPEN = BreakerState.HALF_OPEN


class _Buckets:
    """Calls, failures and slow calls over the rolling window, in time buckets (see the protocol's rules)."""

    __slots__ = (
        "calls",
        "failures",
        "head",
        "policy",
        "ring",
        "slow",
        "total_calls",
        "total_failures",
        "total_slow",
        "trigger",
        "until",
        "width",
    )

    def __init__(self, policy: BreakerPolicy) -> None:
        self.width = policy.window / BUCKETS
        # The policy ``trigger`` was computed for: the value of ``calls`` at which
        # the window holds exactly ``minimum_calls`` calls, where a success
        # lane's credit ends (see BreakerRecord._arm): in the current bucket no
        # other success can make a rate reachable.
        self.policy = policy
        self.trigger = policy.minimum_calls
        # The absolute index of the current bucket (floor(now / width)); None
        # before the first call (any int can be an index: the clock's epoch is arbitrary).
        self.head: int | None = None
        self.until = -math.inf  # the current bucket's end: a reading before it counts in it, with no division
        self.calls = self.failures = self.slow = 0  # the current bucket
        # The BUCKETS buckets before the current one, by absolute index modulo BUCKETS+1.
        self.ring = [(0, 0, 0)] * (BUCKETS + 1)
        self.total_calls = self.total_failures = self.total_slow = 0  # the ring's sums

    def clear(self) -> None:
        self.head = None
        self.until = -math.inf
        self.calls = self.failures = self.slow = 0
        self.ring = [(0, 0, 0)] * (BUCKETS + 1)
        self.total_calls = self.total_failures = self.total_slow = 0
        self.trigger = self.policy.minimum_calls

    def retarget(self, policy: BreakerPolicy) -> None:
        """Apply another breaker's ``minimum_calls`` (same width) to the counts kept so far."""
        self.policy = policy
        self.trigger = policy.minimum_calls - self.total_calls

    def move(self, index: int) -> None:
        """Make ``index`` the current bucket: the old current one joins the ring, expired ones leave it."""
        head = self.head
        if head is None or index - head > BUCKETS:
            self.clear()  # nothing counted so far is in the window any more
        else:
            ring = self.ring
            size = BUCKETS + 1
            ring[head % size] = (self.calls, self.failures, self.slow)
            self.total_calls += self.calls
            self.total_failures += self.failures
            self.total_slow += self.slow
            # The window at ``index`` starts at bucket index - BUCKETS: older ones leave (each once).
            for old in range(head - BUCKETS, index - BUCKETS):
                calls, failures, slow = ring[old % size]
                if calls:
                    ring[old % size] = (0, 0, 0)
                    self.total_calls -= calls
                    self.total_failures -= failures
                    self.total_slow -= slow
            self.calls = self.failures = self.slow = 0
            self.trigger = self.policy.minimum_calls - self.total_calls
        self.head = index
        self.until = (index + 1) * self.width

    def count(self, now: float, failed: bool, slow: bool) -> None:
        index = int(now // self.width)
        head = self.head
        if index != head:
            if head is not None and index < head:
                index = head  # a reading from before the current bucket counts in it
            else:
                self.move(index)
        self.calls += 1
        if failed:
            self.failures += 1
        if slow:
            self.slow += 1

    def totals(self, now: float) -> tuple[int, int, int]:
        """Calls, failures and slow calls in the window at ``now`` (without moving the buckets)."""
        index = int(now // self.width)
        head = self.head
        if head is None or index - head > BUCKETS:
            return 0, 0, 0
        calls = self.total_calls + self.calls
        failures = self.total_failures + self.failures
        slow = self.total_slow + self.slow
        size = BUCKETS + 1
        for old in range(head - BUCKETS, index - BUCKETS):
            c, f, s = self.ring[old % size]
            calls, failures, slow = calls - c, failures - f, slow - s
        return calls, failures, slow


class BreakerRecord:
    """The shared state of one breaker name, and the state machine over it.

    Attributes:
        state: The stored state. An OPEN record whose ``recovery_time`` has
            passed stays OPEN here until the next ``admit`` turns it
            HALF_OPEN; :meth:`effective_state` reports it as HALF_OPEN.
        opened_at: Clock reading when it last opened.
        generation: Moves on every state change and on every ``force``
            (``reset()``/``trip()``); tickets of older generations no longer
            decide anything. A closed call that reads it before running and
            hands it back with its failure needs no ticket object.
    """

    __slots__ = ("_slot_ids", "armed", "buckets", "failures", "generation", "opened_at", "state", "trials")

    def __init__(self) -> None:
        self.state = _CLOSED
        self.opened_at = 0.0
        self.generation = 0
        # Failure times, oldest first. Bounded: once it holds
        # ``failure_threshold`` recent failures the breaker opens.
        self.failures: deque[float] = deque()
        # Trial slot id -> the time the trial was admitted.
        self.trials: dict[int, float] = {}
        self._slot_ids = itertools.count(1)
        # The rate modes' counters, made by the first rated call (see count()).
        self.buckets: _Buckets | None = None
        # The lane whose successes are counted ahead in the current bucket (see _arm()).
        self.armed: SuccessLane | None = None

    def _renew(self) -> None:
        # A new period: every call admitted before it is stale, and the trial
        # slots belonged to the old half-open episode.
        self._disarm()  # (before anything clears the buckets: the lane's credit is in them)
        self.generation += 1
        self.trials.clear()

    def _move(self, new: BreakerState) -> Transition:
        old = self.state
        self.state = new
        self._renew()
        return Transition(old, new)

    def _open(self, now: float) -> Transition:
        self.opened_at = now
        return self._move(_OPEN)

    def _close(self) -> Transition:
        transition = self._move(_CLOSED)
        self.failures.clear()
        if self.buckets is not None:
            self.buckets.clear()
        return transition

    @staticmethod
    def _prune(failures: deque[float], cutoff: float) -> None:
        while failures and failures[0] <= cutoff:
            failures.popleft()

    def effective_state(self, policy: BreakerPolicy, now: float) -> BreakerState:
        """The state a call arriving at ``now`` would meet (OPEN past recovery is HALF_OPEN)."""
        # The recovery boundary is one expression everywhere (admit, snapshot,
        # the breaker's inline rejection): ``opened_at + recovery_time - now``
        # is positive exactly while the breaker rejects. ``now - opened_at >=
        # recovery_time`` rounds differently and disagreed with it by 1e-15 s.
        if self.state is _OPEN and not self.opened_at + policy.recovery_time - now > 0:
            return _HALF_OPEN
        return self.state

    def _live_trials(self, policy: BreakerPolicy, now: float) -> list[float]:
        recovery = policy.recovery_time
        return [start for start in self.trials.values() if start + recovery - now > 0]

    def admit(self, policy: BreakerPolicy, now: float) -> Admission:
        """Admit a call or reject it (rules in :mod:`seawall.backends._breaker_protocol`)."""
        state = self.state
        if state is _CLOSED:
            return Admission(Ticket(self.generation, None), 0.0, state, None)
        transition = None
        if state is _OPEN:
            remaining = self.opened_at + policy.recovery_time - now
            if remaining > 0:
                return Admission(None, remaining, state, None)
            transition = self._move(_HALF_OPEN)
        trials = self.trials
        if len(trials) >= policy.half_open_max_calls:
            # A trial that has held its slot for recovery_time or longer no
            # longer blocks: it is presumed hung (resilience4j issue #935).
            recovery = policy.recovery_time
            for slot, start in list(trials.items()):
                if not start + recovery - now > 0:
                    del trials[slot]
            if len(trials) >= policy.half_open_max_calls:
                retry_after = min(trials.values()) + recovery - now
                return Admission(None, retry_after, _HALF_OPEN, transition)
        slot = next(self._slot_ids)
        trials[slot] = now
        return Admission(Ticket(self.generation, slot), 0.0, _HALF_OPEN, transition)

    def _current(self, ticket: Ticket) -> bool:
        """Whether a plain call's ticket belongs to the current period (see the protocol's rules)."""
        generation = ticket.generation
        return generation == self.generation or generation < 0

    def settle(
        self, policy: BreakerPolicy, now: float, ticket: Ticket | None, outcome: Outcome, slow: bool = False
    ) -> Transition | None:
        """Record how an admitted call ended (rules in :mod:`seawall.backends._breaker_protocol`)."""
        if ticket is not None:
            if ticket.trial is not None:
                if ticket.generation != self.generation:
                    return None  # a trial of an earlier period: its slot went with it
                self.trials.pop(ticket.trial, None)
                if outcome == "success" and slow and policy.slow_call_rate is not None:
                    outcome = "failure"  # a slow trial says the dependency is still slow
                if outcome == "success":
                    return self._close()
                if outcome == "failure":
                    # Pruned here too, or a dependency failing every trial for
                    # days would grow the list by one entry per recovery_time.
                    self.failures.append(now)
                    self._prune(self.failures, now - policy.window)
                    return self._open(now)
                return None
            if not self._current(ticket):
                return None  # admitted before the breaker last changed state
        if policy.rated:
            return None if outcome == "cancelled" else self.count(policy, now, outcome == "failure", slow)
        return self.fail(policy, now) if outcome == "failure" else None

    def lane(self, policy: BreakerPolicy) -> SuccessLane:
        """A fast path for the plain closed successes of one breaker (of ``policy``) into this record."""
        return SuccessLane(self, policy)

    def _arm(self, lane: SuccessLane, buckets: _Buckets) -> None:
        """Let ``lane`` count the next successes in the current bucket itself (the record is CLOSED).

        The credit is added to the bucket's calls ahead, and the lane counts
        it down: the bucket holds ``calls - lane.left`` calls. It ends when
        the call that brings the window to ``minimum_calls`` (``trigger``) is
        counted, so that call is checked as :meth:`count` would check it; in
        the current bucket no other success can open the breaker.
        """
        gap = buckets.trigger - buckets.calls
        credit = gap if 0 < gap < CREDIT else CREDIT
        buckets.calls += credit
        lane.left = credit
        lane.until = buckets.until
        self.armed = lane

    def _disarm(self) -> None:
        """Give the armed lane's unused credit back: the buckets hold the calls counted so far."""
        lane = self.armed
        if lane is not None:
            self.armed = None
            if self.buckets is not None:
                self.buckets.calls -= lane.left
            lane.left = 0
            lane.until = -math.inf

    def replenish(self, lane: SuccessLane, now: float) -> Transition | None:
        """``lane`` counted the last success of its credit at ``now``: check it, and arm the lane again."""
        self._disarm()
        buckets = self.buckets
        if buckets is None:  # (an armed lane has buckets)
            return None
        if buckets.calls == buckets.trigger:
            transition = self.count_checked(lane.policy, now, buckets)
            if transition is not None:
                return transition
        self._arm(lane, buckets)
        return None

    def count(
        self, policy: BreakerPolicy, now: float, failed: bool, slow: bool, lane: SuccessLane | None = None
    ) -> Transition | None:
        """Count a plain call's outcome under a rated policy (the caller checked the generation).

        ``lane``: the call is a success on that lane, which is armed again
        if the breaker stays closed.
        """
        if self.state is not _CLOSED:
            return None
        self._disarm()
        buckets = self.buckets
        if buckets is None or buckets.width != policy.window / BUCKETS:
            buckets = self.buckets = _Buckets(policy)
        elif buckets.policy is not policy:
            buckets.retarget(policy)
        buckets.count(now, failed, slow)
        if failed:
            transition = self.fail(policy, now)  # failure_threshold applies as well
            if transition is not None:
                return transition
        transition = self.count_checked(policy, now, buckets)
        if transition is None and lane is not None:
            self._arm(lane, buckets)
        return transition

    def count_checked(self, policy: BreakerPolicy, now: float, buckets: _Buckets) -> Transition | None:
        """Open if a rate is reached over the window (a call was just counted in ``buckets``)."""
        calls = buckets.total_calls + buckets.calls
        if calls < policy.minimum_calls:
            return None
        # (Checked after every call: reaching minimum_calls, or old calls leaving, can cross a rate too.)
        rate = policy.failure_rate
        if rate is not None and buckets.total_failures + buckets.failures >= rate * calls:
            return self._open(now)
        rate = policy.slow_call_rate
        if rate is not None and buckets.total_slow + buckets.slow >= rate * calls:
            return self._open(now)
        return None

    def fail(self, policy: BreakerPolicy, now: float) -> Transition | None:
        """Count a plain call's failure in the current period (the caller checked the generation)."""
        if self.state is not _CLOSED:
            return None
        failures = self.failures
        failures.append(now)
        self._prune(failures, now - policy.window)
        if len(failures) >= policy.failure_threshold:
            return self._open(now)
        return None

    def force(self, policy: BreakerPolicy, now: float, state: BreakerState) -> Transition | None:
        """Force the state to CLOSED (failures cleared) or OPEN (fresh recovery time); a new period either way."""
        if state is _CLOSED:
            if self.state is _CLOSED:
                self._renew()
                self.failures.clear()
                if self.buckets is not None:
                    self.buckets.clear()
                return None
            return self._close()
        if state is _OPEN:
            if self.state is _OPEN:
                self.opened_at = now
                self._renew()
                return None
            return self._open(now)
        raise ValueError(f"a breaker can be forced to closed or open, not {state!r}")

    def rates(self, policy: BreakerPolicy, now: float) -> tuple[int, float | None, float | None]:
        """Calls in the window and the failure and slow-call rates (``None`` below ``minimum_calls``)."""
        if not policy.rated or self.buckets is None:
            return 0, None, None
        self._disarm()  # (so that the buckets hold what was counted; the next success arms the lane again)
        calls, failures, slow = self.buckets.totals(now)
        if calls < policy.minimum_calls or calls == 0:
            return calls, None, None
        return calls, failures / calls, None if policy.slow_call_rate is None else slow / calls

    def snapshot(self, policy: BreakerPolicy, now: float) -> BreakerSnapshot:
        """Report the state at ``now`` without changing it."""
        cutoff = now - policy.window
        failure_count = sum(1 for at in self.failures if at > cutoff)
        rates = self.rates(policy, now)
        state = self.effective_state(policy, now)
        if state is _OPEN:
            return BreakerSnapshot(state, failure_count, self.opened_at + policy.recovery_time - now, 0, *rates)
        if state is _HALF_OPEN and self.state is _HALF_OPEN:
            live = self._live_trials(policy, now)
            retry_after = 0.0
            if len(live) >= policy.half_open_max_calls:
                retry_after = min(live) + policy.recovery_time - now
            return BreakerSnapshot(state, failure_count, retry_after, len(live), *rates)
        return BreakerSnapshot(state, failure_count, 0.0, 0, *rates)

    def __repr__(self) -> str:
        return (
            f"BreakerRecord(state={self.state.value!r}, failures={len(self.failures)}, "
            f"trials={len(self.trials)}, generation={self.generation})"
        )


class SuccessLane:
    """One breaker's fast path for its plain closed successes into a :class:`BreakerRecord` (rate modes).

    :meth:`succeed` is :meth:`BreakerRecord.count`'s common case, a success
    in the current bucket, done with a credit the record grants (see
    ``BreakerRecord._arm``): at most one lane of a record holds one at a
    time, and every change of the record's state or counts other than the
    lane's own successes takes it back first. A lane of another policy, or
    one past its bucket's end, finds no credit (``until`` is -inf) and
    counts through :meth:`BreakerRecord.count`.

    ``CircuitBreaker.call`` does the commonest case inline - a success with
    more than one unit of credit left is ``left -= 1`` - and calls
    :meth:`succeed` for the rest: the frame costs about a fifth of what
    counting a success adds to ``call()`` (benchmarks/bench_concurrency.py).
    ``tests/test_breaker_rates.py`` runs the permit pair (:meth:`BreakerRecord.count`),
    ``async with`` (this method) and ``call()`` on the same cases.
    """

    __slots__ = ("left", "policy", "record", "until")

    def __init__(self, record: BreakerRecord, policy: BreakerPolicy) -> None:
        self.record = record
        self.policy = policy
        self.until = -math.inf  # the end of the credited bucket; -inf: no credit
        self.left = 0  # the credit left: successes this lane may still count

    def succeed(self, now: float) -> Transition | None:
        """Count a plain call's fast success at ``now``, admitted closed in the record's current generation."""
        # A reading before the current bucket counts in it (as in
        # _Buckets.count), so only its end is compared. The success was
        # counted in the bucket when the credit was granted.
        if now < self.until:
            self.left -= 1
            if self.left:
                return None
            return self.record.replenish(self, now)
        return self.record.count(self.policy, now, False, False, self)

    def __repr__(self) -> str:
        return f"SuccessLane(left={self.left}, until={self.until})"


class MemoryBreakerBackend:
    """Breaker state in this process's memory (the default backend).

    Breakers given the same instance and the same name share one state.
    """

    __slots__ = ("_records",)

    #: This store implements the rate modes (see the protocol's rules).
    supports_rate_modes = True

    def __init__(self) -> None:
        self._records: dict[str, BreakerRecord] = {}

    def record(self, name: str) -> BreakerRecord:
        """The record of ``name``, created (closed) on first use."""
        found = self._records.get(name)
        if found is None:
            found = self._records[name] = BreakerRecord()
        return found

    async def breaker_admit(self, name: str, policy: BreakerPolicy, now: float) -> Admission:
        return self.record(name).admit(policy, now)

    async def breaker_settle(
        self,
        name: str,
        policy: BreakerPolicy,
        now: float,
        ticket: Ticket | None,
        outcome: Outcome,
        *,
        slow: bool = False,
    ) -> Transition | None:
        return self.record(name).settle(policy, now, ticket, outcome, slow)

    async def breaker_force(
        self, name: str, policy: BreakerPolicy, now: float, state: BreakerState
    ) -> Transition | None:
        return self.record(name).force(policy, now, state)

    async def breaker_snapshot(self, name: str, policy: BreakerPolicy, now: float) -> BreakerSnapshot:
        return self.record(name).snapshot(policy, now)

    def __repr__(self) -> str:
        return f"MemoryBreakerBackend(breakers={sorted(self._records)!r})"
