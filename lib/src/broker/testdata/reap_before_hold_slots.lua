-- reap.lua: put every message held by a worker whose lease expired back at
-- the front of its queue, and forget the worker. Atomic, so two live workers
-- reaping at once cannot restore a message twice.
--
-- KEYS[1]  lease ZSET (worker id -> lease deadline, ms)
-- KEYS[2]  landing-source HASH (worker id -> queue key feeding its landing list)
-- ARGV[1]  now (ms since the epoch)
-- ARGV[2]  in-flight HASH prefix (+ worker id)
-- ARGV[3]  landing LIST prefix (+ worker id)
-- ARGV[4]  heartbeat record prefix (+ worker id)
-- ARGV[5]  most workers to reap in this call
-- ARGV[6]  started-marker prefix (+ task id)
-- ARGV[7]  expiry of a started marker (ms)
-- ARGV[8]  running HASH prefix (+ worker id): start.lua's marks, task id ->
--          sequence number. A task marked started whose hold is still
--          there may still be running in the dead worker, so it gets a
--          started marker (revoke.lua refuses while it lasts), as a
--          STARTED record would have it.
-- ARGV[9]  held-count HASH prefix (+ worker id): fetch.lua's counts, gone
--          with the holds they counted
-- ARGV[10] held-sequence SET prefix (+ worker id): fetch.lua's record of
--          the in-flight HASH's sequence numbers, gone with the holds
-- Returns {workers reaped, messages restored}.
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[5]))
local restored = 0
for _, w in ipairs(dead) do
  local landing = ARGV[3] .. w
  local src = redis.call('HGET', KEYS[2], w)
  if src then
    -- taken last (a blocking wait's catch), so restored first: it ends up
    -- behind the held messages, which were taken before it
    local m = redis.call('LPOP', landing)
    while m do
      redis.call('RPUSH', src, m)
      restored = restored + 1
      m = redis.call('LPOP', landing)
    end
    redis.call('HDEL', KEYS[2], w)
  end
  local inflight = ARGV[2] .. w
  local entries = redis.call('HGETALL', inflight)
  local items = {}
  local held = {}
  for i = 1, #entries, 2 do
    items[#items + 1] = { tonumber(entries[i]), entries[i + 1] }
    held[entries[i]] = true
  end
  local running = ARGV[8] .. w
  local marks = redis.call('HGETALL', running)
  for i = 1, #marks, 2 do
    if held[marks[i + 1]] then
      redis.call('SET', ARGV[6] .. marks[i], '1', 'PX', ARGV[7])
    end
  end
  redis.call('DEL', running)
  -- newest first, so the oldest taken ends at the very front of its queue
  table.sort(items, function(a, b) return a[1] > b[1] end)
  for _, it in ipairs(items) do
    local v = it[2]
    local nl = string.find(v, '\n', 1, true)
    redis.call('RPUSH', string.sub(v, 1, nl - 1), string.sub(v, nl + 1))
    restored = restored + 1
  end
  redis.call('DEL', inflight)
  redis.call('DEL', ARGV[10] .. w)
  redis.call('DEL', ARGV[9] .. w)

  redis.call('ZREM', KEYS[1], w)
  redis.call('DEL', ARGV[4] .. w)
end
return { #dead, restored }
