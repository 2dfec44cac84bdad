-- Deletes one cache entry.
--
-- KEYS[1]   the entry
--
-- Reply: 1 deleted, 0 absent.

return redis.call('DEL', KEYS[1])
