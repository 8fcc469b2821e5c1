-- beat_release.lua: give up the beat leader lock at shutdown, only if ours.
--
-- KEYS[1]  the leader lock (STRING: holder JSON with a random token, PX ttl)
-- ARGV[1]  the exact value we set when we took the lock (it embeds our token)
-- Returns 1 when deleted, 0 when it was not ours (expired, or taken over).
--
-- Atomic because a GET then DEL could delete the lock of the instance that
-- took over in between, letting a third one lead beside it.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
