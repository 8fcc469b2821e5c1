-- ack.lua: release a worker's holds on settled messages and lower its
-- held counts (see fetch.lua) by what was really released, in one step, so
-- the counts queue_stats.lua reads stay exact even when an acknowledgement
-- is repeated (a lost reply) or a reaper restored the message first.
--
-- KEYS[1]  the worker's in-flight HASH (hold number -> message)
-- KEYS[2]  the worker's held-count HASH (queue name -> messages held)
-- KEYS[3]  the worker's held-sequence SET (see fetch.lua)
-- KEYS[4]  the worker's hold-queue HASH (see fetch.lua)
-- ARGV[1]  a hold number's slot unit (see fetch.lua)
-- ARGV[2..] groups: queue name, how many hold numbers follow, those
--          numbers; an empty queue name means "not known to the caller":
--          each number's slot names its queue in KEYS[4]
-- Returns how many holds were released.
local released = 0
local function lower(q, k)
  if k > 0 then
    redis.call('HINCRBY', KEYS[2], q, -k)
    released = released + k
  end
end
local unit = tonumber(ARGV[1])
local queues = nil
local i = 2
while i <= #ARGV do
  local q = ARGV[i]
  local k = tonumber(ARGV[i + 1])
  local first, last = i + 2, i + 1 + k
  redis.call('SREM', KEYS[3], unpack(ARGV, first, last))
  if q ~= '' then
    lower(q, redis.call('HDEL', KEYS[1], unpack(ARGV, first, last)))
  else
    if not queues then
      local named = redis.call('HGET', KEYS[4], 'queues')
      queues = named and cjson.decode(named) or {}
    end
    local per_queue = {}
    for j = first, last do
      if redis.call('HDEL', KEYS[1], ARGV[j]) == 1 then
        local name = queues[math.floor(tonumber(ARGV[j]) / unit) + 1]
        if name then
          local cut = string.find(name, '\6\22', 1, true)
          if cut then name = string.sub(name, 1, cut - 1) end
          per_queue[name] = (per_queue[name] or 0) + 1
        end
      end
    end
    for name, n in pairs(per_queue) do lower(name, n) end
  end
  i = last + 1
end
return released
