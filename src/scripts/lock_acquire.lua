-- Takes a lock if it is free, and returns a fencing token that grows per resource.
-- KEYS[1] lock, KEYS[2] fence counter (same hash tag)
-- ARGV[1] token, ARGV[2] lease ms
-- Reply: {1, fence} when taken, {0, ms until the current holder's lease ends} when held.
-- An acquisition re-sent by its own token (a client that re-sends after a cut reply) answers
-- {1, fence} again with the same fence, and changes nothing.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return { 1, redis.call('INCR', KEYS[2]) }
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return { 1, tonumber(redis.call('GET', KEYS[2])) or 0 }
end
return { 0, math.max(redis.call('PTTL', KEYS[1]), 0) }
