-- One fixed-window rule: no clock, and two commands when the request passes.
-- The decision comes before any write: a key at its limit is denied without writing, so a full
-- server (`maxmemory` with `noeviction`, which refuses writes) still denies it rather than
-- failing the call (and the layer failing open).
--
-- KEYS[1] the counter, KEYS[2] the key's override (see multi_head.lua); ARGV: cost, want-state
-- flag (1/0), limit, window ms.
-- Reply: { allowed (0/1), denying rule (1 or 0), retry after ms, remaining, reset ms }, or 1
-- when allowed and the state is not wanted.
local key = KEYS[1]
local cost = tonumber(ARGV[1])
local override = redis.call('GET', KEYS[2])
if override == 'b' then
  local left = math.max(redis.call('PTTL', KEYS[2]), 1)
  return { 0, 1, left, 0, left }
elseif override then
  cost = 0
end
local limit = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local used = tonumber(redis.call('GET', key) or '0')
if cost == 0 or used + cost > limit then
  local ttl = window
  if used > 0 and (cost > 0 or ARGV[2] == '1') then
    ttl = redis.call('PTTL', key)
    if ttl < 0 then ttl = window end
  end
  if cost == 0 then return { 1, 0, 0, math.max(limit - used, 0), ttl } end
  if cost > limit then return { 0, 1, window, math.max(limit - used, 0), ttl } end
  return { 0, 1, ttl, math.max(limit - used, 0), ttl }
end
used = redis.call('INCRBY', key, cost)
if used == cost then
  redis.call('PEXPIRE', key, window)
end
if ARGV[2] ~= '1' then return 1 end
local reset = window
if used ~= cost then reset = math.max(redis.call('PTTL', key), 0) end
return { 1, 0, 0, limit - used, reset }
