-- delay.lua: park a message until it is due (ETA, countdown, retry backoff)
-- and, when a worker held it, settle that hold in the same step, so the
-- message is always in exactly one place.
--
-- KEYS[1]  delayed ZSET (id -> due, ms)
-- KEYS[2]  delayed-message HASH (id -> "<queue key>\n<message>")
-- KEYS[3]  the holding worker's in-flight HASH (any key when ARGV[5] is '')
-- KEYS[4]  delayed-count HASH (queue name -> parked messages), kept here so
--          counting a queue's parked messages never scans KEYS[2]
-- ARGV[1]  due time (ms since the epoch)
-- ARGV[2]  a fresh unique id for this parked message
-- ARGV[3]  queue key to push to when due
-- ARGV[4]  the message
-- KEYS[5]  the holding worker's running HASH (start.lua's marks; any key
--          when ARGV[6] is '')
-- ARGV[5]  sequence number to settle in KEYS[3], or ''
-- ARGV[6]  the task id whose start mark goes with the hold (a retry after
--          the task started), or ''; deleted only while it names this
--          hold, so another hold of the same task id keeps its mark
-- Returns 1 when parked, 0 when the hold was already gone (settled by an
-- earlier attempt whose reply was lost, or restored by a reaper): parking
-- again would duplicate the message.
if ARGV[5] ~= '' and redis.call('HEXISTS', KEYS[3], ARGV[5]) == 0 then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3] .. '\n' .. ARGV[4])
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
if ARGV[5] ~= '' then
  redis.call('HDEL', KEYS[3], ARGV[5])
  if ARGV[6] ~= '' and redis.call('HGET', KEYS[5], ARGV[6]) == ARGV[5] then
    redis.call('HDEL', KEYS[5], ARGV[6])
  end
end
-- The queue name is the key without Celery's priority suffix ("\x06\x16<n>").
local q = ARGV[3]
local sep = string.find(q, '\6\22', 1, true)
if sep then q = string.sub(q, 1, sep - 1) end
redis.call('HINCRBY', KEYS[4], q, 1)
return 1
