  plans[i] = plan
  if not ok then
    allowed = 0
    if retry > wait or denied_by == 0 then
      wait = retry
      denied_by = i
    end
  end
  -- Nothing is taken unless every rule admits: until then, a rule that admits reports what it
  -- has now (its cost is taken below, when every rule admitted).
  if ok then reply[2 + 2 * i] = remaining + cost else reply[2 + 2 * i] = remaining end
  reply[3 + 2 * i] = math.ceil(math.max(reset, 0) / 1000)
end

-- Every rule allowed: consume from all of them.
if allowed == 1 and cost > 0 then
  for i = 1, n do
    local key = KEYS[i]
    local base = 3 + (i - 1) * 4
    local kind = ARGV[base + 1]
    local a = tonumber(ARGV[base + 2])
    local period_ms = tonumber(ARGV[base + 3])
    local c = tonumber(ARGV[base + 4])
    local plan = plans[i]
    reply[2 + 2 * i] = reply[2 + 2 * i] - cost
