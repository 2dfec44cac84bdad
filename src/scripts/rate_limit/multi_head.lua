-- Checks every rate-limit rule of one request and consumes from all of them, or from none
-- (assembled from fragments, see src/scripts/rate_limit/README.md).
--
-- KEYS[i]   the state key of rule i (all keys share one hash tag, so one slot)
-- KEYS[n+1] the key's override (same hash tag; see rate_limit_override.lua): 'b' (blocked)
--           denies at any cost, every rule at 0 remaining until it expires, with its
--           remaining time as the wait; 'a' (allowed) checks every rule at cost 0 (admitted,
--           nothing consumed, the state reported)
-- ARGV[1]   cost of the request (non-negative integer)
-- ARGV[2]   1 when the per-rule state (remaining, reset) is wanted, else 0
-- ARGV[3]   a random nonce, to make sliding-log members unique
-- then four arguments per rule: kind, a, b, c
--   kind 1  fixed window      a = limit,    b = window ms
--   kind 2  sliding log       a = limit,    b = window ms
--   kind 3  sliding counter   a = limit,    b = window ms
--   kind 4  token bucket      a = capacity, b = refill period ms, c = tokens per period
--   kind 5  GCRA              a = rate,     b = period ms,        c = burst
--   kind 6  calendar period   a = limit,    b = nominal length ms, c = unit * 10000 + offset
--                             minutes + 1440 (unit 1 day, 2 ISO week, 3 month; calendar.lua,
--                             which the assembled script puts before this head)
--
-- Reply: { allowed (0/1), denying rule (1-based, 0 when allowed), retry after ms,
--          then per rule: remaining, reset ms }, or 1 when allowed and the state is not wanted
-- Time comes from the server (TIME), in microseconds. Every number returned is an integer.

local cost = tonumber(ARGV[1])
local want_state = ARGV[2] == '1'
local nonce = ARGV[3]
local n = #KEYS - 1

local override = redis.call('GET', KEYS[n + 1])
if override == 'b' then
  local left = math.max(redis.call('PTTL', KEYS[n + 1]), 1)
  local blocked = { 0, 1, left }
  for i = 1, n do
    blocked[2 + 2 * i] = 0
    blocked[3 + 2 * i] = left
  end
  return blocked
elseif override then
  cost = 0
end

-- Server time in microseconds, read only when a rule needs it.
local now = 0
for i = 1, n do
  if ARGV[3 + (i - 1) * 4 + 1] ~= '1' then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000000 + tonumber(t[2])
    break
  end
end

local allowed, denied_by, wait = 1, 0, 0
local reply = { 0, 0, 0 }
local plans = {}

for i = 1, n do
  local key = KEYS[i]
  local base = 3 + (i - 1) * 4
  local kind = ARGV[base + 1]
  local a = tonumber(ARGV[base + 2])
  local period_ms = tonumber(ARGV[base + 3])
  local period = period_ms * 1000
  local c = tonumber(ARGV[base + 4])
  local ok, remaining, reset, retry, plan
