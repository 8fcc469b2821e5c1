-- fetch.lua: take up to ARGV[3] messages for one worker and record that it
-- holds them, in one atomic step, so a crash between "taken" and "recorded"
-- cannot lose a message.
--
-- KEYS[1]    lease ZSET (worker id -> lease deadline, ms): refreshed here so
--            a worker that holds messages always has a live lease
-- KEYS[2]    this worker's in-flight HASH (hold number -> message)
-- KEYS[3]    this worker's landing LIST (filled by a blocking BLMOVE)
-- KEYS[4]    this worker's held-count HASH (queue name -> messages held):
--            raised here, lowered by ack.lua, requeue.lua, delay.lua and
--            dead_letter.lua, so queue_stats.lua counts a worker's holds
--            per queue without reading them
-- KEYS[5]    this worker's held-sequence SET: every sequence number in
--            KEYS[2], added here and removed wherever KEYS[2] loses one
--            (ack, requeue, delay, dead_letter, reap), so start.lua checks
--            a batch's holds without reading the held messages; it expires
--            like KEYS[4] (ARGV[8], renewed by the heartbeat), so a dead
--            worker's set does not outlive it
-- KEYS[6]    this worker's hold-queue HASH: field 'queues' is ARGV[9],
--            the queue lists a hold number's slot names, written here
--            whenever it grew, in the step that takes holds naming it. It
--            has the name the in-flight HASH had in earlier builds, whose
--            holds were "<queue key>\n<message>": their reaper stops with
--            an error at this field (no newline in it) before it restores
--            or deletes anything, so it never misreads this build's holds
-- KEYS[7]    this worker's running HASH (start.lua's marks: task id -> hold
--            number), written only when ARGV[11] asks to start the landed
--            message
-- KEYS[8..]  queue lists in service order (priority bucket, then queue)
-- ARGV[1]    worker id
-- ARGV[2]    lease deadline (ms since the epoch)
-- ARGV[3]    most messages to take
-- ARGV[4]    last sequence number used by this worker
-- ARGV[5]    index (1-based, into KEYS[8..]) of the queue feeding the landing list
-- ARGV[6]    largest message (bytes) to return; a larger one is recorded as
--            held like any other but its size (an integer) is returned in
--            place of the message, so it never crosses the network (the
--            worker dead-letters it from the hold, see dead_letter.lua)
-- ARGV[7]    '1' when the landing list may hold a message (the worker
--            waited since its last take), '0' when it cannot: no RPOP then
-- ARGV[8]    expiry (ms) given to the held-count HASH when a count starts
--            from zero, and to the held-sequence SET when it starts empty
--            (the heartbeat renews both), so a crashed worker's do not
--            outlive it
-- ARGV[9]    JSON array of queue keys: the worker's slots, slot 0 first; it
--            only grows, so a longer one replaces a shorter one
-- ARGV[10]   a hold number's slot unit: the hold number of the n-th message
--            taken (n = ARGV[4] + 1, ...) from KEYS[7 + i] is
--            ARGV[13 + i] * ARGV[10] + n, so the hold names its queue
--            without a copy of the message (Redis hashes every string a
--            script makes; this one would be as long as the message)
-- ARGV[11]   '' or the task id of the message the worker's last BLMOVE
--            moved to the landing list, which the worker will run at once:
--            start it in this step (see "Starting the landed message")
-- ARGV[12]   that message's length in bytes (any value when ARGV[11] is '')
-- ARGV[13]   revoked-marker prefix (+ task id), as start.lua's ARGV[1]
-- ARGV[14..] the slot of each queue list (KEYS[8..], in order)
-- Lists are polled only while they can hold messages: the first queue
-- list, then (when the batch is not full) one EXISTS over the others, and
-- those in order until as many non-empty ones as it counted were found.
-- Returns a flat array: hold number, queue index, message or size, ...
-- The queue index is 1-based into the queue lists (KEYS[8..]). When
-- ARGV[11] names a task, the array starts with the start verdict: 1 the
-- first message taken is that task, held and marked started; 0 it is
-- that task, held, and revoked (not marked: the worker skips it); -1 the
-- landing list did not hold exactly that one message, nothing was started
-- (the worker starts its messages through start.lua as always).
--
-- Starting the landed message: an idle worker's round trip was BLMOVE,
-- this script, start.lua, then the result and ack.lua. When the worker
-- read the message from BLMOVE's reply and knows it will run it at once
-- (a free concurrency slot, due, not expired, registered, no rate limit,
-- no STARTED record asked for), this script does start.lua's part for it:
-- the hold is taken here, so start.lua's hold check is moot; the revoked
-- marker is checked and the running mark set in the same atomic step as
-- the hold, so revoke.lua finds either the marker first or the started
-- task, exactly as with start.lua. The landing list is filled only by the
-- worker's own BLMOVE and emptied only here (or by a reaper, which leaves
-- it empty), so a list of exactly one message of that length containing
-- that id is the message it read.
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
local max = tonumber(ARGV[3])
local seq = tonumber(ARGV[4])
local out = {}
local hset = {}
local seqs = {}
local n = 0

