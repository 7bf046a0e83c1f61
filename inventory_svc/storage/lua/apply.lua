-- apply.lua: bring committed Postgres values into the read model, newer seq wins (take.lua).
-- KEYS[i]  stock hash of one SKU (on a cluster all of one hash slot)
-- ARGV[1]  number of rows n; then per row: key index, location id, on_hand, reserved, safety,
--          version, seq
-- A row is taken only if its seq is newer than the one stored, so commits land in Postgres'
-- order whatever order their updates arrive in, and a late update never undoes a newer one.
-- The units held in flight stay as they are. A hash that is not (yet) hydrated takes the row
-- too, without becoming complete: hydrate.lua keeps it if it is newer than its snapshot.
-- Returns  the number of rows taken
local n = tonumber(ARGV[1])
local taken = 0
for i = 1, n do
  local b = 1 + (i - 1) * 7
  taken = taken + take(KEYS[tonumber(ARGV[b + 1])], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4],
                       ARGV[b + 5], ARGV[b + 6], ARGV[b + 7])
end
return taken
