-- settle.lua: end one hold, exactly once, and bring in what its commit wrote.
-- KEYS[1..m]    stock hashes of the hold's SKUs (of one hash slot on a cluster)
-- KEYS[m+1..2m] their hold record hashes, in the same order
-- ARGV[1]  hold id
-- ARGV[2]  number of committed rows n (0 when the hold is given back: Postgres took none);
--          then per row, as in apply.lua: key index, location id, on_hand, reserved, safety,
--          version, seq
-- The rows are taken first (newer seq wins, take.lua), then each record still present takes
-- its units off `held` and goes. In one script, so the units move from held to the committed
-- values with no instant between where they count twice or not at all. Only a record still
-- present moves units: a hold ended twice (by its replica and by the reconciler, or after a
-- rebuild dropped the records) is ended once, or not at all.
-- Returns  the number of records ended
local m = #KEYS / 2
local n = tonumber(ARGV[2])
for i = 1, n do
  local b = 2 + (i - 1) * 7
  take(KEYS[tonumber(ARGV[b + 1])], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5],
       ARGV[b + 6], ARGV[b + 7])
end
local ended = 0
for k = 1, m do
  local rec = redis.call('HGET', KEYS[m + k], ARGV[1])
  if rec then
    for loc, qty in string.gmatch(rec, ';([^;=]+)=(%d+)') do
      local val = redis.call('HGET', KEYS[k], loc)
      if val then
        local head, h = string.match(val, '^(.*):(%-?%d+)$')
        h = tonumber(h) - tonumber(qty)
        if h < 0 then h = 0 end
        redis.call('HSET', KEYS[k], loc, head .. ':' .. h)
        bump(KEYS[k])
      end
    end
    redis.call('HDEL', KEYS[m + k], ARGV[1])
    ended = ended + 1
  end
end
return ended
