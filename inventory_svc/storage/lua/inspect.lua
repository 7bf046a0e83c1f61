-- inspect.lua: what the reconciler reads of some SKUs (of one hash slot on a
-- cluster), at one instant.
-- KEYS[1..m]    stock hashes of the SKUs ("inv:{sku}")
-- KEYS[m+1..2m] their hold record hashes ("hold:{sku}"), in the same order
-- ARGV          per stock hash, in KEYS order: n, then n location fields to read of it (with
--               the hydration marker "_"); n = 0 reads the whole hash. A pass over recent
--               changes wants a few fields of many wide hashes.
-- Read only. One script, so each SKU's values and its hold records are of the same instant,
-- and the clock is that of the node that wrote the records' times (hold.lua).
-- Returns  {seconds, microseconds (TIME), field/value pairs of KEYS[1], ..., of KEYS[m],
--           HGETALL of KEYS[m+1], ..., HGETALL of KEYS[2m]}
local t = redis.call('TIME')
local out = {t[1], t[2]}
local m = #KEYS / 2
local a = 1
for k = 1, m do
  local n = tonumber(ARGV[a])
  a = a + 1
  if n == 0 then
    out[#out + 1] = redis.call('HGETALL', KEYS[k])
  else
    local names = {'_'}
    for i = 1, n do
      names[#names + 1] = ARGV[a]
      a = a + 1
    end
    local values = redis.call('HMGET', KEYS[k], unpack(names))
    local found = {}
    for i = 1, #names do
      if values[i] then
        found[#found + 1] = names[i]
        found[#found + 1] = values[i]
      end
    end
    out[#out + 1] = found
  end
end
for k = m + 1, #KEYS do
  out[#out + 1] = redis.call('HGETALL', KEYS[k])
end
return out
