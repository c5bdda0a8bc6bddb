-- What KeyManager's own methods do to shared keys, and what stats() reads.
-- ARGV[3] the operation, then its arguments:
--   cooldown fp seconds reason  cool exactly this long (0: ready now); not a disabled key
--   probe fp                     limit the key's pool to a few calls until an answer tells it
--   spend fp lease               a call on the key sends another request: spend its pool's
--                                budget as a call chosen does; the call (its lease) now stands
--                                at the request's place there, for its answer
--   lane fp model probe book     a call of the model would go on the key: the seconds the
--                                model is held in its pool, or 0, and the call takes its
--                                place in the model's pace there (probe '1': a 429 named the
--                                model lately; book: the longest the call waits for a hold,
--                                to go when it ends, see KeyRing.lane_pass); and 1 when the
--                                pool probes the model no more (no pace for it, and its limit
--                                learned or its probes spent), else 0
--   lane fp model probe book track
--                                as lane; track '1': the caller tells laneback when its call
--                                comes back, and a probe waits while more are out than came
--                                back; the third value is the stamp of its probe
--                                ('' if it is none)
--   laneback fp model stamp      the call that lane counted out as a probe of the model at
--                                stamp came back
--   lanepace fp model rate after join
--                                an answer of a request for the model showed its requests
--                                spent: in a pool serving several models, hold the model there
--                                for ``after`` seconds, then pace it at ``rate`` a second (the
--                                pool the key will be in once it joins ``join``, the pool the
--                                answer named, if any, as the call's report will move it)
--   enable fp...                 make disabled keys ready again
--   snapshot fp...               the state and counters of each key, as cjson
-- Returns {held, spent, stamp} for lane (above); 1 for cooldown/probe/spend/enable/lanepace/
-- laneback (0: the
-- key is unknown or, for cooldown, disabled; for lanepace, its pool does not serve several
-- models); json for snapshot.

local op = ARGV[3]
forget_lost()
if op == 'enable' or op == 'snapshot' then  -- (not unpack: ten thousand keys would overflow Lua's stack)
  local fps = {}
  for i = 4, #ARGV do fps[#fps + 1] = ARGV[i] end
  need_keys(fps)
end
if op == 'cooldown' then
  local fp, seconds, reason = ARGV[4], tonumber(ARGV[5]), ARGV[6]
  local rec = key_rec(fp)
  if not rec or rec.where == 'disabled' then
    flush()  -- what forget_lost() did
    return 0
  end
  if seconds <= 0 then
    if rec.where == 'cooling' then make_ready(fp, rec) end
  else
    set_deadline(fp, rec, NOW + seconds, reason, 0, CAUSE.set_by_user)
  end
  flush()
  return 1
elseif op == 'probe' then
  -- The key will be called through a client whose answers tell the budget: until the first
  -- one does, its pool sends only a few calls per key instead of a burst (as _model.Budget.probe).
  local rec = key_rec(ARGV[4])
  if not rec then
    flush()
    return 0
  end
  local p = pool_rec(rec.pool)
  if p and not p.left and not p.snap and p.probing ~= 1 and p.pmodel ~= MIXED then
    p.probing, p.left = 1, PROBE_CALLS * #members(rec.pool) - p.n
    put('p:' .. rec.pool, p)
  end
  flush()
  return 1
elseif op == 'spend' then
  local rec = key_rec(ARGV[4])
  if not rec then
    flush()
    return 0
  end
  local p = pool_rec(rec.pool) or new_pool()
  purge(rec.pool)
  p.sent = p.sent + 1
  local call = p.out[ARGV[5]]
  if call and not call.r then call.m, call.t = p.sent, NOW end
  put('p:' .. rec.pool, p)
  spend_request(rec.pool, p)
  flush()
  return 1
elseif op == 'lane' then
  -- A call of model ARGV[5] would go on key ARGV[4]: the seconds the model is held in its
  -- pool; or 0, and the call takes its place in the model's pace there, which holds the
  -- next ones; held at most ARGV[7] seconds, the call goes when the hold ends and takes its
  -- place then (as KeyRing.lane_pass).
  local rec = key_rec(ARGV[4])
  local p = rec and pool_rec(rec.pool)
  if not p then
    flush()
    return {'0', 0, ''}
  end
  local model = ARGV[5]
  local held = lane_held(p, model)
  local lp = p.lpace and p.lpace[model]
  local probes = p.lprobe or {}
  -- Whether the pool has yet to learn the model's limit (no pace for it; and it serves
  -- several models, or has met no 429 nor headers yet), with probes left (KeyRing.unlearned).
  local unlearned = not lp and (p.pmodel ~= model or (not p.lat and (p.snap or -1) < 0))
    and (probes[model] or 0) < ALLOWANCE_PROBES
  if held > 0 and held > tonumber(ARGV[7]) then
    flush()
    return {string.format('%.17g', held), (lp or unlearned) and 0 or 1, ''}
  end
  local at = NOW + held  -- when the call goes
  local stamp = ''
  if not lp then
    -- A model a 429 named lately (ARGV[6] '1'), whose limit this pool has not learned: one
    -- call per PROBE, ALLOWANCE_PROBES at most; calls that come back (ARGV[8] '1') are
    -- also held while more are out than came back (KeyRing._probes_full).
    if ARGV[6] == '1' and unlearned then
      if ARGV[8] == '1' then
        local outs, backs = p.lout or {}, p.lback or {}
        local out, was = {}, outs[model] or {}
        for _, went in ipairs(was) do
          if num(went) > NOW - PROBE_FOR then out[#out + 1] = went end
        end
        if #out < #was then  -- (out over PROBE_FOR: back)
          backs[model] = (backs[model] or 0) + #was - #out
          p.lback = backs
        end
        if #out > (backs[model] or 0) then
          outs[model] = out
          p.lout = outs
          put('p:' .. rec.pool, p)
          flush()
          return {string.format('%.17g', PROBE), 0, ''}
        end
        stamp = exact(at)
        out[#out + 1] = stamp
        outs[model] = out
        p.lout = outs
      end
      probes[model] = (probes[model] or 0) + 1
      p.lprobe = probes
      hold_lane(p, model, at + PROBE)
      unlearned = probes[model] < ALLOWANCE_PROBES
    end
  else
    local rate, level, stamp = num(lp.r), num(lp.l), num(lp.s)
    if at > stamp then
      level = math.min(1, level + (at - stamp) * rate)
      stamp = at
    end
    level = level - 1
    lp.l, lp.s = exact(level), exact(stamp)
    hold_lane(p, model, at + (1 - level) / rate)
  end
  put('p:' .. rec.pool, p)
  flush()
  return {string.format('%.17g', held), (lp or unlearned) and 0 or 1, stamp}
elseif op == 'laneback' then
  -- (As KeyRing.probe_answered.)
  local rec = key_rec(ARGV[4])
  local p = rec and pool_rec(rec.pool)
  local out = p and p.lout and p.lout[ARGV[5]]
  if not out then
    flush()
    return 0
  end
  for i, went in ipairs(out) do
    if went == ARGV[6] then  -- (the text lane returned, sent back as it was)
      table.remove(out, i)
      local backs = p.lback or {}
      backs[ARGV[5]] = (backs[ARGV[5]] or 0) + 1
      p.lback = backs
      put('p:' .. rec.pool, p)
      break
    end
  end
  flush()
  return 1
elseif op == 'lanepace' then
  -- (As _manager._learn: KeyRing.hold_lane and pace_lane, where the pool is MIXED.)  The
  -- ring moved the key into the pool the answer named (KeyRing.join_pool); the call's report
  -- will: the pace is for that pool's record, or for the key's own, which the move renames
  -- when the key is alone in it and no pool has that name yet (a new pool serves no model).
  local rec = key_rec(ARGV[4])
  local name, join = rec and rec.pool, ARGV[8] or ''
  if rec and join ~= '' and join ~= name and not rec.fixed then
    if pool_rec(join) then
      name = join
    elseif #members(name) ~= 1 then
      name = nil  -- (a pool made anew: it serves no model yet)
    end
  end
  local p = name and pool_rec(name)
  if not p or p.pmodel ~= MIXED then
    flush()
    return 0
  end
  local model, rate, after = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
  hold_lane(p, model, NOW + after)
  pace_lane(p, model, rate, NOW + after)
  put('p:' .. name, p)
  flush()
  return 1
elseif op == 'enable' then
  for i = 4, #ARGV do
    local rec = key_rec(ARGV[i])
    if rec and rec.where == 'disabled' then make_ready(ARGV[i], rec) end
  end
  flush()
  touch(LOAD)  -- the load set may have been empty (every key disabled): made anew
  return 1
elseif op == 'snapshot' then
  -- Leases that expired unreported are released first (a crashed worker's calls).
  local pools = {}
  for i = 4, #ARGV do
    local rec = key_rec(ARGV[i])
    if rec then pools[rec.pool] = true end
  end
  for pool in pairs(pools) do purge(pool) end
  local due = {}
  for i = 4, #ARGV do
    local rec = key_rec(ARGV[i])
    if rec and due_now(rec) then due[#due + 1] = ARGV[i] end
  end
  promote(due)
  local rows = {}
  for i = 4, #ARGV do
    local rec = key_rec(ARGV[i])
    if rec then
      local left = 0
      if rec.where == 'cooling' then left = math.max(0, rec.untl - NOW) end
      rows[ARGV[i]] = {where = rec.where, left = left, reason = rec.reason, in_flight = rec.n,
                       calls = rec.calls, successes = rec.successes,
                       rate_limits = rec.rate_limits, failures = rec.failures, pool = rec.pool,
                       own = rec.own}
    end
  end
  flush()
  return cjson.encode(rows)
end
return redis.error_reply('unknown operation ' .. op)
