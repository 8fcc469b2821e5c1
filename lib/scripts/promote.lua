-- promote.lua: move due messages from the parked sets to the back of their
-- queues. Atomic, so several workers promoting at once move each message once.
--
-- KEYS[1]  parked ZSET (parked id "<unique id>\n<queue key>" -> due, ms)
-- KEYS[2]  parked-message HASH (parked id -> the message alone)
-- KEYS[3]  delayed-count HASH (queue name -> parked messages)
-- KEYS[4]  delayed ZSET of earlier builds (id -> due, ms)
-- KEYS[5]  delayed-message HASH of earlier builds (id -> "<queue key>\n<message>")
-- ARGV[1]  now (ms since the epoch)
-- ARGV[2]  most messages to move in this call
-- Returns {moved, due time of the next parked message or ''}.
--
-- Redis hashes every byte of every string a script makes, so a message
-- parked by this build (delay.lua) becomes one Lua string here; one of an
-- earlier build, which stored its queue key in front of it, becomes two.
-- Each kind of change is one command for the whole batch (HMGET, LPUSH per
-- queue key, HDEL, ZREM, HINCRBY per queue) rather than five per message:
-- promotion shares the server with the drain, and a burst of due messages
-- slows every worker's takes while it is moved.
local budget = tonumber(ARGV[2])
local pushes, order, parked = {}, {}, {}
local function push(qk, message)
  local list = pushes[qk]
  if not list then
    list = {}
    pushes[qk] = list
    order[#order + 1] = qk
  end
  list[#list + 1] = message
  -- A queue name is its key without Celery's priority suffix ("\x06\x16<n>").
  local q = qk
  local sep = string.find(q, '\6\22', 1, true)
  if sep then q = string.sub(q, 1, sep - 1) end
  parked[q] = (parked[q] or 0) + 1
end
-- Ids go to a command in slices, as Lua's unpack has a bounded stack.
local SLICE = 1000
local function each_slice(list, fn)
  for i = 1, #list, SLICE do
    fn(i - 1, unpack(list, i, math.min(i + SLICE - 1, #list)))
  end
end
-- What is due in a ZSET, earliest first: ids, or {id, due, id, due, ...}.
local function due_in(zset, scores)
  if scores then
    return redis.call('ZRANGEBYSCORE', zset, '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, budget)
  end
  return redis.call('ZRANGEBYSCORE', zset, '-inf', ARGV[1], 'LIMIT', 0, budget)
end
-- The `budget` due first of both, in due order: +k is the k-th id of
-- new_ids, -k the k-th of old_ids (an earlier build's first on a tie).
local new_ids, old_ids, merged = {}, {}, {}
local old = due_in(KEYS[4], true)
if #old == 0 then
  -- Once the earlier builds' messages are moved: no scores, no merge.
  new_ids = due_in(KEYS[1], false)
  for k = 1, #new_ids do merged[k] = k end
else
  local new = due_in(KEYS[1], true)
  local i, j = 1, 1
  while #merged < budget and (i < #new or j < #old) do
    if j < #old and (i >= #new or tonumber(old[j + 1]) <= tonumber(new[i + 1])) then
      old_ids[#old_ids + 1] = old[j]
      merged[#merged + 1] = -#old_ids
      j = j + 2
    else
      new_ids[#new_ids + 1] = new[i]
      merged[#merged + 1] = #new_ids
      i = i + 2
    end
  end
end
local function values_of(hash, ids)
  local values = {}
  each_slice(ids, function(before, ...)
    local got = redis.call('HMGET', hash, ...)
    for k = 1, #got do values[before + k] = got[k] end
  end)
  return values
end
local new_values, old_values = values_of(KEYS[2], new_ids), values_of(KEYS[5], old_ids)
for _, m in ipairs(merged) do
  if m > 0 then
    -- This build's: the id names the queue key, the value is the message.
    local id, v = new_ids[m], new_values[m]
    if v then push(string.sub(id, string.find(id, '\n', 1, true) + 1), v) end
  else
    -- An earlier build's: "<queue key>\n<message>".
    local v = old_values[-m]
    if v then
      local nl = string.find(v, '\n', 1, true)
      push(string.sub(v, 1, nl - 1), string.sub(v, nl + 1))
    end
  end
end
for _, set in ipairs({ { KEYS[1], KEYS[2], new_ids }, { KEYS[4], KEYS[5], old_ids } }) do
  each_slice(set[3], function(_, ...) redis.call('HDEL', set[2], ...) end)
  each_slice(set[3], function(_, ...) redis.call('ZREM', set[1], ...) end)
end
-- Each queue key gets its messages in due order, as one LPUSH per message would.
for _, qk in ipairs(order) do
  each_slice(pushes[qk], function(_, ...) redis.call('LPUSH', qk, ...) end)
end
for q, n in pairs(parked) do
  if redis.call('HINCRBY', KEYS[3], q, -n) <= 0 then
    redis.call('HDEL', KEYS[3], q)
  end
end
local next_due
for _, zset in ipairs({ KEYS[1], KEYS[4] }) do
  local first = redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')[2]
  if first and (not next_due or tonumber(first) < tonumber(next_due)) then
    next_due = first
  end
end
return { #merged, next_due or '' }
