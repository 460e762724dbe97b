"""Pure: the Lua scripts the redis backend runs on the server, and the names of its keys.

Owns the key layout and every server-side rule (docs/redis.md#keys): a change to the
whitelist or a knock budget is one script, so it is atomic on the server and no
instance ever reads, decides and writes back (no read-modify-write across instances).

    {prefix}whitelist       sorted set: entry text -> expiry (Unix seconds). The whitelist.
    {prefix}changes         stream of changes: s=sequence, e=entry, x=expiry (-1: removed),
                            o=origin (which host made it), and for a scoped grant k=key
                            name, p=its ports ("22/tcp,53/udp"; none: every monitored
                            port). Trimmed to about STREAM_MAXLEN.
    {prefix}seq             counter: the s of the last change (a gap means "resynchronise")
    {prefix}grants:{entry}  hash: key name -> "expiry granted_at how scoped(0|1)", plus
                            " ports" for a port-scoped grant ("... 1 22/tcp,53/udp"): who
                            granted the entry (docs/whitelist.md#grants); expires with its
                            last grant, its unscoped fields leave with the entry
    {prefix}scoped          sorted set: "{entry} {key name}" -> expiry, the grants of keys
                            with hosts: or ports: (never in the whitelist set, so never
                            seen by allows()); their ports are in their grant records
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
    grants: str  # prefix of the per-entry grant hashes
    scoped: str

    @classmethod
    def under(cls, prefix: str) -> Keys:
        return cls(
            whitelist=f"{prefix}whitelist",
            changes=f"{prefix}changes",
            seq=f"{prefix}seq",
            rate=f"{prefix}rate:",
            grants=f"{prefix}grants:",
            scoped=f"{prefix}scoped",
        )

    def grants_of(self, entry: str) -> str:
        return f"{self.grants}{entry}"

    def budget(self, client: bytes, success: bool) -> str:
        return f"{self.rate}{'s' if success else 'f'}:{client.hex()}"


# Shared by the scripts that change what is granted: the deadline check, the change
# stream, eviction and the settling of a knock's reservation.
CHANGE_HELPERS = """
local function past(deadline_ms)  -- the client stopped waiting for this script
  local clock = redis.call('TIME')
  local server_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  return server_ms > tonumber(deadline_ms)
end
local function append(stream, counter, maxlen, origin, entry, expiry, key_name, ports)
  local seq = redis.call('INCR', counter)  -- one change: its sequence number
  local fields = {'s', seq, 'e', entry, 'x', string.format('%d', expiry), 'o', origin}
  if key_name then
    table.insert(fields, 'k')
    table.insert(fields, key_name)
  end
  if ports and ports ~= '' then
    table.insert(fields, 'p')
    table.insert(fields, ports)
  end
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(fields))
  return seq
end
local function evict(set, capacity, on_victim)  -- room for one more member
  local excess = redis.call('ZCARD', set) - capacity + 1
  if excess <= 0 then return {} end
  local victims = redis.call('ZRANGE', set, 0, excess - 1)  -- the soonest-expiring
  for _, victim in ipairs(victims) do
    redis.call('ZREM', set, victim)
    on_victim(victim)
  end
  return victims
end
local function count_success(successes, failures, token, lifetime, now)
  local held = 'held:' .. token  -- RATE_RESERVE's place, settled as a success
  if redis.call('ZREM', successes, held) == 1 then
    redis.call('ZADD', successes, now, 'knock:' .. token)
    redis.call('PEXPIRE', successes, lifetime)
  end
  redis.call('ZREM', failures, held)
end
"""

# Shared by the scripts that touch grant records: a field is "expiry granted_at how s",
# or "expiry granted_at how 1 ports" for a port-scoped grant (a reader from before port
# scopes matches no such field: it drops the grant rather than widen it).
GRANT_HELPERS = """
local function parse_grant(value)  -- {expiry, granted_at, how, scoped, ports}, nil: damaged
  local x, g, h, s = string.match(value, '^(%-?%d+) (%-?%d+) (%S+) ([01])$')
  local ports = ''
  if not x then
    s = '1'
    x, g, h, ports = string.match(value, '^(%-?%d+) (%-?%d+) (%S+) 1 (%S+)$')
  end
  if not x then return nil end
  return {tonumber(x), tonumber(g), h, s, ports}
