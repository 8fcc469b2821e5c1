-- start.lua: the step between "a worker holds the message" and "the task
-- runs", for a batch of tasks. A task revoked meanwhile is not started;
-- every other one is recorded STARTED. Atomic with revoke.lua on the same
-- keys, so a revocation either lands first (the task is skipped) or finds
-- the task STARTED and is refused: a revoke the API reports as done never
-- races a run.
--
-- Keys are derived from task ids (like Celery's own result keys):
--   <ARGV[1]><id>  revoked marker (STRING with expiry)
--   <ARGV[2]><id>  the task's result record
-- ARGV[1]  revoked-marker prefix
-- ARGV[2]  result-key prefix
-- ARGV[3]  expiry of the STARTED record (ms)
-- ARGV[4], ARGV[5], ...  pairs: task id, its STARTED record (JSON)
-- Returns one integer per task, in order: 1 = run it, 0 = revoked, skip it.
local out = {}
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('EXISTS', ARGV[1] .. id) == 1 then
    out[#out + 1] = 0
  else
    redis.call('SET', ARGV[2] .. id, ARGV[i + 1], 'PX', ARGV[3])
    out[#out + 1] = 1
  end
end
return out
