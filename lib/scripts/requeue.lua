-- requeue.lua: hand messages a worker holds back to the front of their
-- queues (graceful shutdown, or prefetched messages never started). Reading
-- the record and deleting it is one step so a message is never both held and
-- queued, nor neither.
--
-- KEYS[1]  the worker's in-flight HASH
-- ARGV     sequence numbers, oldest first
-- Pushed back newest first, so the oldest ends at the very front.
local n = 0
for i = #ARGV, 1, -1 do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v then
    local nl = string.find(v, '\n', 1, true)
    redis.call('RPUSH', string.sub(v, 1, nl - 1), string.sub(v, nl + 1))
    redis.call('HDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
