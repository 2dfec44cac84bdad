-- Invalidates a whole cache segment by bumping its version; entries of older versions read as
-- misses and expire on their own.
--
-- KEYS[1]   the segment version
--
-- Reply: the new version.

return redis.call('INCR', KEYS[1])
