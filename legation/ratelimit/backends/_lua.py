"""The Redis side of :mod:`legation.ratelimit.algorithms`: one script, one key per call.

ARGV: algorithm (``f``, ``s`` or ``t``), now_ms, window_ms, requests_per_unit, cost, ttl_ms, and for
the sliding window the current, previous and expired window fields. Every number stays an integer
below 2^53 and is written back with ``%.0f`` (Lua's default formatting would switch to exponents).
Returns ``{a, b, c}``: fixed ``{count_after}``; sliding ``{allowed, prev, cur_after}``; token
bucket ``{allowed, units_after}``.
"""

SCRIPT = """
local algo = ARGV[1]
local now = tonumber(ARGV[2])
local w = tonumber(ARGV[3])
local rpu = tonumber(ARGV[4])
local cost = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
local k = KEYS[1]
if algo == 'f' then
  local n = redis.call('INCRBY', k, cost)
  if n == cost then
    redis.call('PEXPIRE', k, ttl)
  end
  return {n}
elseif algo == 's' then
  local prev = tonumber(redis.call('HGET', k, ARGV[8]) or '0')
  local cur = tonumber(redis.call('HGET', k, ARGV[7]) or '0')
  local elapsed = now % w
  if prev * (w - elapsed) + (cur + cost) * w <= rpu * w then
    cur = redis.call('HINCRBY', k, ARGV[7], cost)
    redis.call('HDEL', k, ARGV[9])
    redis.call('PEXPIRE', k, ttl)
    return {1, prev, cur}
  end
  return {0, prev, cur}
else
  local cap = rpu * w
  local state = redis.call('HMGET', k, 'u', 'ts')
  local units = tonumber(state[1])
  local ts = tonumber(state[2])
  if units == nil or ts == nil then
    units = cap
    ts = now
  elseif now > ts then
    units = math.min(cap, units + (now - ts) * rpu)
    ts = now
  end
  local allowed = 0
  if units >= cost * w then
    units = units - cost * w
    allowed = 1
  end
  if rpu > 0 then
    redis.call('HSET', k, 'u', string.format('%.0f', units), 'ts', string.format('%.0f', ts))
    redis.call('PEXPIRE', k, math.ceil((cap - units) / rpu) + 1000)
  end
  return {allowed, units}
end
"""
