-- requeue.lua: hand messages a worker holds back to the front of their
-- queues (graceful shutdown, or prefetched messages never started). Reading
-- the record and deleting it is one step so a message is never both held and
-- queued, nor neither.
--
-- KEYS[1]  the worker's in-flight HASH
-- KEYS[2]  the worker's held-count HASH (queue name -> messages held, see
--          fetch.lua), lowered by what was handed back
-- KEYS[3]  the worker's held-sequence SET (see fetch.lua)
-- ARGV     sequence numbers, oldest first
-- Pushed back newest first, so the oldest ends at the very front.
local n = 0
local per_queue = {}
for i = #ARGV, 1, -1 do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v then
    local nl = string.find(v, '\n', 1, true)
    local key = string.sub(v, 1, nl - 1)
    redis.call('RPUSH', key, string.sub(v, nl + 1))
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('SREM', KEYS[3], ARGV[i])
    n = n + 1
    local cut = string.find(key, '\6\22', 1, true)
    if cut then key = string.sub(key, 1, cut - 1) end
    per_queue[key] = (per_queue[key] or 0) + 1
  end
end
for q, k in pairs(per_queue) do
  redis.call('HINCRBY', KEYS[2], q, -k)
end
return n
