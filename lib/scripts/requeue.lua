-- requeue.lua: hand messages a worker holds back to the front of their
-- queues (graceful shutdown, or prefetched messages never started). Reading
-- the record and deleting it is one step so a message is never both held and
-- queued, nor neither.
--
-- KEYS[1]  the worker's in-flight HASH
-- KEYS[2]  the worker's held-count HASH (queue name -> messages held, see
--          fetch.lua), lowered by what was handed back
-- KEYS[3]  the worker's held-sequence SET (see fetch.lua)
-- KEYS[4]  the worker's hold-queue HASH (see fetch.lua)
-- ARGV[1]  a hold number's slot unit (see fetch.lua)
-- ARGV[2..] hold numbers, oldest first
-- Pushed back newest first, so the oldest ends at the very front.
local n = 0
local per_queue = {}
local unit = tonumber(ARGV[1])
local queues = nil
for i = #ARGV, 2, -1 do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v then
    if not queues then
      local named = redis.call('HGET', KEYS[4], 'queues')
      queues = named and cjson.decode(named) or {}
    end
    local key = queues[math.floor(tonumber(ARGV[i]) / unit) + 1]
    if not key then
      return redis.error_reply('ERR hold ' .. ARGV[i] .. ': its queue is not named in ' .. KEYS[4])
    end
    redis.call('RPUSH', key, v)
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