local max_size = tonumber(ARGV[6])
local unit = tonumber(ARGV[10])
-- messages taken per queue list index
local taken = {}

local function take(index, message)
  seq = seq + 1
  n = n + 1
  taken[index] = (taken[index] or 0) + 1
  -- formatted here: Lua would write a number above 10^14 with 14 digits
  local hold = string.format('%d', tonumber(ARGV[13 + index]) * unit + seq)
  seqs[n] = hold
  hset[#hset + 1] = hold
  hset[#hset + 1] = message
  out[#out + 1] = hold
  out[#out + 1] = index
  if #message > max_size then
    out[#out + 1] = #message
  else
    out[#out + 1] = message
  end
end

-- The landing list first: BLMOVE already moved those off their queue.
local landing_index = tonumber(ARGV[5])
local start_id = ARGV[11]
local verdict = -1
if ARGV[7] ~= '0' then
  local landed = redis.call('RPOP', KEYS[3], max)
  if landed then
    for _, m in ipairs(landed) do take(landing_index, m) end
    if start_id ~= '' and #landed == 1 and #landed[1] == tonumber(ARGV[12])
        and string.find(landed[1], start_id, 1, true) then
      if redis.call('EXISTS', ARGV[13] .. start_id) == 1 then
        verdict = 0
      else
        redis.call('HSET', KEYS[7], start_id, seqs[1])
        verdict = 1
      end
    end
  end
end

local function pop(i)
  local batch = redis.call('RPOP', KEYS[i], max - n)
  if batch then
    for _, m in ipairs(batch) do take(i - 7, m) end
    return true
  end
  return false
end

if n < max and #KEYS >= 8 then
  pop(8)
end
if n < max and #KEYS >= 9 then
  local left = redis.call('EXISTS', unpack(KEYS, 9))
  for i = 9, #KEYS do
    if n >= max or left == 0 then break end
    if pop(i) then left = left - 1 end
  end
end

if #hset > 0 then
  local named = redis.call('HGET', KEYS[6], 'queues')
  if not named or #named < #ARGV[9] then
    redis.call('HSET', KEYS[6], 'queues', ARGV[9])
  end
  redis.call('HSET', KEYS[2], unpack(hset))
  if redis.call('SADD', KEYS[5], unpack(seqs)) == redis.call('SCARD', KEYS[5]) then
    redis.call('PEXPIRE', KEYS[5], ARGV[8])
  end
  -- Counted per queue name: the key without Celery's priority suffix.
  local per_queue = {}
  for index, k in pairs(taken) do
    local q = KEYS[7 + index]
    local cut = string.find(q, "\6\22", 1, true)
    if cut then q = string.sub(q, 1, cut - 1) end
    per_queue[q] = (per_queue[q] or 0) + k
  end
  for q, k in pairs(per_queue) do
    if redis.call('HINCRBY', KEYS[4], q, k) == k then
      redis.call('PEXPIRE', KEYS[4], ARGV[8])
    end
  end
end
if start_id ~= '' then
  table.insert(out, 1, verdict)
end
return out
