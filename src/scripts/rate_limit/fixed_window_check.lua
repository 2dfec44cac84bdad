    local used = tonumber(redis.call('GET', key) or '0')
    local ttl = period
    local fresh = used == 0
    ok = used + cost <= a
    if not fresh and (want_state or not ok) then
      local pttl = redis.call('PTTL', key)
      -- A window in its last millisecond (PTTL 0) is still that window, ending now; only a
      -- counter without an expiry (-1) is repaired as a new window.
      if pttl >= 0 then ttl = math.max(pttl, 1) * 1000 else fresh = true end
    end
    if ok then
      remaining = a - used - cost
      plan = fresh
    else
      remaining = math.max(a - used, 0)
      if cost > a then retry = period else retry = ttl end
    end
    reset = ttl
