-- Renew or release a request's stream lease (and its reservation's lease expiry) in both scopes.
--
-- KEYS  1 leases key   2 leases tenant   3 reservation record   4 reservation index
-- ARGV  1 now ms ('' = Redis TIME)   2 request id   3 'renew' | 'release'
--       4 renew: lease ttl ms; release: how long the usage event may take to be settled, ms
-- On release the usage event is already written: the reservation stays indexed, but with an expiry
-- far enough out that the expired-lease sweeper leaves it to the accountant's settlement.
-- Returns the number of lease entries touched.

-- The model rules' leases are the ones the reservation record lists (`mc`, reserve.lua).

local expires = now_ms() + tonumber(ARGV[4])
local sets = {KEYS[1], KEYS[2]}
local mc = redis.call('HGET', KEYS[3], 'mc')
if mc then
  for _, key in ipairs(cjson.decode(mc).l or {}) do table.insert(sets, key) end
end
local touched = 0
if ARGV[3] == 'release' then
  redis.call('ZADD', KEYS[4], 'XX', expires, ARGV[2])
  for _, key in ipairs(sets) do touched = touched + redis.call('ZREM', key, ARGV[2]) end
  return touched
end
-- The sets live as long as any lease in them: a set whose expiry passed while streams renewed
-- their leases would vanish whole and let the scope admit past its limit.
for _, key in ipairs(sets) do
  touched = touched + redis.call('ZADD', key, 'XX', 'CH', expires, ARGV[2])
  keep_for(key, tonumber(ARGV[4]) + 60000)
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], 'expires', expires)
  redis.call('ZADD', KEYS[4], 'XX', expires, ARGV[2])
end
return touched
