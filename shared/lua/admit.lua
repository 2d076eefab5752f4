-- Admission of one request for a key and its tenant, all or nothing, idempotent per request id.
-- Every key lives under the tenant's hash tag (one cluster slot).
--
-- KEYS  1 decision            (request id -> remembered answer)
--       2 rpm key   3 rpm tenant      (HASH second -> requests)
--       4 tpm key   5 tpm tenant      (HASH second -> tokens, settled + reserved)
--       6 leases key 7 leases tenant  (ZSET request id -> expiry ms)
--       8..13 budgets: key day, key month, key total, tenant day, tenant month, tenant total
--       14.. the limited budget counters of the key's model rules: only checked to exist here (the
--            reservation, which knows the model, decides them; it has no Postgres to rebuild one)
-- ARGV  1 now ms ('' = Redis TIME)   2 request id   3 metered (1/0)   4 lease ttl ms
--       5..6 rpm key/tenant   7..8 tpm key/tenant   9..10 concurrency key/tenant
--       11..16 budget limits in KEYS order          (-1 = no limit everywhere)
--       17 decision ttl ms
-- Returns {1, lim_req, rem_req, reset_req_ms, lim_tok, rem_tok, reset_tok_ms, second}   admitted
--         (second: the window bucket the request was counted in; a refused reservation gives it back)
--         (the token values are reported for every route; only metered ones are checked)
--         {0, reason, retry_after_ms, scope}                                     refused
--         {2, i1, i2, ...}           budget counters (KEYS indices) missing: hydrate, then retry

local remembered = redis.call('GET', KEYS[1])
if remembered then return cjson.decode(remembered) end

local now = now_ms()
local sec = math.floor(now / 1000)
local metered = ARGV[3] == '1'

local function answer(result)
  redis.call('SET', KEYS[1], cjson.encode(result), 'PX', tonumber(ARGV[17]))
  return result
end

-- Budgets first: a missing counter must be rebuilt from Postgres before anything is decided.
if metered then
  local missing = {}
  for i = 8, 13 do
    if tonumber(ARGV[i + 3]) >= 0 and redis.call('EXISTS', KEYS[i]) == 0 then
      table.insert(missing, i)
    end
  end
  for i = 14, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 0 then table.insert(missing, i) end
  end
  if #missing > 0 then
    table.insert(missing, 1, 2)
    return missing
  end
end

local scopes = {'key', 'tenant'}
local req_used, tok_used, req_old, tok_old = {}, {}, {}, {}
for s = 1, 2 do
  local rpm = tonumber(ARGV[4 + s])
  req_used[s], req_old[s] = window(KEYS[1 + s], sec)
  if rpm >= 0 and req_used[s] >= rpm then
    return answer({0, 'rpm', retry_ms(req_old[s], now), scopes[s]})
  end
end
for s = 1, 2 do
  if tonumber(ARGV[6 + s]) >= 0 then tok_used[s], tok_old[s] = window(KEYS[3 + s], sec) end
end
if metered then
  for s = 1, 2 do
    local tpm = tonumber(ARGV[6 + s])
    if tpm >= 0 and tok_used[s] >= tpm then
      return answer({0, 'tpm', retry_ms(tok_old[s], now), scopes[s]})
    end
  end
  for s = 1, 2 do
    local limit = tonumber(ARGV[8 + s])
    redis.call('ZREMRANGEBYSCORE', KEYS[5 + s], '-inf', now)
    if limit >= 0 and redis.call('ZCARD', KEYS[5 + s]) >= limit then
      local first = redis.call('ZRANGE', KEYS[5 + s], 0, 0, 'WITHSCORES')
      local wait = 1000
      if first[2] then wait = math.max(1, tonumber(first[2]) - now) end
      return answer({0, 'concurrency', wait, scopes[s]})
    end
  end
  local periods = {'day', 'month', 'total', 'day', 'month', 'total'}
  for i = 8, 13 do
    local limit = tonumber(ARGV[i + 3])
    if limit >= 0 and tonumber(redis.call('GET', KEYS[i]) or '0') >= limit then
      local scope = scopes[1]
      if i > 10 then scope = scopes[2] end
      return answer({0, 'budget_' .. periods[i - 7], -1, scope})
    end
  end
end

-- Admitted: count the request, take the stream lease.
for s = 1, 2 do
  redis.call('HINCRBY', KEYS[1 + s], sec, 1)
  redis.call('EXPIRE', KEYS[1 + s], WINDOW + 5)
  if metered then
    redis.call('ZADD', KEYS[5 + s], now + tonumber(ARGV[4]), ARGV[2])
    keep_for(KEYS[5 + s], tonumber(ARGV[4]) + 60000)
  end
end

-- Rate-limit header values of the tighter scope (requests; tokens when metered).
local lim_req, rem_req, reset_req = -1, -1, 0
for s = 1, 2 do
  local rpm = tonumber(ARGV[4 + s])
  if rpm >= 0 then
    local rem = rpm - req_used[s] - 1
    if lim_req < 0 or rem < rem_req then
      lim_req, rem_req = rpm, rem
      reset_req = retry_ms(req_old[s] or sec, now)
    end
  end
end
local lim_tok, rem_tok, reset_tok = -1, -1, 0
for s = 1, 2 do
  local tpm = tonumber(ARGV[6 + s])
  if tpm >= 0 then
    local rem = tpm - tok_used[s]
    if lim_tok < 0 or rem < rem_tok then
      lim_tok, rem_tok = tpm, rem
      reset_tok = retry_ms(tok_old[s] or sec, now)
    end
  end
end
return answer({1, lim_req, rem_req, reset_req, lim_tok, rem_tok, reset_tok, sec})
