-- hold.lua: take an all-or-nothing hold on several lines whose keys share one hash slot.
-- KEYS[1..m]    stock hash of one SKU ("inv:{sku}"); field <location_id> =
--               "on_hand:reserved:safety:version", field "_" marks the hash as complete
--               (hydrated from Postgres).
-- KEYS[m+1..2m] the in-flight hold records of the same SKUs ("hold:{sku}"), in the same order
-- ARGV[1]  1 if the channel is POS (may take the safety stock), else 0
-- ARGV[2]  number of lines n
-- ARGV[3]  hold id (the reservation id the hold is for)
-- then per line: key index (1..m), location id, quantity
-- A successful hold is recorded under its id in each SKU's hold hash, with the Redis clock in ms
-- and its lines: "ms;loc=qty;loc=qty". The record goes when the Postgres commit is done (or the
-- hold is given back); a record left behind lets the reconciler tell an orphaned hold (its replica
-- died between Redis and Postgres) from one still in flight, and give it back exactly once.
-- Returns  {0}                         all held
--          {1, k}                      KEYS[k] is not hydrated: load it from Postgres and retry
--          {2, line, available, ...}   short lines (1-based line number and units available); nothing held
--          {3, line}                   the line's SKU-location has no stock row
local pos = ARGV[1] == '1'
local n = tonumber(ARGV[2])
local hold_id = ARGV[3]
local m = #KEYS / 2
for k = 1, m do
  if redis.call('HEXISTS', KEYS[k], '_') == 0 then return {1, k} end
end
local rows = {}
local short = {2}
for i = 1, n do
  local base = 3 + (i - 1) * 3
  local k = tonumber(ARGV[base + 1])
  local key = KEYS[k]
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
  rows[i] = {key, loc, h, r + qty, s, v, k, qty}
end
if #short > 1 then return short end
local t = redis.call('TIME')
local ms = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local records = {}
for i = 1, n do
  local row = rows[i]
  redis.call('HSET', row[1], row[2], row[3] .. ':' .. row[4] .. ':' .. row[5] .. ':' .. row[6])
  records[row[7]] = (records[row[7]] or ms) .. ';' .. row[2] .. '=' .. row[8]
end
if hold_id ~= '' then
  for k, rec in pairs(records) do
    redis.call('HSET', KEYS[m + k], hold_id, rec)
  end
end
return {0}
