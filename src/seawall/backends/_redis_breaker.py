"""Circuit breaker state in Redis: the rules of ``_breaker_protocol.py`` as one Lua script, and each process's view.

Each breaker name is one hash (``<prefix>:v2:cb:<name>``, so one key and one
cluster slot): ``s`` state, ``g`` generation, ``o`` when it opened, ``c`` the
failures counted per time bucket of ``window / 10`` (``"<bucket> <count>"``
pairs, at most ten live ones: failure accounting is O(1) per call however
many failures the fleet records), ``t`` the trial slots in use (``slot
start`` pairs) and ``n`` the next slot number. Every operation (``admit``,
``settle``, ``force``, ``snapshot``, ``restore``) is one run of
:data:`BREAKER`, atomic and timed by the server's clock; the ``now`` that
:class:`~seawall.CircuitBreaker` passes is not used, so hosts whose clocks
disagree still share one breaker. The rolling window is bucketed: a failure
counts for between ``0.9 * window`` and ``window`` seconds.

Every state change (and ``reset()``/``trip()``) is published on the prefix's
channel (``<prefix>:v2:cb``) as ``"<state> <generation> <open seconds left>
<name>"``; every reply carries the same three facts. A process keeps a
:class:`View` per breaker from them, and decides from it without a round
trip while its subscription is live: a closed breaker admits a plain call,
an open one rejects until its recovery time, and a plain call's success
costs nothing (it never changes the state). A failure, a half-open
admission, a trial's outcome, ``force`` and ``snapshot`` go to the server.

A closed breaker's hash expires ``window`` seconds after its last write (its
failures are stale by then). Generations follow the rules of
``_breaker_protocol.py``: a missing hash is a closed period of generation
``0`` (one whose start is not remembered, in which every plain ticket
counts), and each state change or ``reset()``/``trip()`` moves the
generation to at least the server time in microseconds, so no ticket from
before a hash expired can match a later generation. ``restore`` writes an
OPEN state back to a server that lost the hash (a non-persistent server
restarted) from the view of a process that knew it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from seawall._errors import ConfigurationError
from seawall.backends._breaker_protocol import (
    Admission,
    BreakerPolicy,
    BreakerSnapshot,
    BreakerState,
    Outcome,
    Ticket,
    Transition,
)
from seawall.backends._redis_scripts import Script

__all__ = ["BREAKER", "View", "admission", "arguments", "settle_arguments", "snapshot", "transition"]

# KEYS[1] breaker; ARGV: op, failure_threshold, window, recovery_time, half_open_max_calls, channel, name,
# then per op: settle: generation ("-" for none), slot ("0" for none), outcome;  force: "closed" | "open";
# restore: open seconds left, generation.
# Replies (one string, space-separated), each ending in "<state> <generation> <open seconds left>":
#   admit:    "<generation|-> <slot> <retry_after> <state> <old|-> <new|-> ..."
#   settle, force, restore: "<old|-> <new|-> ..."
#   snapshot: "<state> <failure_count> <retry_after> <trials> ..."
BREAKER = Script(
    """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local op = ARGV[1]
