-- beat_publish.lua: publish one scheduled slot of one beat entry, exactly
-- once, and only while we hold the leader lock (fencing).
--
-- KEYS[1]  the leader lock (STRING: holder JSON with a random token, PX ttl)
-- KEYS[2]  last published slot per entry (HASH: entry name -> slot, ms since
--          the epoch)
-- KEYS[3]  the queue list the message goes to (LPUSH, as Celery producers do)
-- ARGV[1]  the exact value we set when we took the lock (it embeds our token)
-- ARGV[2]  margin (ms): publish only if the lock outlives this
-- ARGV[3]  entry name
-- ARGV[4]  slot (ms since the epoch)
-- ARGV[5]  the Celery message
-- Returns {code, detail}:
--   { 1, slot}   published; the slot is recorded as the entry's last
--   { 0, last}   not published: this slot (or a later one) already was
--   {-1, 0}      not published: the lock is not ours (expired or taken over)
--   {-2, pttl}   not published: the lock is ours but expires within the margin
--
-- Atomic because the three checks and the two writes must not interleave
-- with another instance's: a leader that was paused past its lease and wakes
-- up finds the lock gone or someone else's and publishes nothing; and the
-- message is pushed if and only if its slot is recorded, so neither a retry
-- after a lost reply nor two leaders in a split brain can publish a slot
-- twice. Slots of an entry only move forward: one at or before the recorded
-- one is refused.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {-1, 0}
end
local pttl = redis.call('PTTL', KEYS[1])
if pttl <= tonumber(ARGV[2]) then
  return {-2, pttl}
end
local slot = tonumber(ARGV[4])
local last = redis.call('HGET', KEYS[2], ARGV[3])
if last and tonumber(last) >= slot then
  return {0, tonumber(last)}
end
redis.call('LPUSH', KEYS[3], ARGV[5])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
return {1, slot}
