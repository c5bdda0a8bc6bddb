-- stable_openai: shared key state.  Prepended to every script of this directory.
--
-- Every script gets ARGV[1] = the namespace prefix and ARGV[2] = the idle expiry (seconds) of
-- every key it touches; its own arguments start at ARGV[3].  Keys of the namespace P:
--   P:load        ZSET fingerprint -> level * 1e12 + sequence   (ready keys: fewest calls in
--                 flight for their weight first, then least recently used)
--   P:cooling     ZSET fingerprint -> deadline (server time, s)
--   P:leases      ZSET lease -> expiry; a lease is "fp|seq|sent|pool": one call in flight
--   P:seq         STRING, a counter for leases and the least-recently-used order
--   P:done:<lease> STRING, a report already applied (so one sent again counts once; 5 min)
--   P:k:<fp>      HASH of one key: where, until, reason (for people), cause (a CAUSE value,
--                 what the scripts compare), forbidden, in_flight, weight, pool, fixed (pool
--                 given by the user), own (1 while the key is in its own pool), rpm, tpm,
--                 and the counters calls, successes, rate_limits, failures
--   P:pool:<name> HASH of one pool: in_flight; sent (calls chosen, ever); what the server
--                 said, brought up to date: limit, left, reset, refilled, snap (the ``sent``
--                 mark of the freshest answer), wstart/wreset (``sent`` when the window
--                 began, and its end), tlimit, tleft, treset, trefilled, avg (tokens a
--                 request costs), probing (1 until an answer told the budget), was (the
--                 name it had before the server named it);
--                 rrate/rcap/rlevel/rstamp and
--                 trate/tcap/tlevel/tstamp (client-side pacing)
--   P:pool:<name>:keys  SET of the pool's fingerprints
--   P:pool:<name>:out   ZSET lease -> sent mark, the pool's calls in flight
--   P:ring:<id>   SET of the fingerprints one key configuration uses
-- No key, and nothing derived from one but its keyed fingerprint, is ever stored.
-- Time is the server's (TIME), so the clocks of the hosts do not matter.
-- Expiry: register.lua, which every process runs again every few minutes, refreshes the
-- expiry of everything its keys use; a script that may create a key anew (a sorted set that
-- emptied, a pool) gives it an expiry at once.  Whatever no process uses expires.

if redis.replicate_commands then pcall(redis.replicate_commands) end

local P = ARGV[1]
local TTL = tonumber(ARGV[2])
local LOAD, COOLING, LEASES, SEQ = P .. ':load', P .. ':cooling', P .. ':leases', P .. ':seq'
-- MAX_RESET, NEW_WINDOW, PROBE, PROBE_CALLS and CAUSE come from the Python side: redis.py
-- puts them before this file (_ring.py's constants, _cause.Cause's values).

local T = redis.call('TIME')
local NOW = tonumber(T[1]) + tonumber(T[2]) / 1e6

local function kkey(fp) return P .. ':k:' .. fp end
local function pkey(name) return P .. ':pool:' .. name end

local function num(value, default)
  if value == false or value == nil or value == '' then return default end
  return tonumber(value)
end

local function touch(key) redis.call('EXPIRE', key, TTL) end

