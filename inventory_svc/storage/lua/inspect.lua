-- inspect.lua: what the reconciler reads of some SKUs of one hash slot, at one instant.
-- KEYS[1..m]    stock hashes of the SKUs ("inv:{sku}")
-- KEYS[m+1..2m] their hold record hashes ("hold:{sku}"), in the same order
-- ARGV          none
-- Read only. One script, so each SKU's values and its hold records are of the same instant,
-- and the clock is that of the node that wrote the records' times (hold.lua).
-- Returns  {seconds, microseconds (TIME), HGETALL of KEYS[1], ..., HGETALL of KEYS[2m]}
local t = redis.call('TIME')
local out = {t[1], t[2]}
for k = 1, #KEYS do
  out[#out + 1] = redis.call('HGETALL', KEYS[k])
end
return out
