-- Choose a key and mark it in flight, in one step.
-- ARGV[3] ring id, ARGV[4] lease seconds, ARGV[5..] fingerprints to avoid (taken only when
-- no other key is ready).
-- Returns {1, fingerprint, lease}; or {0, seconds until the first cooling key is ready (-1
-- when none is cooling), cjson {cooling = {reason = n}, disabled = {reason = n},
-- forbidden = all usable keys benched for a 403}}; or {-1} when the ring is unknown here
-- (never registered, expired, or the server restarted): register it, then ask again.

local ring = P .. ':ring:' .. ARGV[3]
local lease_seconds = tonumber(ARGV[4])
if redis.call('EXISTS', ring) == 0 then return {-1} end
purge_leases()
promote()

local avoid = {}
for i = 5, #ARGV do avoid[ARGV[i]] = true end

local chosen, fallback
local offset = 0
while not chosen do
  local batch = redis.call('ZRANGE', LOAD, offset, offset + 31)
  if #batch == 0 then break end
  for _, fp in ipairs(batch) do
    if redis.call('SISMEMBER', ring, fp) == 1 then
      if not avoid[fp] then chosen = fp; break end
      fallback = fallback or fp
    end
  end
  offset = offset + 32
end
chosen = chosen or fallback

if chosen then
  local k = kkey(chosen)
  if redis.call('EXISTS', k) == 0 then return {-1} end
  redis.call('HINCRBY', k, 'calls', 1)
  shift_in_flight(chosen, 1)
  local pool = redis.call('HGET', k, 'pool')
  local pk = pkey(pool)
  local sent = redis.call('HINCRBY', pk, 'sent', 1)
  local lease = chosen .. '|' .. redis.call('INCR', SEQ) .. '|' .. sent .. '|' .. pool
  redis.call('ZADD', LEASES, NOW + lease_seconds, lease)

  -- Spend one request of the pool's budget: what the server said is left, and its pacing.
  redis.call('ZADD', pk .. ':out', sent, lease)
  refresh(pool, 1)
  local f = redis.call('HMGET', pk, 'left', 'reset', 'tleft', 'treset', 'avg')
  local left, reset = num(f[1], nil), num(f[2], 0)
  if left then
    left = window_bound(pk, left - 1)
    redis.call('HSET', pk, 'left', left)
    if left <= 0 then  -- until the server's reset, or until an answer says when that is
      cool_pool(pool, reset > NOW and reset or NOW + PROBE, 'budget spent (RPM)',
                CAUSE.requests_spent)
    end
  end
  local tleft, treset, avg = num(f[3], nil), num(f[4], 0), num(f[5], 0)
  if tleft then
    tleft = tleft - avg  -- the request's size is known only when it is reported
    redis.call('HSET', pk, 'tleft', tleft)
    if tleft < math.max(1, avg) then
      cool_pool(pool, treset > NOW and treset or NOW + PROBE, 'budget spent (TPM)',
                CAUSE.tokens_spent)
    end
  end
  local wait = bucket_take(pk, 'r', 1, 1)
  if wait > 0 then cool_pool(pool, NOW + wait, 'paced (rpm)', CAUSE.paced) end
  touch(LOAD); touch(LEASES); touch(pk .. ':out')
  return {1, chosen, lease}
end

-- No key is ready: when will one be, and why not now.
local first, usable, forbidden = nil, 0, 0
local cooling, disabled = {}, {}
for _, fp in ipairs(redis.call('SMEMBERS', ring)) do
  local f = redis.call('HMGET', kkey(fp), 'where', 'until', 'reason', 'forbidden')
  if not f[1] then return {-1} end
  if f[1] == 'ready' then  -- ready but not in P:load: put it back, and ask again
    make_ready(fp)
    return {0, '0', cjson.encode({cooling = {}, disabled = {}, forbidden = false})}
  end
  local reason = f[3] ~= '' and f[3] or f[1]
  if f[1] == 'cooling' then
    local deadline = tonumber(f[2])
    if not first or deadline < first then first = deadline end
    cooling[reason] = (cooling[reason] or 0) + 1
    usable = usable + 1
    if f[4] == '1' then forbidden = forbidden + 1 end
  else
    disabled[reason] = (disabled[reason] or 0) + 1
  end
end
local wait = first and tostring(math.max(0, first - NOW)) or '-1'
return {0, wait, cjson.encode({
  cooling = cooling, disabled = disabled, forbidden = usable > 0 and forbidden == usable})}
