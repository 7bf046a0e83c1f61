-- take.lua: a function shared by apply.lua and settle.lua (prepended to them when loaded, after
-- bump.lua), not a script of its own.
-- take(key, loc, on_hand, reserved, safety, version, seq): write a committed Postgres value of
-- one SKU-location if its seq is newer than the one stored, keeping the units held in flight.
-- Returns 1 if written, 0 if the stored value is as new or newer.
local function take(key, loc, h, r, s, v, seq)
  local held = '0'
  local val = redis.call('HGET', key, loc)
  if val then
    local q, hd = string.match(val, ':(%-?%d+):(%-?%d+)$')
    if tonumber(q) >= tonumber(seq) then return 0 end
    held = hd
  end
  redis.call('HSET', key, loc, h .. ':' .. r .. ':' .. s .. ':' .. v .. ':' .. seq .. ':' .. held)
  bump(key)
  return 1
end
