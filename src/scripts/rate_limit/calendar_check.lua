    -- The counter holds "<first day of its period>:<units used>", so a counter of an earlier
    -- period counts as empty even before it expires.
    local first, ends = calendar_period(now, c)
    local used = 0
    local v = redis.call('GET', key)
    if v then
      local p, u = string.match(v, '^(%-?%d+):(%d+)$')
      if tonumber(p) == first then used = tonumber(u) end
    end
    ok = used + cost <= a
    reset = ends - now
    if ok then
      remaining = a - used - cost
      plan = { string.format('%d:%d', first, used + cost), string.format('%d', ends / 1000) }
    else
      remaining = math.max(a - used, 0)
      retry = reset
    end
