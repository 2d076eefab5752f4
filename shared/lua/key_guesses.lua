-- Per-prefix guard on Argon2 mismatches (authz_sidecar/prefix_limiter.py). Both keys carry the
-- prefix's hash tag, so one call touches one Redis Cluster slot.
-- KEYS[1]: mismatches counted against the prefix in its current window (expires with the window)
-- KEYS[2]: digest of the token last verified for the prefix (expires after ARGV[2] ms)
-- ARGV[1]: "check" | "mismatch" | "verified"
-- ARGV[2]: window in ms ("mismatch"), digest lifetime in ms ("verified")
-- ARGV[3]: the digest ("verified")
-- Returns {mismatches, ms left in the window (-2: none), digest (check only; absent when none)}.

local op = ARGV[1]
if op == 'mismatch' then
  local n = redis.call('INCR', KEYS[1])
  if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
  return {n, redis.call('PTTL', KEYS[1])}
end
if op == 'verified' then
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
  return {0, -2}
end
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
return {n, redis.call('PTTL', KEYS[1]), redis.call('GET', KEYS[2])}
