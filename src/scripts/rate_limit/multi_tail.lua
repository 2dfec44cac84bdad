  end
end

reply[1] = allowed
reply[2] = denied_by
reply[3] = math.ceil(math.max(wait, 0) / 1000)
return reply
