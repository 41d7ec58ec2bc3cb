-- The calling hub's presence: which hubs are live and which client ids have a
-- socket on each, so that events about a client's jobs reach the hubs it is on.
-- A(1) action:
--   'start'  forget what an earlier run under this hub id left; A(2) lease seconds;
--            the first start of the namespace records its time (stats 'since');
--            records the hub's scheduling policy (header) as the namespace's
--   'alive'  extend the hub's deadline by A(2) seconds; returns 1 if the hub had
--            been given up for dead (its client list is gone: list them again)
--   'join'   A(2), A(3), ...: client ids now with a socket here
--   'leave'  A(2), A(3), ...: client ids with no socket here any more
--   'stop'   the hub goes away
local h, action = CALLER, A(1)
if h == '' then return redis.error_reply('INVALID_FIELD hub id required') end
if action == 'start' or action == 'stop' then
  redis.call('DEL', K.clients(h), K.inbox(h))
  if action == 'stop' then return redis.call('ZREM', K.hubs(), h) end
end
if action == 'start' then
  -- the namespace's first hub start: rates never average over time before it
  redis.call('HSETNX', K.stats(), 'since', ts(now()))
  redis.call('HSET', K.policy(), 'aging_ms', AGING_MS, 'fair_share', FAIR_ARG, 'hub', h)
end
if action == 'start' or action == 'alive' then
  local added = redis.call('ZADD', K.hubs(), ts(now() + tonumber(A(2))), h)
  return action == 'alive' and added or 0
end
local command = action == 'join' and 'SADD' or action == 'leave' and 'SREM'
if not command then return redis.error_reply('INVALID_FIELD unknown action ' .. action) end
-- in batches: Lua unpacks at most about 8,000 values at once, and a hub that lists
-- its clients again (after being given up for dead) may hold more
local changed, ids, i = 0, {}, 2
while A(i) do
  ids[#ids + 1] = A(i)
  if #ids == 1000 then
    changed = changed + redis.call(command, K.clients(h), unpack(ids))
    ids = {}
  end
  i = i + 1
end
if #ids > 0 then changed = changed + redis.call(command, K.clients(h), unpack(ids)) end
return changed
