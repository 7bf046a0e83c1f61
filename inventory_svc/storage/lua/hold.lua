-- hold.lua: take an all-or-nothing hold on several lines whose keys share one hash slot.
-- KEYS[i]  stock hash of one SKU ("inv:{sku}"); field <location_id> = "on_hand:reserved:safety:version",
--          field "_" marks the hash as complete (hydrated from Postgres).
-- ARGV[1]  1 if the channel is POS (may take the safety stock), else 0
-- ARGV[2]  number of lines n; then per line: key index, location id, quantity
-- Returns  {0}                         all held
--          {1, k}                      KEYS[k] is not hydrated: load it from Postgres and retry
--          {2, line, available, ...}   short lines (1-based line number and units available); nothing held
--          {3, line}                   the line's SKU-location has no stock row
local pos = ARGV[1] == '1'
local n = tonumber(ARGV[2])
for k = 1, #KEYS do
  if redis.call('HEXISTS', KEYS[k], '_') == 0 then return {1, k} end
end
local rows = {}
local short = {2}
for i = 1, n do
  local base = 2 + (i - 1) * 3
  local key = KEYS[tonumber(ARGV[base + 1])]
  local loc = ARGV[base + 2]
  local qty = tonumber(ARGV[base + 3])
  local val = redis.call('HGET', key, loc)
  if not val then return {3, i} end
  local h, r, s, v = string.match(val, '^(%-?%d+):(%-?%d+):(%-?%d+):(%-?%d+)$')
  h, r, s = tonumber(h), tonumber(r), tonumber(s)
  local avail = h - r
  if not pos then avail = avail - s end
  if avail < 0 then avail = 0 end
  if avail < qty then
    short[#short + 1] = i
    short[#short + 1] = avail
  end
  rows[i] = {key, loc, h, r + qty, s, v}
end
if #short > 1 then return short end
for i = 1, n do
  local row = rows[i]
  redis.call('HSET', row[1], row[2], row[3] .. ':' .. row[4] .. ':' .. row[5] .. ':' .. row[6])
end
return {0}
