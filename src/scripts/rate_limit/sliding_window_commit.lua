    redis.call('HSET', key, 'w', plan[1], 'c', plan[2], 'p', plan[3])
    redis.call('PEXPIRE', key, math.ceil(plan[4] / 1000))
