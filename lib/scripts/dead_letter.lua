-- dead_letter.lua: record a message in its queue's dead-letter list and
-- settle the worker's hold on it in one step, so it is never lost between
-- the two nor left held after being dead-lettered.
--
-- KEYS[1]  the queue's dead-letter LIST (newest first)
-- KEYS[2]  the holding worker's in-flight HASH
-- ARGV[1]  the dead-letter record (JSON: reason, payload, ...)
-- ARGV[2]  sequence number to settle
-- Returns 0 without writing when the hold is already gone (an earlier
-- attempt whose reply was lost, or a reaper restored the message).
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then
  return 0
end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[2])
return 1
