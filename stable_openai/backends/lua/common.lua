-- stable_openai: shared key state.  Prepended to every script of this directory.
--
-- A namespace N lives in three Redis keys, all with the hash tag {N} (one Cluster slot), and
-- every script declares the ones it uses:
--   KEYS[1] {N}:state  HASH of JSON records, read and written in one HMGET and one HSET a call:
--     k:<fp>    one key: where (ready/cooling/disabled), untl (deadline, server time), cseq
--               (the order it began cooling in), reason
--               (for people), cause (a CAUSE value: what the scripts compare), forbidden,
--               n (calls in flight), weight, pool, fixed (pool given by the user), own (still
--               in a pool of its own), rpm, tpm, calls, successes, rate_limits, failures
--     p:<pool>  one pool: n (calls in flight); sent (calls chosen, ever); out {lease = {m =
--               the ``sent`` mark it was chosen at, e = expiry, f = fingerprint, t = when it
--               was chosen or spent for a further request (when its request leaves, the
--               client tells in its report), r = 1 once it ended with its request unanswered}}, the
--               calls in flight and the unanswered ones; gone {lease = when}, calls whose
--               lease expired before they reported; what the server said, brought up to
--               date: limit, left, reset, order (the freshest answer's reset stamped from
--               when its request left, see report.lua), refilled, snap (the ``sent`` mark of
--               the freshest answer), wstart/wreset
--               (``sent`` when the window began, and its end), tlimit, tleft, treset,
--               trefilled, avg (tokens a request costs), probing (1 until an answer told the
--               budget), was (its name before the server named it), held (1 while keys may
--               be cooling for its spent request budget); r/t {rate, cap, level,
--               stamp} (client-side pacing of requests and tokens); the pace learned from
--               429s (strings of 17 digits): pace, plevel, pstamp, lat (the last 429), idle,
--               closing, told; adm, stale, hintless (counts); allow (see pace_spend); the
--               server's windows, once known: per, ptold, panchor, pend, psize, plimit, padm,
--               plim (see next_window); a sliding window kept to: spr, sleast, ssize, sopen
--               (see slide_told); a refilling bucket's rate, told by answers (see
--               bucket_told): blo, bhi, bfull, bfreset (strings of 17 digits), bfirst, bsure;
--               pmodel (the model its calls
--               and 429s named, MIXED once they named two); lanes {model = until}, the models
--               held in a pool that serves several (see hold_lane), lpace their paces,
--               lprobe {model = calls} the calls sent of a model before its pace was learned
--               (control.lua's lane), lout {model = {stamp...}} when those of them still out
--               went (of calls that tell when they come back: laneback), lback {model = n}
--               how many of those came back (or were out over PROBE_FOR)
--     m:<pool>  the fingerprints of the pool's keys (a JSON array)
--     seq       a counter: the least-recently-used order
--   KEYS[2] {N}:load   ZSET "<fp>|<pool>" -> score.  Ready keys score level * 1e11 + seq
--     (fewest calls in flight for their weight first, then least recently used); cooling keys
--     score their deadline (ms since EPOCH) - 1e15, so they come first, soonest first, and one
--     ZRANGE finds both the keys that are due and the ready ones.  Disabled keys are not in it.
--   KEYS[3] {N}:ring:<id>  SET of the fingerprints one key configuration uses.
-- A lease is a call in flight, named by the client that makes it ("<client>.<n>"): a report
-- carries it back with the pool and mark it was chosen at.  A client that lost the reply to
-- a choose sends the lease's name with its next script call, and it is released then.  A
-- lease not reported by its expiry (a crashed worker) is released the next time its pool is
-- used, or by stats().
-- No key, and nothing derived from one but its keyed fingerprint, is ever stored.
-- Time is the server's (TIME), so the clocks of the hosts do not matter.
-- Expiry: register.lua, which every process runs again every few minutes, refreshes the
-- expiry of the three keys; a script that may create the load set anew gives it one at once.
--
-- Every script gets ARGV[1] = the idle expiry (seconds), ARGV[2] = the time to use instead of
-- the server's ('' in use; tests give one to drive both stores on one fake clock), ARGV[3] =
-- the leases whose choose replies were lost (space-separated; '' for none).  ARGV[2] is taken
-- out here: each script's own arguments start at ARGV[3].

local STATE, LOAD, RING = KEYS[1], KEYS[2], KEYS[3]
local TTL = tonumber(ARGV[1])
-- MAX_RESET, NEW_WINDOW, ORDER_SLACK, PROBE, PROBE_CALLS, RESET_SLACK, ALLOWANCE_PROBES,
-- UNANSWERED, the
-- pace and period constants and CAUSE come from the Python
-- side: redis.py puts them before this file (_model.py's constants, _cause.Cause's values).

local NOW = tonumber(table.remove(ARGV, 2))
if not NOW then
  local T = redis.call('TIME')
  NOW = tonumber(T[1]) + tonumber(T[2]) / 1e6
end
local EPOCH = 1.7e9
local COOLING_BASE = -1e15
local LEVEL = 1e11

-- Records: read once, written once (flush).
local REC, DIRTY = {}, {}
local ZADDS, ZREMS = {}, {}

-- redis.call(command, key, ...) with ``args`` in chunks (Lua's stack is not unbounded):
-- the replies, one list.
local function chunked(command, key, args)
  local replies = {}
  for first = 1, #args, 1000 do
    local reply = redis.call(command, key, unpack(args, first, math.min(#args, first + 999)))
    if type(reply) == 'table' then
      for _, value in ipairs(reply) do replies[#replies + 1] = value end
    end
  end
  return replies
end

local function need(fields)
  local missing = {}
  for _, field in ipairs(fields) do
    if REC[field] == nil then missing[#missing + 1] = field end
  end
  if #missing == 0 then return end
  local values = chunked('HMGET', STATE, missing)
  for i, field in ipairs(missing) do
    REC[field] = values[i] and cjson.decode(values[i]) or false
  end
end

local function get(field)
  need({field})
  return REC[field] or nil
end

local function put(field, value)
  REC[field] = value or false
  DIRTY[field] = true
end

local function key_rec(fp) return get('k:' .. fp) end

-- Read the records of the keys ``fps`` (a list of fingerprints) in one go; returns ``fps``.
local function need_keys(fps)
  local fields = {}
  for i, fp in ipairs(fps) do fields[i] = 'k:' .. fp end
  need(fields)
  return fps
end
local function pool_rec(name) return get('p:' .. name) end
local function member(fp, rec) return fp .. '|' .. rec.pool end

local function next_seq()
  local seq = (get('seq') or 0) + 1
  put('seq', seq)
  return seq
end

local function zadd(name, score) ZADDS[name] = score; ZREMS[name] = nil end
local function zrem(name) ZREMS[name] = true; ZADDS[name] = nil end

local function flush()
  local sets, dels = {}, {}
  for field in pairs(DIRTY) do
    if REC[field] then
      sets[#sets + 1] = field
      sets[#sets + 1] = cjson.encode(REC[field])
    else
      dels[#dels + 1] = field
    end
  end
  chunked('HSET', STATE, sets)
  chunked('HDEL', STATE, dels)
  local adds, rems = {}, {}
  for name, score in pairs(ZADDS) do adds[#adds + 1] = score; adds[#adds + 1] = name end
  for name in pairs(ZREMS) do rems[#rems + 1] = name end
  chunked('ZADD', LOAD, adds)
  chunked('ZREM', LOAD, rems)
  REC, DIRTY, ZADDS, ZREMS = {}, {}, {}, {}
end

local function touch(key) redis.call('EXPIRE', key, TTL) end

local function level_of(in_flight, weight)
  if weight == 1 then return in_flight end
  return math.floor(in_flight / weight)
end

-- A ready key's place in the load set: its level, then the order it got there in.
local function place(fp, rec)
  local score = level_of(rec.n, rec.weight) * LEVEL + next_seq() % LEVEL
  zadd(member(fp, rec), string.format('%.0f', score))
end

local function cooling_score(deadline)
  return string.format('%.0f', COOLING_BASE + math.floor((deadline - EPOCH) * 1000))
end

local function make_ready(fp, rec)
  rec.where, rec.untl, rec.reason, rec.cause, rec.forbidden = 'ready', 0, '', '', 0
  put('k:' .. fp, rec)
  place(fp, rec)
end

-- Cool a key until a deadline; an already later deadline is kept.  ``reason`` is for people;
-- ``cause`` (a value of CAUSE) is what the scripts compare.
local function set_deadline(fp, rec, deadline, reason, forbidden, cause)
  rec.where, rec.untl, rec.reason, rec.cause, rec.forbidden =
    'cooling', deadline, reason, cause, forbidden
  rec.cseq = next_seq()  -- keys due at once are made ready in the order they were cooled
  put('k:' .. fp, rec)
  zadd(member(fp, rec), cooling_score(deadline))
end

local function cool(fp, rec, deadline, reason, forbidden, cause)
  if rec.where == 'disabled' then return end
  if rec.where == 'cooling' and rec.untl >= deadline - SAME_DEADLINE then return end
  set_deadline(fp, rec, deadline, reason, forbidden, cause)
end

local function members(pool) return get('m:' .. pool) or {} end

local function member_recs(pool) return need_keys(members(pool)) end

-- Cool every key of a pool: they share the budget that is spent.
local function cool_pool(pool, deadline, reason, cause)
  local p = pool_rec(pool)
  if p and cause == CAUSE.requests_spent and not p.held then
    p.held = 1  -- keys held for the request budget: an answer with budget left frees them
    put('p:' .. pool, p)
  end
  for _, fp in ipairs(member_recs(pool)) do
    local rec = key_rec(fp)
    if rec then cool(fp, rec, deadline, reason, 0, cause) end
  end
end

-- Disable a key until it is given again, or until ``recheck`` (0: never): then it is made
-- ready again, for a call to find out whether it works (as KeyRing.disable).  True if it was
-- not disabled before.  A key to recheck waits in the load set as a cooling key does.
local function disable(fp, rec, reason, cause, recheck)
  if rec.where == 'disabled' then return false end
  if rec.where ~= nil then zrem(member(fp, rec)) end
  rec.where, rec.untl, rec.reason, rec.cause, rec.forbidden = 'disabled', recheck, reason, cause, 0
  if recheck > 0 then
    rec.cseq = next_seq()
    zadd(member(fp, rec), cooling_score(recheck))
  end
  put('k:' .. fp, rec)
  return true
end

-- A model whose limit is spent in a pool that serves several (a 429 said so) is held there
-- until ``untl`` (a later deadline already held is kept): p.lanes {model = until}.
local function hold_lane(p, model, untl)
  local lanes = p.lanes or {}
  if untl > (lanes[model] or 0) then lanes[model] = untl end
  p.lanes = lanes
end

-- The models held in pool record ``p`` now, with the seconds each is held for, and those it
-- paces (0 when not held), as cjson ('' for none); the holds that are over are let go.
local function lanes_held(p)
  local held, any = {}, false
  for model, untl in pairs(p.lanes or {}) do
    if untl > NOW then held[model] = untl - NOW; any = true else p.lanes[model] = nil end
  end
  for model in pairs(p.lpace or {}) do
    if not held[model] then held[model] = 0; any = true end
  end
  if p.lanes and next(p.lanes) == nil then p.lanes = nil end
  return any and cjson.encode(held) or ''
end

-- Seconds ``model`` is held in pool record ``p`` (0: not; a hold that is over is let go).
local function lane_held(p, model)
  local untl = p.lanes and p.lanes[model]
  if not untl then return 0 end
  if untl > NOW then return untl - NOW end
  p.lanes[model] = nil
  return 0
end

-- A key whose cooldown, or whose time disabled before a recheck, is over.
local function due_now(rec)
  return (rec.where == 'cooling' or (rec.where == 'disabled' and rec.untl > 0))
    and rec.untl <= NOW
end

-- Client-side pacing: a debt-allowing token bucket, as in stable_openai/_budget.py.
local function bucket_take(p, prefix, amount, want)
  local b = p[prefix]
  if not b then return 0 end
  if NOW > b.stamp then b.level = math.min(b.cap, b.level + (NOW - b.stamp) * b.rate); b.stamp = NOW end
  b.level = b.level - amount
  want = math.min(want, b.cap)
  if b.level >= want then return 0 end
  return (want - b.level) / b.rate
end

local function new_pool()
  return {n = 0, sent = 0, out = {}, gone = {}}
end

-- The pace a pool learned from its 429s (as _model.Budget: spend_request, limited, admit,
-- ended).  Its numbers are kept as strings of 17 digits: JSON here keeps 14, and both stores
-- must compute the same deadlines.
local function exact(x) return x and string.format('%.17g', x) or nil end
local function num(text) return text and tonumber(text) or nil end
-- Lists of them: as numbers, and back as strings (from the ``from``-th on).
local function nums(list)
  local out = {}
  for i, text in ipairs(list or {}) do out[i] = num(text) end
  return out
end

local function texts(list, from)
  local out = {}
  for i = from or 1, #list do out[#out + 1] = exact(list[i]) end
  return out
end

-- How many of the sorted ``list`` are at most ``x``.
local function upto(list, x)
  local n = 0
  while n < #list and list[n + 1] <= x do n = n + 1 end
  return n
end

-- The models held in a pool that serves several (p.lanes, see hold_lane above), and their
-- paces: p.lpace {model = {r = rate, l = level, s = stamp}}, strings of 17 digits (as
-- KeyRing.pace_lane, lane_pass, lane_succeeded).
local function pace_lane(p, model, rate, start)
  local lpace = p.lpace or {}
  local known = lpace[model]
  if known and num(known.r) < rate then rate = num(known.r) end
  lpace[model] = {r = exact(rate), l = exact(1.0), s = exact(start)}
  p.lpace = lpace
end

-- A call starts after the window's end (_model.Budget._next_window): the window it starts
-- in begins, with as many calls as the last one admitted if a 429 met it, more by
-- PERIOD_GAIN if it spent them all without one (up to the size a 429 named), else as many.
-- The server's windows, once known (_model.Budget.period...): p.per (their length), p.ptold
-- (the last end a 429 told), p.panchor (the first end measured), p.pend (the current
-- window's end), p.psize (a window's calls) — strings of 17 digits —, p.plimit (the size a 429
-- named), p.padm (successes since the window began), p.plim (one met a 429 there).
local function next_window(p, period)
  local ends = num(p.pend)
  local size = num(p.psize)
  if p.plim then
    size = math.max(1, p.padm or 0, size / 2)
  elseif p.allow <= 0 then
    size = size + PERIOD_GAIN
  end
  if p.plimit then size = math.min(size, p.plimit) end
  p.pend = exact(ends + period * (math.floor((NOW - ends) / period) + 1))
  p.psize = exact(size)
  p.padm, p.plim = 0, nil
  p.allow = math.floor(size)
end

-- A windows' period as measured, or the known one it is near (as _model._known).
local function known(period)
  for _, k in ipairs(KNOWN_PERIODS) do
    if math.abs(period - k) <= PERIOD_SLACK * k then return k end
  end
  return period
end

-- A 429 that gives no rate said the server admits again at ``ends`` (as
-- _model.Budget._window_told): returns whether the pool knows the server's windows.
local function window_told(p, now, ends, limit)
  local told, period = num(p.ptold), num(p.per)
  if told and math.abs(ends - told) <= math.max(NEW_WINDOW, PERIOD_SLACK * (period or 0)) then
    return period ~= nil  -- the same window's end again
  end
  p.ptold = exact(ends)
  if not told or ends < told then
    p.per = nil
    return false
  end
  local gap = ends - told
  if not period then
    -- (only a 429 of the allowance its first end gave, with calls admitted, within a minute,
    -- in the first half of the span: _model.Budget._window_told)
    if not p.allow or gap > MAX_PERIOD or (p.adm or 0) == 0 or now - told >= gap / 2 then
      return false
    end
    p.per, p.panchor, p.plimit = exact(known(gap)), exact(told), limit
    p.psize = exact(limit or math.max(1, p.adm or 0))
    if limit then p.padm, p.plim = 0, nil else p.padm, p.plim = p.adm or 0, 1 end
  else
    local windows = math.floor(gap / period + 0.5)
    if windows < 1 or math.abs(gap - windows * period) > PERIOD_SLACK * period then
      p.per = nil  -- off the windows known
      return false
    end
    local since = ends - num(p.panchor)
    p.per = exact(known(since / math.floor(since / period + 0.5)))
    p.plim = 1
  end
  p.pend = exact(ends)
  p.allow = 0
  return true
end

-- The sliding window a pool keeps to (_model.Budget._slid): p.spr (its length), p.sleast (the
-- longest a 429's reset showed it), p.ssize (its size), p.sopen (when each request it counts
-- ages out, in order); strings of 17 digits but ssize.
local function slide_opens(p, above, shift)
  local opens = {}
  for _, at in ipairs(p.sopen or {}) do
    at = num(at)
    if at > above then opens[#opens + 1] = at + shift end
  end
  return opens
end

local function slide_keep(p, opens)
  local size = p.ssize
  if #opens > size then
    local kept = {}
    for i = #opens - size + 1, #opens do kept[#kept + 1] = opens[i] end
    opens = kept
  end
  p.sopen = texts(opens)
  return opens
end

-- A sliding window's 429, or any that gives its numbers once one did (_model.Budget._slid):
-- whether the pool keeps to the window (not when others share it unseen).
local function slide_told(p, wait, reset, limit)
  local first, last = NOW + wait, NOW + math.max(wait, reset)
  local period, opens = num(p.spr), {}
  local least = reset * (1.0 + SLIDE_SLACK)
  if not period then
    p.sleast, p.spr = exact(least), exact(least)
  else  -- it came ``wait`` early; the window did not count it (the last the pool counted)
    least = math.max(num(p.sleast) or 0, least)
    local longer = math.min(math.max(least, period + wait), least * (1.0 + SLIDE_STRETCH))
    local sopen = p.sopen or {}
    sopen[#sopen] = nil
    p.sopen = sopen
    opens = slide_opens(p, NOW, math.max(wait, longer - period))
    if #opens < limit - 1 and (p.adm or 0) < limit then return false end
    p.sleast, p.spr = exact(least), exact(longer)
  end
  local missing = limit - #opens
  if missing > 0 then
    opens[#opens + 1] = first
    for _ = 2, missing do opens[#opens + 1] = last end
  end
  table.sort(opens)
  p.ssize = limit
  opens = slide_keep(p, opens)
  opens[#opens] = math.max(opens[#opens], last)
  p.sopen[#opens] = exact(opens[#opens])
  p.pace, p.allow, p.per, p.ptold = nil, nil, nil, nil
  return true
end

-- A call starts on the pool: it takes its place in the pace, which cools the pool until the
-- next call's.
local function pace_spend(pool, p)
  local slide = num(p.spr)
  if slide then  -- (_model.Budget.spend_request: a sliding window)
    local opens = slide_opens(p, NOW, 0)
    opens[#opens + 1] = NOW + slide
    table.sort(opens)
    local full = #opens >= p.ssize
    opens = slide_keep(p, opens)
    if full then cool_pool(pool, opens[1], 'paced (429s)', CAUSE.paced) end
    put('p:' .. pool, p)
    return
  end
  local rate = num(p.pace)
  if not rate then
    local period = num(p.per)
    if period then  -- (_model.Budget.spend_request: the server's windows)
      if NOW >= num(p.pend) then next_window(p, period) end
      p.allow = p.allow - 1
      if p.allow <= 0 then
        cool_pool(pool, num(p.pend) + PERIOD_SLACK * period, 'paced (429s)', CAUSE.paced)
      end
      put('p:' .. pool, p)
    elseif p.allow then  -- (_model.Budget.allowance: spend_request)
      p.allow = p.allow - 1
      if p.allow < -ALLOWANCE_PROBES then
        p.allow, p.ptold = nil, nil  -- (as many probes met no 429)
      elseif p.allow <= 0 then
        cool_pool(pool, NOW + PROBE, 'paced (429s)', CAUSE.paced)
      end
      put('p:' .. pool, p)
    end
    return
  end
  local level, stamp = num(p.plevel) or 0, num(p.pstamp) or 0
  if NOW > stamp then
    level = level + (NOW - stamp) * rate
    p.pstamp = exact(NOW)
    if level > 1 then  -- the pool was not busy: that time says nothing of its limit
      p.idle = exact((num(p.idle) or 0) + (level - 1) / rate)
      level = 1
    end
  end
  level = level - 1
  p.plevel = exact(level)
  put('p:' .. pool, p)
  cool_pool(pool, NOW + (1 - level) / rate, 'paced (429s)', CAUSE.paced)
end

-- Measure the span that ended at the last 429 (if one did), and begin the next.
local function pace_close(p)
  local span, admitted = num(p.closing), p.adm or 0
  if p.per then  -- (allowed per window, not paced)
  elseif span and span > 0 and admitted > 0 then
    local measured = admitted / span
    local told = num(p.told)
    p.pace = exact(PACE_BACKOFF * ((told and told < measured) and told or measured))
  elseif span and span > 0 and p.pace then  -- nothing admitted between two 429s
    p.pace = exact(num(p.pace) * PACE_DROP)
  end
  if p.pace then p.allow = nil end
  p.closing, p.adm = nil, 0
end

-- One of the calls in flight at the last 429 ended: once all have, the span is measured.
local function pace_over(p)
  p.stale = p.stale - 1
  if p.stale == 0 then pace_close(p) end
end

-- A refilling bucket's rate, from what answers show (as _model.Budget._bucket_told,
-- bucket_rate, _bucket_ready, _bucket_forget): the interval every answer allows (blo < rate
-- <= bhi; blo -1: none, not a bucket; bhi nil: no bound yet).
local function bucket_forget(p)
  p.blo, p.bhi, p.bfirst, p.bfreset, p.bsure, p.bfull = nil, nil, nil, nil, nil, nil
  p.bshared = nil
end

-- No bucket to pace by (as _model.Budget._bucket_end).
local function bucket_end(p) p.blo, p.bhi = exact(-1.0), nil end

local function bucket_told(p, left, reset)
  local lo = num(p.blo) or 0
  local used = p.limit and (p.limit - left) or 0
  if lo < 0 or used <= 0 or reset <= RESET_SLACK then return end
  if reset > MAX_PERIOD then  -- (a day's limit: no pool is paced by it)
    bucket_end(p)
    return
  end
  if not p.bfirst then
    p.bfirst, p.bfreset = used, exact(reset)
  elseif used ~= p.bfirst and math.abs(reset - num(p.bfreset)) > 2 * RESET_SLACK then
    p.bsure = 1
  end
  lo = math.max(lo, (used - 1) / (reset + RESET_SLACK))
  local hi = math.min(num(p.bhi) or math.huge, used / (reset - RESET_SLACK))
  if lo < hi then
    p.blo, p.bhi = exact(lo), exact(hi)
  else
    bucket_end(p)
  end
end

local function bucket_rate(p)
  local lo = num(p.blo)
  if p.bsure and lo and lo > 0 then return lo, num(p.bhi) end
  return nil
end

-- The freshest answer: empty at ``order``, and ``unseen`` calls fill it more (as
-- _model.Budget._bucket_answered).
local function bucket_answered(p, order, unseen)
  local lo, hi = bucket_rate(p)
  if lo then p.bfull = exact(order + unseen / lo) end
  return lo, hi
end

-- When the bucket has room for two requests (_model.Budget._bucket_ready).
local function bucket_ready(p, hi)
  return num(p.bfull) - math.max(p.limit - 2, 0) / hi
end

-- Forget when requests come back: at a refill, a 429, a pool found to serve two models
-- (_model.Budget._forget_returns; the lists are described at request_ends below).
local function forget_returns(p) p.ends, p.back, p.view = nil, nil, nil end

-- A call or a 429 named ``model``: the pool's first, or it serves two (_model.MIXED).
local function pace_model(p, model)
  if p.pmodel ~= model and p.pmodel ~= MIXED then
    if not p.pmodel then
      p.pmodel = model
    else  -- two models: not paced from 429s any more, nor from headers of one model
      p.pmodel, p.pace, p.stale, p.closing, p.allow = MIXED, nil, 0, nil, nil
      p.per, p.ptold, p.spr, p.sopen = nil, nil, nil, nil
      p.limit, p.left, p.reset, p.order, p.snap = nil, nil, nil, nil, nil
      forget_returns(p)
      p.sentat = nil
      p.wstart, p.wreset = nil, nil
      p.tlimit, p.tleft, p.treset, p.probing = nil, nil, nil, 0
      bucket_forget(p)
    end
  end
end

-- A 429 that named no delay: its backoff, or one call of the pace its span just measured, or
-- of the pace what that span admitted so far gives, if shorter (_model.Budget._measured_backoff).
local function measured_backoff(p, cooled)
  local doubled = 2 ^ math.max(0, (p.hintless or 0) - 1)
  local rate = num(p.pace)
  if rate then return math.min(cooled, 1 / rate * doubled) end
  local span, admitted = num(p.closing), p.adm or 0
  if span and span > 0 and admitted > 0 then
    return math.min(cooled, 1 / (PACE_BACKOFF * (admitted / span)) * doubled)
  end
  return cooled
end

-- A call on the pool was rate limited; ``in_flight``: the pool's calls still in flight;
-- ``told``: the rate the 429's numbers give (nil if none); ``cooled``: the seconds it cools
-- (``hinted``: the server said so; else the longest it backs off for); ``model``: the one it
-- names (nil if none); ``limit``: its window's size, when it gives no rate, or its headers'
-- request limit (nil if not named); ``reset``: when they say that limit is back in full (nil
-- if not); ``sliding``: its numbers are a sliding window's.  Returns the seconds the pool
-- cools.
local function pace_limited(p, in_flight, told, cooled, hinted, model, limit, reset, sliding)
  if model then pace_model(p, model) end
  if bucket_rate(p) then bucket_end(p); p.bshared = 1 end  -- (see _model.Budget.limited)
  forget_returns(p)  -- (the server counted more than the pool knew of)
  local since = num(p.lat)
  local stale = (p.stale or 0) > 0 and since and NOW < since + UNANSWERED
  if not hinted then  -- a backoff from the pace, doubled by each fresh 429 without a success
    if not stale then p.hintless = (p.hintless or 0) + 1 end
    local rate = num(p.pace)
    local first = rate and 1 / rate or BLIND_FIRST
    cooled = math.min(cooled, first * 2 ^ math.max(0, (p.hintless or 0) - 1))
  end
  if p.pmodel == MIXED or (p.snap or -1) >= 0 then return cooled end  -- (headers pace it)
  if stale then
    pace_over(p)
    return hinted and cooled or measured_backoff(p, cooled)
  end
  if reset and limit and limit <= SLIDE_MOST and hinted and (p.spr or (sliding and not p.pace))
      and slide_told(p, cooled, reset, limit) then
    p.lat, p.idle, p.stale, p.closing, p.adm = exact(NOW + cooled), exact(0), in_flight, nil, 0
    return cooled  -- (kept to a sliding window: _model.Budget._slid)
  end
  if p.spr then p.spr, p.sopen, since = nil, nil, nil end  -- (bursts in a window: no pace)
  -- A window's end, from a 429 without a rate: once two told one, allowed per window.
  local was, windows = p.per ~= nil, false
  if not told and hinted and cooled > 0 and cooled <= MAX_PERIOD then
    windows = window_told(p, NOW, NOW + cooled, limit)
  else
    p.per, p.ptold = nil, nil
  end
  if windows then
    p.pace = nil
  elseif was then
    since = nil  -- (the span spent in windows is no pace)
  end
  if p.closing then pace_close(p) end
  -- Spans run from where the server said it admits again (or from the 429, without a hint).
  local mark = hinted and NOW + cooled or NOW
  p.closing = since and exact(mark - since - (num(p.idle) or 0)) or nil
  p.told = exact(told)
  if told then
    local paced, pace = PACE_BACKOFF * told, num(p.pace)
    if not pace or paced < pace then p.pace = exact(paced) end
  end
  if p.pace then
    p.allow = nil
  elseif windows then  -- (its window is spent until its end)
  elseif not told then  -- no rate: a window's end, or no numbers (_model.Budget.limited)
    p.allow = limit or (was and math.floor(num(p.psize)) or math.max(1, p.adm or 0))
  end
  p.lat, p.idle, p.stale = exact(mark), exact(0), in_flight
  if in_flight == 0 then pace_close(p) end
  if not hinted then cooled = measured_backoff(p, cooled) end
  p.plevel, p.pstamp = exact(0), exact(NOW + cooled)  -- (restarts empty: _model.Budget.limited)
  return cooled
end

-- A call on the pool succeeded (``model``: the one it asked for, nil if not known).
local function pace_admit(p, model)
  p.adm = (p.adm or 0) + 1
  if not (p.lat or model) then return end  -- before a 429 or a model: only counted
  if model then pace_model(p, model) end
  if p.per then p.padm = (p.padm or 0) + 1 end
  p.hintless = nil
  local rate = num(p.pace)
  if rate then p.pace = exact(rate * (1 + PACE_GAIN)) end
  if (p.stale or 0) > 0 then pace_over(p) end
end

-- A pool's record, made if it does not exist, and paced for a key that has rpm/tpm where it
-- is not paced yet — and, ``retune`` (the key was given again with another rpm/tpm), at the
-- new rate where it is (as KeyRing._pace).
local function pace(pool, rpm, tpm, retune)
  local p = pool_rec(pool)
  if not p then p = new_pool() end
  for prefix, per_minute in pairs({r = rpm, t = tpm}) do
    if type(per_minute) == 'number' then
      local rate = per_minute / 60
      local cap = math.max(1, rate)
      local b = p[prefix]
      if not b then
        p[prefix] = {rate = rate, cap = cap, level = cap, stamp = NOW}
      elseif retune and b.rate ~= rate then  -- given again at another rate (Bucket.set_rate)
        b.rate, b.cap, b.level = rate, cap, math.min(b.level, cap)
      end
    end
  end
  put('p:' .. pool, p)
  return p
end

local function count(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n
end

-- Move a key into another pool, with its calls in flight.
local function move(fp, rec, name)
  local old_name = rec.pool
  if old_name == name then return end
  local old, new = pool_rec(old_name) or new_pool(), pool_rec(name)
  local old_members = members(old_name)
  local rest = {}
  for _, other in ipairs(old_members) do if other ~= fp then rest[#rest + 1] = other end end
  if rec.where ~= 'disabled' then
    local old_member = member(fp, rec)
    local score = ZADDS[old_member]  -- placed in this script, or else as Redis has it
    if not score and not ZREMS[old_member] then score = redis.call('ZSCORE', LOAD, old_member) end
    zrem(old_member)
    rec.pool = name
    if score then zadd(member(fp, rec), score) end
  end
  rec.pool, rec.own = name, false
  put('k:' .. fp, rec)
  if not new and #rest == 0 then
    -- The key's own pool gets the server's name, keeping what it counted (as the ring's
    -- KeyRing.join_pool): the marks of the calls in flight still compare.
    old.was = old_name  -- the leases of its calls still name it
    new = old
  else
    new = new or new_pool()
    new.n = new.n + rec.n
    old.n = math.max(0, old.n - rec.n)
    -- Its calls in flight join the pool's, as if chosen before any answer still to come;
    -- the old pool keeps them as unanswered until it has no call in flight (as the ring).
    for lease, call in pairs(old.out) do
      if call.f == fp and not call.r then
        new.out[lease] = {m = 0, e = call.e, f = fp, t = NOW}
        call.r = 1
      end
    end
  end
  if #rest == 0 then
    put('p:' .. old_name, nil)
    put('m:' .. old_name, nil)
  else
    put('p:' .. old_name, old)
    put('m:' .. old_name, rest)
  end
  if rec.where == 'cooling' and rec.cause == CAUSE.requests_spent then
    new.held = 1  -- (held for its old pool's budget: the new pool's answers free it, as the ring)
  end
  put('p:' .. name, new)
  local joined = members(name)
  joined[#joined + 1] = fp
  put('m:' .. name, joined)
  pace(name, rec.rpm, rec.tpm)
end

-- A call is over (reported, or its lease expired): it is no longer in its pool's calls in
-- flight, wherever its key has moved since.  ``unanswered``: its request left and no answer
-- came, so the server may still count it: its mark stays among the pool's unanswered ones
-- until the pool has no call in flight (as _model.Budget.outstanding).  Returns whether it
-- was still in flight.
-- The pool whose calls in flight hold ``lease`` (chosen in ``pool``; its key ``fp`` may have
-- moved since), and that pool's record; nil when it is not in flight.
local function find_call(fp, lease, pool)
  for _, name in ipairs({pool, (key_rec(fp) or {}).pool}) do
    local p = pool_rec(name)
    local call = p and p.out[lease]
    if call and not call.r then return name, p end
  end
  return nil, nil
end

local function forget_call(fp, lease, pool, unanswered)
  local name, p = find_call(fp, lease, pool)
  if not name then return false end
  if unanswered then p.out[lease].r = 1 else p.out[lease] = nil end
  p.n = math.max(0, p.n - 1)
  if p.n == 0 then p.out = {} end
  put('p:' .. name, p)
  local rec = key_rec(fp)
  if rec then
    rec.n = math.max(0, rec.n - 1)
    put('k:' .. fp, rec)
    if rec.where == 'ready' then place(fp, rec) end
  end
  return true
end

-- Release the leases of a pool that expired (their worker died or froze): a late report of
-- one still counts its outcome, once.
local function purge(pool)
  local p = pool_rec(pool)
  if not p then return end
  local expired = {}
  for lease, call in pairs(p.out) do
    if call.e < NOW and not call.r then expired[#expired + 1] = {lease, call.f} end
    if call.r and (call.t or 0) <= NOW - UNANSWERED then  -- counted by now, or never
      p.out[lease] = nil
      put('p:' .. pool, p)
    end
  end
  for lease, when in pairs(p.gone) do
    if when < NOW - 600 then p.gone[lease] = nil; put('p:' .. pool, p) end
  end
  for _, item in ipairs(expired) do
    forget_call(item[2], item[1], pool, false)
    p.gone[item[1]] = NOW
  end
end

-- Release leases whose choose replies were lost (ARGV[2]): the client never had them.
local function forget_lost()
  if ARGV[2] == '' then return end
  local lost = {}
  for lease in string.gmatch(ARGV[2], '%S+') do lost[lease] = true end
  local pools = {}
  for _, fp in ipairs(need_keys(redis.call('SMEMBERS', RING))) do
    local rec = key_rec(fp)
    if rec then pools[rec.pool] = true end
  end
  for pool in pairs(pools) do
    local p = pool_rec(pool)
    if p then
      for lease in pairs(lost) do
        local call = p.out[lease]
        if call and not call.r then
          forget_call(call.f, lease, pool, false)
          local rec = key_rec(call.f)
          if rec then rec.calls = math.max(0, rec.calls - 1) end  -- never made
          lost[lease] = nil
        end
      end
    end
  end
end

-- At most what is left of a window that began at a refill: its limit, less every call chosen
-- since (answers may come out of order; this count never does).
local function window_bound(p, left)
  if not p.wstart or not p.limit then return left end
  return math.min(left, p.limit - (p.sent - p.wstart))
end

-- When each request stops counting, as its answer's reset says (_model.Budget.
-- _requests_counted): p.ends, of those answered since the last refill (the latest ``limit``),
-- {at the latest, at the earliest} in order; p.back, of those the freshest answer counts, the
-- ends before its reset, each bringing one request back; p.view {m, l, b}: the freshest
-- answer's mark, the requests it showed left and the ends of those it counted; p.sentat: when
-- its request left; p.bshared: a 429 met the pool paced by its bucket (others spend it).
-- Strings of 17 digits.  Kept only as _model.Budget._keeps_ends says:
local function keeps_ends(p)
  return p.limit and p.limit <= SLIDE_MOST and not bucket_rate(p)
end

local function request_ends(p, at, order)
  local limit = p.limit
  if not keeps_ends(p) then
    p.ends = nil
    return
  end
  local ends = {}
  for i, pair in ipairs(p.ends or {}) do ends[i] = {num(pair[1]), num(pair[2])} end
  ends[#ends + 1] = {at, order}
  table.sort(ends, function(x, y)
    if x[1] ~= y[1] then return x[1] < y[1] end
    return x[2] < y[2]
  end)
  local kept = {}
  for i = math.max(1, #ends - limit + 1), #ends do
    kept[#kept + 1] = {exact(ends[i][1]), exact(ends[i][2])}
  end
  p.ends = kept
end

local function requests_counted(p, left_at, reset, left)
  if not keeps_ends(p) or p.bshared then return {} end  -- (others spend it unseen)
  local counted = p.limit - left - 1
  if counted <= 0 then return {} end
  local ends = {}
  for _, pair in ipairs(p.ends or {}) do
    local at, order = num(pair[1]), num(pair[2])
    if left_at - OVERTAKE < order and at < reset then ends[#ends + 1] = at end
  end
  local out = {}
  for i = math.max(1, #ends - counted + 1), #ends do out[#out + 1] = ends[i] end
  return out
end

-- When a spent request budget has room for a call again (_model.Budget.requests_back_at).
local function back_at(p, reset)
  if not p.left then return reset end
  local index = math.ceil(-p.left)
  local back = p.back or {}
  if index < #back then return math.min(num(back[index + 1]), reset) end
  return reset
end

-- Past the server's reset, a pool's full budget is back, less the calls in flight (as
-- _model.Budget.refresh); before it, a request each time one the freshest answer counted
-- stops counting.  ``fresh``: calls already counted in ``sent`` that belong to the new window.
local function refresh(pool, p, fresh)
  local reset = p.reset or 0
  if reset > 0 and NOW >= reset and (p.refilled or 0) < reset then
    p.refilled, p.snap, p.wstart, p.wreset = reset, p.sent - fresh, p.sent - fresh, nil
    p.left = p.limit and (p.limit - (p.n - fresh)) or nil  -- fresh calls spend theirs after
    forget_returns(p)  -- (all back: counted no more)
    put('p:' .. pool, p)
  end
  if p.back and p.back[1] and NOW >= num(p.back[1]) then
    local back = nums(p.back)
    local returned = upto(back, NOW)
    p.back = texts(back, returned + 1)
    if p.left and p.limit then
      p.left = window_bound(p, math.min(p.left + returned, p.limit - (p.n - fresh)))
    end
    put('p:' .. pool, p)
  end
  local treset = p.treset or 0
  if treset > 0 and NOW >= treset and (p.trefilled or 0) < treset then
    p.trefilled = treset
    p.tleft = p.tlimit and (p.tlimit - (p.n - fresh) * (p.avg or 0)) or nil
    put('p:' .. pool, p)
  end
end

-- An answer shows budget left: members held only for a spent request budget are ready.
local function uncool_budget(pool)
  local p = pool_rec(pool)
  if not (p and p.held) then return end
  p.held = nil
  put('p:' .. pool, p)
  for _, fp in ipairs(member_recs(pool)) do
    local rec = key_rec(fp)
    if rec and rec.where == 'cooling' and rec.cause == CAUSE.requests_spent then
      make_ready(fp, rec)
    end
  end
end

-- A request leaves the pool (its ``sent`` counted already): it spends one request of the
-- pool's budget and a call's worth of tokens, and its pacing (as KeyRing._spend_request).
local function spend_request(pool, p)
  pace_spend(pool, p)
  refresh(pool, p, 1)
  local reset = p.reset or 0
  if p.left then
    p.left = window_bound(p, p.left - 1)
    local lo, hi = bucket_rate(p)
    if lo and p.bfull then  -- a refilling bucket admits the next call once it has room
      p.bfull = exact(math.max(num(p.bfull) or 0, NOW) + 1.0 / lo)
      local ready = bucket_ready(p, hi)
      if ready > NOW then cool_pool(pool, ready, 'budget spent (RPM)', CAUSE.requests_spent) end
    elseif p.left <= 0 then  -- until a request is back, or the server's reset, or until an
      -- answer says when that is
      local back = back_at(p, reset)
      cool_pool(pool, back > NOW and back or NOW + PROBE, 'budget spent (RPM)',
                CAUSE.requests_spent)
    end
  end
  local treset, avg = p.treset or 0, p.avg or 0
  if p.tleft then
    p.tleft = p.tleft - avg  -- the request's size is known only when it is reported
    if p.tleft < math.max(1, avg) then
      cool_pool(pool, treset > NOW and treset or NOW + PROBE, 'budget spent (TPM)',
                CAUSE.tokens_spent)
    end
  end
  local wait = bucket_take(p, 'r', 1, 1)
  if wait > 0 then cool_pool(pool, NOW + wait, 'paced (rpm)', CAUSE.paced) end
end

-- Make the cooling keys among ``fps`` ready, in the order they began cooling (as the ring's
-- heap pops them), then the disabled keys due to be checked again (as its second heap), each
-- pool brought up to date first.  Returns the keys made ready.
local function promote(fps)
  need_keys(fps)
  local due = {}
  for _, fp in ipairs(fps) do
    local rec = key_rec(fp)
    if rec and due_now(rec) then due[#due + 1] = fp end
  end
  table.sort(due, function(a, b)
    local x, y = key_rec(a), key_rec(b)
    if x.where ~= y.where then return x.where == 'cooling' end
    if x.untl ~= y.untl then return x.untl < y.untl end
    return (x.cseq or 0) < (y.cseq or 0)
  end)
  for _, fp in ipairs(due) do
    local rec = key_rec(fp)
    local p = pool_rec(rec.pool)
    if p then refresh(rec.pool, p, 0) end
    make_ready(fp, rec)
  end
  return due
end
