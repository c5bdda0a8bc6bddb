-- Choose a key and mark it in flight, in one step.
-- ARGV[3] the lease (named by the client), ARGV[4] lease seconds, ARGV[5..] fingerprints to
-- avoid (taken only when no other key is ready).
-- Returns {1, fingerprint, pool, sent mark, the models held in the pool (cjson {model = seconds
-- held}, '' for none)}; or {0, seconds until the first cooling key is
-- ready (-1 when none is cooling), cjson {cooling = {reason = n}, disabled = {reason = n},
-- forbidden = all usable keys benched for a 403}}; or {-1} when the ring is unknown here
-- (never registered, expired, or the server restarted): register it, then ask again.

local lease, lease_seconds = ARGV[3], tonumber(ARGV[4])
forget_lost()

local avoid = {}
for i = 5, #ARGV do avoid[ARGV[i]] = true end

local function split(name) return string.match(name, '^([^|]+)|(.*)$') end

-- Append to ``ready`` the next 32 ready keys of the load set from ``offset`` that are not in
-- it yet nor placed anew by this script; returns how many were read.
local function read_ready(ready, offset)
  local listed = {}
  for _, item in ipairs(ready) do listed[item[1]] = true end
  local page = redis.call('ZRANGE', LOAD, 0, '+inf', 'BYSCORE', 'LIMIT', offset, 32,
                          'WITHSCORES')
  for i = 1, #page, 2 do
    if not listed[page[i]] and not ZADDS[page[i]] then
      ready[#ready + 1] = {page[i], tonumber(page[i + 1])}
    end
  end
  return #page / 2
end

-- Cooling keys come first in the load set, soonest first: those that are due are made ready
-- (all of them), then the ready keys are read in order.
local due_below = tonumber(cooling_score(NOW))
local batch = redis.call('ZRANGE', LOAD, '-inf', '+inf', 'BYSCORE', 'LIMIT', 0, 32,
                         'WITHSCORES')
local ready, due, seen = {}, {}, 0  -- seen: ready keys of the load set read so far
for i = 1, #batch, 2 do
  local score = tonumber(batch[i + 1])
  if score < 0 then
    if score <= due_below then due[#due + 1] = batch[i] end
  else
    ready[#ready + 1] = {batch[i], score}
    seen = seen + 1
  end
end
local more = #batch == 64  -- the load set may hold more ready keys than were read
if more and #due == 32 then
  -- Every key read is due, and more may be: make them all ready at once, in the order they
  -- began cooling (as the ring does), not only those a batch read by fingerprint.
  due = redis.call('ZRANGE', LOAD, '-inf', string.format('%.0f', due_below), 'BYSCORE')
end
if #due > 0 then
  local fps = {}
  for i, name in ipairs(due) do fps[i] = split(name) end
  for _, fp in ipairs(promote(fps)) do
    local rec = key_rec(fp)
    ready[#ready + 1] = {member(fp, rec), tonumber(ZADDS[member(fp, rec)])}
  end
  for _, name in ipairs(due) do
    local rec = key_rec(split(name))
    if not rec or rec.where == 'disabled' then zrem(name) end
  end
  if more then
    -- The batch was all or mostly cooling keys: the keys made ready just now come after the
    -- ready keys of their load (as in the ring), so read those too before choosing.
    seen = read_ready(ready, 0)
    more = seen == 32
  end
end

local chosen, fallback, chosen_pool
while true do
  table.sort(ready, function(a, b) return a[2] < b[2] end)
  for _, item in ipairs(ready) do
    local fp = split(item[1])
    if redis.call('SISMEMBER', RING, fp) == 1 then
      if not avoid[fp] then chosen = item[1]; break end
      fallback = fallback or item[1]
    end
  end
  if chosen or not more then break end
  -- None of this ring's, or all to avoid: read on.
  ready = {}
  local read = read_ready(ready, seen)
  seen = seen + read
  more = read == 32
end
chosen = chosen or fallback

if chosen then
  chosen, chosen_pool = split(chosen)
  need({'k:' .. chosen, 'p:' .. chosen_pool, 'seq'})  -- what a call reads, in one command
  local rec = key_rec(chosen)
  if not rec then
    flush()
    return {-1}
  end
  if rec.where ~= 'ready' or rec.pool ~= chosen_pool then
    -- A stale member (the state hash was lost and made anew, or an index outlived a move):
    -- drop it, place the key as its record says, and ask again.
    zrem(chosen .. '|' .. chosen_pool)
    if rec.where == 'ready' then place(chosen, rec) end
    if rec.where == 'cooling' then zadd(member(chosen, rec), cooling_score(rec.untl)) end
    flush()
    return {0, '0', cjson.encode({cooling = {}, disabled = {}, forbidden = false})}
  end
  local pool = rec.pool
  local p = pool_rec(pool) or new_pool()
  purge(pool)
  rec.calls = rec.calls + 1
  rec.n = rec.n + 1
  put('k:' .. chosen, rec)
  place(chosen, rec)
  p.n = p.n + 1
  p.sent = p.sent + 1
  local sent = p.sent
  p.out[lease] = {m = sent, e = NOW + lease_seconds, f = chosen, t = NOW}
  put('p:' .. pool, p)

  spend_request(pool, p)
  local lanes = lanes_held(p)
  flush()
  return {1, chosen, pool, sent, lanes}
end

-- No key is ready: when will one be, and why not now.
local first, usable, forbidden, recheck = nil, 0, 0, nil
local cooling, disabled = {}, {}
local fps = redis.call('SMEMBERS', RING)
if #fps == 0 then
  flush()
  return {-1}
end
need_keys(fps)
for _, fp in ipairs(fps) do
  local rec = key_rec(fp)
  if not rec then
    flush()
    return {-1}
  end
  purge(rec.pool)
  if rec.where == 'ready' or due_now(rec) then
    -- ready (or due) but not in the load set: put it back, and ask again
    make_ready(fp, rec)
    flush()
    touch(LOAD)
    return {0, '0', cjson.encode({cooling = {}, disabled = {}, forbidden = false})}
  end
  local reason = rec.reason ~= '' and rec.reason or rec.where
  if rec.where == 'cooling' then
    if not first or rec.untl < first then first = rec.untl end
    cooling[reason] = (cooling[reason] or 0) + 1
    usable = usable + 1
    if rec.forbidden == 1 then forbidden = forbidden + 1 end
  else
    disabled[reason] = (disabled[reason] or 0) + 1
    if rec.untl > 0 and (not recheck or rec.untl < recheck) then recheck = rec.untl end
  end
end
flush()
local wait = first and tostring(math.max(0, first - NOW)) or '-1'
return {0, wait, cjson.encode({
  cooling = cooling, disabled = disabled, forbidden = usable > 0 and forbidden == usable,
  recheck = recheck and math.max(0, recheck - NOW)})}