end
local function grant_fields(hkey)
  local out = {}
  local flat = redis.call('HGETALL', hkey)
  for i = 1, #flat, 2 do
    out[flat[i]] = parse_grant(flat[i + 1])
  end
  return out
end
local function settle(hkey, now)  -- drop ended grants; the hash expires with its last one
  local last = 0
  for name, g in pairs(grant_fields(hkey)) do
    if g[1] <= now then
      redis.call('HDEL', hkey, name)
    elseif g[1] > last then
      last = g[1]
    end
  end
  if last > 0 then redis.call('EXPIREAT', hkey, last) end
end
local function drop_unscoped(hkey)  -- the entry left the whitelist: so did these grants
  for name, g in pairs(grant_fields(hkey)) do
    if g[4] == '0' then redis.call('HDEL', hkey, name) end
  end
end
local function record(hkey, name, expiry, now, how, scoped, ports)
  local value = string.format('%d %d %s %s', expiry, math.floor(now), how, scoped)
  if ports and ports ~= '' then value = value .. ' ' .. ports end
  redis.call('HSET', hkey, name, value)
  settle(hkey, now)
end
"""

# KEYS: whitelist, changes, seq, grants of the entry
#       [, success times, failure times of the knocking client]
# ARGV: entry, now, wanted expiry, capacity, stream maxlen, origin, deadline (server ms),
#       grants prefix, key name ('' records no grant), how, the key's own expiry
#       [, reservation token, budget key lifetime in ms]
# -> {-1} when the server ran it after the deadline (the caller has given up: store
#    nothing), else {expiry, {evicted entries...}, sequence number of the grant}
# With the budget keys, the knock's reservation (RATE_RESERVE) is settled as a success in
# the same step: the grant and its count are one write, one round trip, one fsync.
#
# Expired entries are purged here, by the server, before anything is counted: an expired
# entry is never held against the capacity nor evicted in place of a live one. Readers
# filter by score (> now), so an entry is gone at its expiry even before a purge.
KNOCK = (
    CHANGE_HELPERS
    + GRANT_HELPERS
    + """
if past(ARGV[7]) then
  return {-1}
end
local entry, now = ARGV[1], tonumber(ARGV[2])
local expiry, capacity = tonumber(ARGV[3]), tonumber(ARGV[4])
local function change(changed, expiry_)
  return append(KEYS[2], KEYS[3], ARGV[5], ARGV[6], changed, expiry_)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local current = redis.call('ZSCORE', KEYS[1], entry)
if current and tonumber(current) > expiry then
  expiry = tonumber(current)  -- a re-knock never shortens a grant
end
local evicted = {}
if not current then
  -- `entry` is not in the set, so never itself a victim
  evicted = evict(KEYS[1], capacity, function(victim)
    drop_unscoped(ARGV[8] .. victim)
    change(victim, -1)
  end)
end
redis.call('ZADD', KEYS[1], expiry, entry)
local seq = change(entry, expiry)
if ARGV[9] ~= '' then
  -- the key's own grant: never shorter than its earlier live one
  local own = tonumber(ARGV[11])
  local earlier = grant_fields(KEYS[4])[ARGV[9]]
  if earlier and earlier[4] == '0' and earlier[1] > now and earlier[1] > own then
    own = earlier[1]
  end
  record(KEYS[4], ARGV[9], own, now, ARGV[10], '0')
end
if #KEYS == 6 then
  count_success(KEYS[5], KEYS[6], ARGV[12], ARGV[13], now)
end
return {string.format('%d', expiry), evicted, seq}
"""
)

# KEYS: whitelist, changes, seq
# ARGV: now, stream maxlen, origin, then entry, expiry pairs (migration: a whole whitelist)
# -> number of entries stored. Keeps the later expiry of an entry already present.
LOAD = (
    CHANGE_HELPERS
    + """
