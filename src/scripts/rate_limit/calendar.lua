-- Calendar periods, for the calendar check (kind 6): civil dates from days since 1970-01-01 by
-- Howard Hinnant's days_from_civil and civil_from_days (http://howardhinnant.github.io/
-- date_algorithms.html), in integer arithmetic on Lua's doubles (every value stays far below
-- 2^53: times are microseconds, about 1.8e15 today).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((m + 9) % 12) + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp + 3
  if m > 12 then m = m - 12; y = y + 1 end
  return y, m, d
end

-- The calendar period that holds `now` (µs since the epoch) for a rule's `spec` (its c:
-- unit * 10000 + offset minutes + 1440; unit 1 day, 2 ISO week, 3 month): the period's first
-- day (days since the epoch, on the offset's clock), its end and its start (µs since the epoch).
local function calendar_period(now, spec)
  local unit = math.floor(spec / 10000)
  local offset = (spec % 10000 - 1440) * 60000000
  local day = math.floor((now + offset) / 86400000000)
  local first, after = day, day + 1
  if unit == 2 then
    -- 1970-01-01 was a Thursday: Monday is the day where (day + 3) % 7 == 0.
    first = day - (day + 3) % 7
    after = first + 7
  elseif unit == 3 then
    local y, m, d = civil_from_days(day)
    first = day - d + 1
    if m == 12 then y, m = y + 1, 1 else m = m + 1 end
    after = days_from_civil(y, m, 1)
  end
  return first, after * 86400000000 - offset, first * 86400000000 - offset
end
