-- start.lua: the step between "a worker holds the message" and "the task
-- runs", for a batch of tasks. A task revoked meanwhile is not started,
-- nor is one whose hold the worker lost (its lease expired and a reaper
-- put the message back on its queue: another worker may run it now).
-- Every other one is marked started, atomically with revoke.lua, so a
-- revocation either lands first (the task is skipped) or finds the task
-- started and is refused: a revoke the API reports as done never races a
-- run. Atomic with reap.lua too when results live on the broker's server:
-- a message restored to its queue is never also started here.
--
-- How a task is marked started:
--   * with the worker's in-flight HASH (results on the broker's server):
--     one HSET per batch into the worker's running HASH (ARGV[6]: task id
--     -> sequence number of its hold). revoke.lua looks there (in every
--     leased worker's) and counts a mark only while its hold exists; the
--     acknowledgement deletes it, and reap.lua turns the marks of a dead
--     worker into started markers. The STARTED result record is written
--     only when ARGV[5] is '1' (Celery's task_track_started).
--   * without it (results on another server, or no worker): the STARTED
--     record is always written; it is what revoke.lua refuses on.
--
-- Keys are derived from task ids (like Celery's own result keys):
--   <ARGV[1]><id>  revoked marker (STRING with expiry)
--   <ARGV[2]><id>  the task's result record
-- ARGV[1]  revoked-marker prefix
-- ARGV[2]  result-key prefix
-- ARGV[3]  expiry of the STARTED record (ms)
-- ARGV[4]  the worker's in-flight HASH, or '' when results live on another
--          server (the worker then checks its holds there first)
-- ARGV[5]  '1': write STARTED records; '0': only when ARGV[4] is ''
-- ARGV[6]  the worker's running HASH (any value when ARGV[4] is '')
-- ARGV[7]  the worker's held-sequence SET (any value when ARGV[4] is '')
-- ARGV[8], ARGV[9], ARGV[10], ...  triples: task id, its STARTED record
--          (JSON, '' when none is written), the sequence number of its hold
-- Returns one integer per task, in order: 1 = run it, 0 = revoked, skip
-- it, 2 = no longer held, do not run it, 3 = already finished, skip it.
--
-- Already finished: where STARTED records carry the exclusion (ARGV[4]
-- is ''), a task whose result record is final (SUCCESS, FAILURE or
-- REVOKED) is a second delivery of a message already run to the end (a
-- broker that redelivered after a lost acknowledgement, the beat's outbox
-- published again after a crash): one MGET per batch finds it, and the
-- worker acknowledges the message without running it or touching the
-- record. A STARTED, RETRY or PENDING record runs the task (a worker that
-- died mid-run, a retry).
local first = 8
local inflight = ARGV[4]
local record = ARGV[5] == '1' or inflight == ''
local n = (#ARGV - first + 1) / 3
local out = {}

-- 1. Holds: one SMISMEMBER for the batch. The held-sequence set names
-- the in-flight hash's fields (every script that adds or removes a hold
-- changes both, see fetch.lua), so it answers without reading a held
-- message. What can part them leaves one containing the other: the set
-- expires (a worker whose heartbeat stopped for three lease lengths:
-- holds without numbers, and no number without its hold, since the set is
-- empty then), or the whole hash is deleted without the set (numbers
-- without holds, none the other way), which reapers of earlier builds
-- did; they now stop before touching this build's holds (see fetch.lua's
-- KEYS[6]). So equal sizes mean equal contents; when they differ the
-- hash itself is read.
if inflight ~= '' then
  local seqs = {}
  for i = first, #ARGV, 3 do seqs[#seqs + 1] = ARGV[i + 2] end
  if redis.call('SCARD', ARGV[7]) == redis.call('HLEN', inflight) then
    local held = redis.call('SMISMEMBER', ARGV[7], unpack(seqs))
    for k = 1, n do out[k] = held[k] == 1 and 1 or 2 end
  else
    local held = redis.call('HMGET', inflight, unpack(seqs))
    for k = 1, n do out[k] = held[k] and 1 or 2 end
  end
else
  for k = 1, n do out[k] = 1 end
end

-- 2. Revocations: one multi-key EXISTS for the tasks still held; one
-- lookup per task only when it finds any.
local markers = {}
for k = 1, n do
  if out[k] == 1 then markers[#markers + 1] = ARGV[1] .. ARGV[first + 3 * (k - 1)] end
end
if #markers > 0 and redis.call('EXISTS', unpack(markers)) > 0 then
  for k = 1, n do
    if out[k] == 1 and redis.call('EXISTS', ARGV[1] .. ARGV[first + 3 * (k - 1)]) == 1 then
      out[k] = 0
    end
  end
end

-- 2b. Already finished (only without the in-flight hash, see above).
if inflight == '' then
  local ids, at = {}, {}
  for k = 1, n do
    if out[k] == 1 then
      ids[#ids + 1] = ARGV[2] .. ARGV[first + 3 * (k - 1)]
      at[#at + 1] = k
    end
  end
  if #ids > 0 then
    local recs = redis.call('MGET', unpack(ids))
    for j = 1, #ids do
      local rec = recs[j]
      if rec and (string.find(rec, '"status"%s*:%s*"SUCCESS"')
          or string.find(rec, '"status"%s*:%s*"FAILURE"')
          or string.find(rec, '"status"%s*:%s*"REVOKED"')) then
        out[at[j]] = 3
      end
    end
  end
end

-- 3. Mark the rest started: one HSET for the batch, and the STARTED
-- records when asked (or when there is no in-flight hash to mark).
local fields = {}
for k = 1, n do
  if out[k] == 1 then
    local i = first + 3 * (k - 1)
    if inflight ~= '' then
      fields[#fields + 1] = ARGV[i]
      fields[#fields + 1] = ARGV[i + 2]
    end
    if record then
      redis.call('SET', ARGV[2] .. ARGV[i], ARGV[i + 1], 'PX', ARGV[3])
    end
  end
end
if #fields > 0 then
  redis.call('HSET', ARGV[6], unpack(fields))
end
return out
