-- Replace a reservation with the actual tokens, exactly once per request id. Two callers:
-- stream_proxy beside the usage event (before the ledger has it: ARGV 4 = '0') and the accountant
-- after its Postgres commit (ARGV 4 = '1'). What stream_proxy settles is remembered in the
-- unledgered hash until the accountant's settle says the ledger has it too, so a rebuild of the
-- counters from Postgres can count it (shared/lua/rebuild.lua).
--
-- KEYS  1 reservation record   2 settled marker   3 reservation index
--       4 tpm key   5 tpm tenant   6..11 budgets (key day/month/total, tenant day/month/total)
--       12 leases key   13 leases tenant   14 unledgered (HASH request id -> entry)   15 counter lock
-- ARGV  1 actual tokens ('' = charge the reservation as it stands)   2 request id   3 marker ttl ms
--       4 '1' the ledger has this request, '0' not yet   5 key id   6 day period   7 month period
--       8 the qualified model ('' = none)
-- The model counters and leases are the ones the reservation record lists (`mc`, reserve.lua).
-- Returns 1 when applied now, 0 when this request id was already settled, -1 (ledgered settles
-- only) while the tenant's counters are being rebuilt: nothing changed, call again shortly.
-- KEYS 4..11 must be the same keys the reservation charged (same periods).
-- An unledgered entry is "key id,tokens,second,day,month,written ms,qualified model".

local UNLEDGERED_KEEP_MS = 7 * 86400 * 1000
local ledgered = ARGV[4] == '1'

if ledgered then
  if redis.call('EXISTS', KEYS[15]) == 1 then return -1 end
  -- stream_proxy counted it already; from now on Postgres counts it as well
  if redis.call('HDEL', KEYS[14], ARGV[2]) == 1 then return 0 end
end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end

local counted, key_id, sec, day, month, model = 0, ARGV[5], nil, ARGV[6], ARGV[7], ARGV[8] or ''
local record = redis.call('HMGET', KEYS[1], 'amount', 'sec', 'charged', 'key', 'day', 'month', 'model', 'mc')
local mc = {}
if record[8] then mc = cjson.decode(record[8]) end
if record[1] then
  local amount = tonumber(record[1])
  local actual = amount
  if ARGV[1] ~= '' then actual = tonumber(ARGV[1]) end
  local delta = actual - amount
  if delta ~= 0 then
    for _, key in ipairs(mc.w or {}) do
      if redis.call('HEXISTS', key, record[2]) == 1 then redis.call('HINCRBY', key, record[2], delta) end
    end
    for _, key in ipairs(mc.b or {}) do
      if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, delta) end
    end
    for index in string.gmatch(record[3], '%d+') do
      local k = tonumber(index) + 2  -- reservation indices 2..9 map to settle indices 4..11
      if k <= 5 then
        if redis.call('HEXISTS', KEYS[k], record[2]) == 1 then
          redis.call('HINCRBY', KEYS[k], record[2], delta)
        end
      elseif redis.call('EXISTS', KEYS[k]) == 1 then
        redis.call('INCRBY', KEYS[k], delta)
      end
    end
  end
  counted, sec = actual, record[2]
  if record[4] then key_id, day, month = record[4], record[5], record[6] end
  if record[7] then model = record[7] end
  redis.call('DEL', KEYS[1])
elseif ARGV[1] ~= '' then
  -- No reservation (lost with a Redis restart): count the tokens in the live budget counters.
  local actual = tonumber(ARGV[1])
  for k = 6, 11 do
    if actual > 0 and redis.call('EXISTS', KEYS[k]) == 1 then redis.call('INCRBY', KEYS[k], actual) end
  end
  counted = actual
end
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[12], ARGV[2])
redis.call('ZREM', KEYS[13], ARGV[2])
for _, key in ipairs(mc.l or {}) do redis.call('ZREM', key, ARGV[2]) end
redis.call('SET', KEYS[2], '1', 'PX', tonumber(ARGV[3]))
if not ledgered and counted > 0 then
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if sec == nil then sec = tostring(math.floor(ms / 1000)) end
  redis.call('HSET', KEYS[14], ARGV[2],
    table.concat({key_id, string.format('%d', counted), sec, day, month, string.format('%d', ms), model}, ','))
  redis.call('PEXPIRE', KEYS[14], UNLEDGERED_KEEP_MS)
end
return 1
