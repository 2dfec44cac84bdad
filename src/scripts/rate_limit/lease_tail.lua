-- Replicas seen within a window (at least a second), counted before anything is written.
local seen_ms = math.max(period_ms, 1000)
local seen = redis.call('HGETALL', KEYS[3])
local replicas, stale = 1, {}
for i = 1, #seen, 2 do
  if seen[i] ~= replica then
    if tonumber(seen[i + 1]) >= now_ms - seen_ms then
      replicas = replicas + 1
    else
      stale[#stale + 1] = seen[i]
    end
  end
end

local ok, remaining, reset, retry, plan = check(need)
if not ok then
  return { 0, math.ceil(math.max(retry, 0) / 1000), remaining, math.ceil(math.max(reset, 0) / 1000), 0, replicas }
end
local granted = need
local extra = math.min(want - need, math.floor(remaining / (2 * replicas)))
if extra > 0 then
  local ok2, remaining2, reset2, _, plan2 = check(need + extra)
  if ok2 then
    granted, remaining, reset, plan = need + extra, remaining2, reset2, plan2
  end
end
if granted > 0 then commit(granted, plan) end
redis.call('HSET', KEYS[3], replica, now_ms)
if #stale > 0 then redis.call('HDEL', KEYS[3], unpack(stale)) end
redis.call('PEXPIRE', KEYS[3], seen_ms)
local window = 0
if kind == '1' then window = math.max(redis.call('PTTL', key), 0) end
return { granted, 0, remaining, math.ceil(math.max(reset, 0) / 1000), window, replicas }
