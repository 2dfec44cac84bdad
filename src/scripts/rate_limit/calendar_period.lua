-- Test entry point (feature `test-support`): the calendar period of ARGV[1] (µs since the
-- epoch) for the spec ARGV[2], computed by the very fragment the rate-limit scripts run.
-- Reply: { first day of the period (days since the epoch), end (µs since the epoch) }.
local first, ends = calendar_period(tonumber(ARGV[1]), tonumber(ARGV[2]))
return { first, ends }
