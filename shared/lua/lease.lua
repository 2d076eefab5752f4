-- Renew or release a request's stream lease (and its reservation's lease expiry) in both scopes.
--
-- KEYS  1 leases key   2 leases tenant   3 reservation record   4 reservation index
-- ARGV  1 now ms ('' = Redis TIME)   2 request id   3 'renew' | 'release'
--       4 renew: lease ttl ms; release: how long the usage event may take to be settled, ms
-- On release the usage event is already written: the reservation stays indexed, but with an expiry
-- far enough out that the expired-lease sweeper leaves it to the accountant's settlement.
-- Returns the number of lease entries touched.

local expires = now_ms() + tonumber(ARGV[4])
if ARGV[3] == 'release' then
  redis.call('ZADD', KEYS[4], 'XX', expires, ARGV[2])
  return redis.call('ZREM', KEYS[1], ARGV[2]) + redis.call('ZREM', KEYS[2], ARGV[2])
end
local touched = redis.call('ZADD', KEYS[1], 'XX', 'CH', expires, ARGV[2])
touched = touched + redis.call('ZADD', KEYS[2], 'XX', 'CH', expires, ARGV[2])
-- The sets live as long as any lease in them: a set whose expiry passed while streams renewed
-- their leases would vanish whole and let the scope admit past its limit.
keep_for(KEYS[1], tonumber(ARGV[4]) + 60000)
keep_for(KEYS[2], tonumber(ARGV[4]) + 60000)
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], 'expires', expires)
  redis.call('ZADD', KEYS[4], 'XX', expires, ARGV[2])
end
return touched
