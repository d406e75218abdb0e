"""Circuit breaker state in Redis: the rules of ``_breaker_memory.py`` as one Lua script.

Each breaker name is one hash (``<prefix>:cb:<name>``) with the fields of a
:class:`~seawall.backends._breaker_memory.BreakerRecord`: ``s`` state, ``g``
generation, ``o`` when it opened, ``f`` the failure times within the window
(space-separated, at most ``failure_threshold`` of them), ``t`` the trial
slots in use (``slot start`` pairs) and ``n`` the next slot number. Every
operation (``admit``, ``settle``, ``force``, ``snapshot``) is one run of
:data:`BREAKER`, atomic and timed by the server's clock; the ``now`` that
:class:`~seawall.CircuitBreaker` passes is not used, so hosts whose clocks
disagree still share one breaker.

A closed breaker's hash expires ``window`` seconds after its last write
(its failures are stale by then). Generations follow the rules of
``_breaker_protocol.py``: a missing hash is a closed period of generation
``0`` (one whose start is not remembered, in which every plain ticket
counts), and each state change or ``reset()``/``trip()`` moves the
generation to at least the server time in microseconds, so no ticket from
before a hash expired can match a later generation. What expiry forgets:
a call admitted before a state change, still running ``window`` seconds
after the breaker closed again quietly, is judged as current when it fails.
"""

from __future__ import annotations

from typing import Final

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

__all__ = ["BREAKER", "admission", "arguments", "snapshot", "transition"]

