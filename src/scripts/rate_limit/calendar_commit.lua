    -- PEXPIREAT rather than SET's PXAT (Redis 6.2): any Redis that runs the other scripts.
    redis.call('SET', key, plan[1])
    redis.call('PEXPIREAT', key, plan[2])
