-- Looks up one cache entry: reads the segment version and the entry, decides how fresh the
-- entry is, and takes the fill lock when the entry needs computing. One atomic call.
--
-- KEYS[1]   the segment version   <prefix>:c:{<segment>}:v
-- KEYS[2]   the entry (a hash)    <prefix>:c:{<segment>}:e:<key>
-- KEYS[3]   the fill lock         <prefix>:c:{<segment>}:l:<key>
-- ARGV[1]   fill lock TTL in ms (0: never lock)
-- ARGV[2]   fill lock token
-- ARGV[3]   XFetch beta (0: no early recompute)
-- ARGV[4]   a uniform random number in (0, 1]
--
-- Entry fields: v version, t stored at (us), f fresh until (us), w stale-while-revalidate
-- until (us), e stale-if-error until (us), x kept for revalidation until (us; absent in entries
-- of older versions), d compute time (us), b the encoded response.
--
-- Reply: { state, version, age ms, lock, body }
--   state 0 miss, 1 fresh, 2 early (XFetch), 3 stale, 4 stale only on error, 5 corrupt (deleted),
--         6 expired but kept to be revalidated
--   lock  0 not tried, 1 acquired, 2 held by another
-- Time comes from the server (TIME), in microseconds.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lock_ms = tonumber(ARGV[1]) or 0
local beta = tonumber(ARGV[3]) or 0
local rnd = tonumber(ARGV[4]) or 1
if rnd <= 0 or rnd > 1 then rnd = 1 end

local version = tonumber(redis.call('GET', KEYS[1])) or 0
local state = 0
local age = 0
local body = false

local r = redis.pcall('HMGET', KEYS[2], 'v', 't', 'f', 'w', 'e', 'd', 'b', 'x')
if type(r) == 'table' and r.err then
  -- Not a hash (written by something else): unreadable, delete it.
  redis.call('DEL', KEYS[2])
  state = 5
elseif r[1] or r[7] then
  local v, st, f, w, e, d = tonumber(r[1]), tonumber(r[2]), tonumber(r[3]), tonumber(r[4]),
    tonumber(r[5]), tonumber(r[6])
  if not (v and st and f and w and e and d and r[7]) then
    redis.call('DEL', KEYS[2])
    state = 5
  elseif v == version then
    if now < f then
      state = 1
      if beta > 0 and d > 0 and (now - d * beta * math.log(rnd)) >= f then
        state = 2
      end
    elseif now < w then
      state = 3
    elseif now < e then
      state = 4
    elseif now < (tonumber(r[8]) or 0) then
      state = 6
    end
    if state ~= 0 then
      body = r[7]
      age = math.floor((now - st) / 1000)
      if age < 0 then age = 0 end
    end
  end
end

local lock = 0
if lock_ms > 0 and state ~= 1 then
  if redis.call('SET', KEYS[3], ARGV[2], 'NX', 'PX', lock_ms) then
    lock = 1
  else
    lock = 2
  end
end

return { state, version, age, lock, body }
