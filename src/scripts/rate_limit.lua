-- Checks every rate-limit rule of one request and consumes from all of them, or from none.
--
-- KEYS[i]   the state key of rule i (all keys share one hash tag, so one slot)
-- ARGV[1]   cost of the request (non-negative integer)
-- ARGV[2]   a random nonce, to make sliding-log members unique
-- ARGV[3]   1 when the per-rule state (remaining, reset) is wanted, else 0
-- then four arguments per rule: kind, a, b, c
--   kind 1  fixed window      a = limit,    b = window ms
--   kind 2  sliding log       a = limit,    b = window ms
--   kind 3  sliding counter   a = limit,    b = window ms
--   kind 4  token bucket      a = capacity, b = refill period ms, c = tokens per period
--   kind 5  GCRA              a = rate,     b = period ms,        c = burst
--
-- Reply: { allowed (0/1), denying rule (1-based, 0 when allowed), retry after ms,
--          then per rule: remaining, reset ms }
-- Time comes from the server (TIME), in microseconds. Every number returned is an integer.

local cost = tonumber(ARGV[1])
local nonce = ARGV[2]
local want_state = ARGV[3] == '1'
local n = #KEYS

-- Fast path: one fixed-window rule needs no clock, and one command when the request passes.
-- INCRBY first; a request over the limit is taken back at once, inside this atomic call.
if n == 1 and ARGV[4] == '1' and cost > 0 then
  local key = KEYS[1]
  local limit = tonumber(ARGV[5])
  local window = tonumber(ARGV[6])
  if cost > limit then
    local used = tonumber(redis.call('GET', key) or '0')
    return { 0, 1, window, math.max(limit - used, 0), window }
  end
  local used = redis.call('INCRBY', key, cost)
  if used == cost then
    redis.call('PEXPIRE', key, window)
  end
  if used <= limit then
    local reset = window
    if want_state and used ~= cost then reset = math.max(redis.call('PTTL', key), 0) end
    return { 1, 0, 0, limit - used, reset }
  end
  redis.call('DECRBY', key, cost)
  local ttl = redis.call('PTTL', key)
  if ttl < 0 then
    redis.call('PEXPIRE', key, window)
    ttl = window
  end
  return { 0, 1, ttl, math.max(limit - used + cost, 0), ttl }
end

-- Server time in microseconds, read only when a rule needs it.
local now = 0
for i = 1, n do
  if ARGV[3 + (i - 1) * 4 + 1] ~= '1' then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000000 + tonumber(t[2])
    break
  end
end

local allowed = 1
local denied_by = 0
local wait = 0
local reply = { 0, 0, 0 }
local plans = {}

