-- Token reservation by stream_proxy once it has read the body; spends the grant in the same call,
-- and decides the limits of the model rules the request's model falls under (one call, all or
-- nothing: docs/ARCHITECTURE.md#model-limits). Every key lives under the tenant's hash tag.
--
-- KEYS  1 grant-spent marker   2 tpm key   3 tpm tenant
--       4..9 budgets: key day, key month, key total, tenant day, tenant month, tenant total
--       10 reservation record (HASH)   11 reservation index (ZSET request id -> lease expiry ms)
--       12 rpm key   13 rpm tenant (the admission's count, given back when this call refuses)
--       14.. six per model scope: rpm, tpm, leases, budget day, budget month, budget total
-- ARGV  1 now ms ('' = Redis TIME)   2 request id   3 metered (1/0)
--       4 prompt upper bound   5 requested completion limit (-1 = none)   6 default completion cap (-1 = none)
--       7..8 tpm limits key/tenant   9..14 budget limits in KEYS order (-1 = no limit)
--       15 marker ttl ms   16 lease ttl ms   17 key id   18 day period   19 month period
--       20 the second the admission counted the request in (-1: it counted none)
--       21 the qualified model ('' = none)   22 number of model scopes
--       23.. one per model scope: "scope,rpm,tpm,concurrency,day,month,total" (-1 = no limit; one
--            argument each: every argument costs the client as much as a Redis command does)
-- The reservation record keeps key id, periods and model so an expired lease can be charged without
-- the usage event that never came, and (field `mc`, JSON) the model counters it charged and the model
-- leases it holds, which settle.lua, lease.lua and rebuild.lua read: same tenant, same slot.
-- Returns {1, completion limit to forward (-1 = none), tokens reserved}
--         {0, 'used'}                         the grant was already spent
--         {0, 'tpm' | 'budget', retry_after_ms (-1 = unknown), scope}  not even prompt + 1 fits
--         {0, reason, retry_after_ms, scope, model scope number, limit, used}  a model rule refused:
--            reason rpm | concurrency | tpm | budget_day | budget_month | budget_total
--         {2, i1, ...}                        budget counters (KEYS indices) missing

local now = now_ms()
local sec = math.floor(now / 1000)
local metered = ARGV[3] == '1'
local n = tonumber(ARGV[22] or '0')
local scopes = {'key', 'tenant'}
local mlimits, mwhos = {}, {}
for s = 1, n do
  local parts = {}
  for part in string.gmatch(ARGV[22 + s], '[^,]+') do table.insert(parts, part) end
  mwhos[s] = parts[1]
  mlimits[s] = {tonumber(parts[2]), tonumber(parts[3]), tonumber(parts[4]), tonumber(parts[5]),
    tonumber(parts[6]), tonumber(parts[7])}
end
local function mkey(s, j) return KEYS[13 + 6 * (s - 1) + j] end
local function mlimit(s, j) return mlimits[s][j] end
local function mwho(s) return mwhos[s] end

-- Budget counters are read once: a missing one (false) that has a limit must be hydrated first.
local value = {}
if metered then
  local missing = {}
  for i = 4, 9 do
    value[i] = redis.call('GET', KEYS[i])
    if tonumber(ARGV[i + 5]) >= 0 and not value[i] then table.insert(missing, i) end
  end
  for s = 1, n do
    for j = 4, 6 do
      local k = 13 + 6 * (s - 1) + j
      value[k] = redis.call('GET', KEYS[k])
      if mlimit(s, j) >= 0 and not value[k] then table.insert(missing, k) end
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

-- A refusal charges nothing, not even the request the admission counted.
local function refuse(answer)
  local at = tonumber(ARGV[20])
  if at >= 0 then
    for k = 12, 13 do
      if tonumber(redis.call('HGET', KEYS[k], at) or '0') > 0 then redis.call('HINCRBY', KEYS[k], at, -1) end
    end
  end
  return answer
end

-- Requests and streams of the model rules first: they need no token arithmetic.
for s = 1, n do
  local rpm = mlimit(s, 1)
  if rpm >= 0 then
    local used, oldest = window(mkey(s, 1), sec)
    if used >= rpm then return refuse({0, 'rpm', retry_ms(oldest, now), mwho(s), s, rpm, used}) end
  end
  local streams = mlimit(s, 3)
  if streams >= 0 then
    redis.call('ZREMRANGEBYSCORE', mkey(s, 3), '-inf', now)
    local open = redis.call('ZCARD', mkey(s, 3))
    if open >= streams then
      local first = redis.call('ZRANGE', mkey(s, 3), 0, 0, 'WITHSCORES')
      local wait = 1000
      if first[2] then wait = math.max(1, tonumber(first[2]) - now) end
      return refuse({0, 'concurrency', wait, mwho(s), s, streams, open})
    end
  end
end

local prompt = tonumber(ARGV[4])
local headroom, tight = nil, nil
local charged, windows, budgets = {}, {}, {}

-- A counter that exists is kept exact even where no limit applies now (rebuild-counters writes every
-- one; a limit set later must find it right), so existing unlimited counters are charged too.
local function consider(room, answer)
  if headroom == nil or room < headroom then headroom, tight = room, answer end
end
for s = 1, 2 do
  local limit = tonumber(ARGV[6 + s])
  if limit >= 0 then
    local used, oldest = window(KEYS[1 + s], sec)
    consider(limit - used, {0, 'tpm', retry_ms(oldest, now), scopes[s]})
    table.insert(charged, 1 + s)
  elseif redis.call('EXISTS', KEYS[1 + s]) == 1 then
    table.insert(charged, 1 + s)
  end
end
for i = 4, 9 do
  local limit = tonumber(ARGV[i + 5])
  if limit >= 0 then
    local scope = scopes[1]
    if i > 6 then scope = scopes[2] end
    consider(limit - tonumber(value[i] or '0'), {0, 'budget', -1, scope})
    table.insert(charged, i)
  elseif value[i] then
    table.insert(charged, i)
  end
end
local periods = {'day', 'month', 'total'}
for s = 1, n do
  local limit = mlimit(s, 2)
  if limit >= 0 then
    local used, oldest = window(mkey(s, 2), sec)
    consider(limit - used, {0, 'tpm', retry_ms(oldest, now), mwho(s), s, limit, used})
    table.insert(windows, mkey(s, 2))
  elseif redis.call('EXISTS', mkey(s, 2)) == 1 then
    table.insert(windows, mkey(s, 2))
  end
  for j = 4, 6 do
    local budget, current = mlimit(s, j), value[13 + 6 * (s - 1) + j]
    if budget >= 0 then
      local used = tonumber(current or '0')
      consider(budget - used, {0, 'budget_' .. periods[j - 3], -1, mwho(s), s, budget, used})
      table.insert(budgets, mkey(s, j))
    elseif current then
      table.insert(budgets, mkey(s, j))
    end
  end
end

local completion = tonumber(ARGV[5])
if completion < 0 then completion = tonumber(ARGV[6]) end
if headroom ~= nil then
  if headroom < prompt + 1 then
    return refuse(tight)  -- nothing reserved; the grant stays spent
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
local leases = {}
for s = 1, n do
  redis.call('HINCRBY', mkey(s, 1), sec, 1)
  redis.call('EXPIRE', mkey(s, 1), WINDOW + 5)
  redis.call('ZADD', mkey(s, 3), expires, ARGV[2])
  keep_for(mkey(s, 3), tonumber(ARGV[16]) + 60000)
  table.insert(leases, mkey(s, 3))
end
for _, key in ipairs(windows) do
  redis.call('HINCRBY', key, sec, reserved)
  redis.call('EXPIRE', key, WINDOW + 5)
end
for _, key in ipairs(budgets) do redis.call('INCRBY', key, reserved) end
local record = {'amount', reserved, 'sec', sec, 'charged', table.concat(charged, ','), 'expires', expires,
  'key', ARGV[17], 'day', ARGV[18], 'month', ARGV[19], 'model', ARGV[21]}
if n > 0 then
  -- cjson writes an empty list as {}: the readers take a missing list as empty
  table.insert(record, 'mc')
  table.insert(record, cjson.encode({w = windows, b = budgets, l = leases}))
end
redis.call('HSET', KEYS[10], unpack(record))
redis.call('PEXPIRE', KEYS[10], 7 * 86400 * 1000)
redis.call('ZADD', KEYS[11], expires, ARGV[2])
return {1, completion, reserved}