local function starts_with(text, prefix) return string.sub(text, 1, #prefix) == prefix end

local function level_of(in_flight, weight)
  if weight == 1 then return in_flight end
  return math.floor(in_flight / weight)
end

-- A ready key's place in P:load: its level, then the order it got there in.
local function place(fp, in_flight, weight)
  local seq = redis.call('INCR', SEQ)
  redis.call('ZADD', LOAD, level_of(in_flight, weight) * 1e12 + seq % 1e12, fp)
  touch(LOAD)  -- it may have emptied: control.lua's promote() would leave it without an expiry
end

-- Add delta to the calls in flight of a key and of its pool (never below zero).
local function shift_in_flight(fp, delta)
  local k = kkey(fp)
  local f = redis.call('HMGET', k, 'in_flight', 'weight', 'where', 'pool')
  if not f[1] then return end
  local in_flight = tonumber(f[1]) + delta
  if in_flight < 0 then return end
  redis.call('HSET', k, 'in_flight', in_flight)
  if f[3] == 'ready' then place(fp, in_flight, num(f[2], 1)) end
  local pk = pkey(f[4])
  if num(redis.call('HGET', pk, 'in_flight'), 0) + delta >= 0 then
    redis.call('HINCRBY', pk, 'in_flight', delta)
  end
end

local function make_ready(fp)
  local k = kkey(fp)
  local f = redis.call('HMGET', k, 'in_flight', 'weight')
  redis.call('HSET', k, 'where', 'ready', 'until', 0, 'reason', '', 'cause', '', 'forbidden', 0)
  redis.call('ZREM', COOLING, fp)
  place(fp, num(f[1], 0), num(f[2], 1))
end

-- Cool a key until a deadline; an already later deadline is kept.  ``reason`` is for people;
-- ``cause`` (a value of CAUSE) is what the scripts compare.
local function cool(fp, deadline, reason, forbidden, cause)
  local k = kkey(fp)
  local f = redis.call('HMGET', k, 'where', 'until')
  if not f[1] or f[1] == 'disabled' then return end
  if f[1] == 'cooling' and tonumber(f[2]) >= deadline then return end
  redis.call('HSET', k, 'where', 'cooling', 'until', deadline, 'reason', reason,
             'cause', cause, 'forbidden', forbidden)
  redis.call('ZREM', LOAD, fp)
  redis.call('ZADD', COOLING, deadline, fp)
  touch(COOLING)
end

-- Cool every key of a pool: they share the budget that is spent.
local function cool_pool(pool, deadline, reason, cause)
  for _, fp in ipairs(redis.call('SMEMBERS', pkey(pool) .. ':keys')) do
    cool(fp, deadline, reason, 0, cause)
  end
end

-- Disable a key until it is given again; true if it was not disabled before.
local function disable(fp, reason, cause)
  local k = kkey(fp)
  local where = redis.call('HGET', k, 'where')
  if not where or where == 'disabled' then return false end
  redis.call('HSET', k, 'where', 'disabled', 'until', 0, 'reason', reason, 'cause', cause,
             'forbidden', 0)
  redis.call('ZREM', LOAD, fp)
  redis.call('ZREM', COOLING, fp)
  return true
end

-- Client-side pacing: a debt-allowing token bucket, as in stable_openai/_budget.py.
local function bucket_take(pk, prefix, amount, need)
  local f = redis.call('HMGET', pk, prefix .. 'rate', prefix .. 'cap', prefix .. 'level',
                       prefix .. 'stamp')
  local rate = num(f[1], nil)
  if not rate then return 0 end
  local cap, level, stamp = tonumber(f[2]), tonumber(f[3]), tonumber(f[4])
  if NOW > stamp then level = math.min(cap, level + (NOW - stamp) * rate); stamp = NOW end
  level = level - amount
  redis.call('HSET', pk, prefix .. 'level', level, prefix .. 'stamp', stamp)
  need = math.min(need, cap)
  if level >= need then return 0 end
  return (need - level) / rate
end

-- Make a pool's hash exist, with an expiry (scripts only update it after this), and start
-- pacing it for a key that has rpm/tpm, unless it is paced already.
local function pace(pool, rpm, tpm)
  local pk = pkey(pool)
  redis.call('HSETNX', pk, 'in_flight', 0)
  for prefix, per_minute in pairs({r = num(rpm, nil), t = num(tpm, nil)}) do
    if per_minute and redis.call('HEXISTS', pk, prefix .. 'rate') == 0 then
      local rate = per_minute / 60
      local cap = math.max(1, rate)
      redis.call('HSET', pk, prefix .. 'rate', rate, prefix .. 'cap', cap, prefix .. 'level', cap,
                 prefix .. 'stamp', NOW)
    end
  end
  touch(pk)
end

-- Move a key into another pool, with its calls in flight.
local function move(fp, name)
  local k = kkey(fp)
  local f = redis.call('HMGET', k, 'pool', 'in_flight', 'rpm', 'tpm')
  if not f[1] or f[1] == name then return end
  local in_flight = num(f[2], 0)
  local old, new = pkey(f[1]), pkey(name)
  redis.call('HSET', k, 'pool', name, 'own', 0)
  redis.call('SREM', old .. ':keys', fp)
  redis.call('SADD', new .. ':keys', fp)
  if redis.call('EXISTS', new) == 0 and redis.call('SCARD', old .. ':keys') == 0 then
    -- The key's own pool gets the server's name, keeping what it counted (as the ring's
    -- KeyRing.join_pool): the marks of the calls in flight still compare.
    for _, suffix in ipairs({'', ':out'}) do
      if redis.call('EXISTS', old .. suffix) == 1 then
        redis.call('RENAME', old .. suffix, new .. suffix)
      end
    end
    redis.call('HSET', new, 'was', f[1])  -- the leases of its calls still name it
  else
    if in_flight > 0 then
      if num(redis.call('HGET', old, 'in_flight'), 0) >= in_flight then
        redis.call('HINCRBY', old, 'in_flight', -in_flight)
      end
      redis.call('HINCRBY', new, 'in_flight', in_flight)
    end
    -- Its calls in flight join the pool's, as if chosen before any answer still to come.
    for _, lease in ipairs(redis.call('ZRANGE', old .. ':out', 0, -1)) do
      if starts_with(lease, fp .. '|') then
        redis.call('ZREM', old .. ':out', lease)
        redis.call('ZADD', new .. ':out', 0, lease)
      end
    end
    if redis.call('SCARD', old .. ':keys') == 0 then redis.call('DEL', old, old .. ':out') end
    touch(new .. ':out')
  end
  pace(name, f[3], f[4])
  touch(new .. ':keys')
end

-- A call is over (reported, or its lease expired): it is no longer in its pool's calls in
-- flight, wherever its key has moved since.
local function forget_call(fp, lease)
  local pool = string.match(lease, '^[^|]+|[^|]+|[^|]+|(.*)$')
  redis.call('ZREM', pkey(pool) .. ':out', lease)
  local now_in = redis.call('HGET', kkey(fp), 'pool')
  if now_in and now_in ~= pool then redis.call('ZREM', pkey(now_in) .. ':out', lease) end
  shift_in_flight(fp, -1)
end

-- Drop the leases of calls that never reported (a crashed or frozen worker).
local function purge_leases()
  local expired = redis.call('ZRANGEBYSCORE', LEASES, '-inf', NOW, 'LIMIT', 0, 256)
  for _, lease in ipairs(expired) do
    redis.call('ZREM', LEASES, lease)
    forget_call(string.match(lease, '^[^|]+'), lease)
  end
end

-- Past the server's reset, a pool's full budget is back, less the calls in flight (as the
-- ring's KeyRing._refresh).  ``fresh``: calls already counted in ``sent`` that belong to the
-- new window.
local function refresh(pool, fresh)
  local pk = pkey(pool)
  local f = redis.call('HMGET', pk, 'reset', 'refilled', 'limit', 'in_flight', 'sent',
                       'treset', 'trefilled', 'tlimit', 'avg')
  local reset, in_flight = num(f[1], 0), num(f[4], 0)
  if reset > 0 and NOW >= reset and num(f[2], 0) < reset then
    local sent = num(f[5], 0)
    redis.call('HSET', pk, 'refilled', reset, 'snap', sent, 'wstart', sent - fresh)
    redis.call('HDEL', pk, 'wreset')
    if f[3] then
      redis.call('HSET', pk, 'left', tonumber(f[3]) - in_flight)
    else
      redis.call('HDEL', pk, 'left')
    end
  end
  local treset = num(f[6], 0)
  if treset > 0 and NOW >= treset and num(f[7], 0) < treset then
    redis.call('HSET', pk, 'trefilled', treset)
    if f[8] then
      redis.call('HSET', pk, 'tleft', tonumber(f[8]) - in_flight * num(f[9], 0))
    else
      redis.call('HDEL', pk, 'tleft')
    end
  end
end

-- At most what is left of a window that began at a refill: its limit, less every call chosen
-- since (answers may come out of order; this count never does).
local function window_bound(pk, left)
  local f = redis.call('HMGET', pk, 'wstart', 'limit', 'sent')
  if not f[1] or not f[2] then return left end
  return math.min(left, tonumber(f[2]) - (num(f[3], 0) - tonumber(f[1])))
end

-- An answer shows budget left: members held only for a spent request budget are ready.
local function uncool_budget(pool)
  for _, fp in ipairs(redis.call('SMEMBERS', pkey(pool) .. ':keys')) do
    local f = redis.call('HMGET', kkey(fp), 'where', 'cause')
    if f[1] == 'cooling' and f[2] == CAUSE.requests_spent then make_ready(fp) end
  end
end

-- Make keys whose cooldown is over ready; a pool whose window has reset has its budget back.
local function promote()
  local due = redis.call('ZRANGEBYSCORE', COOLING, '-inf', NOW, 'LIMIT', 0, 256)
  for _, fp in ipairs(due) do
    local f = redis.call('HMGET', kkey(fp), 'where', 'reason', 'pool')
    if f[1] == 'cooling' then
      refresh(f[3], 0)
      make_ready(fp)
    else
      redis.call('ZREM', COOLING, fp)
    end
  end
end

