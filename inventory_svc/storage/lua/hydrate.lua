-- hydrate.lua: load one SKU's stock hash from a Postgres snapshot.
-- KEYS[1]  stock hash of the SKU
-- KEYS[2]  its hold records: dropped with a load, as the snapshot counts only committed units (a
--          hold in flight then neither gives back nor keeps units it no longer has here)
-- ARGV[1]  "1" to replace whatever is there (a full rebuild: nothing there is trusted), "0" to
--          load only a hash that is not hydrated
-- ARGV[2..] pairs of location id, "on_hand:reserved:safety:version:seq"
-- Without force, a field already there with a seq at least as new as the snapshot's (a commit
-- applied while the snapshot was on its way) is kept: a load never takes the hash back in time.
-- Returns  1 if written, 0 if it was already hydrated and left alone
local force = ARGV[1] == '1'
if not force and redis.call('HEXISTS', KEYS[1], '_') == 1 then return 0 end
redis.call('DEL', KEYS[2])
local have = {}
if force then
  redis.call('DEL', KEYS[1])
else
  local cur = redis.call('HGETALL', KEYS[1])
  for i = 1, #cur, 2 do
    if cur[i] ~= '_' then
      local head = string.match(cur[i + 1], '^(.*):%-?%d+$')
      have[cur[i]] = head
      -- its holds' records are gone: so are the units they held
      redis.call('HSET', KEYS[1], cur[i], head .. ':0')
    end
  end
end
-- "_" marks the hash hydrated and counts its changes (bump.lua), from the clock in µs
local t = redis.call('TIME')
local args = {'_', string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]))}
for i = 2, #ARGV, 2 do
  local loc, val = ARGV[i], ARGV[i + 1]
  local old = have[loc]
  local keep = false
  if old then
    keep = tonumber(string.match(old, '(%-?%d+)$')) >= tonumber(string.match(val, '(%-?%d+)$'))
  end
  if not keep then
    args[#args + 1] = loc
    args[#args + 1] = val .. ':0'
  end
end
redis.call('HSET', KEYS[1], unpack(args))
return 1
