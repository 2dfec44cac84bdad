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
