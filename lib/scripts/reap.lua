-- reap.lua: put every message held by a worker whose lease expired back at
-- the front of its queue, and forget the worker. Atomic, so two live workers
-- reaping at once cannot restore a message twice.
--
-- KEYS[1]  lease ZSET (worker id -> lease deadline, ms)
-- KEYS[2]  landing-source HASH (worker id -> queue key feeding its landing list)
-- ARGV[1]  now (ms since the epoch)
-- ARGV[2]  in-flight HASH prefix (+ worker id): hold number -> message
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
-- ARGV[11] hold-queue HASH prefix (+ worker id): field 'queues', the JSON
--          array of queue keys a hold number's slot names (see fetch.lua).
--          The same key held an earlier build's holds, as
--          "<queue key>\n<message>" values: those are restored from here.
-- ARGV[12] a hold number's slot unit (slot = floor(number / unit))
-- Returns {workers reaped, messages restored}. A worker whose holds cannot
-- be restored (a hold's queue is not named: a server that lost keys) is
-- left as it is, and logged.
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[5]))
local restored = 0
local reaped = 0
local unit = tonumber(ARGV[12])
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
  local legacy = ARGV[11] .. w
  -- items: {order, queue key, message}
  local items = {}
  local held = {}
  local entries = redis.call('HGETALL', inflight)
  local named = redis.call('HGET', legacy, 'queues')
  local queues = named and cjson.decode(named) or {}
  local lost = nil
  for i = 1, #entries, 2 do
    local number = tonumber(entries[i])
    local slot = math.floor(number / unit)
    local key = queues[slot + 1]
    if not key then
      lost = entries[i]
      break
    end
    items[#items + 1] = { number - slot * unit, key, entries[i + 1] }
    held[entries[i]] = true
  end
  if lost then
    -- fetch.lua names a hold's queue in the same step as the hold, so this
    -- is only a server that lost keys (eviction): the holds stay, untouched.
    redis.log(redis.LOG_WARNING, 'taskstack reap: worker ' .. w .. ' holds ' .. lost ..
      ' but its queue is not named in ' .. legacy .. '; its holds are left in ' .. inflight)
  else
    -- An earlier build's holds: "<queue key>\n<message>", under the
    -- hold-queue key's name (its 'queues' field is not a hold).
    entries = redis.call('HGETALL', legacy)
    for i = 1, #entries, 2 do
      if entries[i] ~= 'queues' then
        local v = entries[i + 1]
        local nl = string.find(v, '\n', 1, true)
        items[#items + 1] = { tonumber(entries[i]), string.sub(v, 1, nl - 1), string.sub(v, nl + 1) }
        held[entries[i]] = true
      end
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
      redis.call('RPUSH', it[2], it[3])
      restored = restored + 1
    end
    redis.call('DEL', inflight)
    redis.call('DEL', legacy)
    redis.call('DEL', ARGV[10] .. w)
    redis.call('DEL', ARGV[9] .. w)

    redis.call('ZREM', KEYS[1], w)
    redis.call('DEL', ARGV[4] .. w)
    reaped = reaped + 1
  end
end
return { reaped, restored }
