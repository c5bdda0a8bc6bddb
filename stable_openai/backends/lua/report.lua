-- A call is over: release its lease, count its outcome, and apply what it taught.
-- ARGV[3] fingerprint, ARGV[4] lease ('' for a call chosen while Redis was unreachable),
-- ARGV[5] outcome: succeeded | failed | rate_limited | abandoned | given_back,
-- ARGV[6] fate: keep | cool | cool_pool | disable, ARGV[7] seconds (for disable: until the
-- key is checked again, '' for never), ARGV[8] reason,
-- ARGV[9] forbidden (0/1), ARGV[10] pool the server named ('' if none), ARGV[11] 'own' to
-- join it only from the key's own pool, ARGV[12..17] the x-ratelimit budget ('' when not
-- sent): requests limit, left and reset (s), tokens limit, left and reset (s), ARGV[18] the
-- tokens the call's requests cost (for tpm pacing), ARGV[19] the cause of the fate (a CAUSE
-- value; the reason in ARGV[8] is only for people), ARGV[20] the pool the call was chosen
-- in and ARGV[21] its ``sent`` mark ('' without a lease), ARGV[22] '1' when its request
-- left and got no answer, ARGV[23] '1' when a successful answer's headers were read (even
-- if none was about the budget), ARGV[24] '1' when a 429 of a per-minute limit teaches the
-- pool's pace, ARGV[25] the rate its numbers give ('' if none), ARGV[26] '0' when the 429
-- named no delay (ARGV[7] is then the longest the pool backs off for), ARGV[27] the model
-- whose limit it names, or that a successful call asked for ('' if not known), ARGV[28] the
-- model the call asked for ('' if not known), ARGV[29] '1' when the 429's limit is a per-day
-- one, ARGV[30] the requests a window admits when the 429 names its size and end but no
-- rate, or its headers' request limit ('' if neither), ARGV[31] how many seconds ago the
-- call's last request left ('' when no pooled client's hook saw it leave), ARGV[32] the
-- seconds until the 429's headers say that limit is back in full ('' if they do not), ARGV[33]
-- '1' when its numbers are a sliding window's.
-- Returns {1} if this report disabled the key, {0} otherwise, {-1} if the key is unknown
-- here (the server restarted): register, then report again.

local fp, lease, outcome, fate, cause = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[19]
local pool_then, mark_then = ARGV[20], tonumber(ARGV[21])
forget_lost()
local fields = {'k:' .. fp, 'seq'}
if pool_then ~= '' then fields[3] = 'p:' .. pool_then end
need(fields)
local rec = key_rec(fp)
if not rec then
  flush()
  return {-1}
end


-- A report is applied once: one whose lease is neither in flight nor among the leases that
-- expired unreported was applied already (sent again after its reply was lost).
local in_flight = false
local left_at = tonumber(ARGV[31])  -- when the call's last request left, if known
if left_at then left_at = NOW - left_at end
if lease ~= '' then
  -- A lease that expired unreported is released first (as gone): a report sent again after
  -- this one then finds it neither in flight nor gone, and counts once.
  purge(pool_then)
  if rec.pool ~= pool_then then purge(rec.pool) end
  in_flight = find_call(fp, lease, pool_then) ~= nil
  local gone = false
  for _, name in ipairs({pool_then, rec.pool}) do
    local p = pool_rec(name)
    if p and p.gone[lease] then gone = true; p.gone[lease] = nil; put('p:' .. name, p) end
  end
  if not (in_flight or gone) then
    flush()
    return {0}
  end
  -- A call that sent further requests stands at the last one's place (control.lua's spend),
  -- in the pool its key is in then: its answer is placed there.  (A call whose key moved
  -- to another pool since holds mark 0 there: its place is unknown, as before.)
  local name, p = find_call(fp, lease, pool_then)
  local call = name and p.out[lease]
  if mark_then and call and call.m > 0 then pool_then, mark_then = name, call.m end
end

-- The pool the server named: a key given no pool by the user moves into it.
local join = ARGV[10]
if join ~= '' and not rec.fixed and (ARGV[11] ~= 'own' or rec.own) then move(fp, rec, join) end

local pool = rec.pool
local p = pool_rec(pool)
if not p then p = pace(pool, rec.rpm, rec.tpm) end
put('p:' .. pool, p)
purge(pool)

