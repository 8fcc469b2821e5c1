-- dead_letter.lua: record a message in its queue's dead-letter list and
-- settle the worker's hold on it in one step, so it is never lost between
-- the two nor left held after being dead-lettered.
--
-- KEYS[1]  the queue's dead-letter LIST (newest first)
-- KEYS[2]  the holding worker's in-flight HASH
-- KEYS[3]  the holding worker's held-count HASH (queue name -> messages
--          held, see fetch.lua), lowered by one
-- KEYS[4]  the holding worker's running HASH (start.lua's marks)
-- KEYS[5]  the holding worker's held-sequence SET (see fetch.lua)
-- KEYS[6]  the holding worker's hold-queue HASH (see fetch.lua)
-- ARGV[1]  the dead-letter record (JSON: reason, payload, ...)
-- ARGV[2]  sequence number to settle
-- ARGV[3]  '' or a key: the message is too large to have been sent to the
--          worker, so it is copied from the hold to this STRING key (the
--          record names it as `payload_key`) instead of being in the record
-- ARGV[4]  the task id, or '' when unknown: its start mark is deleted with
--          the hold when it names this hold (a task that started and then
--          gave up: rejected, retries exhausted), so the hash does not grow
-- ARGV[5]  a hold number's slot unit (see fetch.lua)
-- Returns 0 without writing when the hold is already gone (an earlier
-- attempt whose reply was lost, or a reaper restored the message).
-- Read only when it is to be copied.
local held
if ARGV[3] ~= '' then
  held = redis.call('HGET', KEYS[2], ARGV[2])
elseif redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then
  held = true
end
if not held then
  return 0
end
-- The hold is the message; its number's slot names its queue.
local named = redis.call('HGET', KEYS[6], 'queues')
local q = named and cjson.decode(named)[math.floor(tonumber(ARGV[2]) / tonumber(ARGV[5])) + 1]
if not q then
  return redis.error_reply('ERR hold ' .. ARGV[2] .. ': its queue is not named in ' .. KEYS[6])
end
if ARGV[3] ~= '' then
  redis.call('SET', ARGV[3], held)
end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('SREM', KEYS[5], ARGV[2])
local cut = string.find(q, '\6\22', 1, true)
if cut then q = string.sub(q, 1, cut - 1) end
redis.call('HINCRBY', KEYS[3], q, -1)
if ARGV[4] ~= '' and redis.call('HGET', KEYS[4], ARGV[4]) == ARGV[2] then
  redis.call('HDEL', KEYS[4], ARGV[4])
end
return 1
