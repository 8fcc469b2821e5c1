-- Sends canvas follow-ups (chain steps, callbacks, errbacks, chord bodies)
-- at most once each: a follow-up is pushed only when its marker is new, in
-- the same atomic step, so a task redelivered after a crash between
-- sending and acknowledging never sends the same follow-up twice.
-- KEYS: marker_1, queue_key_1, marker_2, queue_key_2, ...
-- ARGV[1]: marker TTL (seconds); ARGV[1 + i]: payload i
-- Returns how many were pushed (the rest had been sent before).
local ttl = tonumber(ARGV[1])
local sent = 0
for i = 1, #KEYS, 2 do
    if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ttl) then
        redis.call('LPUSH', KEYS[i + 1], ARGV[(i + 1) / 2 + 1])
        sent = sent + 1
    end
end
return sent
