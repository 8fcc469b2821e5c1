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
-- ARGV[4..]  queue names
-- Returns, per queue in order, {ready, delayed, in_flight, dead}.
-- Cost: in-flight counting reads every held message (bounded by the
-- workers' prefetch), so it is meant for dashboards, not per task.
local sep = '\6\22'
local function queue_of(key)
  local s = string.find(key, sep, 1, true)
  if s then return string.sub(key, 1, s - 1) end
  return key
end
local wanted, inflight = {}, {}
for i = 4, #ARGV do
  wanted[ARGV[i]] = true
  inflight[ARGV[i]] = 0
end
for _, worker in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  for _, v in ipairs(redis.call('HVALS', ARGV[1] .. worker)) do
    local nl = string.find(v, '\n', 1, true)
    if nl then
      local q = queue_of(string.sub(v, 1, nl - 1))
      if wanted[q] then inflight[q] = inflight[q] + 1 end
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
local out = {}
for i = 4, #ARGV do
  local q = ARGV[i]
  local ready = redis.call('LLEN', q)
  for _, b in ipairs({ '3', '6', '9' }) do
    ready = ready + redis.call('LLEN', q .. sep .. b)
  end
  local delayed = tonumber(redis.call('HGET', KEYS[3], q) or '0')
  local dead = redis.call('LLEN', ARGV[3] .. q)
  out[#out + 1] = { ready, delayed, inflight[q], dead }
end
return out
