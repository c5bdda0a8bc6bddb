-- Make the keys of one configuration known, and refresh the expiry of everything they use
-- (every process runs this again every few minutes).  Idempotent: a key
-- already known keeps its state (a key disabled by another worker stays disabled).
-- ARGV[3..], 9 values per key: fingerprint, weight, pool ('' for the key's own or learned
-- pool), rpm, tpm ('' when not paced), and this process's own knowledge to merge (after
-- Redis was unreachable): disabled reason, seconds of cooldown left (of a disabled key: until
-- it is checked again), its reason ('' when none), and the cause of either (a CAUSE value).
-- Returns {the number of keys that were new here, how many of them all are disabled, seconds
-- until the first of those is checked again (-1: none will be)}.

forget_lost()
local fps = {}
for i = 3, #ARGV, 9 do fps[#fps + 1] = ARGV[i] end
need_keys(fps)
local new, disabled, recheck = 0, 0, nil
for i = 3, #ARGV, 9 do
  local fp, weight, pool = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local rpm, tpm = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  local rec = key_rec(fp)
  local retune = false
  if not rec then
    local name = pool ~= '' and pool or ('key:' .. fp)
    rec = {where = 'ready', untl = 0, reason = '', cause = '', forbidden = 0, n = 0,
           weight = weight, pool = name, fixed = pool ~= '', own = pool == '',
           rpm = rpm, tpm = tpm, calls = 0, successes = 0, rate_limits = 0, failures = 0}
    local joined = members(name)
    joined[#joined + 1] = fp
    put('m:' .. name, joined)
    put('k:' .. fp, rec)
    place(fp, rec)
    new = new + 1
  else
    retune = rec.rpm ~= rpm or rec.tpm ~= tpm
    rec.weight, rec.rpm, rec.tpm = weight, rpm, tpm
    put('k:' .. fp, rec)
    if pool ~= '' then
      move(fp, rec, pool)
      rec.fixed = true
    end
    -- Heal the load set if it lost the key (it can only be missing, never wrong, after a
    -- crash); a ready key is placed again with its level.
    if rec.where == 'ready' then
      if not redis.call('ZSCORE', LOAD, member(fp, rec)) then place(fp, rec) end
    elseif rec.where == 'cooling' then
      zadd(member(fp, rec), cooling_score(rec.untl))
    end
  end
  pace(rec.pool, rpm, tpm, retune)
  local cause = ARGV[i + 8]
  local left = tonumber(ARGV[i + 6])
  if ARGV[i + 5] ~= '' then
    disable(fp, rec, ARGV[i + 5], cause, left and NOW + left or 0)
  elseif left then
    cool(fp, rec, NOW + left, ARGV[i + 7], 0, cause)
  end
  if rec.where == 'disabled' then
    disabled = disabled + 1
    if rec.untl > 0 and (not recheck or rec.untl < recheck) then recheck = rec.untl end
  end
end
chunked('SADD', RING, fps)
flush()
for _, key in ipairs({STATE, LOAD, RING}) do touch(key) end
return {new, disabled, recheck and tostring(math.max(0, recheck - NOW)) or '-1'}