# KEYS[1] breaker; ARGV: op, failure_threshold, window, recovery_time, half_open_max_calls, then per op:
#   settle: generation ("-" for none), slot ("0" for none), outcome;  force: "closed" | "open".
# Replies (one string, space-separated):
#   admit:    "<generation|-> <slot> <retry_after> <state> <old|-> <new|->"
#   settle, force: "<old|-> <new|->"
#   snapshot: "<state> <failure_count> <retry_after> <trials>"
BREAKER = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local op = ARGV[1]
local threshold = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local recovery = tonumber(ARGV[4])
local max_trials = tonumber(ARGV[5])
local h = redis.call('HMGET', KEYS[1], 's', 'g', 'o', 'f', 't', 'n')
local state = h[1] or 'closed'
local generation = tonumber(h[2]) or 0
local opened_at = tonumber(h[3]) or 0
local failures = {}
if h[4] then
  for at in string.gmatch(h[4], '%S+') do failures[#failures + 1] = tonumber(at) end
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

-- a new period: older tickets decide nothing; see the module docstring for why the clock
local function renew()
  generation = math.max(generation + 1, tonumber(t[1]) * 1000000 + tonumber(t[2]))
  trials = {}
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
  failures = {}
  move('closed')
end
local function fail()
  failures[#failures + 1] = now
  local kept = {}
  for _, at in ipairs(failures) do
    if at > now - window then kept[#kept + 1] = at end
  end
  failures = kept
end
local function save()
  local f = {}
  for i, at in ipairs(failures) do f[i] = string.format('%.17g', at) end
  local s = {}
  for _, pair in ipairs(trials) do s[#s + 1] = string.format('%d %.17g', pair[1], pair[2]) end
  redis.call('HSET', KEYS[1], 's', state, 'g', string.format('%.17g', generation),
    'o', string.format('%.17g', opened_at), 'f', table.concat(f, ' '), 't', table.concat(s, ' '),
    'n', string.format('%d', next_slot))
  if state == 'closed' then
    redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1)
  else
    redis.call('PERSIST', KEYS[1])
  end
end
-- one expression per boundary, as in memory: a slot is live while start + recovery - now > 0
local function live_trials()
  local kept = {}
  for _, pair in ipairs(trials) do
    if pair[2] + recovery - now > 0 then kept[#kept + 1] = pair end
  end
  return kept
end
local function oldest(pairs)
  local first = pairs[1][2]
  for _, pair in ipairs(pairs) do
    if pair[2] < first then first = pair[2] end
  end
  return first
end

if op == 'admit' then
  if state == 'closed' then
    return string.format('%.17g 0 0 closed - -', generation)
  end
  if state == 'open' then
    local remaining = opened_at + recovery - now
    if remaining > 0 then
      return string.format('- 0 %.17g open - -', remaining)
    end
    move('half_open')
  end
  if #trials >= max_trials then
    -- a trial holding its slot for recovery_time or longer is presumed hung
    trials = live_trials()
    if #trials >= max_trials then
      save()
      return string.format('- 0 %.17g half_open ', oldest(trials) + recovery - now) .. moved
    end
  end
  local slot = next_slot
  next_slot = next_slot + 1
  trials[#trials + 1] = {slot, now}
  save()
  return string.format('%.17g %d 0 half_open ', generation, slot) .. moved
end

if op == 'settle' then
  -- an absent or negative ticket was admitted without a decision: judged as current
  local ticket = tonumber(ARGV[6])
  local slot = tonumber(ARGV[7])
  local outcome = ARGV[8]
  if slot ~= 0 then
    if ticket ~= generation then return moved end
    local kept = {}
    for _, pair in ipairs(trials) do
      if pair[1] ~= slot then kept[#kept + 1] = pair end
    end
    trials = kept
    if outcome == 'success' then
      close()
    elseif outcome == 'failure' then
      fail()
      open()
    end
    save()
    return moved
  end
  if ticket ~= nil and ticket >= 0 and ticket ~= generation and generation ~= 0 then
    return moved
  end
  if outcome ~= 'failure' or state ~= 'closed' then
    return moved
  end
  fail()
  if #failures >= threshold then open() end
  save()
  return moved
end

if op == 'force' then
  if ARGV[6] == 'closed' then
    if state == 'closed' then failures = {}; renew() else close() end
  else
    if state == 'open' then opened_at = now; renew() else open() end
  end
  save()
  return moved
end

-- snapshot
local count = 0
for _, at in ipairs(failures) do
  if at > now - window then count = count + 1 end
end
local effective = state
if state == 'open' and not (opened_at + recovery - now > 0) then effective = 'half_open' end
if effective == 'open' then
  return string.format('open %d %.17g 0', count, opened_at + recovery - now)
end
if effective == 'half_open' and state == 'half_open' then
  local live = live_trials()
  local retry = 0
  if #live >= max_trials then retry = oldest(live) + recovery - now end
  return string.format('half_open %d %.17g %d', count, retry, #live)
end
return string.format('%s %d 0 0', effective, count)
"""
)

_NONE: Final = ("-", b"-")


def arguments(policy: BreakerPolicy) -> tuple[bytes, ...]:
    """The policy as script arguments (ARGV[2] to ARGV[5])."""
    return (
        str(int(policy.failure_threshold)).encode(),
        repr(float(policy.window)).encode(),
        repr(float(policy.recovery_time)).encode(),
        str(int(policy.half_open_max_calls)).encode(),
    )


def settle_arguments(ticket: Ticket | None, outcome: Outcome) -> tuple[bytes, ...]:
    """The ticket and outcome as script arguments (ARGV[6] to ARGV[8])."""
    if ticket is None:
        return (b"-", b"0", outcome.encode())
    return (str(ticket.generation).encode(), str(ticket.trial or 0).encode(), outcome.encode())


def _transition(old: bytes | str, new: bytes | str) -> Transition | None:
    if old in _NONE:
        return None
    return Transition(BreakerState(_text(old)), BreakerState(_text(new)))


def _text(word: bytes | str) -> str:
    return word.decode() if isinstance(word, bytes) else word


def transition(reply: bytes | str) -> Transition | None:
    """Parse the reply of ``settle`` or ``force``."""
    old, new = reply.split()
    return _transition(old, new)


def admission(reply: bytes | str) -> Admission:
    """Parse the reply of ``admit``."""
    generation, slot, retry_after, state, old, new = reply.split()
    ticket = None if generation in _NONE else Ticket(int(generation), int(slot) or None)
    return Admission(ticket, float(retry_after), BreakerState(_text(state)), _transition(old, new))


def snapshot(reply: bytes | str) -> BreakerSnapshot:
    """Parse the reply of ``snapshot``."""
    state, failure_count, retry_after, trials = reply.split()
    return BreakerSnapshot(BreakerState(_text(state)), int(failure_count), float(retry_after), int(trials))
