-- settle.lua: end holds, each exactly once, and bring in what their commits wrote.
-- KEYS[1..m]    stock hashes of the holds' SKUs (of one hash slot on a cluster)
-- KEYS[m+1..2m] their hold record hashes, in the same order
-- ARGV[1]  number of holds h; then per hold: its id, the number c of its SKUs here, and their
--          key indices (1..m)
-- then     number of committed rows n (0 when the holds are given back: Postgres took none);
--          then per row, as in apply.lua: key index, location id, on_hand, reserved, safety,
--          version, seq
-- The rows are taken first (newer seq wins, take.lua), then each record still present takes
-- its units off `held` and goes. In one script, so the units move from held to the committed
-- values with no instant between where they count twice or not at all. Only a record still
-- present moves units: a hold ended twice (by its replica and by the reconciler, or after a
-- rebuild dropped the records) is ended once, or not at all. A group commit ends all its holds
-- in one script (one per hash slot on a cluster).
-- Returns  the number of records ended
local m = #KEYS / 2
local holds = {}
local a = 2
for j = 1, tonumber(ARGV[1]) do
  local c = tonumber(ARGV[a + 1])
  local ks = {}
  for i = 1, c do ks[i] = tonumber(ARGV[a + 1 + i]) end
  holds[j] = {ARGV[a], ks}
  a = a + 2 + c
end
local n = tonumber(ARGV[a])
for i = 1, n do
  local b = a + (i - 1) * 7
  take(KEYS[tonumber(ARGV[b + 1])], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5],
       ARGV[b + 6], ARGV[b + 7])
end
local ended = 0
for _, hold in ipairs(holds) do
  local id = hold[1]
  for _, k in ipairs(hold[2]) do
    local rec = redis.call('HGET', KEYS[m + k], id)
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
      redis.call('HDEL', KEYS[m + k], id)
      ended = ended + 1
    end
  end
end
return ended
