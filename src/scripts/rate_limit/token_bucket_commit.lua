    local full = math.ceil((a - plan) * period_ms / c)
    redis.call('HSET', key, 't', tostring(plan), 'ts', now)
    redis.call('PEXPIRE', key, math.max(full, 1))
