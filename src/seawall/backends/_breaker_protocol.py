"""The state store of a circuit breaker, behind a small protocol.

A :class:`~seawall.CircuitBreaker` keeps its policy (thresholds, times) and
its per-task bookkeeping itself; everything that several processes must agree
on lives in a :class:`BreakerBackend`, keyed by the breaker's name:

* the state (closed / open / half-open) and a *generation* number that moves
  on every state change and on every ``reset()``/``trip()``,
* the recent failure times (the rolling window),
* when the breaker opened,
* the half-open trial slots in use, each with its start time.

Every operation is one self-contained decision taking the policy and the
time, so a shared backend can run each as a single atomic server-side script
(a Redis ``EVAL``) in one round trip. A shared backend should time with its
own (server) clock and may ignore the ``now`` it is given; the in-memory
backend uses the breaker's injected clock.

The rules every backend implements:

``admit``
    CLOSED admits a plain call. OPEN rejects while ``opened_at +
    recovery_time - now > 0`` (this one expression is the recovery boundary
    for ``admit``, ``snapshot`` and the breaker's own state), then turns
    HALF_OPEN. HALF_OPEN first forgets trial slots that are no longer live
    (a slot is live while ``start + recovery_time - now > 0``: a hung trial
    must not block recovery forever), then admits a trial if fewer than
    ``half_open_max_calls`` slots are in use, else rejects. Every admitted
    call gets a :class:`Ticket` naming the generation it was admitted in.
``settle``
    An outcome counts only in the period it started in. A ticket of another
    generation than the current one decides nothing: the breaker changed
    state (or was reset or tripped) while the call ran. A trial of the
    current generation frees its slot; its success closes the breaker
    (failures cleared), its failure opens it afresh. A plain call of the
    current generation matters only if it is a failure (the breaker is
    CLOSED then): it joins the rolling window, and ``failure_threshold``
    failures within ``window`` seconds open the breaker. Successes never
    erase failures. ``"cancelled"`` only frees the slot.
``force``
    ``reset()`` (to CLOSED, failures cleared) and ``trip()`` (to OPEN for a
    fresh ``recovery_time``). Both start a new period - the generation moves
    even when the state stays the same - so nothing admitted before them
    decides anything afterwards.

Rate modes (second release). A policy with ``failure_rate`` or
``slow_call_rate`` set (:attr:`BreakerPolicy.rated`) also counts *every*
closed-state outcome of the current period, successes included, in
time-bucketed counters over the rolling ``window``: buckets ``window / 10``
wide, aligned to ``floor(now / (window / 10))``; the window at ``now`` is the
current bucket and the 10 before it, so an outcome leaves the window at most
10% late and counting is O(1) per call. After a plain call is counted, with
at least ``minimum_calls`` calls in the window, the breaker opens when
``failures / calls >= failure_rate`` or ``slow / calls >= slow_call_rate``
(``failure_threshold`` failures still open it too; a policy whose
threshold is off carries :data:`~seawall._checks.MAX_COUNT`, which is never
reached). A call is *slow* when it took ``slow_call_duration`` or longer, or
timed out (the coordinator's ``ProtectionTimeout``), whatever its outcome;
a slow half-open trial counts as a failed one when ``slow_call_rate`` is set.
Closing the breaker (a trial success, ``reset()``) empties the counters.
``snapshot`` reports ``calls``, ``failure_rate`` and ``slow_call_rate`` over
the window (the rates ``None`` while fewer than ``minimum_calls`` calls are in
it).

What this adds to the protocol, for a backend that implements it:

* :class:`BreakerPolicy` has four more fields (``failure_rate``,
  ``slow_call_duration``, ``slow_call_rate``, ``minimum_calls``), with
  defaults that mean "count mode".
* ``breaker_settle`` takes ``slow: bool`` (keyword). The breaker passes it
  only when the policy is rated, and then also settles plain successes, so
  a backend without rate modes keeps working in count mode unchanged.
* :class:`BreakerSnapshot` has three more fields with defaults (``calls``,
  ``failure_rate``, ``slow_call_rate``).
* A backend declares that it implements rate modes with a true class
  attribute ``supports_rate_modes``. A :class:`~seawall.CircuitBreaker` given
  rate options on a backend without it raises ``ConfigurationError`` at
  construction rather than ignoring them.

A shared store may also implement :class:`LocalAdmission`: a synchronous
``breaker_admit_local`` that admits a plain call of the closed state from the
process's own view (no await), with the promise that such a call's success
(or cancellation) needs no ``breaker_settle`` in count mode. The breaker then
takes its synchronous path for a closed success - no coroutine, no shielded
settle - and still awaits ``breaker_settle`` for a failure, and
``breaker_admit`` whenever ``breaker_admit_local`` returns ``None``.

Under a rated policy a success must be counted, so the breaker uses that
path only on a store that also implements :class:`LocalSuccess`: a
synchronous ``breaker_succeed_local`` that counts a plain call's success
(one that was not slow) without an await, the store promising to add it to
the shared counts later (Redis: with the breaker's next round trip, or
within a bounded interval). A slow success and a failure are still settled
with ``breaker_settle``, so a rate is judged when one of them arrives.

Two tickets stand outside the generations: ``ticket=None`` (a plain call a
caller admitted without asking the store) and a ticket with a negative
generation (what a store hands out when it admitted a call without deciding,
such as Redis during an outage). Both are judged as plain calls of the
current period. A store may also forget the generation of a quiet closed
period (Redis lets an idle closed hash expire); it then reports generation
``0`` for it, and a plain ticket settled in generation ``0`` counts whatever
its own generation.
"""

