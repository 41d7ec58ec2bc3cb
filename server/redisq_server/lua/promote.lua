-- Move retrying jobs whose backoff has passed, and scheduled jobs now due, to a
-- worker or their queue (a scheduled job enters its queue now: its wait starts, and
-- it gets a fresh seq, so it queues behind the jobs of its priority already there), and
-- end the avoidances (shun, lib.lua) whose time has passed: such a job, if still
-- queued, goes to an idle worker of the machine it avoided, if one waits.
-- A(1) how many of each to handle in this call
-- Returns {moved, seconds until the next retry or avoidance is due or -1,
-- assignment, ...}.
local t = now()
local limit = tonumber(A(1))
local due = redis.call('ZRANGEBYSCORE', K.delayed(), '-inf', ts(t), 'LIMIT', 0, limit)
local out = {#due, -1}
for _, id in ipairs(due) do
  redis.call('ZREM', K.delayed(), id)
  if redis.call('ZREM', K.scheduled(), id) == 1 then
    -- a delayed job enters its queue now: FIFO among its priority from here on
    redis.call('HSET', K.job(id), 'seq', redis.call('INCR', K.seq()))
  end
  local a = enqueue(id, t, false, true)
  if a then
    out[#out + 1] = a
  else
    local j = redis.call('HMGET', K.job(id), 'client', 'attempt')
    emit(t, 'promoted', {'job', id, 'status', 'queued', 'client', j[1], 'attempt', j[2]},
      hubs_for(j[1]))
  end
end
local ended = redis.call('ZRANGEBYSCORE', K.avoid(), '-inf', ts(t), 'LIMIT', 0, limit)
for _, id in ipairs(ended) do
  local machine = redis.call('HGET', K.job(id), 'avoid')
  if machine then unshun(id, machine) else redis.call('ZREM', K.avoid(), id) end
end
redispatch(ended, t)
local wait = nil
for _, key in ipairs({K.delayed(), K.avoid()}) do
  local nxt = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if nxt[2] then
    local w = math.max(0, tonumber(nxt[2]) - t)
    if wait == nil or w < wait then wait = w end
  end
end
if wait then out[2] = string.format('%.6f', wait) end
return out
