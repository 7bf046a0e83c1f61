-- repair.lua: the reconciler's compare-and-set of one SKU-location.
-- KEYS[1]  stock hash of the SKU
-- ARGV[1]  location id
-- ARGV[2]  the value the reconciler observed in Redis ("" = field absent)
-- ARGV[3]  the value to write ("on_hand:reserved:safety:version:seq:held": Postgres' values and
--          the units of the hold records read with the observed value)
-- Returns  1 if repaired, 0 if the field changed since it was observed (left for the next pass)
if redis.call('HEXISTS', KEYS[1], '_') == 0 then return 0 end
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if cur ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
bump(KEYS[1])
return 1