local now, stored = tonumber(ARGV[1]), 0
for i = 4, #ARGV, 2 do
  local entry, expiry = ARGV[i], tonumber(ARGV[i + 1])
  local current = redis.call('ZSCORE', KEYS[1], entry)
  if expiry > now and not (current and tonumber(current) >= expiry) then
    redis.call('ZADD', KEYS[1], expiry, entry)
    append(KEYS[2], KEYS[3], ARGV[2], ARGV[3], entry, expiry)
    stored = stored + 1
  end
end
return stored
"""
)

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

# KEYS: whitelist, changes, seq, grants of the entry, scoped grants
#       [, success times, failure times of the knocking client]
# ARGV: entry, now, the key's own expiry, capacity, stream maxlen, origin, deadline
#       (server ms), grants prefix, key name, how, ports ('': every monitored port)
#       [, reservation token, lifetime in ms]
# -> {-1} after the deadline, else {expiry, {"entry key name" of evicted scoped grants...},
#    sequence number, the entry's unscoped expiry (0: none)}
# A scoped key's grant (hosts:, ports:): in the scoped set and the entry's grants hash
# only, never in the whitelist set; its ports replace the key's earlier ones, as the
# file backend's grant line does. Scoped grants are held to the same capacity as the
# whitelist.
SCOPED_KNOCK = (
    CHANGE_HELPERS
    + GRANT_HELPERS
    + """
if past(ARGV[7]) then
  return {-1}
end
local entry, now, expiry = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local name = ARGV[9]
local member = entry .. ' ' .. name
local function change(changed, key_name, expiry_, ports)
  return append(KEYS[2], KEYS[3], ARGV[5], ARGV[6], changed, expiry_, key_name, ports)
end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
settle(KEYS[4], now)
local current = redis.call('ZSCORE', KEYS[5], member)
if current and tonumber(current) > expiry then
  expiry = tonumber(current)
end
local evicted = {}
if not current then
  evicted = evict(KEYS[5], tonumber(ARGV[4]), function(victim)
    local space = string.find(victim, ' ', 1, true)
    local ventry, vname = string.sub(victim, 1, space - 1), string.sub(victim, space + 1)
    redis.call('HDEL', ARGV[8] .. ventry, vname)
    change(ventry, vname, -1)
  end)
end
redis.call('ZADD', KEYS[5], expiry, member)
record(KEYS[4], name, expiry, now, ARGV[10], '1', ARGV[11])
local seq = change(entry, name, expiry, ARGV[11])
if #KEYS == 7 then
  count_success(KEYS[6], KEYS[7], ARGV[12], ARGV[13], now)
end
local unscoped = redis.call('ZSCORE', KEYS[1], entry)
if not unscoped or tonumber(unscoped) <= now then unscoped = 0 end
return {string.format('%d', expiry), evicted, seq, string.format('%d', tonumber(unscoped))}
"""
)

# KEYS: whitelist, changes, seq, grants of the entry, scoped grants
# ARGV: entry, key name ('': every grant of the entry), now, stream maxlen, origin
# -> {{{key name ('' restored), expiry, granted_at (-1: none), how, scoped, ports}...}
#     ended, {{expiry, ports}...} of the scoped grants left, sequence number of the last
#     change, the entry's expiry in the whitelist set now (0: gone)}
# (what is left is what the firewall then holds for the entry: firewall_plan)
# The same rule as the file backend: an ended unscoped grant cuts the entry back to the
# longest unscoped grant left (an entry that ran longer than every recorded grant has a
# `restored` one); ended scoped grants leave the scoped set. Every change is streamed.
REVOKE = (
    CHANGE_HELPERS
    + GRANT_HELPERS
    + """
local entry, name, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local current = redis.call('ZSCORE', KEYS[1], entry)
current = current and tonumber(current) or 0
if current <= now then current = 0 end
local ended, others, top = {}, {}, 0
for n, g in pairs(grant_fields(KEYS[4])) do
  if g[1] > now and (g[4] == '1' or g[1] <= current) then
    if g[4] == '0' and g[1] > top then top = g[1] end
    local grant = {n, g[1], g[2], g[3], g[4], g[5]}
    if name == '' or n == name then table.insert(ended, grant) else table.insert(others, grant) end
  end
