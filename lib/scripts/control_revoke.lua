-- control_revoke.lua: a revoke from Celery's remote control (`celery
-- control revoke`, `AsyncResult.revoke()`). Unlike revoke.lua it applies
-- to tasks taskstack never recorded (a Celery client stores no PENDING
-- record): the revoked marker start.lua looks for is set in any case, so
-- every worker skips the task whenever it arrives, within the marker's
-- expiry, and across restarts. The REVOKED record is stored unless the task
-- has started or finished (then its own record stands; a running task is
-- stopped by `terminate`, and records REVOKED itself).
--
-- KEYS[1]  the task's result record
-- KEYS[2]  the task's revoked marker
-- ARGV[1]  the REVOKED record (JSON)
-- ARGV[2]  least expiry of the marker and record (ms)
-- Returns the previous status ('' when there was no record).
local raw = redis.call('GET', KEYS[1])
local status = ''
if raw then
  local ok, rec = pcall(cjson.decode, raw)
  if ok and type(rec) == 'table' and type(rec['status']) == 'string' then
    status = rec['status']
  end
end
local ms = tonumber(ARGV[2])
local left = redis.call('PTTL', KEYS[1])
if left > ms then
  ms = left
end
redis.call('SET', KEYS[2], '1', 'PX', ms)
if status == '' or status == 'PENDING' or status == 'RECEIVED' or status == 'RETRY' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ms)
  redis.call('PUBLISH', KEYS[1], ARGV[1])
end
return status
