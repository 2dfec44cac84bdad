-- Leases a batch of units of one rule for one replica, which then admits from it locally
-- (assembled from fragments, see src/scripts/rate_limit/README.md).
--
-- KEYS[1] the rule's state, KEYS[2] the key's override, KEYS[3] the replicas that leased the
--         key recently (a hash: replica id -> ms of its last lease); one hash tag, one slot
-- ARGV    need (units the caller needs now), want (the batch the replica asks for, >= need),
--         replica id, kind (1 fixed window, 4 token bucket, 5 GCRA), a, b (period ms), c
-- Reply:  { granted (0 when denied, -1 when an override applies: check directly),
--           retry after ms (when denied), remaining after the grant, reset ms,
--           ms left in the window (fixed window; 0 for the others), replicas seen }
-- The grant is debited before the reply: `need` or nothing, plus at most
-- floor(remaining after need / (2 * replicas seen)) more, up to `want`. Decides before it
-- writes. Time comes from the server (TIME).
local key = KEYS[1]
local need = tonumber(ARGV[1])
local want = tonumber(ARGV[2])
local replica = ARGV[3]
local kind = ARGV[4]
local a = tonumber(ARGV[5])
local period_ms = tonumber(ARGV[6])
local period = period_ms * 1000
local c = tonumber(ARGV[7])
local want_state = true
local override = redis.call('GET', KEYS[2])
if override == 'b' then
  local left = math.max(redis.call('PTTL', KEYS[2]), 1)
  return { 0, left, 0, left, 0, 1 }
elseif override then
  return { -1, 0, 0, 0, 0, 1 }
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now / 1000)

-- The strategies' check and commit fragments, as functions (the script puts them here).
local function check(cost)
  local ok, remaining, reset, retry, plan
