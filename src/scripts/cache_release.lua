-- Releases a fill lock if the token still holds it (compare and delete).
--
-- KEYS[1]   the fill lock
-- ARGV[1]   the token
--
-- Reply: 1 released, 0 not held with this token.

if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
