-- Stores the response of a claimed record, only while the token still holds the claim.
-- KEYS[1] record; ARGV[1] token, ARGV[2] response, ARGV[3] retention ms.
-- Reply: 1 stored, 0 the claim was lost (nothing stored). Safe to run twice: a completion
-- re-sent by the token that completed the record (its first reply was lost) answers 1 again and
-- changes nothing.
local rec = redis.call('HMGET', KEYS[1], 'state', 'token')
if rec[2] ~= ARGV[1] then
  return 0
end
if rec[1] == 'c' then
  return 1
end
if rec[1] ~= 'p' then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'c', 'resp', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
