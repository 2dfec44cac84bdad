    local tat = math.ceil(plan)
    redis.call('SET', key, string.format('%d', tat), 'PX', math.max(math.ceil((tat - now) / 1000), 1))
