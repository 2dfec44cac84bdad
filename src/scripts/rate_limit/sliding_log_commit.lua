    -- Members are the call's random nonce (plus the unit's index when it costs more than one):
    -- unique without formatting the time, which the score already holds.
    if cost == 1 then
      redis.call('ZADD', key, now, nonce)
    else
      local members = {}
      for j = 1, cost do
        members[#members + 1] = now
        members[#members + 1] = nonce .. ':' .. j
        if #members >= 200 then
          redis.call('ZADD', key, unpack(members))
          members = {}
        end
      end
      if #members > 0 then redis.call('ZADD', key, unpack(members)) end
    end
    redis.call('PEXPIRE', key, period_ms)
