-- Invalidates a whole cache segment by bumping its version; entries of older versions read as
-- misses and expire on their own.
--
-- KEYS[1]   the segment version
-- ARGV[1]   how long the version key lives at least after a bump, ms (longer than any fill in
--           flight, so a fill that read an older version is always rejected; stores extend it to
--           cover their entries)
--
-- Reply: the new version.

local v = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < tonumber(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return v
