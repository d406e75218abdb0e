"""Circuit breaker state in Redis: the rules of ``_breaker_protocol.py`` as one Lua script, and each process's view.

Each breaker name is one hash (``<prefix>:v2:cb:<name>``, so one key and one
cluster slot): ``s`` state, ``g`` generation, ``o`` when it opened, ``c`` the
failures counted per time bucket of ``window / 10`` (``"<bucket> <count>"``
pairs, at most ten live ones: failure accounting is O(1) per call however
many failures the fleet records), ``t`` the trial slots in use (``slot
start`` pairs), ``n`` the next slot number, and in the rate modes ``r``:
calls, failures and slow calls per bucket (``"<bucket> <calls> <failures>
<slow>"``, the window's eleven buckets and, for judging late successes on
the window of their own time, the ten before them: bounded, O(1) per call).
Every operation (``admit``, ``settle``, ``force``, ``snapshot``,
``restore``, and ``add``, which only counts successes) is one run of
:data:`BREAKER`, atomic and timed by the server's clock (or by the clock a
test gives the backend); the ``now`` that :class:`~seawall.CircuitBreaker`
passes is not used, so hosts whose clocks disagree still share one breaker.
The rolling window is bucketed: a failure counts for between ``0.9 *
window`` and ``window`` seconds towards ``failure_threshold``; the rate
modes follow the in-memory store's rules (``_breaker_protocol.py``), with
buckets computed by the same floor division.

Rate modes count successes, but a closed success costs no round trip: the
process keeps them per bucket (:class:`Successes`) and every operation of
the breaker carries them (``ARGV[10]``), or the backend's flush sends them
at most :data:`FLUSH_INTERVAL` later. The script counts each group in the
bucket it happened in and judges it on that bucket's window, so the rates
agree with the in-memory store's once the successes are sent.

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

__all__ = [
    "BREAKER",
    "FLUSH_INTERVAL",
    "Successes",
    "View",
    "admission",
    "arguments",
    "rate_argument",
    "settle_arguments",
    "snapshot",
    "transition",
]

# KEYS[1] breaker; ARGV: op, failure_threshold, window, recovery_time, half_open_max_calls, channel, name,
# now ("-": the server's clock), rates ("-" in count mode, else "<failure_rate|-> <slow_call_rate|-> <minimum_calls>"),
# successes ("" or "<generation> <age> <calls> ..."; the process's uncounted plain successes, per bucket, each
# group's age in seconds), then per op: settle: generation ("-" for none), slot ("0" for none), outcome, slow ("1"|"0");
# force: "closed" | "open";  restore: open seconds left, generation.  ("add" only counts the successes.)
# Replies (one string, space-separated), each ending in "<state> <generation> <open seconds left>":
#   admit:    "<generation|-> <slot> <retry_after> <state> <old|-> <new|-> ..."
#   settle, force, restore, add: "<old|-> <new|-> ..."
#   snapshot: "<state> <failure_count> <retry_after> <trials> <calls> <failures> <slow> ..."
BREAKER = Script(
    """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if ARGV[8] ~= '-' then now = tonumber(ARGV[8]) end
local op = ARGV[1]
local threshold = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local recovery = tonumber(ARGV[4])
local max_trials = tonumber(ARGV[5])
local h = redis.call('HMGET', KEYS[1], 's', 'g', 'o', 'c', 't', 'n', 'r')
local state = h[1] or 'closed'
local generation = tonumber(h[2]) or 0
local opened_at = tonumber(h[3]) or 0
local width = window / 10
-- the bucket of time t: Python's float floor division (t // width), so every boundary is the in-memory
-- store's to the last bit (floor(t / width) rounds the quotient first, and disagrees next to a boundary)
local function bucket_of(t)
  local mod = math.fmod(t, width)
  if mod ~= 0 and mod < 0 then mod = mod + width end
  local div = (t - mod) / width
  local floor = math.floor(div)
  if div - floor > 0.5 then floor = floor + 1 end
  return floor
