-- delay.lua: park a message until it is due (ETA, countdown, retry backoff)
-- and, when a worker held it, settle that hold in the same step, so the
-- message is always in exactly one place.
--
-- KEYS[1]  parked ZSET (parked id -> due, ms). A parked id is
--          "<ARGV[2]>\n<queue key>", so the message is stored alone and
--          promote.lua makes one Lua string of it, not two (Redis hashes
--          every byte of every string a script makes). Builds before this
--          layout parked in another ZSET and HASH, which promote.lua reads.
-- KEYS[2]  parked-message HASH (parked id -> the message)
-- KEYS[3]  the holding worker's in-flight HASH (any key when ARGV[5] is '')
-- KEYS[4]  delayed-count HASH (queue name -> parked messages), kept here so
--          counting a queue's parked messages never scans KEYS[2]
-- KEYS[5]  the holding worker's held-count HASH (queue name -> messages
--          held, see fetch.lua; any key when ARGV[5] is ''), lowered by one
-- KEYS[6]  the holding worker's running HASH (start.lua's marks; any key
--          when ARGV[6] is '')
-- KEYS[7]  the holding worker's held-sequence SET (see fetch.lua; any key
--          when ARGV[5] is '')
-- KEYS[8]  the holding worker's hold-queue HASH (see fetch.lua; any key
--          when ARGV[5] is '')
-- ARGV[1]  due time (ms since the epoch)
-- ARGV[2]  a fresh unique id for this parked message
-- ARGV[3]  queue key to push to when due
-- ARGV[4]  the message
-- ARGV[5]  sequence number to settle in KEYS[3], or ''
-- ARGV[6]  the task id whose start mark goes with the hold (a retry after
--          the task started), or ''; deleted only while it names this
--          hold, so another hold of the same task id keeps its mark
-- ARGV[7]  a hold number's slot unit (see fetch.lua)
-- Returns 1 when parked, 0 when the hold was already gone (settled by an
-- earlier attempt whose reply was lost, or restored by a reaper): parking
-- again would duplicate the message.
-- The queue a hold was counted in: its number's slot names it (a retry
-- may go to another queue).
local held_in
if ARGV[5] ~= '' then
  if redis.call('HEXISTS', KEYS[3], ARGV[5]) == 0 then
    return 0
  end
  local named = redis.call('HGET', KEYS[8], 'queues')
  held_in = named and cjson.decode(named)[math.floor(tonumber(ARGV[5]) / tonumber(ARGV[7])) + 1]
  if not held_in then
    return redis.error_reply('ERR hold ' .. ARGV[5] .. ': its queue is not named in ' .. KEYS[8])
  end
end
local parked = ARGV[2] .. '\n' .. ARGV[3]
redis.call('HSET', KEYS[2], parked, ARGV[4])
redis.call('ZADD', KEYS[1], ARGV[1], parked)
-- A queue name is its key without Celery's priority suffix ("\x06\x16<n>").
local function name_of(key)
  local sep = string.find(key, '\6\22', 1, true)
  if sep then return string.sub(key, 1, sep - 1) end
  return key
end
if held_in then
  redis.call('HDEL', KEYS[3], ARGV[5])
  redis.call('SREM', KEYS[7], ARGV[5])
  redis.call('HINCRBY', KEYS[5], name_of(held_in), -1)
  if ARGV[6] ~= '' and redis.call('HGET', KEYS[6], ARGV[6]) == ARGV[5] then
    redis.call('HDEL', KEYS[6], ARGV[6])
  end
end
redis.call('HINCRBY', KEYS[4], name_of(ARGV[3]), 1)
return 1
