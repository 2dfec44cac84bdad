  end
end

if allowed == 1 and not want_state then return 1 end
reply[1] = allowed
reply[2] = denied_by
reply[3] = math.ceil(math.max(wait, 0) / 1000)
return reply
