-- One rule of one strategy (assembled from fragments, see src/scripts/rate_limit/README.md).
--
-- KEYS[1] the rule's state; ARGV: cost, want-state flag (1/0), a, b (period ms), c[, nonce]
-- (see the rule kinds in multi_head.lua).
-- Reply: { allowed (0/1), denying rule (1 or 0), retry after ms, remaining, reset ms }, or 1
-- when allowed and the state is not wanted.
local key = KEYS[1]
local cost = tonumber(ARGV[1])
local want_state = ARGV[2] == '1'
local a = tonumber(ARGV[3])
local period_ms = tonumber(ARGV[4])
local period = period_ms * 1000
local c = tonumber(ARGV[5])
local nonce = ARGV[6]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ok, remaining, reset, retry, plan