end
if current > top then
  local grant = {'', current, -1, 'restored', '0', ''}
  if name == '' then table.insert(ended, grant) else table.insert(others, grant) end
end
if #ended == 0 then
  return {{}, {}, 0, 0}
end
local seq = 0
local function change(key_name, expiry)
  seq = append(KEYS[2], KEYS[3], ARGV[4], ARGV[5], entry, expiry, key_name)
end
local keep, scoped_left, cut = 0, {}, false
for _, g in ipairs(others) do
  if g[5] == '0' and g[2] > keep then keep = g[2] end
  if g[5] == '1' then table.insert(scoped_left, {string.format('%d', g[2]), g[6]}) end
end
local reply = {}
for _, g in ipairs(ended) do
  if g[5] == '0' then
    cut = true
  else
    redis.call('ZREM', KEYS[5], entry .. ' ' .. g[1])
    change(g[1], -1)
  end
  if g[1] ~= '' then redis.call('HDEL', KEYS[4], g[1]) end
  table.insert(reply, {g[1], string.format('%d', g[2]), string.format('%d', g[3]), g[4], g[5],
                       g[6]})
end
if cut then
  redis.call('ZREM', KEYS[1], entry)
  change(nil, -1)
  if keep > 0 then
    redis.call('ZADD', KEYS[1], keep, entry)
    change(nil, keep)
  end
end
settle(KEYS[4], now)
local left = cut and keep or current
return {reply, scoped_left, seq, string.format('%d', left)}
"""
)

# KEYS: grants of one entry, scoped grants, changes, seq
# ARGV: now, stream maxlen, origin, entry, then key name, record pairs (migration)
# -> records stored. A record already there with a later expiry is kept.
LOAD_GRANTS = (
    CHANGE_HELPERS
    + GRANT_HELPERS
    + """
local now, stored = tonumber(ARGV[1]), 0
local present = grant_fields(KEYS[1])
for i = 5, #ARGV, 2 do
  local name, value = ARGV[i], ARGV[i + 1]
  local g = parse_grant(value)
  local before = present[name]
  if g and g[1] > now and not (before and before[1] >= g[1]) then
    redis.call('HSET', KEYS[1], name, value)
    if g[4] == '1' then
      redis.call('ZADD', KEYS[2], g[1], ARGV[4] .. ' ' .. name)
      append(KEYS[3], KEYS[4], ARGV[2], ARGV[3], ARGV[4], g[1], name, g[5])
    end
    stored = stored + 1
  end
end
settle(KEYS[1], now)
return stored
"""
)

# KEYS: whitelist, changes, seq, scoped grants
# ARGV: now, grants prefix
# -> {seq, id of the last change ('0-0': none), {entry, expiry...} of the whitelist,
#     {member, expiry, ports...} of the scoped grants}
# A replica's full resync, in one atomic step. A scoped grant goes with its ports, read
# from its record; one whose record is missing or unreadable is left out (never widened
# to every port).
RESYNC = (
    GRANT_HELPERS
    + """
local after = '(' .. ARGV[1]
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local members = redis.call('ZRANGEBYSCORE', KEYS[4], after, '+inf', 'WITHSCORES')
local scoped = {}
for i = 1, #members, 2 do
  local space = string.find(members[i], ' ', 1, true)
  local value = space and redis.call('HGET', ARGV[2] .. string.sub(members[i], 1, space - 1),
                                     string.sub(members[i], space + 1))
  local g = value and parse_grant(value)
  if g and g[4] == '1' then
    table.insert(scoped, members[i])
    table.insert(scoped, members[i + 1])
    table.insert(scoped, g[5])
  end
end
return {redis.call('GET', KEYS[3]) or '0', last[1] and last[1][1] or '0-0',
        redis.call('ZRANGEBYSCORE', KEYS[1], after, '+inf', 'WITHSCORES'), scoped}
"""
)