end
local current = bucket_of(now)
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
-- rate modes: per bucket "<bucket> <calls> <failures> <slow>", the current bucket and the ten before it (as in
-- memory: an outcome leaves the window at most 10% late), oldest first: O(1) per call
local rated = ARGV[9] ~= '-'
local failure_rate, slow_rate, minimum = nil, nil, 0
local rates = {}
if rated then
  local words = {}
  for word in string.gmatch(ARGV[9], '%S+') do words[#words + 1] = word end
  failure_rate, slow_rate, minimum = tonumber(words[1]), tonumber(words[2]), tonumber(words[3])
  if h[7] then
    local quad = {}
    for word in string.gmatch(h[7], '%S+') do
      quad[#quad + 1] = tonumber(word)
      if #quad == 4 then
        -- (kept a window longer than they count: waiting successes are judged on the window of their own time)
        if quad[1] >= current - 20 then rates[#rates + 1] = quad end
        quad = {}
      end
    end
  end
end

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
  rates = {}
  move('closed')
end
local function fail()
  local last = buckets[#buckets]
  if last ~= nil and last[1] == current then last[2] = last[2] + 1 else buckets[#buckets + 1] = {current, 1} end
end
local function encode_rates()
  local r = {}
  for _, quad in ipairs(rates) do
    if quad[1] >= current - 20 then r[#r + 1] = string.format('%d %d %d %d', quad[1], quad[2], quad[3], quad[4]) end
  end
  return table.concat(r, ' ')
end
-- a closed hash outlives its last outcome's window (a rate bucket is in it for up to 1.1 windows)
local function expire()
  local span = window
  if rated then span = window * 1.1 end
  redis.call('PEXPIRE', KEYS[1], math.ceil(span * 1000) + 1)
end
local function save()
  local c = {}
  for _, pair in ipairs(buckets) do c[#c + 1] = string.format('%d %d', pair[1], pair[2]) end
  local s = {}
  for _, pair in ipairs(trials) do s[#s + 1] = string.format('%d %.17g', pair[1], pair[2]) end
  redis.call('HSET', KEYS[1], 's', state, 'g', string.format('%.17g', generation),
    'o', string.format('%.17g', opened_at), 'c', table.concat(c, ' '), 't', table.concat(s, ' '),
    'n', string.format('%d', next_slot), 'r', encode_rates())
  if state == 'closed' then
    expire()
  else
    redis.call('PERSIST', KEYS[1])
  end
  if changed then
    redis.call('PUBLISH', ARGV[6], string.format('%s %.17g %.17g ', state, generation, remaining()) .. ARGV[7])
    changed = false
  end
end
-- a plain failure that changed no state: only the counts change (and the expiry moves)
local function save_counts()
  if h[1] == false or h[1] == nil then return save() end
  local c = {}
  for _, pair in ipairs(buckets) do c[#c + 1] = string.format('%d %d', pair[1], pair[2]) end
  redis.call('HSET', KEYS[1], 'c', table.concat(c, ' '), 'r', encode_rates())
  expire()
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

-- rate modes: count one or more outcomes in bucket ``index`` (a bucket before the window: not at all)
local function tally(index, calls, failures, slow)
  if index > current then index = current end
  if index < current - 10 then return end
  local at = #rates + 1
  for i, quad in ipairs(rates) do
    if quad[1] == index then
      quad[2], quad[3], quad[4] = quad[2] + calls, quad[3] + failures, quad[4] + slow
      return
    end
    if quad[1] > index then at = i; break end
  end
  table.insert(rates, at, {index, calls, failures, slow})
end
-- calls, failures and slow calls in the window at bucket ``at`` (the current one unless given)
local function totals(at)
  at = at or current
  local calls, failures, slow = 0, 0, 0
  for _, quad in ipairs(rates) do
    if quad[1] >= at - 10 and quad[1] <= at then
      calls, failures, slow = calls + quad[2], failures + quad[3], slow + quad[4]
    end
  end
  return calls, failures, slow
end
-- open if a rate is reached over the window judged at ``calls`` calls (memory judges after every call)
local function judge(calls, failures, slow)
  if calls < minimum then return end
  if failure_rate ~= nil and failures >= failure_rate * calls then open(); return end
  if slow_rate ~= nil and slow >= slow_rate * calls then open() end
end
-- a plain ticket of another period decides nothing (an absent or negative one, or a forgotten period: counts)
local function stale(ticket)
  return ticket ~= nil and ticket >= 0 and ticket ~= generation and generation ~= 0
end
-- the process's successes not yet counted, oldest group first: each goes in the bucket it happened in
-- (now - age) and is judged on the window of that bucket, as memory judged it when it happened. Successes
-- only lower a rate, except the one that brings the window to minimum_calls (or a bucket whose start
-- pushed older ones out): judged at the first count at which memory, judging after every call, would have
if rated and ARGV[10] ~= '' and op ~= 'force' and op ~= 'restore' then
  local words = {}
  for word in string.gmatch(ARGV[10], '%S+') do words[#words + 1] = tonumber(word) end
  if state == 'closed' and not stale(words[1]) then
    for i = 2, #words - 1, 2 do
      local index = math.min(bucket_of(now - words[i]), current)
      if index >= current - 10 and state == 'closed' then
        local before = totals(index)
        tally(index, words[i + 1], 0, 0)
        local calls, failures, slow = totals(index)
        local first = math.max(minimum, before + 1)
        if first <= calls then judge(first, failures, slow) end
      end
    end
    if state == 'open' then save() else save_counts() end
  end
end

if op == 'admit' then
  if state == 'closed' then
    return string.format('%.17g 0 0 closed ', generation) .. moved .. tail()
  end
  if state == 'open' then
    local left = opened_at + recovery - now
    if left > 0 then
      return string.format('- 0 %.17g open ', left) .. moved .. tail()
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
  local ticket = tonumber(ARGV[11])
  local slot = tonumber(ARGV[12])
  local outcome = ARGV[13]
  local slow = ARGV[14] == '1'
  if slot ~= 0 then
    if ticket ~= generation then return moved .. tail() end
    local kept = {}
    for _, pair in ipairs(trials) do
      if pair[1] ~= slot then kept[#kept + 1] = pair end
    end
    trials = kept
    -- a slow trial says the dependency is still slow
    if outcome == 'success' and slow and slow_rate ~= nil then outcome = 'failure' end
    if outcome == 'success' then
      close()
    elseif outcome == 'failure' then
      open()
    end
    save()
    return moved .. tail()
  end
  if stale(ticket) or state ~= 'closed' then return moved .. tail() end
  if not rated then
    if outcome ~= 'failure' then return moved .. tail() end
    fail()
    if count() >= threshold then
      open()
      save()
    else
      save_counts()
    end
    return moved .. tail()
  end
  if outcome == 'cancelled' then return moved .. tail() end
  local failed = 0
  if outcome == 'failure' then failed = 1 end
  local late = 0
  if slow then late = 1 end
  tally(current, 1, failed, late)
  if failed == 1 then
    fail()  -- failure_threshold applies as well
    if count() >= threshold then open() end
  end
  if state == 'closed' then judge(totals()) end
  if state == 'closed' then save_counts() else save() end
  return moved .. tail()
end

if op == 'add' then
  return moved .. tail()
end

if op == 'force' then
  if ARGV[11] == 'closed' then
    if state == 'closed' then buckets = {}; rates = {}; renew() else close() end
  else
    if state == 'open' then opened_at = now; renew() else open() end
  end
  save()
  return moved .. tail()
end

if op == 'restore' then
  -- a process that knew this breaker OPEN re-publishes it on a server that lost it
  if h[1] == false or h[1] == nil then
    local left = tonumber(ARGV[11])
    if left > 0 then
      generation = tonumber(ARGV[12])
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
local calls, failures, slow = totals()
local rated_counts = string.format(' %d %d %d', calls, failures, slow)
local effective = state
if state == 'open' and not (opened_at + recovery - now > 0) then effective = 'half_open' end
if effective == 'open' then
  return string.format('open %d %.17g 0', count(), opened_at + recovery - now) .. rated_counts .. tail()
end
if effective == 'half_open' and state == 'half_open' then
  local live = live_trials()
  local retry = 0
  if #live >= max_trials then retry = oldest(live) + recovery - now end
  return string.format('half_open %d %.17g %d', count(), retry, #live) .. rated_counts .. tail()
end
return string.format('%s %d 0 0', effective, count()) .. rated_counts .. tail()
"""
)

_NONE: Final = ("-", b"-")
#: The policy fields the script implements; any other one set is refused (it would be silently ignored).
_KNOWN_FIELDS: Final = frozenset(
    {
        "failure_threshold",
        "window",
        "recovery_time",
        "half_open_max_calls",
        "failure_rate",
        "slow_call_duration",
        "slow_call_rate",
        "minimum_calls",
    }
)


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


class Successes:
    """A process's plain successes of one breaker that Redis has not counted yet (rate modes), per time bucket.

    They ride on the next round trip of the breaker (a failure, a slow call,
    an admission, a snapshot) or on the backend's flush, at most
    :data:`FLUSH_INTERVAL` later. Each bucket is sent as its age (the seconds
    since its middle), so the server counts it in the bucket it happened in
    whatever the offset between the two clocks.
    """

    __slots__ = ("buckets", "filling", "generation", "index", "until", "width")

    def __init__(self, generation: int, width: float) -> None:
        self.generation = generation
        self.width = width
        self.buckets: dict[int, int] = {}  # finished bucket index (the process's clock) -> successes
        # The bucket being filled, its count and when it ends (a reading before then is one comparison).
        self.index = 0
        self.filling = 0
        self.until = -math.inf

    def add(self, now: float) -> None:
        if now >= self.until:
            if self.filling:
                self.buckets[self.index] = self.buckets.get(self.index, 0) + self.filling
                self.filling = 0
            # (Python's floor division, as the in-memory store and the script compute a bucket)
            self.index = int(now // self.width)
            self.until = (self.index + 1) * self.width
        self.filling += 1

    def argument(self, now: float) -> bytes:
        """The successes as the script's ARGV[10]: ``"<generation> <age> <calls> ..."``, oldest first."""
        width = self.width
        groups = dict(self.buckets)
        if self.filling:
            groups[self.index] = groups.get(self.index, 0) + self.filling
        words = [str(self.generation)]
        for index in sorted(groups):
            words += [repr(now - (index + 0.5) * width), str(groups[index])]
        return " ".join(words).encode()


#: Seconds a success waits at most in the process before Redis counts it (when no round trip carries it sooner).
FLUSH_INTERVAL: Final = 0.1


def arguments(policy: BreakerPolicy) -> tuple[bytes, ...]:
    """The policy as script arguments (ARGV[2] to ARGV[5]).

    Raises:
        ConfigurationError: The policy sets a field the script does not know
            (a policy of a newer protocol), which would otherwise be ignored.
    """
    for field in getattr(policy, "_fields", ()):
        if field in _KNOWN_FIELDS:
            continue
        value = getattr(policy, field)
        if value is not None and value is not False:
            raise ConfigurationError(
                f"circuit_breaker.{field}: the Redis breaker backend does not implement {field}={value!r}; "
                f"use the in-memory backend for it",
                path=f"circuit_breaker.{field}",
            )
    return (
        str(int(policy.failure_threshold)).encode(),
        repr(float(policy.window)).encode(),
        repr(float(policy.recovery_time)).encode(),
        str(int(policy.half_open_max_calls)).encode(),
    )


def rate_argument(policy: BreakerPolicy) -> bytes:
    """The rate modes as the script's ARGV[9]: ``"-"`` in count mode."""
    if not policy.rated:
        return b"-"
    failure_rate = "-" if policy.failure_rate is None else repr(float(policy.failure_rate))
    slow_rate = "-" if policy.slow_call_rate is None else repr(float(policy.slow_call_rate))
    return f"{failure_rate} {slow_rate} {int(policy.minimum_calls)}".encode()


def settle_arguments(ticket: Ticket | None, outcome: Outcome, slow: bool) -> tuple[bytes, ...]:
    """The ticket, outcome and slowness as script arguments (ARGV[11] to ARGV[14])."""
    late = b"1" if slow else b"0"
    if ticket is None:
        return (b"-", b"0", outcome.encode(), late)
    return (str(ticket.generation).encode(), str(ticket.trial or 0).encode(), outcome.encode(), late)


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


def snapshot(reply: bytes | str, policy: BreakerPolicy) -> tuple[BreakerSnapshot, Facts]:
    """Parse the reply of ``snapshot``; the rates as the in-memory store computes them."""
    words = reply.split()
    state, failure_count, retry_after, trials, calls_word, failures, slow = words[:7]
    calls = int(calls_word)
    failure_rate = slow_call_rate = None
    if policy.rated and calls >= policy.minimum_calls and calls > 0:
        failure_rate = int(failures) / calls
        slow_call_rate = None if policy.slow_call_rate is None else int(slow) / calls
    found = BreakerSnapshot(
        BreakerState(_text(state)),
        int(failure_count),
        float(retry_after),
        int(trials),
        calls if policy.rated else 0,
        failure_rate,
        slow_call_rate,
    )
    return found, _facts(words)


def message(data: bytes) -> tuple[bytes, Facts]:
    """Parse a published state change: the breaker's name (as on the wire) and its facts."""
    state, generation, left, name = data.split(b" ", 3)
    return name, (BreakerState(state.decode()), int(float(generation)), float(left))
