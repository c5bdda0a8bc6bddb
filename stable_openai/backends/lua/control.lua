-- What KeyManager's own methods do to shared keys, and what stats() reads.
-- ARGV[3] the operation, then its arguments:
--   cooldown fp seconds reason  cool exactly this long (0: ready now); not a disabled key
--   enable fp...                 make disabled keys ready again
--   snapshot fp...               the state and counters of each key, as cjson
-- Returns 1 for cooldown/enable, or {now, json} for snapshot.

local op = ARGV[3]
purge_leases()
promote()
if op == 'cooldown' then
  local fp, seconds, reason = ARGV[4], tonumber(ARGV[5]), ARGV[6]
  local k = kkey(fp)
  local where = redis.call('HGET', k, 'where')
  if not where or where == 'disabled' then return 0 end
  if seconds <= 0 then
    if where == 'cooling' then make_ready(fp) end
  else
    redis.call('HSET', k, 'where', 'cooling', 'until', NOW + seconds, 'reason', reason,
               'cause', CAUSE.set_by_user, 'forbidden', 0)
    redis.call('ZREM', LOAD, fp)
    redis.call('ZADD', COOLING, NOW + seconds, fp)
    touch(COOLING)
  end
  touch(LOAD)
  return 1
elseif op == 'enable' then
  for i = 4, #ARGV do
    if redis.call('HGET', kkey(ARGV[i]), 'where') == 'disabled' then make_ready(ARGV[i]) end
  end
  touch(LOAD)
  return 1
elseif op == 'snapshot' then
  local rows = {}
  for i = 4, #ARGV do
    local f = redis.call('HMGET', kkey(ARGV[i]), 'where', 'until', 'reason', 'in_flight',
                         'calls', 'successes', 'rate_limits', 'failures', 'pool', 'own')
    if f[1] then
      rows[ARGV[i]] = {where = f[1], left = f[1] == 'cooling' and math.max(0, f[2] - NOW) or 0,
                       reason = f[3], in_flight = tonumber(f[4]), calls = tonumber(f[5]),
                       successes = tonumber(f[6]), rate_limits = tonumber(f[7]),
                       failures = tonumber(f[8]), pool = f[9], own = f[10] == '1'}
    end
  end
  return cjson.encode(rows)
end
return redis.error_reply('unknown operation ' .. op)
