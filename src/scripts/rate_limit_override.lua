-- Sets or clears the override of a rate-limit key, read by every check in the same call as the
-- rules (see the head of the check scripts).
--
-- KEYS[1] the override key `<prefix>:{<hashed key>}:o` (the hash tag of the key's rule keys)
-- ARGV[1] 'b' (blocked), 'a' (allowed), or '' to clear
-- ARGV[2] how long it lasts, in ms (at least 1)
-- Reply: 1
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
