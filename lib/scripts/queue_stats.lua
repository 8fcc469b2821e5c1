-- queue_stats.lua: how many messages of each queue are ready, parked
-- (ETA, countdown, retry backoff), held by workers and dead-lettered. One
-- script so the figures are one consistent snapshot: a message moving
-- between places is never counted twice or missed.
--
-- KEYS[1]  leases ZSET (worker id -> lease deadline)
-- KEYS[2]  landing-source HASH (worker id -> queue key feeding its landing list)
-- KEYS[3]  delayed-count HASH (queue name -> parked messages)
-- ARGV[1]  in-flight HASH prefix (+ worker id)
-- ARGV[2]  landing LIST prefix (+ worker id)
-- ARGV[3]  dead-letter LIST prefix (+ queue name)
-- ARGV[4]  now (ms since the epoch)
-- ARGV[5]  held-count HASH prefix (+ worker id)
-- ARGV[6]  hold-queue HASH prefix (+ worker id): field 'queues' names the
--          queue of a hold number's slot (see fetch.lua); under the same
--          key an earlier build kept its holds ("<queue key>\n<message>")
-- ARGV[7]  a hold number's slot unit (see fetch.lua)
-- ARGV[8..]  queue names
-- Returns, per queue in order, {ready, delayed, in_flight, dead, oldest}:
-- oldest is how long (ms) the oldest ready message has been ready, from its
-- `taskstack_ready_at` header (0 when the queue is empty, -1 when the
-- oldest message has no such header, e.g. one sent by Python Celery),
-- then {workers whose holds had to be read}.
-- Cost: a few commands per worker and per queue, whatever the number of
-- messages. A worker's holds are counted from its held-count HASH (kept by
-- the scripts that add and remove holds, see fetch.lua) when those counts
-- add up to the number of its holds; otherwise (a worker of an older
-- version, or one whose holds a reaper restored while it ran) its hold
-- numbers are read (their slots name the queues; an earlier build's
-- holds are read whole), as many as it holds.
local sep = '\6\22'
local function queue_of(key)
  local s = string.find(key, sep, 1, true)
  if s then return string.sub(key, 1, s - 1) end
  return key
end
local wanted, inflight = {}, {}
local now = tonumber(ARGV[4])
local unit = tonumber(ARGV[7])
for i = 8, #ARGV do
  wanted[ARGV[i]] = true
  inflight[ARGV[i]] = 0
end
local scanned = 0
for _, worker in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local holds = ARGV[1] .. worker
  local legacy = ARGV[6] .. worker
  local held = redis.call('HLEN', holds)
  local earlier = redis.call('HLEN', legacy)
  if earlier > 0 and redis.call('HEXISTS', legacy, 'queues') == 1 then
    earlier = earlier - 1
  end
  held = held + earlier
  if held > 0 then
    local counts = redis.call('HGETALL', ARGV[5] .. worker)
    local sum = 0
    for i = 2, #counts, 2 do sum = sum + tonumber(counts[i]) end
    if sum == held then
      for i = 1, #counts, 2 do
        local q = counts[i]
        if wanted[q] then inflight[q] = inflight[q] + tonumber(counts[i + 1]) end
      end
    else
      scanned = scanned + 1
      local named = redis.call('HGET', legacy, 'queues')
      local queues = named and cjson.decode(named) or {}
      for _, number in ipairs(redis.call('HKEYS', holds)) do
        local key = queues[math.floor(tonumber(number) / unit) + 1]
        if key then
          local q = queue_of(key)
          if wanted[q] then inflight[q] = inflight[q] + 1 end
        end
      end
      for _, v in ipairs(redis.call('HVALS', legacy)) do
        local nl = string.find(v, '\n', 1, true)
        if nl then
          local q = queue_of(string.sub(v, 1, nl - 1))
          if wanted[q] then inflight[q] = inflight[q] + 1 end
        end
      end
    end
  end
  local landed = redis.call('LLEN', ARGV[2] .. worker)
  if landed > 0 then
    local src = redis.call('HGET', KEYS[2], worker)
    if src then
      local q = queue_of(src)
      if wanted[q] then inflight[q] = inflight[q] + landed end
    end
  end
end
-- The oldest ready message of a list is at its RPOP end. The header is
-- found by pattern (the body is base64, so it cannot hold the pattern).
local function waited(key)
  local m = redis.call('LINDEX', key, -1)
  if not m then return 0 end
  local at = string.match(m, '"taskstack_ready_at":%s*(%d+)')
  if not at then return -1 end
  return math.max(now - tonumber(at), 0)
end
local out = {}
for i = 8, #ARGV do
  local q = ARGV[i]
  local ready, oldest = 0, 0
  for _, key in ipairs({ q, q .. sep .. '3', q .. sep .. '6', q .. sep .. '9' }) do
    local n = redis.call('LLEN', key)
    if n > 0 then
      ready = ready + n
      local w = waited(key)
      if w < 0 or oldest < 0 then
        oldest = -1
      elseif w > oldest then
        oldest = w
      end
    end
  end
  local delayed = tonumber(redis.call('HGET', KEYS[3], q) or '0')
  local dead = redis.call('LLEN', ARGV[3] .. q)
  out[#out + 1] = { ready, delayed, inflight[q], dead, oldest }
end
out[#out + 1] = { scanned }
return out
