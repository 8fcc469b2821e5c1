-- start.lua: the step between "a worker holds the message" and "the task
-- runs", for a batch of tasks. A task revoked meanwhile is not started,
-- nor is one whose hold the worker lost (its lease expired and a reaper
-- put the message back on its queue: another worker may run it now);
-- every other one is recorded STARTED. Atomic with revoke.lua on the same
-- keys, so a revocation either lands first (the task is skipped) or finds
-- the task STARTED and is refused: a revoke the API reports as done never
-- races a run. Atomic with reap.lua too when results live on the broker's
-- server: a message restored to its queue is never also started here.
--
-- Keys are derived from task ids (like Celery's own result keys):
--   <ARGV[1]><id>  revoked marker (STRING with expiry)
--   <ARGV[2]><id>  the task's result record
-- ARGV[1]  revoked-marker prefix
-- ARGV[2]  result-key prefix
-- ARGV[3]  expiry of the STARTED record (ms)
-- ARGV[4]  the worker's in-flight HASH, or '' when results live on another
--          server (the worker then checks its holds there first)
-- ARGV[5], ARGV[6], ARGV[7], ...  triples: task id, its STARTED record
--          (JSON), the sequence number of its hold
-- Returns one integer per task, in order: 1 = run it, 0 = revoked, skip
-- it, 2 = no longer held, do not run it.
local out = {}
local inflight = ARGV[4]
for i = 5, #ARGV, 3 do
  local id = ARGV[i]
  if inflight ~= '' and redis.call('HEXISTS', inflight, ARGV[i + 2]) == 0 then
    out[#out + 1] = 2
  elseif redis.call('EXISTS', ARGV[1] .. id) == 1 then
    out[#out + 1] = 0
  else
    redis.call('SET', ARGV[2] .. id, ARGV[i + 1], 'PX', ARGV[3])
    out[#out + 1] = 1
  end
end
return out
