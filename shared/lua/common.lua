-- Prepended to every limit script when it is loaded (shared/limits.py): one clock and one window.

local WINDOW = 60  -- seconds; buckets of one second, 61 kept (a slot frees 60-61 s after use)

-- Redis TIME in milliseconds (one clock for every replica); tests pin it with a non-empty ARGV[1].
local function now_ms()
  if ARGV[1] ~= '' then return tonumber(ARGV[1]) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Keep a key alive for at least `ms` more milliseconds; never shortens a longer expiry, never gives
-- one to a key without (a key that does not exist stays absent).
local function keep_for(key, ms)
  local left = redis.call('PTTL', key)
  if left >= 0 and left < ms then redis.call('PEXPIRE', key, ms) end
end

-- Sum a bucket window at second `sec`, dropping buckets older than the window; also the oldest
-- live bucket.
local function window(key, sec)
  local data = redis.call('HGETALL', key)
  local total, oldest = 0, nil
  for i = 1, #data, 2 do
    local b = tonumber(data[i])
    if b < sec - WINDOW then
      redis.call('HDEL', key, data[i])
    else
      total = total + tonumber(data[i + 1])
      if oldest == nil or b < oldest then oldest = b end
    end
  end
  return total, oldest
end

-- Milliseconds until the oldest bucket leaves the window (at least 1).
local function retry_ms(oldest, now)
  if oldest == nil then return 1000 end
  local ms = (oldest + WINDOW + 1) * 1000 - now
  if ms < 1 then ms = 1 end
  return ms
end

