-- revoke.lua: revoke a task that has not started. The check of the task's
-- state, the revoked marker workers look for (start.lua) and the REVOKED
-- record are one step, so a task is either revoked before it starts or the
-- revocation is refused.
--
-- KEYS[1]  the task's result record
-- KEYS[2]  the task's revoked marker
-- ARGV[1]  the REVOKED record (JSON)
-- ARGV[2]  least expiry of the marker and record (ms); a record that would
--          live longer (a task due far in the future) keeps its expiry
-- Returns {outcome, previous status}: outcome is 'revoked', 'already'
-- (revoked before), 'unknown' (no record: never enqueued through a
-- producer that records PENDING, or expired) or 'refused' (the task has
-- started or finished).
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
local ms = tonumber(ARGV[2])
local left = redis.call('PTTL', KEYS[1])
if left > ms then
  ms = left
end
redis.call('SET', KEYS[2], '1', 'PX', ms)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ms)
redis.call('PUBLISH', KEYS[1], ARGV[1])
return { 'revoked', status }