local threshold = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local recovery = tonumber(ARGV[4])
local max_trials = tonumber(ARGV[5])
local h = redis.call('HMGET', KEYS[1], 's', 'g', 'o', 'c', 't', 'n')
local state = h[1] or 'closed'
local generation = tonumber(h[2]) or 0
local opened_at = tonumber(h[3]) or 0
local width = window / 10
local current = math.floor(now / width)
-- failures per time bucket of window / 10: at most ten live pairs "<bucket> <count>", O(1) per call
local buckets = {}
if h[4] then
  local index = nil
  for word in string.gmatch(h[4], '%S+') do
    if index == nil then index = tonumber(word) else
      if index > current - 10 then buckets[#buckets + 1] = {index, tonumber(word)} end
      index = nil
    end
  end
end
local trials = {}
if h[5] then
  local slot = nil
  for word in string.gmatch(h[5], '%S+') do
    if slot == nil then slot = tonumber(word) else trials[#trials + 1] = {slot, tonumber(word)}; slot = nil end
  end
end
local next_slot = tonumber(h[6]) or 1
local moved = '- -'
local changed = false

local function count()
  local n = 0
  for _, pair in ipairs(buckets) do n = n + pair[2] end
  return n
end
local function remaining()
  if state ~= 'open' then return 0 end
  local left = opened_at + recovery - now
  if left > 0 then return left end
  return 0
end
-- a new period: older tickets decide nothing; see the module docstring for why the clock
local function renew()
  generation = math.max(generation + 1, tonumber(t[1]) * 1000000 + tonumber(t[2]))
  trials = {}
  changed = true
end
local function move(new)
  moved = state .. ' ' .. new
  state = new
  renew()
end
local function open()
  opened_at = now
  move('open')
end
local function close()
  buckets = {}
  move('closed')
end
local function fail()
  local last = buckets[#buckets]
  if last ~= nil and last[1] == current then last[2] = last[2] + 1 else buckets[#buckets + 1] = {current, 1} end
end
local function save()
  local c = {}
  for _, pair in ipairs(buckets) do c[#c + 1] = string.format('%d %d', pair[1], pair[2]) end
  local s = {}
  for _, pair in ipairs(trials) do s[#s + 1] = string.format('%d %.17g', pair[1], pair[2]) end
  redis.call('HSET', KEYS[1], 's', state, 'g', string.format('%.17g', generation),
    'o', string.format('%.17g', opened_at), 'c', table.concat(c, ' '), 't', table.concat(s, ' '),
    'n', string.format('%d', next_slot))
  if state == 'closed' then
    redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1)
  else
    redis.call('PERSIST', KEYS[1])
  end
  if changed then
    redis.call('PUBLISH', ARGV[6], string.format('%s %.17g %.17g ', state, generation, remaining()) .. ARGV[7])
  end
end
-- a plain failure that changed no state: only the counts change (and the expiry moves)
local function save_counts()
  if h[1] == false or h[1] == nil then return save() end
  local c = {}
  for _, pair in ipairs(buckets) do c[#c + 1] = string.format('%d %d', pair[1], pair[2]) end
  redis.call('HSET', KEYS[1], 'c', table.concat(c, ' '))
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1)
end
local function tail()
  return string.format(' %s %.17g %.17g', state, generation, remaining())
end
-- one expression per boundary, as in memory: a slot is live while start + recovery - now > 0
local function live_trials()
  local kept = {}
  for _, pair in ipairs(trials) do
    if pair[2] + recovery - now > 0 then kept[#kept + 1] = pair end
  end
  return kept
end
local function oldest(list)
  local first = list[1][2]
  for _, pair in ipairs(list) do
    if pair[2] < first then first = pair[2] end
  end
  return first
end

if op == 'admit' then
  if state == 'closed' then
    return string.format('%.17g 0 0 closed - -', generation) .. tail()
  end
  if state == 'open' then
    local left = opened_at + recovery - now
    if left > 0 then
      return string.format('- 0 %.17g open - -', left) .. tail()
    end
    move('half_open')
  end
  if #trials >= max_trials then
    -- a trial holding its slot for recovery_time or longer is presumed hung
    trials = live_trials()
    if #trials >= max_trials then
      save()
      return string.format('- 0 %.17g half_open ', oldest(trials) + recovery - now) .. moved .. tail()
    end
  end
  local slot = next_slot
  next_slot = next_slot + 1
  trials[#trials + 1] = {slot, now}
  save()
  return string.format('%.17g %d 0 half_open ', generation, slot) .. moved .. tail()
end

if op == 'settle' then
  -- an absent or negative ticket was admitted without a decision: judged as current
  local ticket = tonumber(ARGV[8])
  local slot = tonumber(ARGV[9])
  local outcome = ARGV[10]
  if slot ~= 0 then
    if ticket ~= generation then return moved .. tail() end
    local kept = {}
    for _, pair in ipairs(trials) do
      if pair[1] ~= slot then kept[#kept + 1] = pair end
    end
    trials = kept
    if outcome == 'success' then
      close()
    elseif outcome == 'failure' then
      open()
    end
    save()
    return moved .. tail()
  end
  if ticket ~= nil and ticket >= 0 and ticket ~= generation and generation ~= 0 then
    return moved .. tail()
  end
  if outcome ~= 'failure' or state ~= 'closed' then
    return moved .. tail()
  end
  fail()
  if count() >= threshold then
    open()
    save()
  else
    save_counts()
  end
  return moved .. tail()
end

if op == 'force' then
  if ARGV[8] == 'closed' then
    if state == 'closed' then buckets = {}; renew() else close() end
  else
    if state == 'open' then opened_at = now; renew() else open() end
  end
  save()
  return moved .. tail()
end

if op == 'restore' then
  -- a process that knew this breaker OPEN re-publishes it on a server that lost it
  if h[1] == false or h[1] == nil then
    local left = tonumber(ARGV[8])
    if left > 0 then
      generation = tonumber(ARGV[9])
      opened_at = now - recovery + left
      state = 'open'
      moved = 'closed open'
      renew()
      save()
    end
  end
  return moved .. tail()
end

-- snapshot
local effective = state
if state == 'open' and not (opened_at + recovery - now > 0) then effective = 'half_open' end
if effective == 'open' then
  return string.format('open %d %.17g 0', count(), opened_at + recovery - now) .. tail()
end
if effective == 'half_open' and state == 'half_open' then
  local live = live_trials()
  local retry = 0
  if #live >= max_trials then retry = oldest(live) + recovery - now end
  return string.format('half_open %d %.17g %d', count(), retry, #live) .. tail()
end
return string.format('%s %d 0 0', effective, count()) .. tail()
"""
)

_NONE: Final = ("-", b"-")
_KNOWN_FIELDS: Final = frozenset({"failure_threshold", "window", "recovery_time", "half_open_max_calls"})


@dataclass(slots=True)
class View:
    """What one process knows of one breaker: enough to decide a closed or open call without a round trip."""

    state: BreakerState
    generation: int
    open_until: float
    """The loop time the OPEN state ends (``-inf`` when not open)."""
    confirmed: bool
    """Learned while the subscription was live (only a confirmed OPEN view rejects on its own)."""
    admission: Admission | None = None
    """While CLOSED: the admission of a plain call in this generation (one object, handed to every call)."""

    def learn(self, state: BreakerState, generation: int, left: float, now: float, *, reply: bool) -> None:
        """Take in a reply's or a message's facts; a message older than the view is ignored."""
        if generation < self.generation:
            if not reply or generation != 0:
                return
            if state is not BreakerState.CLOSED or self.state is not BreakerState.CLOSED:
                return  # a closed reply of a forgotten period must not hide a newer OPEN
        self.state = state
        self.generation = generation
        self.open_until = now + left if state is BreakerState.OPEN else -math.inf
        closed = state is BreakerState.CLOSED
        self.admission = Admission(Ticket(generation, None), 0.0, state, None) if closed else None


def arguments(policy: BreakerPolicy) -> tuple[bytes, ...]:
    """The policy as script arguments (ARGV[2] to ARGV[5]).

    Raises:
        ConfigurationError: The policy asks for a rate mode (``failure_rate``,
            ``slow_call_*``), which the Redis breaker does not implement yet.
    """
    for field in getattr(policy, "_fields", ()):
        if field in _KNOWN_FIELDS or field == "minimum_calls":
            continue
        value = getattr(policy, field)
        if value is not None and value is not False:
            raise ConfigurationError(
                f"circuit_breaker.{field}: the Redis breaker backend counts failures only (failure_threshold "
                f"within window); rate modes ({field}={value!r}) need the in-memory backend for now",
                path=f"circuit_breaker.{field}",
            )
    return (
        str(int(policy.failure_threshold)).encode(),
        repr(float(policy.window)).encode(),
        repr(float(policy.recovery_time)).encode(),
        str(int(policy.half_open_max_calls)).encode(),
    )


def settle_arguments(ticket: Ticket | None, outcome: Outcome) -> tuple[bytes, ...]:
    """The ticket and outcome as script arguments (ARGV[8] to ARGV[10])."""
    if ticket is None:
        return (b"-", b"0", outcome.encode())
    return (str(ticket.generation).encode(), str(ticket.trial or 0).encode(), outcome.encode())


def _text(word: bytes | str) -> str:
    return word.decode() if isinstance(word, bytes) else word


def _transition(old: bytes | str, new: bytes | str) -> Transition | None:
    if old in _NONE:
        return None
    return Transition(BreakerState(_text(old)), BreakerState(_text(new)))


#: The facts every reply and message ends with: the state, its generation, the open seconds left.
Facts = tuple[BreakerState, int, float]


def _facts(words: list[bytes] | list[str]) -> Facts:
    state, generation, left = words[-3:]
    return BreakerState(_text(state)), int(float(generation)), float(left)


def transition(reply: bytes | str) -> tuple[Transition | None, Facts]:
    """Parse the reply of ``settle``, ``force`` or ``restore``."""
    words = reply.split()
    return _transition(words[0], words[1]), _facts(words)


def admission(reply: bytes | str) -> tuple[Admission, Facts]:
    """Parse the reply of ``admit``."""
    words = reply.split()
    generation, slot, retry_after, state, old, new = words[:6]
    ticket = None if generation in _NONE else Ticket(int(float(generation)), int(slot) or None)
    return Admission(ticket, float(retry_after), BreakerState(_text(state)), _transition(old, new)), _facts(words)


def snapshot(reply: bytes | str) -> tuple[BreakerSnapshot, Facts]:
    """Parse the reply of ``snapshot``."""
    words = reply.split()
    state, failure_count, retry_after, trials = words[:4]
    found = BreakerSnapshot(BreakerState(_text(state)), int(failure_count), float(retry_after), int(trials))
    return found, _facts(words)


def message(data: bytes) -> tuple[bytes, Facts]:
    """Parse a published state change: the breaker's name (as on the wire) and its facts."""
    state, generation, left, name = data.split(b" ", 3)
    return name, (BreakerState(state.decode()), int(float(generation)), float(left))
