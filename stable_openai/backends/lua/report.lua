-- A call is over: release its lease, count its outcome, and apply what it taught.
-- ARGV[3] fingerprint, ARGV[4] lease ('' for a call chosen while Redis was unreachable),
-- ARGV[5] outcome: succeeded | failed | rate_limited | abandoned | given_back,
-- ARGV[6] fate: keep | cool | cool_pool | disable, ARGV[7] seconds, ARGV[8] reason,
-- ARGV[9] forbidden (0/1), ARGV[10] pool the server named ('' if none), ARGV[11] 'own' to
-- join it only from the key's own pool, ARGV[12..17] the x-ratelimit budget ('' when not
-- sent): requests limit, left and reset (s), tokens limit, left and reset (s), ARGV[18] the
-- tokens the call's requests cost (for tpm pacing), ARGV[19] the cause of the fate (a CAUSE
-- value; the reason in ARGV[8] is only for people).
-- Returns {1} if this report disabled the key, {0} otherwise, {-1} if the key is unknown
-- here (the server restarted): register, then report again.

local fp, lease, outcome, fate, cause = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[19]
local k = kkey(fp)
if redis.call('EXISTS', k) == 0 then return {-1} end

-- A report is applied once: one sent again (its first reply was lost to a timeout or a
-- closing event loop, though Redis ran it) must not count the call twice.
if lease ~= '' and not redis.call('SET', P .. ':done:' .. lease, 1, 'NX', 'EX', 300) then
  return {0}
end

-- The pool the server named: a key given no pool by the user moves into it.
local join = ARGV[10]
if join ~= '' then
  local f = redis.call('HMGET', k, 'fixed', 'own')
  if f[1] ~= '1' and (ARGV[11] ~= 'own' or f[2] == '1') then move(fp, join) end
end

local pool = redis.call('HGET', k, 'pool')
local pk = pkey(pool)

-- What the server said is left (as the ring's KeyRing.learn).  Its remainders count the
-- requests admitted up to this one: not those chosen after it, nor — as requests overtake
-- each other on the way — those chosen before it and still unanswered.  Only the freshest
-- answer counts, unless it shows a new window; one from a window already refilled is stale.
local rlimit, rleft, rreset = num(ARGV[12], nil), num(ARGV[13], nil), num(ARGV[14], nil)
local tlimit, tleft, treset = num(ARGV[15], nil), num(ARGV[16], nil), num(ARGV[17], nil)
if rlimit then redis.call('HSET', pk, 'limit', rlimit) end
if outcome == 'succeeded' and redis.call('HGET', pk, 'probing') == '1' then
  -- The budget is told now (below), or the server does not tell it: either way, no more probing.
  redis.call('HSET', pk, 'probing', 0)
  if not (rleft and rreset) then
    redis.call('HDEL', pk, 'left')
    uncool_budget(pool)
  end
end
if tlimit then redis.call('HSET', pk, 'tlimit', tlimit) end
if (rleft and rreset) or (tleft and treset) then
  local f = redis.call('HMGET', pk, 'sent', 'in_flight', 'avg', 'snap', 'reset', 'refilled',
                       'treset', 'trefilled', 'was')
  local sent = num(f[1], 0)
  local mark, unseen = sent, math.max(0, num(f[2], 1) - 1)
  local sent_then, pool_then = string.match(lease, '^[^|]+|[^|]+|([^|]+)|(.*)$')
  if pool_then == pool or pool_then == f[9] then
    mark = tonumber(sent_then)
    unseen = sent - mark + redis.call('ZCOUNT', pk .. ':out', '-inf', '(' .. mark)
  end
  local snap = num(f[4], -1)
  if rleft and rreset then
    local reset = NOW + math.min(rreset, MAX_RESET)
    if reset <= num(f[6], 0) + NEW_WINDOW then
      -- an answer from a window already over and refilled: stale
    elseif mark >= snap or reset > num(f[5], 0) + NEW_WINDOW then
      -- Within the window begun at the last refill, no more than its limit less the calls
      -- chosen since; an answer of a later window ends that bound.
      local w = redis.call('HMGET', pk, 'wstart', 'wreset')
      if w[1] and not w[2] then
        redis.call('HSET', pk, 'wreset', reset)
      elseif w[1] and reset > tonumber(w[2]) + NEW_WINDOW then
        redis.call('HDEL', pk, 'wstart', 'wreset')
      end
      local left = window_bound(pk, rleft - unseen)
      redis.call('HSET', pk, 'left', left, 'reset', reset, 'snap', mark)
      if left <= 0 then
        cool_pool(pool, reset, 'budget spent (RPM)', CAUSE.requests_spent)
      else
        uncool_budget(pool)
      end
    end
  end
  if tleft and treset then
    local reset = NOW + math.min(treset, MAX_RESET)
    if reset <= num(f[8], 0) + NEW_WINDOW then
      -- stale, as above
    elseif mark >= snap or reset > num(f[7], 0) + NEW_WINDOW then
      local avg = num(f[3], 0)
      local left = tleft - unseen * avg
      redis.call('HSET', pk, 'tleft', left, 'treset', reset)
      if left < math.max(1, avg) then
        cool_pool(pool, reset, 'budget spent (TPM)', CAUSE.tokens_spent)
      end
    end
  end
end

-- Release the lease (an expired one was released when it expired).
if lease ~= '' and redis.call('ZREM', LEASES, lease) == 1 then forget_call(fp, lease) end

if outcome == 'succeeded' then
  redis.call('HINCRBY', k, 'successes', 1)
elseif outcome == 'failed' then
  redis.call('HINCRBY', k, 'failures', 1)
elseif outcome == 'rate_limited' then
  redis.call('HINCRBY', k, 'rate_limits', 1)
elseif outcome == 'given_back' then
  redis.call('HINCRBY', k, 'calls', -1)
end

-- Tokens the call's requests cost: the pool's average request, and its tpm pacing.
local tokens = num(ARGV[18], 0)
if tokens ~= 0 then
  local avg = num(redis.call('HGET', pk, 'avg'), 0)
  if tokens > 0 then
    avg = avg == 0 and tokens or 0.8 * avg + 0.2 * tokens
    redis.call('HSET', pk, 'avg', avg)
  end
  local wait = bucket_take(pk, 't', tokens, avg)
  if wait > 0 then cool_pool(pool, NOW + wait, 'paced (tpm)', CAUSE.paced) end
end

local disabled = 0
local seconds = math.max(0, num(ARGV[7], 0))
if fate == 'cool' then
  cool(fp, NOW + seconds, ARGV[8], tonumber(ARGV[9]), cause)
elseif fate == 'cool_pool' then
  cool_pool(pool, NOW + seconds, ARGV[8], cause)
elseif fate == 'disable' then
  if disable(fp, ARGV[8], cause) then disabled = 1 end
end
touch(LOAD)
return {disabled}
