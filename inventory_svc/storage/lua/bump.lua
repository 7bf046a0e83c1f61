-- bump.lua: a function shared by the scripts that change a stock hash (prepended to them when
-- loaded), not a script of its own.
-- bump(key): count a change of a hydrated stock hash in its marker field "_", so a reader that
-- keeps something derived from the hash (routing's stock columns) can tell by reading that one
-- field whether the hash changed. hydrate.lua starts the count at the Redis clock in µs, so a
-- rebuilt hash never repeats a count the old one had. An unhydrated hash is left without "_".
local function bump(key)
  if redis.call('HEXISTS', key, '_') == 1 then redis.call('HINCRBY', key, '_', 1) end
end
