-- Refreshes a cache entry in place after a 304 Not Modified: replaces the head of its encoded
-- response and its freshness, keeps its body (never sent again). Only if the fill lock (when a
-- token is given) still holds, the segment version is unchanged, and the entry is still the one
-- read (it starts with the old head). Releases the lock. One atomic call.
--
-- KEYS[1]   the segment version
-- KEYS[2]   the entry
-- KEYS[3]   the fill lock ('' token: not used)
-- ARGV[1]   the segment version read at lookup
-- ARGV[2]   the fill token, or ''
-- ARGV[3]   fresh TTL ms
-- ARGV[4]   stale-while-revalidate window ms
-- ARGV[5]   stale-if-error window ms
-- ARGV[6]   kept for revalidation ms
-- ARGV[7]   the old head (the first bytes of the stored response)
-- ARGV[8]   the new head
--
-- Reply: 1 refreshed, 0 segment version changed, -1 fill lock lost, 2 entry gone or replaced.

local token = ARGV[2]
if token ~= '' then
  if redis.call('GET', KEYS[3]) ~= token then
    return -1
  end
  redis.call('DEL', KEYS[3])
end
local version = tonumber(redis.call('GET', KEYS[1])) or 0
if version ~= tonumber(ARGV[1]) then
  return 0
end
local r = redis.pcall('HMGET', KEYS[2], 'v', 'b')
if type(r) ~= 'table' or r.err or tonumber(r[1]) ~= version or not r[2] then
  return 2
end
local old = ARGV[7]
local b = r[2]
if string.sub(b, 1, #old) ~= old then
  return 2
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local fresh = tonumber(ARGV[3])
local swr = tonumber(ARGV[4])
local sie = tonumber(ARGV[5])
local kept = tonumber(ARGV[6])
local f = now + fresh * 1000
local keep = fresh + math.max(swr, sie, kept)
local vttl = redis.call('PTTL', KEYS[1])
if vttl == -2 then
  redis.call('SET', KEYS[1], version, 'PX', math.max(keep, 1))
elseif vttl >= 0 and vttl < keep then
  redis.call('PEXPIRE', KEYS[1], keep)
end
redis.call('HSET', KEYS[2], 't', now, 'f', f, 'w', f + swr * 1000, 'e', f + sie * 1000,
  'x', f + kept * 1000, 'b', ARGV[8] .. string.sub(b, #old + 1))
redis.call('PEXPIRE', KEYS[2], math.max(keep, 1))
return 1
