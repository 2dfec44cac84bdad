-- One rule of one strategy (assembled from fragments, see src/scripts/rate_limit/README.md).
--
-- KEYS[1] the rule's state, KEYS[2] the key's override; ARGV: cost, want-state flag (1/0), a,
-- b (period ms), c[, nonce] (see the rule kinds and the override in multi_head.lua).
-- Reply: { allowed (0/1), denying rule (1 or 0), retry after ms, remaining, reset ms }, or 1
-- when allowed and the state is not wanted.
local key = KEYS[1]
local cost = tonumber(ARGV[1])
local override = redis.call('GET', KEYS[2])
if override == 'b' then
  local left = math.max(redis.call('PTTL', KEYS[2]), 1)
  return { 0, 1, left, 0, left }
elseif override then
  cost = 0
end
local want_state = ARGV[2] == '1'
local a = tonumber(ARGV[3])
local period_ms = tonumber(ARGV[4])
local period = period_ms * 1000
local c = tonumber(ARGV[5])
local nonce = ARGV[6]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ok, remaining, reset, retry, plan
