-- Extends (ARGV[2] > 0: new lease ms) or releases (ARGV[2] = 0) an in-flight claim, only for
-- the holder of the token. KEYS[1] record; ARGV[1] token. Reply: 1 done, 0 not the holder.
local rec = redis.call('HMGET', KEYS[1], 'state', 'token')
if rec[1] ~= 'p' or rec[2] ~= ARGV[1] then
  return 0
end
if ARGV[2] == '0' then
  return redis.call('DEL', KEYS[1])
end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
