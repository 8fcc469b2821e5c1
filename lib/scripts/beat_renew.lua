-- beat_renew.lua: extend the beat leader lock, only while it is still ours.
--
-- KEYS[1]  the leader lock (STRING: holder JSON with a random token, PX ttl)
-- ARGV[1]  the exact value we set when we took the lock (it embeds our token)
-- ARGV[2]  the lock's time to live (ms)
-- Returns 1 when renewed, 0 when the lock expired or another instance holds
-- it (we lost leadership).
--
-- Atomic because the comparison and the PEXPIRE must see the same value: a
-- plain GET then PEXPIRE could extend a lock another instance took in
-- between, making two leaders.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
