-- settle.lua: end the record of one hold, exactly once.
-- KEYS[1..m]    stock hashes of the hold's SKUs (one hash slot)
-- KEYS[m+1..2m] their hold record hashes, in the same order
-- ARGV[1]  hold id
-- ARGV[2]  "back": give the recorded units back (Postgres did not take them), then drop the record
--          "done": drop the record only (Postgres committed them; the units stay reserved)
-- Only a record still present moves units, so a hold given back twice (by its replica and by the
-- reconciler, or after a rebuild dropped the records) is given back once, or not at all.
-- Returns  the number of records ended
local m = #KEYS / 2
local ended = 0
for k = 1, m do
  local rec = redis.call('HGET', KEYS[m + k], ARGV[1])
  if rec then
    if ARGV[2] == 'back' and redis.call('HEXISTS', KEYS[k], '_') == 1 then
      for loc, qty in string.gmatch(rec, ';([^;=]+)=(%d+)') do
        local val = redis.call('HGET', KEYS[k], loc)
        if val then
          local h, r, s, v = string.match(val, '^(%-?%d+):(%-?%d+):(%-?%d+):(%-?%d+)$')
          r = tonumber(r) - tonumber(qty)
          if r < 0 then r = 0 end
          redis.call('HSET', KEYS[k], loc, h .. ':' .. r .. ':' .. s .. ':' .. v)
        end
      end
    end
    redis.call('HDEL', KEYS[m + k], ARGV[1])
    ended = ended + 1
  end
end
return ended
