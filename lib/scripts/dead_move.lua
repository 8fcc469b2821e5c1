-- dead_move.lua: requeue or discard chosen dead letters. Each record is
-- removed from the dead-letter list and (to requeue) its original message
-- pushed to its queue in one step, so a dead letter is never both requeued
-- and still listed, nor requeued twice by two operators at once.
--
-- KEYS[1]  the queue's dead-letter LIST
-- ARGV[1]  'requeue' or 'discard'
-- ARGV[2..]  the exact records (as read) to act on
-- Returns the records acted on (those still listed when the script ran).
-- A message over max_message_size is kept apart, in the STRING the record
-- names as `payload_key`: it is requeued from there, and that key goes
-- with the record either way. A record that cannot be requeued (not JSON,
-- no queue key or message, or a message that was not UTF-8 text, kept as
-- `payload_base64`) is left where it is: a script is not rolled back on
-- error, so everything is checked before anything is written.
local done = {}
for i = 2, #ARGV do
  local rec = ARGV[i]
  local target, payload, apart
  local ok, d = pcall(cjson.decode, rec)
  if ok and type(d) == 'table' then
    if type(d['payload_key']) == 'string' then
      apart = d['payload_key']
    end
    if ARGV[1] == 'requeue' and type(d['queue_key']) == 'string'
        and d['payload_base64'] == nil then
      if apart then
        payload = redis.call('GET', apart)
      elseif type(d['payload']) == 'string' then
        payload = d['payload']
      end
      if payload then target = d['queue_key'] end
    end
  end
  if (ARGV[1] == 'discard' or target) and redis.call('LREM', KEYS[1], 1, rec) == 1 then
    if target then
      redis.call('LPUSH', target, payload)
    end
    if apart then
      redis.call('DEL', apart)
    end
    done[#done + 1] = rec
  end
end
return done
