-- hold.lua: take an all-or-nothing hold on several lines whose keys share one hash slot
-- (on a cluster; on one server a call's SKUs of any slots go in one script).
-- KEYS[1..m]    stock hash of one SKU ("inv:{sku}"); field <location_id> =
--               "on_hand:reserved:safety:version:seq:held" (the committed Postgres values, the
--               seq they came with, and the units of holds in flight); field "_" marks the hash
--               as complete (hydrated from Postgres).
-- KEYS[m+1..2m] the in-flight hold records of the same SKUs ("hold:{sku}"), in the same order
-- KEYS[2m+1..] with a key filter (one Redis server only; see redis_keys.py): the meta hash
--               ("inv:meta"), then the filter's buckets, the one this key's bits go to first
-- ARGV[1]  1 if the channel is POS (may take the safety stock), else 0
-- ARGV[2]  number of lines n
-- ARGV[3]  hold id (the reservation id the hold is for)
-- ARGV[4]  1 to hold even where only the committed stock covers a line (Postgres decides), else 0
-- ARGV[5]  number of filter keys after the hold records (0: the call has no idempotency key)
-- then per line: key index (1..m), location id, quantity
-- then, with filter keys: the first bucket's expiry (Unix ms), and the key's bit offsets
-- Held units count against availability at once but are kept apart from the committed
-- `reserved`: reads report only what Postgres committed, and a hold whose commit fails never
-- showed. So a line is short for sure only when the committed stock cannot cover it. When it
-- can, and only holds in flight are in the way, the answer depends on how they end: {4} asks the
-- caller to wait for them (a refusal now could not be explained by any state a read shows).
-- A successful hold is recorded under its id in each SKU's hold hash, with the Redis clock in ms
-- and its lines: "ms;loc=qty;loc=qty". settle.lua ends it (commit done, or given back); a record
-- left behind lets the reconciler tell an orphaned hold (its replica died between Redis and
-- Postgres) from one still in flight, and give it back exactly once.
-- Returns  {0}                         all held
--          {1, k, ...}                 KEYS[k] (and each k after it) is not hydrated: load them
--                                      from Postgres and retry
--          {2, line, available, ...}   short lines (1-based line number, committed units
--                                      available); nothing held
--          {5, line, available, ...}   the same, and the (complete) filter shows that no call
--                                      with this idempotency key ever took stock
--          {3, line}                   the line's SKU-location has no stock row
--          {4}                         only holds in flight are in the way; nothing held
local pos = ARGV[1] == '1'
local n = tonumber(ARGV[2])
local hold_id = ARGV[3]
local force = ARGV[4] == '1'
local filtered = tonumber(ARGV[5]) > 0
local m = (#KEYS - tonumber(ARGV[5])) / 2
local after = 6 + 3 * n  -- the filter's arguments, after the lines
-- true if no call with this key took stock: some bit of it is clear in every bucket (a set
-- bit may be another key's, a clear one proves absence), in a filter known complete
local function key_unused()
  local meta = redis.call('HMGET', KEYS[2 * m + 1], 'keys_epoch', 'keys_complete')
  if not meta[1] or meta[1] ~= meta[2] then return false end
  for b = 2 * m + 2, #KEYS do
    local all = true
    for j = after + 1, #ARGV do
      if redis.call('GETBIT', KEYS[b], ARGV[j]) == 0 then all = false break end
    end
    if all then return false end
  end
  return true
end
local missing = {1}
for k = 1, m do
  if redis.call('HEXISTS', KEYS[k], '_') == 0 then missing[#missing + 1] = k end
end
if #missing > 1 then return missing end
-- "k/loc" -> {key, loc, on_hand, reserved, safety, version, seq, held, this call's units}
local fields = {}
local order = {}
local short = {2}
local wait = false
for i = 1, n do
  local base = 5 + (i - 1) * 3
  local k = tonumber(ARGV[base + 1])
  local loc = ARGV[base + 2]
  local qty = tonumber(ARGV[base + 3])
  local id = k .. '/' .. loc
  local f = fields[id]
  if not f then
    local val = redis.call('HGET', KEYS[k], loc)
    if not val then return {3, i} end
    local h, r, s, v, q, held = string.match(
      val, '^(%-?%d+):(%-?%d+):(%-?%d+):(%-?%d+):(%-?%d+):(%-?%d+)$')
    f = {KEYS[k], loc, tonumber(h), tonumber(r), tonumber(s), v, q, tonumber(held), 0}
    fields[id] = f
    order[#order + 1] = id
  end
  local committed = f[3] - f[4]
  if not pos then committed = committed - f[5] end
  if committed < 0 then committed = 0 end
  if committed < f[9] + qty then  -- f[9]: units of earlier lines of this call here
    short[#short + 1] = i
    short[#short + 1] = math.max(committed - f[9], 0)
  elseif committed - f[8] < qty and not force then
    wait = true
  end
  f[8] = f[8] + qty
  f[9] = f[9] + qty
end
if #short > 1 then
  if filtered and key_unused() then short[1] = 5 end
  return short
end
if wait then return {4} end
if filtered then  -- before the commit is sent: a key Postgres may remember has its bits set
  local bucket = KEYS[2 * m + 2]
  for j = after + 1, #ARGV do redis.call('SETBIT', bucket, ARGV[j], 1) end
  redis.call('PEXPIREAT', bucket, ARGV[after])
end
local changed = {}
for _, id in ipairs(order) do
  local f = fields[id]
  redis.call('HSET', f[1], f[2],
             f[3] .. ':' .. f[4] .. ':' .. f[5] .. ':' .. f[6] .. ':' .. f[7] .. ':' .. f[8])
  changed[f[1]] = true
end
for key in pairs(changed) do bump(key) end
if hold_id ~= '' then
  local t = redis.call('TIME')
  local ms = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  local records = {}
  for i = 1, n do
    local base = 5 + (i - 1) * 3
    local k = tonumber(ARGV[base + 1])
    records[k] = (records[k] or ms) .. ';' .. ARGV[base + 2] .. '=' .. ARGV[base + 3]
  end
  for k, rec in pairs(records) do
    redis.call('HSET', KEYS[m + k], hold_id, rec)
  end
end
return {0}