from __future__ import annotations

import enum
from typing import Literal, NamedTuple, Protocol, runtime_checkable

__all__ = [
    "Admission",
    "BreakerBackend",
    "BreakerPolicy",
    "BreakerSnapshot",
    "BreakerState",
    "LocalAdmission",
    "LocalSuccess",
    "Outcome",
    "Ticket",
    "Transition",
]


class BreakerState(enum.StrEnum):
    """The state of a circuit breaker."""

    CLOSED = "closed"
    """Calls run; failures are counted."""
    OPEN = "open"
    """Calls are rejected at once until ``recovery_time`` has passed."""
    HALF_OPEN = "half_open"
    """A bounded number of trial calls run; their outcome closes or re-opens the breaker."""


#: How a call ended: ``"success"`` (excluded exceptions included), ``"failure"``,
#: or ``"cancelled"`` (cancellation and other ``BaseException``s: neither).
Outcome = Literal["success", "failure", "cancelled"]


class BreakerPolicy(NamedTuple):
    """The rule a breaker applies; passed with every operation (plain values, script-friendly)."""

    failure_threshold: int
    window: float
    recovery_time: float
    half_open_max_calls: int
    failure_rate: float | None = None
    """Open when failures / calls reaches it over the window (at least ``minimum_calls`` calls)."""
    slow_call_duration: float | None = None
    """Seconds from which a call counts as slow."""
    slow_call_rate: float | None = None
    """Open when slow calls / calls reaches it over the window (at least ``minimum_calls`` calls)."""
    minimum_calls: int = 10
    """Calls the window must hold before a rate decides anything."""

    @property
    def rated(self) -> bool:
        """Whether a rate mode is on: every outcome is counted, successes included."""
        return self.failure_rate is not None or self.slow_call_rate is not None


class Ticket(NamedTuple):
    """What ``admit`` hands to an admitted call, and the call hands back to ``settle``."""

    generation: int
    """The generation the call was admitted in (negative: admitted without a decision, judged as current)."""
    trial: int | None
    """The half-open trial slot held, or ``None`` for a plain (closed-state) call."""


class Transition(NamedTuple):
    """A state change made by an operation."""

    old: BreakerState
    new: BreakerState


class Admission(NamedTuple):
    """The answer of ``admit``."""

    ticket: Ticket | None
    """The admitted call's ticket, or ``None`` when rejected."""
    retry_after: float
    """When rejected: seconds until a call could be admitted (``0.0`` when admitted)."""
    state: BreakerState
    """The state after the decision."""
    transition: Transition | None
    """The state change the decision made (OPEN to HALF_OPEN), if any."""


class BreakerSnapshot(NamedTuple):
    """The state of one breaker at one instant, for ``status()``."""

    state: BreakerState
    failure_count: int
    """Failures within the rolling window."""
    retry_after: float
    """Seconds until a call could be admitted; ``0.0`` when one would be now."""
    trials: int
    """Trial slots in use (hung ones past ``recovery_time`` not counted)."""
    calls: int = 0
    """Calls counted in the window (rate modes only; ``0`` otherwise)."""
    failure_rate: float | None = None
    """Failures / calls in the window (``None``: no rate mode, or fewer than ``minimum_calls``)."""
    slow_call_rate: float | None = None
    """Slow calls / calls in the window (``None``: no rate mode, or fewer than ``minimum_calls``)."""
    reachable: bool = True
    """``False``: a shared store could not be read (an outage); the rest is this process's own view."""


@runtime_checkable
class BreakerBackend(Protocol):
    """Where breaker state lives; one store may hold many breakers, keyed by name.

    Every method is one atomic decision. ``now`` is the breaker's clock
    reading; a backend shared between hosts should use its own clock instead.
    """

    async def breaker_admit(self, name: str, policy: BreakerPolicy, now: float) -> Admission:
        """Admit a call or reject it (see the module docstring for the rules)."""
        ...

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
        """Record how an admitted call ended; ``ticket=None`` is a plain call admitted without asking.

        ``slow`` (passed only under a rated policy): the call took
        ``slow_call_duration`` or longer, or timed out.
        """
        ...

    async def breaker_force(
        self, name: str, policy: BreakerPolicy, now: float, state: BreakerState
    ) -> Transition | None:
        """Force the state: CLOSED (failures cleared) or OPEN (for a fresh ``recovery_time``)."""
        ...

    async def breaker_snapshot(self, name: str, policy: BreakerPolicy, now: float) -> BreakerSnapshot:
        """Report the state without changing it."""
        ...


@runtime_checkable
class LocalAdmission(Protocol):
    """The capability of a shared store to admit a closed-state plain call without a round trip."""

    def breaker_admit_local(self, name: str, policy: BreakerPolicy) -> Ticket | None:
        """The ticket of a plain call admitted now from this process's view, or ``None``: ask ``breaker_admit``.

        A plain ticket returned here promises that the call's success or
        cancellation changes nothing in count mode, so the breaker settles
        only its failure.
        """
        ...


@runtime_checkable
class LocalSuccess(Protocol):
    """The capability of a shared store to count a rated breaker's plain success without a round trip."""

    def breaker_succeed_local(self, name: str, policy: BreakerPolicy, ticket: Ticket | None) -> None:
        """Count the success (not slow) of a plain call admitted with ``ticket``; the store sends it later."""
        ...
