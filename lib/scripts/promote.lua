-- promote.lua: move due messages from the delayed set to the back of their
-- queues. Atomic, so several workers promoting at once move each message once.
--
-- KEYS[1]  delayed ZSET (id -> due, ms)
-- KEYS[2]  delayed-message HASH (id -> "<queue key>\n<message>")
-- KEYS[3]  delayed-count HASH (queue name -> parked messages)
-- ARGV[1]  now (ms since the epoch)
-- ARGV[2]  most messages to move in this call
-- Returns {moved, due time of the next parked message or ''}.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do
  local v = redis.call('HGET', KEYS[2], id)
  if v then
    local nl = string.find(v, '\n', 1, true)
    local qk = string.sub(v, 1, nl - 1)
    redis.call('LPUSH', qk, string.sub(v, nl + 1))
    redis.call('HDEL', KEYS[2], id)
    local q = qk
    local sep = string.find(q, '\6\22', 1, true)
    if sep then q = string.sub(q, 1, sep - 1) end
    if redis.call('HINCRBY', KEYS[3], q, -1) <= 0 then
      redis.call('HDEL', KEYS[3], q)
    end
  end
  redis.call('ZREM', KEYS[1], id)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return { #due, nxt[2] or '' }
