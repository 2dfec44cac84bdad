-- Claims an idempotency record, or reports what holds it.
-- KEYS[1] record (hash), KEYS[2] fence counter (same hash tag)
-- ARGV[1] token, ARGV[2] request fingerprint, ARGV[3] lease ms, ARGV[4] fence counter ttl ms
-- Reply: {1, fence} claimed; {2, ms left on the lease} in flight; {3, response} completed;
--        {4} the key was used with another request (fingerprint mismatch).
-- A claim re-sent by its own token (a client that re-sends after a cut reply) answers
-- {1, fence} again with the same fence, and changes nothing.
local rec = redis.call('HMGET', KEYS[1], 'state', 'fp', 'token', 'fence')
if not rec[1] then
  local fence = redis.call('INCR', KEYS[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
  redis.call('HSET', KEYS[1], 'state', 'p', 'fp', ARGV[2], 'token', ARGV[1], 'fence', fence)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return { 1, fence }
end
if rec[1] == 'p' and rec[3] == ARGV[1] and rec[2] == ARGV[2] then
  return { 1, tonumber(rec[4]) or 0 }
end
if rec[2] ~= ARGV[2] then
  return { 4 }
end
if rec[1] == 'p' then
  return { 2, math.max(redis.call('PTTL', KEYS[1]), 0) }
end
return { 3, redis.call('HGET', KEYS[1], 'resp') }
