-- Where the expired-lease sweeper looks: tenants that may hold open reservations, each scored with
-- the Redis time it was last registered.
--
-- KEYS  1 the reserving-tenants sorted set
-- ARGV  1 now ms ('' = Redis TIME)   2 tenant id   3 'register' | 'forget' | 'now'
--       4 forget: remove only a registration older than this many ms
-- A stream_proxy registers a tenant at most every few seconds (not on every request), so `forget`
-- (the sweeper, after seeing the tenant's reservation index empty) removes a tenant only when no
-- stream_proxy has registered it lately: a reservation made meanwhile keeps it listed.
-- Returns 1 when the set changed ('now': Redis TIME in ms, which a cluster client cannot ask for
-- without naming a key).

local now = now_ms()
if ARGV[3] == 'now' then
  return now
end
if ARGV[3] == 'register' then
  return redis.call('ZADD', KEYS[1], now, ARGV[2])
end
local score = redis.call('ZSCORE', KEYS[1], ARGV[2])
if score and tonumber(score) < now - tonumber(ARGV[4]) then
  return redis.call('ZREM', KEYS[1], ARGV[2])
end
return 0
