"""The Lua scripts that decide rate limits on the Redis server.

Each script is one atomic step on the server, timed by the server's clock
(``redis.call('TIME')``). A non-deterministic read such as ``TIME`` is allowed
before a write only when the script is replicated by its effects: always on
Redis 7 and Valkey, the default on Redis 5 and 6 unless
``lua-replicate-commands no``, so every script starts by asking for it
(``redis.replicate_commands()``, a no-op where effects are the only way). The
semantics are those of the in-memory tables in ``_limiter_memory.py``:

* :data:`GCRA` keeps, per bucket, its *backlog* (seconds until the bucket is
  empty again) and the server time, in microseconds, when it was written.
  The backlog now is the stored one minus the time elapsed; a hit of
  ``cost`` fits when ``backlog + cost * interval <= window`` (the level after
  it is at most ``limit``). Storing a backlog (at most ``window``) instead of
  an absolute arrival time keeps the float small, so a burst adds up exactly
  as in memory, and the elapsed time is a difference of two exact integers.
* :data:`FIXED_WINDOW` keeps, per bucket, its count and the index of the
  aligned window (``floor(now / window)`` on the server clock) it counts;
  a count of another window reads as zero.

Both write with ``PX`` so an idle bucket vanishes once it is back to empty,
and both reply with one string of space-separated numbers: Redis truncates
Lua numbers in replies to integers, and one bulk string is about three times
cheaper for the client to parse than an array of them. ``ARGV[4]`` is
``"1"`` to take, ``"0"`` to only look.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

__all__ = ["FIXED_WINDOW", "GCRA", "MULTI", "PROBE", "Script"]


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script and its SHA1, the name ``EVALSHA`` calls it by."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest())


# KEYS[1] bucket; ARGV: horizon (the window with the rule's tolerance, s), interval (s per unit),
# cost, take ("1") or look ("0"). The client computes the horizon, so both backends share one slack.
# Reply: "<admitted 1|0> <backlog after the operation, s>".
GCRA = Script(
    """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local micros = t[2]
local now = tonumber(t[1]) * 1000000 + tonumber(micros)
local backlog = 0
local stored = redis.call('GET', KEYS[1])
if stored then
  local space = string.find(stored, ' ', 1, true)
  local elapsed = (now - tonumber(string.sub(stored, space + 1))) / 1000000
  -- a server clock stepped back must not grow the bucket
  if elapsed < 0 then elapsed = 0 end
  backlog = tonumber(string.sub(stored, 1, space - 1)) - elapsed
  if backlog < 0 then backlog = 0 end
end
if ARGV[4] == '1' then
  local after = backlog + tonumber(ARGV[3]) * tonumber(ARGV[2])
  if after <= tonumber(ARGV[1]) then
    local text = string.format('%.17g', after)
    -- now as TIME's digits, zero-padded: what %.17g prints of that integer, without formatting a float
    local stamp = t[1] .. string.sub('00000', #micros) .. micros
    redis.call('SET', KEYS[1], text .. ' ' .. stamp, 'PX', math.ceil(after * 1000) + 1)
    return '1 ' .. text
  end
end
return string.format('0 %.17g', backlog)
"""
)

# KEYS[1] bucket; ARGV: window (s), ceiling (the limit with the rule's tolerance), cost,
# take ("1") or look ("0").
# Reply: "<admitted 1|0> <count after the operation> <seconds until the window ends>".
FIXED_WINDOW = Script(
    """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local span = tonumber(ARGV[1]) * 1000000
local index = math.floor(now / span)
local ends = (index + 1) * span
-- now / span may round up across a boundary: the window must contain now
if ends <= now then
  index = index + 1
  ends = ends + span
end
local count = 0
local stored = redis.call('GET', KEYS[1])
if stored then
  local space = string.find(stored, ' ', 1, true)
  if tonumber(string.sub(stored, space + 1)) == index then
    count = tonumber(string.sub(stored, 1, space - 1))
  end
end
local left = string.format('%.17g', (ends - now) / 1000000)
if ARGV[4] == '1' then
  local after = count + tonumber(ARGV[3])
  if after <= tonumber(ARGV[2]) then
    local text = string.format('%.17g', after)
    redis.call('SET', KEYS[1], text .. string.format(' %.17g', index), 'PX', math.ceil((ends - now) / 1000))
    return '1 ' .. text .. ' ' .. left
  end
end
return string.format('0 %.17g ', count) .. left
"""
)

# Several rules of one bucket at once, each as GCRA or FIXED_WINDOW above: every rule is read
# and judged first, and written only when all admit, so a denial takes from none.
# KEYS[i] the bucket under rule i (all in one cluster slot: the caller's key carries a hash tag);
# ARGV: cost, take ("1") or look ("0"), then per rule "g" or "f" and that script's first two arguments.
# Reply: "<admitted 1|0>" then per rule " <fits 1|0> <state> <seconds until the window ends, or 0>",
# the state after the operation (GCRA's backlog, a fixed window's count).
MULTI = Script(
    """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cost = tonumber(ARGV[1])
local all = true
local fits, states, afters, lefts, expiries, stamps = {}, {}, {}, {}, {}, {}
for i = 1, #KEYS do
  local first, second = tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2])
  local stored = redis.call('GET', KEYS[i])
  if ARGV[3 * i] == 'g' then
    local backlog = 0
    if stored then
      local space = string.find(stored, ' ', 1, true)
      local elapsed = (now - tonumber(string.sub(stored, space + 1))) / 1000000
      if elapsed < 0 then elapsed = 0 end
      backlog = tonumber(string.sub(stored, 1, space - 1)) - elapsed
      if backlog < 0 then backlog = 0 end
    end
    states[i], afters[i], lefts[i], stamps[i] = backlog, backlog + cost * second, 0, now
    fits[i] = afters[i] <= first
    expiries[i] = math.ceil(afters[i] * 1000) + 1
  else
    local span = first * 1000000
    local index = math.floor(now / span)
    local ends = (index + 1) * span
    if ends <= now then
      index = index + 1
      ends = ends + span
    end
    local count = 0
    if stored then
      local space = string.find(stored, ' ', 1, true)
      if tonumber(string.sub(stored, space + 1)) == index then
        count = tonumber(string.sub(stored, 1, space - 1))
      end
    end
    states[i], afters[i], lefts[i], stamps[i] = count, count + cost, (ends - now) / 1000000, index
    fits[i] = afters[i] <= second
    expiries[i] = math.ceil((ends - now) / 1000)
  end
  if not fits[i] then all = false end
end
local taken = all and ARGV[2] == '1'
local reply = {taken and '1' or '0'}
for i = 1, #KEYS do
  local state = states[i]
  if taken then
    state = afters[i]
    redis.call('SET', KEYS[i], string.format('%.17g %.17g', state, stamps[i]), 'PX', expiries[i])
  end
  reply[#reply + 1] = string.format('%s %.17g %.17g', fits[i] and '1' or '0', state, lefts[i])
end
return table.concat(reply, ' ')
"""
)

# KEYS[1] a probe key of the backend's own. What RedisBackend.verify() runs once: the server clock, then a
# write (so a read-only replica, a script replicated verbatim, a cluster slot elsewhere all answer an error).
PROBE = Script(
    """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
redis.call('SET', KEYS[1], t[1], 'PX', 1000)
redis.call('DEL', KEYS[1])
return 'ok'
"""
)
