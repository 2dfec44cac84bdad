-- Stores the response of a claimed record, only while the token still holds the claim.
-- KEYS[1] record; ARGV[1] token, ARGV[2] response, ARGV[3] retention ms.
-- Reply: 1 stored, 0 the claim was lost (nothing stored).
local rec = redis.call('HMGET', KEYS[1], 'state', 'token')
if rec[1] ~= 'p' or rec[2] ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'c', 'resp', ARGV[2])
redis.call('HDEL', KEYS[1], 'token')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
