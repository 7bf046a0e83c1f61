-- hydrate.lua: load one SKU's stock hash from a Postgres snapshot.
-- KEYS[1]  stock hash of the SKU
-- KEYS[2]  its hold records: dropped with a load, as the snapshot counts only committed units (a
--          hold in flight then neither gives back nor keeps units it no longer has here)
-- ARGV[1]  "1" to replace whatever is there (full rebuild), "0" to write only if not hydrated
-- ARGV[2..] pairs of location id, "on_hand:reserved:safety:version"
-- Returns  1 if written, 0 if it was already hydrated and left alone
if ARGV[1] ~= '1' and redis.call('HEXISTS', KEYS[1], '_') == 1 then return 0 end
redis.call('DEL', KEYS[1])
if KEYS[2] then redis.call('DEL', KEYS[2]) end
local args = {'_', '1'}
for i = 2, #ARGV do args[#args + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(args))
return 1