-- What the server said is left (as _model.Budget.learn).  Its remainders count the
-- requests admitted up to this one: not those chosen after it, nor — as requests overtake
-- each other on the way — those chosen before it and still unanswered.  Only the freshest
-- answer counts, unless it shows a new window; one from a window already refilled is stale.
local rlimit, rleft, rreset = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local tlimit, tleft, treset = tonumber(ARGV[15]), tonumber(ARGV[16]), tonumber(ARGV[17])
local told = ARGV[23] == '1'
if (mark_then and pool_then ~= pool and pool_then ~= p.was) or p.pmodel == MIXED then
  -- chosen in another pool before its key joined this one: its place here is unknown; or a
  -- pool serving several models, whose headers are each of one model's limit: not its own
  rlimit, rleft, rreset, tlimit, tleft, treset, told = nil, nil, nil, nil, nil, nil, false
end
if rlimit then
  if rlimit ~= p.limit then bucket_forget(p) end
  p.limit = rlimit
end
if told and p.probing == 1 and not (rleft and rreset) then
  -- The server does not tell the request budget: nothing to wait for, no more probing.
  p.probing, p.left = 0, nil
  uncool_budget(pool)
end
if tlimit then p.tlimit = tlimit end
if (rleft and rreset) or (tleft and treset) then
  local mark, unseen = p.sent, math.max(0, p.n - 1)
  local earlier = unseen  -- (those that left before it, unanswered: all, its place unknown)
  -- those chosen before ``m`` still unanswered (one that left long ago is counted by now, or
  -- never)
  local function before(m)
    local n = 0
    for _, call in pairs(p.out) do
      if call.m < m and (call.t or 0) > NOW - UNANSWERED then n = n + 1 end
    end
    return n
  end
  if mark_then and (pool_then == pool or pool_then == p.was) then
    mark = mark_then
    earlier = before(mark)
    unseen = p.sent - mark + earlier
  end
  local snap = p.snap or -1
  if rleft and rreset then
    local reset = NOW + math.min(rreset, MAX_RESET)
    if not left_at or left_at <= NOW - UNANSWERED then left_at = NOW end
    local order, known = left_at + math.min(rreset, MAX_RESET), p.order or 0
    bucket_told(p, rleft, rreset)
    local stale = reset <= (p.refilled or 0) + NEW_WINDOW
    if not stale and rreset <= MAX_PERIOD then request_ends(p, reset, order) end
    if stale then
      -- an answer from a window already over and refilled
    elseif order >= known - ORDER_SLACK and (mark >= snap or order > known + ORDER_SLACK) then
      -- Counted after the freshest answer known (resets compared as stamped from when their
      -- requests left: _model.Budget.learn).  Within the window begun at the last refill, no
      -- more than its limit less the calls chosen since; an answer of a later window ends
      -- that bound.
      if p.wstart and not p.wreset then
        p.wreset = reset
      elseif p.wstart and reset > p.wreset + NEW_WINDOW then
        p.wstart, p.wreset = nil, nil
      end
      -- Those it counts come back when they stop counting; an answer before it, of the same
      -- window (resets stamped from when the requests left), whose request left less than
      -- OVERTAKE before this one's may have been counted after it: no more left than it
      -- shows now, with its own request back at its reset (_model.Budget.learn).
      local back = requests_counted(p, left_at, reset, rleft + earlier)
      local returned = upto(back, NOW)
      local left = rleft - unseen + returned
      local view, known_reset = p.view, p.reset or 0
      if view and left_at < (num(p.sentat) or 0) + OVERTAKE and order <= known + NEW_WINDOW then
        local view_back = nums(view.b)
        if known_reset < reset then
          view_back[#view_back + 1] = known_reset
          table.sort(view_back)
        end
        local was = view.l - (p.sent - view.m) - before(view.m) + upto(view_back, NOW)
        if was < left then
          left, back = was, view_back
          returned = upto(back, NOW)
        end
      end
      p.view = {m = mark, l = rleft, b = texts(back)}
      p.sentat, p.back = exact(left_at), texts(back, returned + 1)
      left = window_bound(p, left)
      p.left, p.reset, p.order, p.snap, p.probing = left, reset, order, mark, 0
      p.allow, p.per, p.ptold = nil, nil, nil  -- (the headers pace it now: _model.Budget.learn)
      p.spr, p.sopen = nil, nil
      local lo, hi = bucket_answered(p, order, unseen)
      if lo then  -- held until the bucket has room, as the freshest answer says (no longer
        -- than the reset), not until a time calls pushed out (_model.Budget.learn)
        local ready = math.min(bucket_ready(p, hi), reset)
        uncool_budget(pool)
        if ready > NOW then cool_pool(pool, ready, 'budget spent (RPM)', CAUSE.requests_spent) end
      elseif left <= 0 then
        local back_then = back_at(p, reset)
        if back_then < reset then uncool_budget(pool) end  -- (held until later: back sooner)
        cool_pool(pool, back_then, 'budget spent (RPM)', CAUSE.requests_spent)
      else
        uncool_budget(pool)
      end
    end
  end
  if tleft and treset then
    local reset = NOW + math.min(treset, MAX_RESET)
    if reset <= (p.trefilled or 0) + NEW_WINDOW then
      -- stale, as above
    elseif mark >= snap or reset > (p.treset or 0) + NEW_WINDOW then
      local avg = p.avg or 0
      local left = tleft - unseen * avg
      p.tleft, p.treset = left, reset
      if left < math.max(1, avg) then
        cool_pool(pool, reset, 'budget spent (TPM)', CAUSE.tokens_spent)
      end
    end
  end
end

-- Release the lease (an expired one was released when it expired).
if in_flight then forget_call(fp, lease, pool_then, ARGV[22] == '1') end

if outcome == 'succeeded' then
  rec.successes = rec.successes + 1
elseif outcome == 'failed' then
  rec.failures = rec.failures + 1
elseif outcome == 'rate_limited' then
  rec.rate_limits = rec.rate_limits + 1
elseif outcome == 'given_back' then
  rec.calls = rec.calls - 1
end
put('k:' .. fp, rec)

-- What the outcome teaches the pool's pace (as KeyRing.succeed/fail/end), and how long a
-- 429 that named no delay cools it.
local seconds = math.max(0, tonumber(ARGV[7]) or 0)
local model = ARGV[27] ~= '' and ARGV[27] or nil
local single = p.pmodel ~= MIXED
if outcome == 'succeeded' then
  pace_admit(p, model)
  local lp = model and p.lpace and p.lpace[model]
  if lp then lp.r = exact(num(lp.r) * (1 + PACE_GAIN)) end
elseif outcome == 'rate_limited' and ARGV[24] == '1' then
  seconds = pace_limited(p, p.n, tonumber(ARGV[25]), seconds, ARGV[26] ~= '0', model,
                         tonumber(ARGV[30]), tonumber(ARGV[32]), ARGV[33] == '1')
elseif (p.stale or 0) > 0 then
  pace_over(p)
end
put('p:' .. pool, p)
if single and p.pmodel == MIXED then uncool_budget(pool) end  -- (pace_model forgot it)

-- Tokens the call's requests cost: the pool's average call (as _model.Budget.cost, in whole
-- tokens), and its tpm pacing.
local tokens = tonumber(ARGV[18]) or 0
if tokens ~= 0 then
  local avg = p.avg or 0
  if tokens > 0 then
    avg = math.floor((avg == 0 and tokens or 0.8 * avg + 0.2 * tokens) + 0.5)
    p.avg = avg
  end
  local wait = bucket_take(p, 't', tokens, avg)
  if wait > 0 then cool_pool(pool, NOW + wait, 'paced (tpm)', CAUSE.paced) end
end

local disabled = 0
local asked = ARGV[28] ~= '' and ARGV[28] or nil
if fate == 'cool' then
  cool(fp, rec, NOW + seconds, ARGV[8], tonumber(ARGV[9]), cause)
elseif fate == 'cool_pool' and asked and outcome == 'rate_limited' and p.pmodel == MIXED then
  -- A pool serving several models: the 429 is of the call's model's limit, which is held
  -- there (as KeyRing.hold_lane), not the pool's keys.
  hold_lane(p, asked, NOW + seconds)
  if ARGV[29] == '1' then hold_lane(p, asked .. PER_DAY, NOW + seconds) end  -- (a day's)
  local told = tonumber(ARGV[25])
  if told then pace_lane(p, asked, PACE_BACKOFF * told, NOW + seconds) end
  put('p:' .. pool, p)
elseif fate == 'cool_pool' then
  cool_pool(pool, NOW + seconds, ARGV[8], cause)
elseif fate == 'disable' then
  if disable(fp, rec, ARGV[8], cause, ARGV[7] ~= '' and NOW + seconds or 0) then
    disabled = 1
  end
end
flush()
return {disabled}
