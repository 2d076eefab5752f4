-- Set a tenant's counters from Postgres in one atomic step (shared/counters.py,
-- docs/ARCHITECTURE.md#rebuilding-counters). Postgres gives each counter's settled total; this adds
-- what Redis counts and the ledger did not have when those totals were read: every open
-- reservation (its amount) and every unledgered settle (its tokens). A request the ledger already
-- had but whose accountant settle has not run yet (held off by the lock) is in both: its ledger
-- tokens are taken off again, so its settle, run after this, leaves the counter exact.
--
-- KEYS  1 reservation index   2 unledgered hash   3 counter lock   4.. counters (as the plan lists)
-- ARGV  1 '' (Redis TIME)   2 lock token   3 plan (JSON):
--   resv_prefix   reservation record key without the request id
--   day, month    the current period names
--   counters      [{k = KEYS index, scope = 't' | key id, period = 'day'|'month'|'total'|'tpm',
--                   value = settled total (budgets) or {second = tokens} (tpm), ttl = seconds (-1: none),
--                   index = the reservation's charged index (unscoped counters), or
--                   pattern = the Lua pattern of a model rule (its counters: a request counts in
--                   them when its qualified model matches), missing_only = bool}]
--   ledgered      {request id = tokens the ledger holds}, for open reservations and unledgered settles
-- Returns {1, counters written} or {0} when the lock was lost (nothing written; rebuild again).

local UNLEDGERED_KEEP_MS = 7 * 86400 * 1000
if redis.call('GET', KEYS[3]) ~= ARGV[2] then return {0} end
local plan = cjson.decode(ARGV[3])
local now = now_ms()
local sec = math.floor(now / 1000)

-- What Redis counts that the settled totals may not: open reservations, then unledgered settles.
local items = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local rk = plan.resv_prefix .. id
  local r = redis.call('HMGET', rk, 'amount', 'sec', 'charged', 'key', 'day', 'month', 'model', 'mc')
  local amount, at = tonumber(r[1]), tonumber(r[2])
  if amount and at and r[4] and r[5] and r[6] then
    local charged = {}
    for index in string.gmatch(r[3] or '', '%d+') do charged[tonumber(index)] = true end
    local mc = {}
    if r[8] then mc = cjson.decode(r[8]) end
    local mcharged = {}
    for _, key in ipairs(mc.w or {}) do mcharged[key] = true end
    for _, key in ipairs(mc.b or {}) do mcharged[key] = true end
    table.insert(items, {id = id, rk = rk, tokens = amount, sec = at, key = r[4], day = r[5],
      month = r[6], model = r[7] or '', charged = charged, mc = mc, mcharged = mcharged, added = false})
  end
end
local entries = redis.call('HGETALL', KEYS[2])
for i = 1, #entries, 2 do
  local f = {}
  for part in string.gmatch(entries[i + 1], '[^,]+') do table.insert(f, part) end
  local tokens, at, written = tonumber(f[2]), tonumber(f[3]), tonumber(f[6])
  if not (tokens and at and written) or written < now - UNLEDGERED_KEEP_MS then
    redis.call('HDEL', KEYS[2], entries[i])
  else
    table.insert(items, {id = entries[i], tokens = tokens, sec = at, key = f[1], day = f[4],
      month = f[5], model = f[7] or ''})
  end
end

local function covers(item, c)
  if c.scope ~= 't' and tostring(c.scope) ~= item.key then return false end
  if c.pattern and not string.find(item.model, c.pattern) then return false end
  if c.period == 'day' then return item.day == plan.day end
  if c.period == 'month' then return item.month == plan.month end
  if c.period == 'tpm' then return item.sec >= sec - WINDOW end
  return true
end

local written = 0
for _, c in ipairs(plan.counters) do
  local key = KEYS[c.k]
  if not (c.missing_only and redis.call('EXISTS', key) == 1) then
    local ledger_has = 0
    if c.period == 'tpm' then
      redis.call('DEL', key)
      for second, tokens in pairs(c.value) do
        if tonumber(second) >= sec - WINDOW then
          redis.call('HINCRBY', key, second, string.format('%d', tokens))
        end
      end
    end
    local value = 0
    if c.period ~= 'tpm' then value = c.value end
    for _, item in ipairs(items) do
      if covers(item, c) then
        if c.period == 'tpm' then
          redis.call('HINCRBY', key, string.format('%d', item.sec), string.format('%d', item.tokens))
        else
          value = value + item.tokens - (plan.ledgered[item.id] or 0)
        end
        if c.pattern then
          if item.mcharged and not item.mcharged[key] then
            item.mcharged[key] = true
            local list = 'b'
            if c.period == 'tpm' then list = 'w' end
            item.mc[list] = item.mc[list] or {}
            table.insert(item.mc[list], key)
            item.added = true
          end
        elseif item.charged and not item.charged[c.index] then
          item.charged[c.index] = true
          item.added = true
        end
      end
    end
    if c.period == 'tpm' then
      if redis.call('EXISTS', key) == 1 then redis.call('EXPIRE', key, WINDOW + 5) end
    else
      if value < 0 then value = 0 end
      if c.ttl >= 0 then
        redis.call('SET', key, string.format('%d', value), 'EX', c.ttl)
      else
        redis.call('SET', key, string.format('%d', value))
      end
    end
    written = written + 1
  end
end

-- A reservation now counted in a counter it had not charged must have that counter settled too.
for _, item in ipairs(items) do
  if item.added then
    local list = {}
    for index in pairs(item.charged) do table.insert(list, index) end
    table.sort(list)
    redis.call('HSET', item.rk, 'charged', table.concat(list, ','), 'mc', cjson.encode(item.mc))
  end
end
redis.call('DEL', KEYS[3])
return {1, written}
