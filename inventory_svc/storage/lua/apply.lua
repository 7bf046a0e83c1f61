-- apply.lua: bring committed Postgres state into the read model, and move reserved units.
-- KEYS[i]  stock hash of one SKU (all in one hash slot)
-- ARGV[1]  number of rows n; then per row: key index, location id, on_hand, safety, version,
--          reserved delta
-- on_hand/safety/version are taken only when the version is newer than the one stored, so late
-- updates never overwrite newer ones. The reserved delta is always added (floored at 0): it gives
-- back or converts a hold this replica took. A hash that is not hydrated is left alone: it will be
-- loaded whole from Postgres when next needed.
-- Returns  the number of rows applied
local n = tonumber(ARGV[1])
local applied = 0
for i = 1, n do
  local base = 1 + (i - 1) * 6
  local key = KEYS[tonumber(ARGV[base + 1])]
  if redis.call('HEXISTS', key, '_') == 1 then
    local loc = ARGV[base + 2]
    local h, s, v = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4]), tonumber(ARGV[base + 5])
    local dr = tonumber(ARGV[base + 6])
    local r = 0
    local val = redis.call('HGET', key, loc)
    if val then
      local oh, orr, os, ov = string.match(val, '^(%-?%d+):(%-?%d+):(%-?%d+):(%-?%d+)$')
      r = tonumber(orr)
      if tonumber(ov) >= v then
        h, s, v = tonumber(oh), tonumber(os), tonumber(ov)
      end
    end
    r = r + dr
    if r < 0 then r = 0 end
    redis.call('HSET', key, loc, h .. ':' .. r .. ':' .. s .. ':' .. v)
    applied = applied + 1
  end
end
return applied
