    redis.call('SET', key, plan[1], 'PXAT', plan[2])
