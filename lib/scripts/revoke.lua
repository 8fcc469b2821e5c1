-- revoke.lua: revoke a task that has not started. The check of the task's
-- state, the revoked marker workers look for (start.lua) and the REVOKED
-- record are one step, so a task is either revoked before it starts or the
-- revocation is refused.
--
-- A task is started when its record says so (STARTED, written by
-- start.lua when asked or when results live on another server), when a
-- leased worker's running HASH maps its id to a hold that worker's
-- in-flight HASH still has (start.lua's per-batch mark), or when its started
-- marker exists (reap.lua's, for the marks of a worker it reaped).
--
-- With results in PostgreSQL (ARGV[6] = '1') the record is not here: the
-- caller checked the row's state first, and this script is only the
-- exclusion with start.lua: refused when a mark or started marker says the
-- task runs, else the revoked marker is set (for ARGV[2] ms) and the
-- caller then stores the REVOKED row (see backend/postgres/mod.rs).
--
-- KEYS[1]  the task's result record (unused when ARGV[6] is '1')
-- KEYS[2]  the task's revoked marker
-- KEYS[3]  the task's started marker
-- KEYS[4]  lease ZSET (worker id -> lease deadline), or any key when
--          ARGV[3] is '' (results on another Redis server than the broker)
-- ARGV[1]  the REVOKED record (JSON; unused when ARGV[6] is '1')
-- ARGV[2]  least expiry of the marker and record (ms); a record that would
--          live longer (a task due far in the future) keeps its expiry
-- ARGV[3]  in-flight HASH prefix (+ worker id), or ''
-- ARGV[4]  the task id
-- ARGV[5]  running HASH prefix (+ worker id)
-- ARGV[6]  '1': results in PostgreSQL (marker only), '' otherwise
-- ARGV[7]  hold-queue HASH prefix (+ worker id), where a worker of an
--          earlier build keeps its holds, or ''
-- Returns {outcome, previous status}: outcome is 'revoked', 'already'
-- (revoked before), 'unknown' (no record: never enqueued through a
-- producer that records PENDING, or expired), 'refused' (the task has
-- started or finished) or, with ARGV[6] = '1', 'marked' (the marker is set;
-- the caller stores the record).
local function running()
  if redis.call('EXISTS', KEYS[3]) == 1 then
    return true
  end
  if ARGV[3] ~= '' then
    for _, w in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
      local seq = redis.call('HGET', ARGV[5] .. w, ARGV[4])
      if seq and (redis.call('HEXISTS', ARGV[3] .. w, seq) == 1
          or redis.call('HEXISTS', ARGV[7] .. w, seq) == 1) then
        return true
      end
    end
  end
  return false
end

if ARGV[6] == '1' then
  if running() then
    return { 'refused', 'STARTED' }
  end
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
  return { 'marked', '' }
end

local raw = redis.call('GET', KEYS[1])
if not raw then
  return { 'unknown', '' }
end
local ok, rec = pcall(cjson.decode, raw)
local status = ''
if ok and type(rec) == 'table' and type(rec['status']) == 'string' then
  status = rec['status']
end
if status == 'REVOKED' then
  return { 'already', status }
end
if status ~= 'PENDING' and status ~= 'RECEIVED' and status ~= 'RETRY' then
  return { 'refused', status }
end
if running() then
  return { 'refused', 'STARTED' }
end
local ms = tonumber(ARGV[2])
local left = redis.call('PTTL', KEYS[1])
if left > ms then
  ms = left
end
redis.call('SET', KEYS[2], '1', 'PX', ms)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ms)
redis.call('PUBLISH', KEYS[1], ARGV[1])
return { 'revoked', status }
