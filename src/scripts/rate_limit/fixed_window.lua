-- One fixed-window rule: no clock, and one command when the request passes.
-- INCRBY first; a request over the limit is taken back at once, inside this atomic call.
--
-- KEYS[1] the counter; ARGV: cost, want-state flag (1/0), limit, window ms.
-- Reply: { allowed (0/1), denying rule (1 or 0), retry after ms, remaining, reset ms }, or 1
-- when allowed and the state is not wanted.
local key = KEYS[1]
local cost = tonumber(ARGV[1])
local limit = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
if cost == 0 or cost > limit then
  local used = tonumber(redis.call('GET', key) or '0')
  local ttl = window
  if used > 0 and ARGV[2] == '1' then
    ttl = redis.call('PTTL', key)
    if ttl < 0 then ttl = window end
  end
  if cost == 0 then return { 1, 0, 0, math.max(limit - used, 0), ttl } end
  return { 0, 1, window, math.max(limit - used, 0), ttl }
end
local used = redis.call('INCRBY', key, cost)
if used == cost then
  redis.call('PEXPIRE', key, window)
end
if used <= limit then
  if ARGV[2] ~= '1' then return 1 end
  local reset = window
  if used ~= cost and ARGV[2] == '1' then reset = math.max(redis.call('PTTL', key), 0) end
  return { 1, 0, 0, limit - used, reset }
end
redis.call('DECRBY', key, cost)
local ttl = redis.call('PTTL', key)
if ttl < 0 then
  redis.call('PEXPIRE', key, window)
  ttl = window
end
return { 0, 1, ttl, math.max(limit - used + cost, 0), ttl }
