    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - period)
    local count = redis.call('ZCARD', key)
    ok = count + cost <= a
    local oldest = nil
    if want_state and count > 0 then
      oldest = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2])
    end
    if ok then
      remaining = a - count - cost
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
