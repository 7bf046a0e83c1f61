-- markers.lua: the change count of many stock hashes in one command (storage/redis_stock.py
-- `markers`; routing keeps each SKU's stock column by it).
-- KEYS    stock hashes ("inv:{sku}"); on a single server any number of slots, on a cluster
--         the keys of one slot
-- ARGV    none
-- Read only. A pipeline of one HGET per hash costs the client a command to pack and a reply to
-- parse each: at 20 lines that was most of routing's stock read.
-- Returns  per key, in KEYS order: its marker field "_" (bump.lua), or nil where the hash is not
--          hydrated
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('HGET', key, '_')
end
return out
