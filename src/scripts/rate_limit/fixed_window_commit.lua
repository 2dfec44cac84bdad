    redis.call('INCRBY', key, cost)
    if plan then redis.call('PEXPIRE', key, period_ms) end
