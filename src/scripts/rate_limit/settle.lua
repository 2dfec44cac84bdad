-- Settles a metered request: charges (delta > 0) or refunds (delta < 0) the difference between
-- its actual cost and the estimate that its check consumed, on every rule of the check at once.
-- Nothing is denied: a charge may push a key past its limit (later requests wait longer).
--
-- KEYS[i]   the state key of rule i: the same keys as the check (one hash tag, so one slot)
-- KEYS[n+1] the key's override, as in the check: an allowed key's requests consumed nothing,
--           so nothing is settled while it is allowed
-- KEYS[n+2] this settlement's own key (`<head>s:<random id>`): set for a minute by the first run,
--           so that a settlement that a client sends again (its reply was lost and it
--           reconnected) is not applied twice: a refund applied twice would admit more than the
--           limit
-- ARGV[1]   delta (integer, |delta| < 2^50)
-- ARGV[2]   age: ms since the check was answered, at least (a lower bound measured by the caller)
-- then four arguments per rule: kind, a, b, c (as in multi_head.lua)
--
-- Per strategy:
--   fixed window  the counter moves by delta (never below 0), only while the window the check
--                 counted in lasts: a window that started less than `age` ago is a newer one,
--                 and an expired counter means the window ended; then nothing changes
--   token bucket  the bucket, refilled up to now, loses delta tokens (it may go negative: a
--                 debt that the refill pays back), at most back to its capacity on a refund
--   GCRA          the TAT, from now at the earliest, moves by delta emission intervals; a TAT
--                 back at or before now is deleted (the same as absent)
--   calendar      like a fixed window: the count of the period the check counted in moves by
--                 delta (never below 0) while that period lasts; a period that began less
--                 than `age` ago is a newer one (calendar.lua comes before this script)
--   sliding log and sliding window: left as they are (the layer refuses them in a metered
--                 policy)
-- Reply: the number of rules changed. Time comes from the server (TIME).

local n = #KEYS - 2
if not redis.call('SET', KEYS[n + 2], '1', 'NX', 'PX', 60000) then return 0 end
if redis.call('GET', KEYS[n + 1]) == 'a' then return 0 end
local delta = tonumber(ARGV[1])
local age = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local changed = 0

for i = 1, n do
  local key = KEYS[i]
  local base = 2 + (i - 1) * 4
  local kind = ARGV[base + 1]
  local a = tonumber(ARGV[base + 2])
  local period_ms = tonumber(ARGV[base + 3])
  local c = tonumber(ARGV[base + 4])
  local period = period_ms * 1000
  if kind == '1' then
    local used = redis.call('GET', key)
    if used then
      local pttl = redis.call('PTTL', key)
      if pttl > 0 and age <= period_ms - pttl then
        used = tonumber(used)
        local change = math.max(used + delta, 0) - used
        -- INCRBY keeps the window's expiry.
        if change ~= 0 then redis.call('INCRBY', key, change) end
        changed = changed + 1
      end
    end
  elseif kind == '4' then
    local h = redis.call('HMGET', key, 't', 'ts')
    local per_us = c / period
    local tokens = a
    if h[1] then
      tokens = math.min(a, tonumber(h[1]) + math.max(now - tonumber(h[2]), 0) * per_us)
    end
    local left = math.min(tokens - delta, a)
    if left >= a then
      redis.call('DEL', key)
    else
      local full = math.ceil((a - left) * period_ms / c)
      redis.call('HSET', key, 't', tostring(left), 'ts', now)
      redis.call('PEXPIRE', key, math.max(full, 1))
    end
    changed = changed + 1
  elseif kind == '5' then
    local interval = period / a
    local tat = tonumber(redis.call('GET', key) or '0')
    if tat < now then tat = now end
    tat = math.ceil(tat + delta * interval)
    if tat <= now then
      redis.call('DEL', key)
    else
      redis.call('SET', key, string.format('%d', tat), 'PX', math.max(math.ceil((tat - now) / 1000), 1))
    end
    changed = changed + 1
  elseif kind == '6' then
    local first, ends, starts = calendar_period(now, c)
    local v = redis.call('GET', key)
    if v and age <= (now - starts) / 1000 then
      local p, u = string.match(v, '^(%-?%d+):(%d+)$')
      if tonumber(p) == first then
        local used = tonumber(u)
        local after = math.max(used + delta, 0)
        if after ~= used then
          redis.call('SET', key, string.format('%d:%d', first, after))
          redis.call('PEXPIREAT', key, string.format('%d', ends / 1000))
        end
        changed = changed + 1
      end
    end
  end
end

return changed
