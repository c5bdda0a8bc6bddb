-- Make the keys of one configuration known, and refresh the expiry of everything they use
-- (every process runs this again every few minutes).  Idempotent: a key
-- already known keeps its state (a key disabled by another worker stays disabled).
-- ARGV[3] ring id, then 9 values per key: fingerprint, weight, pool ('' for the key's own
-- or learned pool), rpm, tpm ('' when not paced), and this process's own knowledge to merge
-- (after Redis was unreachable): disabled reason, seconds of cooldown left, its reason
-- ('' when none), and the cause of either (a CAUSE value).
-- Returns the number of keys that were new here.

local ring = P .. ':ring:' .. ARGV[3]
local new = 0
for i = 4, #ARGV, 9 do
  local fp, weight, pool, rpm, tpm = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local k = kkey(fp)
  if redis.call('EXISTS', k) == 0 then
    local name = pool ~= '' and pool or ('key:' .. fp)
    redis.call('HSET', k, 'where', 'ready', 'until', 0, 'reason', '', 'cause', '',
               'forbidden', 0, 'in_flight', 0, 'weight', weight, 'pool', name,
               'fixed', pool ~= '' and 1 or 0, 'own', pool ~= '' and 0 or 1,
               'rpm', rpm, 'tpm', tpm, 'calls', 0, 'successes', 0, 'rate_limits', 0,
               'failures', 0)
    redis.call('SADD', pkey(name) .. ':keys', fp)
    place(fp, 0, tonumber(weight))
    new = new + 1
    -- Until an answer tells the pool's budget, it sends only a few calls per key, not a
    -- burst from every worker (as the ring's KeyRing.probe).
    local pk = pkey(name)
    local p = redis.call('HMGET', pk, 'probing', 'snap', 'left')
    if p[1] ~= '0' and not p[2] and (p[1] == '1' or not p[3]) then
      redis.call('HSET', pk, 'probing', 1, 'left', num(p[3], 0) + PROBE_CALLS)
    end
  else
    redis.call('HSET', k, 'weight', weight, 'rpm', rpm, 'tpm', tpm)
    if redis.call('HEXISTS', k, 'own') == 0 then  -- registered by a version without it
      redis.call('HSET', k, 'own', redis.call('HGET', k, 'pool') == 'key:' .. fp and 1 or 0)
    end
    if pool ~= '' then
      move(fp, pool)
      redis.call('HSET', k, 'fixed', 1)
    end
    -- Heal an index that lost the key (it can only be missing, never wrong, after a crash).
    local f = redis.call('HMGET', k, 'where', 'until', 'in_flight')
    if f[1] == 'ready' and not redis.call('ZSCORE', LOAD, fp) then
      place(fp, num(f[3], 0), tonumber(weight))
    elseif f[1] == 'cooling' then
      redis.call('ZADD', COOLING, tonumber(f[2]), fp)
    end
  end
  local name = redis.call('HGET', k, 'pool')
  pace(name, rpm, tpm)
  if ARGV[i + 5] ~= '' then disable(fp, ARGV[i + 5], ARGV[i + 8]) end
  if ARGV[i + 6] ~= '' then cool(fp, NOW + tonumber(ARGV[i + 6]), ARGV[i + 7], 0, ARGV[i + 8]) end
  redis.call('SADD', ring, fp)
  for _, key in ipairs({k, pkey(name), pkey(name) .. ':keys', pkey(name) .. ':out'}) do
    touch(key)
  end
end
for _, key in ipairs({ring, LOAD, COOLING, LEASES, SEQ}) do touch(key) end
return new
