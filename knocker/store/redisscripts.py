"""Pure: the Lua scripts the redis backend runs on the server, and the names of its keys.

Owns the key layout and every server-side rule (docs/redis.md#keys): a change to the
whitelist or a knock budget is one script, so it is atomic on the server and no
instance ever reads, decides and writes back (no read-modify-write across instances).

    {prefix}whitelist       sorted set: entry text -> expiry (Unix seconds). The whitelist.
    {prefix}changes         stream of changes: s=sequence, e=entry, x=expiry (-1: removed),
                            o=origin (which host made it). Trimmed to about STREAM_MAXLEN.
    {prefix}seq             counter: the s of the last change (a gap means "resynchronise")
    {prefix}rate:s:{client} sorted set of success times of one client, expiring on its own
    {prefix}rate:f:{client} the same for failed knocks
"""

from __future__ import annotations

from dataclasses import dataclass

STREAM_MAXLEN = 10_000  # changes kept; a replica further behind resynchronises in full
REMOVED = -1


@dataclass(frozen=True)
class Keys:
    whitelist: str
    changes: str
    seq: str
    rate: str  # prefix of the rate-limit keys

    @classmethod
    def under(cls, prefix: str) -> Keys:
        return cls(
            whitelist=f"{prefix}whitelist",
            changes=f"{prefix}changes",
            seq=f"{prefix}seq",
            rate=f"{prefix}rate:",
        )

    def budget(self, client: bytes, success: bool) -> str:
        return f"{self.rate}{'s' if success else 'f'}:{client.hex()}"


# KEYS: whitelist, changes, seq [, success times, failure times of the knocking client]
# ARGV: entry, now, wanted expiry, capacity, stream maxlen, origin, deadline (server ms)
#       [, reservation token, budget key lifetime in ms]
# -> {-1} when the server ran it after the deadline (the caller has given up: store
#    nothing), else {expiry, {evicted entries...}, sequence number of the grant}
# With the budget keys, the knock's reservation (RATE_RESERVE) is settled as a success in
# the same step: the grant and its count are one write, one round trip, one fsync.
#
# Expired entries are purged here, by the server, before anything is counted: an expired
# entry is never held against the capacity nor evicted in place of a live one. Readers
# filter by score (> now), so an entry is gone at its expiry even before a purge.
KNOCK = """
local clock = redis.call('TIME')
local server_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
if server_ms > tonumber(ARGV[7]) then
  return {-1}
end
local entry, now = ARGV[1], tonumber(ARGV[2])
local expiry, capacity = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local current = redis.call('ZSCORE', KEYS[1], entry)
if current and tonumber(current) > expiry then
  expiry = tonumber(current)  -- a re-knock never shortens a grant
end
local evicted = {}
if not current then
  local excess = redis.call('ZCARD', KEYS[1]) - capacity + 1
  if excess > 0 then
    -- the soonest-expiring entries; `entry` is not in the set, so never itself
    evicted = redis.call('ZRANGE', KEYS[1], 0, excess - 1)
    for _, victim in ipairs(evicted) do
      redis.call('ZREM', KEYS[1], victim)
      local seq = redis.call('INCR', KEYS[3])
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
                 's', seq, 'e', victim, 'x', -1, 'o', ARGV[6])
    end
  end
end
redis.call('ZADD', KEYS[1], expiry, entry)
local seq = redis.call('INCR', KEYS[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
           's', seq, 'e', entry, 'x', string.format('%d', expiry), 'o', ARGV[6])
if #KEYS == 5 then
  local held = 'held:' .. ARGV[8]
  if redis.call('ZREM', KEYS[4], held) == 1 then
    redis.call('ZADD', KEYS[4], now, 'knock:' .. ARGV[8])
    redis.call('PEXPIRE', KEYS[4], ARGV[9])
  end
  redis.call('ZREM', KEYS[5], held)
end
return {string.format('%d', expiry), evicted, seq}
"""

# KEYS: whitelist, changes, seq
# ARGV: now, stream maxlen, origin, then entry, expiry pairs (migration: a whole whitelist)
# -> number of entries stored. Keeps the later expiry of an entry already present.
LOAD = """
local now, stored = tonumber(ARGV[1]), 0
for i = 4, #ARGV, 2 do
  local entry, expiry = ARGV[i], tonumber(ARGV[i + 1])
  local current = redis.call('ZSCORE', KEYS[1], entry)
  if expiry > now and not (current and tonumber(current) >= expiry) then
    redis.call('ZADD', KEYS[1], expiry, entry)
    local seq = redis.call('INCR', KEYS[3])
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*',
               's', seq, 'e', entry, 'x', ARGV[i + 1], 'o', ARGV[3])
    stored = stored + 1
  end
end
return stored
"""

# KEYS: success times, failure times of one client (sorted sets: member -> time)
# ARGV: window start, success budget, failure budget (0: unlimited), now, token,
#       key lifetime in ms
# -> 1 and a place held in each limited budget ("held:" token, counted like a knock),
#    or 0 and nothing held when either budget is used up (docs/api.md#rate-limiting).
# Check and hold in one step: concurrent knocks on any instances never overrun a budget.
# A place never released (its worker died) leaves the window like any knock; each key
# expires by itself once the window has passed without knocks (no sweeper).
RATE_RESERVE = """
local budgets = {tonumber(ARGV[2]), tonumber(ARGV[3])}
for i = 1, 2 do
  if budgets[i] > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[1])
    if redis.call('ZCARD', KEYS[i]) >= budgets[i] then
      return 0
    end
  end
end
for i = 1, 2 do
  if budgets[i] > 0 then
    redis.call('ZADD', KEYS[i], ARGV[4], 'held:' .. ARGV[5])
    redis.call('PEXPIRE', KEYS[i], ARGV[6])
  end
end
return 1
"""

# KEYS: success times, failure times of one client
# ARGV: outcome ('success', 'failure' or 'uncounted'), now, token, key lifetime in ms
# Releases the places RATE_RESERVE held under `token` and counts the knock as what it
# turned out to be.
RATE_SETTLE = """
local held = 'held:' .. ARGV[3]
local counted = {success = 1, failure = 2}
for i = 1, 2 do
  if redis.call('ZREM', KEYS[i], held) == 1 and counted[ARGV[1]] == i then
    redis.call('ZADD', KEYS[i], ARGV[2], 'knock:' .. ARGV[3])
    redis.call('PEXPIRE', KEYS[i], ARGV[4])
  end
end
return 0
"""
