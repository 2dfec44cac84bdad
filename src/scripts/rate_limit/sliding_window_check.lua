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
