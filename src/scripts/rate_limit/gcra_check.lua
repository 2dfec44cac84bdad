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
