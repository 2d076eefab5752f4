-- Replace a reservation with the actual tokens (the accountant), exactly once per request id.
--
-- KEYS  1 reservation record   2 settled marker   3 reservation index
--       4 tpm key   5 tpm tenant   6..11 budgets (key day/month/total, tenant day/month/total)
--       12 leases key   13 leases tenant
-- ARGV  1 actual tokens ('' = charge the reservation as it stands)   2 request id   3 marker ttl ms
-- Returns 1 when applied now, 0 when this request id was already settled.
-- KEYS 4..11 must be the same keys the reservation charged (same periods).

if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end

local record = redis.call('HMGET', KEYS[1], 'amount', 'sec', 'charged')
if record[1] then
  local amount = tonumber(record[1])
  local actual = amount
  if ARGV[1] ~= '' then actual = tonumber(ARGV[1]) end
  local delta = actual - amount
  if delta ~= 0 then
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
  redis.call('DEL', KEYS[1])
elseif ARGV[1] ~= '' then
  -- No reservation (lost with a Redis restart): count the tokens in the live budget counters.
  local actual = tonumber(ARGV[1])
  for k = 6, 11 do
    if actual > 0 and redis.call('EXISTS', KEYS[k]) == 1 then redis.call('INCRBY', KEYS[k], actual) end
  end
end
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[12], ARGV[2])
redis.call('ZREM', KEYS[13], ARGV[2])
redis.call('SET', KEYS[2], '1', 'PX', tonumber(ARGV[3]))
return 1
