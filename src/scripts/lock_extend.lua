-- Extends a lock's lease, only for the holder of the token (compare-and-extend).
-- KEYS[1] lock; ARGV[1] token, ARGV[2] lease ms. Reply: 1 extended, 0 not the holder.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
