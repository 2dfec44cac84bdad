-- Deletes cache entries (all of one segment: one hash slot).
--
-- KEYS      the entries
--
-- Reply: how many existed.

return redis.call('DEL', unpack(KEYS))
