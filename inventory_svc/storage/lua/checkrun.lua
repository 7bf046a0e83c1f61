-- checkrun.lua: run on every new connection. The marker says which Redis server process (run id)
-- the data was built on; a server that comes back with data built on another process (restarted
-- from an older snapshot or AOF, a failed-over replica) holds data that may be stale with no way
-- to tell, so it is dropped whole and rebuilt from Postgres (SKUs on demand, the rest by the
-- reconciler). Atomic, so of many connections opening at once only the first drops anything.
-- KEYS[1]  the meta hash ("inv:meta"); ARGV[1] this server's run id
-- Returns  1 if the data was dropped, 0 if it is trusted (or there is no marker: nothing built)
local built_on = redis.call('HGET', KEYS[1], 'built_on')
if built_on and built_on ~= ARGV[1] then
  redis.call('FLUSHDB')
  return 1
end
return 0