for i = 1, n do
  local key = KEYS[i]
  local base = 3 + (i - 1) * 4
  local kind = tonumber(ARGV[base + 1])
  local a = tonumber(ARGV[base + 2])
  local period = tonumber(ARGV[base + 3]) * 1000
  local c = tonumber(ARGV[base + 4])
  local ok, remaining, reset, retry, plan

  if kind == 1 then
    local used = tonumber(redis.call('GET', key) or '0')
    local ttl = period
    local fresh = used == 0
    ok = used + cost <= a
    if not fresh and (want_state or not ok) then
      local pttl = redis.call('PTTL', key)
      if pttl > 0 then ttl = pttl * 1000 else fresh = true end
    end
    if ok then
      remaining = a - used - cost
      plan = fresh
    else
      remaining = math.max(a - used, 0)
      if cost > a then retry = period else retry = ttl end
    end
    reset = ttl
  elseif kind == 2 then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - period)
    local count = redis.call('ZCARD', key)
    ok = count + cost <= a
    local oldest = nil
    if want_state and count > 0 then
      oldest = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2])
    end
    if ok then
      remaining = a - count - cost
      plan = true
    else
      remaining = math.max(a - count, 0)
      if cost > a then
        retry = period
      else
        local nth = redis.call('ZRANGE', key, count + cost - a - 1, count + cost - a - 1, 'WITHSCORES')
        retry = tonumber(nth[2]) + period - now
      end
    end
    if oldest then reset = oldest + period - now elseif ok and cost > 0 then reset = period else reset = 0 end
  elseif kind == 3 then
    local h = redis.call('HMGET', key, 'w', 'c', 'p')
    local idx = math.floor(now / period)
    local elapsed = now - idx * period
    local w = tonumber(h[1])
    local cur, prev = 0, 0
    if w == idx then
      cur = tonumber(h[2]) or 0
      prev = tonumber(h[3]) or 0
    elseif w == idx - 1 then
      prev = tonumber(h[2]) or 0
    end
    local est = prev * (1 - elapsed / period) + cur
    ok = est + cost <= a
    reset = period - elapsed
    if ok then
      remaining = math.floor(a - est - cost)
      plan = { idx, cur + cost, prev, 2 * period - elapsed }
    else
      remaining = math.max(math.floor(a - est), 0)
      if cost > a then
        retry = period
      elseif cur + cost <= a then
        -- wait until enough of the previous window has slid out
        retry = period * (1 - (a - cur - cost) / prev) - elapsed
      else
        -- wait for the next window, where this window becomes the previous one
        local into_next = 0
        if cur > 0 then into_next = period * (1 - (a - cost) / cur) end
        retry = (period - elapsed) + math.max(into_next, 0)
      end
    end
  elseif kind == 4 then
    local h = redis.call('HMGET', key, 't', 'ts')
    local per_us = c / period
    local tokens = a
    if h[1] then
      tokens = math.min(a, tonumber(h[1]) + math.max(now - tonumber(h[2]), 0) * per_us)
    end
    ok = tokens >= cost
    if ok then
      local left = tokens - cost
      remaining = math.floor(left)
      reset = (a - left) / per_us
      plan = left
    else
      remaining = math.floor(tokens)
      reset = (a - tokens) / per_us
      if cost > a then retry = period else retry = (cost - tokens) / per_us end
    end
  else
    local interval = period / a
    local burst = c * interval
    local tat = tonumber(redis.call('GET', key) or '0')
    if tat < now then tat = now end
    local new_tat = tat + cost * interval
    local allow_at = new_tat - burst
    ok = allow_at <= now
    if ok then
      remaining = math.floor((now - allow_at) / interval)
      reset = new_tat - now
      plan = new_tat
    else
      remaining = math.max(math.floor((now - (tat - burst)) / interval), 0)
      reset = tat - now
      if cost > c then retry = period else retry = allow_at - now end
    end
  end

  plans[i] = plan
  if not ok then
    allowed = 0
    if retry > wait or denied_by == 0 then
      wait = retry
      denied_by = i
    end
  end
  reply[2 + 2 * i] = remaining
  reply[3 + 2 * i] = math.ceil(math.max(reset, 0) / 1000)
end

if allowed == 1 then
  for i = 1, n do
    local key = KEYS[i]
    local base = 3 + (i - 1) * 4
    local kind = tonumber(ARGV[base + 1])
    local period_ms = tonumber(ARGV[base + 3])
    local plan = plans[i]
    if cost > 0 then
      if kind == 1 then
        redis.call('INCRBY', key, cost)
        if plan then redis.call('PEXPIRE', key, period_ms) end
      elseif kind == 2 then
        local members = {}
        local stamp = string.format('%d', now)
        for j = 1, cost do
          members[#members + 1] = now
          members[#members + 1] = stamp .. ':' .. nonce .. ':' .. j
          if #members >= 200 then
            redis.call('ZADD', key, unpack(members))
            members = {}
          end
        end
        if #members > 0 then redis.call('ZADD', key, unpack(members)) end
        redis.call('PEXPIRE', key, period_ms)
      elseif kind == 3 then
        redis.call('HSET', key, 'w', plan[1], 'c', plan[2], 'p', plan[3])
        redis.call('PEXPIRE', key, math.ceil(plan[4] / 1000))
      elseif kind == 4 then
        local a = tonumber(ARGV[base + 2])
        local c = tonumber(ARGV[base + 4])
        local full = math.ceil((a - plan) * period_ms / c)
        redis.call('HSET', key, 't', tostring(plan), 'ts', now)
        redis.call('PEXPIRE', key, math.max(full, 1))
      else
        local tat = math.ceil(plan)
        redis.call('SET', key, string.format('%d', tat), 'PX', math.max(math.ceil((tat - now) / 1000), 1))
      end
    end
  end
end

reply[1] = allowed
reply[2] = denied_by
reply[3] = math.ceil(math.max(wait, 0) / 1000)
return reply
