-- Token reservation by stream_proxy once it has read the body; spends the grant in the same call.
-- Every key lives under the tenant's hash tag.
--
-- KEYS  1 grant-spent marker   2 tpm key   3 tpm tenant
--       4..9 budgets: key day, key month, key total, tenant day, tenant month, tenant total
--       10 reservation record (HASH)   11 reservation index (ZSET request id -> lease expiry ms)
-- ARGV  1 now ms ('' = Redis TIME)   2 request id   3 metered (1/0)
--       4 prompt upper bound   5 requested completion limit (-1 = none)   6 default completion cap (-1 = none)
--       7..8 tpm limits key/tenant   9..14 budget limits in KEYS order (-1 = no limit)
--       15 marker ttl ms   16 lease ttl ms   17 key id   18 day period   19 month period
-- The reservation record keeps key id and periods so an expired lease can be charged without
-- the usage event that never came.
-- Returns {1, completion limit to forward (-1 = none), tokens reserved}
--         {0, 'used'}                         the grant was already spent
--         {0, 'tpm' | 'budget', retry_after_ms (-1 = unknown), scope}  not even prompt + 1 fits
--         {2, i1, ...}                        budget counters (KEYS indices) missing

local now = now_ms()
local sec = math.floor(now / 1000)
local metered = ARGV[3] == '1'

if metered then
  local missing = {}
  for i = 4, 9 do
    if tonumber(ARGV[i + 5]) >= 0 and redis.call('EXISTS', KEYS[i]) == 0 then
      table.insert(missing, i)
    end
  end
  if #missing > 0 then
    table.insert(missing, 1, 2)
    return missing
  end
end

if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', tonumber(ARGV[15])) then
  return {0, 'used'}
end
if not metered then return {1, -1, 0} end

local prompt = tonumber(ARGV[4])
local headroom, tight, tight_scope, tight_retry = nil, nil, nil, -1
local scopes = {'key', 'tenant'}
local charged = {}

-- A counter that exists is kept exact even where no limit applies now (rebuild-counters writes every
-- one; a limit set later must find it right), so existing unlimited counters are charged too.
for s = 1, 2 do
  local limit = tonumber(ARGV[6 + s])
  if limit >= 0 then
    local used, oldest = window(KEYS[1 + s], sec)
    local room = limit - used
    if headroom == nil or room < headroom then
      headroom, tight, tight_scope = room, 'tpm', scopes[s]
      tight_retry = retry_ms(oldest, now)
    end
    table.insert(charged, 1 + s)
  elseif redis.call('EXISTS', KEYS[1 + s]) == 1 then
    table.insert(charged, 1 + s)
  end
end
for i = 4, 9 do
  local limit = tonumber(ARGV[i + 5])
  if limit >= 0 then
    local room = limit - tonumber(redis.call('GET', KEYS[i]) or '0')
    if headroom == nil or room < headroom then
      headroom, tight, tight_retry = room, 'budget', -1
      tight_scope = scopes[1]
      if i > 6 then tight_scope = scopes[2] end
    end
    table.insert(charged, i)
  elseif redis.call('EXISTS', KEYS[i]) == 1 then
    table.insert(charged, i)
  end
end

local completion = tonumber(ARGV[5])
if completion < 0 then completion = tonumber(ARGV[6]) end
if headroom ~= nil then
  if headroom < prompt + 1 then
    return {0, tight, tight_retry, tight_scope}  -- nothing reserved; the grant stays spent
  end
  if completion < 0 or completion > headroom - prompt then completion = headroom - prompt end
end

local reserved = prompt
if completion > 0 then reserved = prompt + completion end
for _, i in ipairs(charged) do
  if i <= 3 then
    redis.call('HINCRBY', KEYS[i], sec, reserved)
    redis.call('EXPIRE', KEYS[i], WINDOW + 5)
  else
    redis.call('INCRBY', KEYS[i], reserved)
  end
end
local expires = now + tonumber(ARGV[16])
redis.call('HSET', KEYS[10], 'amount', reserved, 'sec', sec, 'charged', table.concat(charged, ','),
  'expires', expires, 'key', ARGV[17], 'day', ARGV[18], 'month', ARGV[19])
redis.call('PEXPIRE', KEYS[10], 7 * 86400 * 1000)
redis.call('ZADD', KEYS[11], expires, ARGV[2])
return {1, completion, reserved}
