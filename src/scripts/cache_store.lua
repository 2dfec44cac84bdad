-- Stores one cache entry if the segment version read at lookup still holds and, when a fill
-- token is given, the fill lock is still held with it; releases the lock. One atomic call.
--
-- KEYS[1]   the segment version
-- KEYS[2]   the entry
-- KEYS[3]   the fill lock ('' token: not used)
-- ARGV[1]   the segment version read at lookup
-- ARGV[2]   the fill token, or ''
-- ARGV[3]   fresh TTL ms
-- ARGV[4]   stale-while-revalidate window ms
-- ARGV[5]   stale-if-error window ms
-- ARGV[6]   compute time us
-- ARGV[7]   the encoded response
-- ARGV[8]   how long the entry is kept after its freshness to be revalidated, ms
--
-- Reply: 1 stored, 0 segment version changed, -1 fill lock lost.

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

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local fresh = tonumber(ARGV[3])
local swr = tonumber(ARGV[4])
local sie = tonumber(ARGV[5])
local kept = tonumber(ARGV[8]) or 0
local f = now + fresh * 1000
local keep = fresh + math.max(swr, sie, kept)
-- The version key must outlive every entry written under it (so that when it expires, and the
-- version reads 0 again, no entry of an older version is left).
local vttl = redis.call('PTTL', KEYS[1])
if vttl == -2 then
  redis.call('SET', KEYS[1], version, 'PX', math.max(keep, 1))
elseif vttl >= 0 and vttl < keep then
  redis.call('PEXPIRE', KEYS[1], keep)
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'v', version, 't', now, 'f', f, 'w', f + swr * 1000,
  'e', f + sie * 1000, 'x', f + kept * 1000, 'd', tonumber(ARGV[6]), 'b', ARGV[7])
redis.call('PEXPIRE', KEYS[2], math.max(keep, 1))
return 1
