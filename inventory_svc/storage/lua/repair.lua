-- repair.lua: the reconciler's compare-and-set of one SKU-location.
-- KEYS[1]  stock hash of the SKU
-- ARGV[1]  location id
-- ARGV[2]  the value the reconciler observed in Redis ("" = field absent)
-- ARGV[3]  the value to write, from Postgres ("" = delete the field)
-- Returns  1 if repaired, 0 if the field changed since it was observed (left for the next pass)
if redis.call('HEXISTS', KEYS[1], '_') == 0 then return 0 end
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if cur ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
return 1
