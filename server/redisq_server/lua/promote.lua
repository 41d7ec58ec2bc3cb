-- Move retrying jobs whose backoff has passed back to a worker or their queue.
-- A(1) how many to move in this call
-- Returns {moved, seconds until the next one is due or -1, assignment, ...}.
local t = now()
local due = redis.call('ZRANGEBYSCORE', K.delayed(), '-inf', ts(t), 'LIMIT', 0, tonumber(A(1)))
local out = {#due, -1}
for _, id in ipairs(due) do
  redis.call('ZREM', K.delayed(), id)
  local a = enqueue(id, t, false, true)
  if a then
    out[#out + 1] = a
  else
    local j = redis.call('HMGET', K.job(id), 'client', 'attempt')
    emit(t, 'promoted', {'job', id, 'status', 'queued', 'client', j[1], 'attempt', j[2]},
      hubs_for(j[1]))
  end
end
local nxt = redis.call('ZRANGE', K.delayed(), 0, 0, 'WITHSCORES')
if nxt[2] then out[2] = string.format('%.6f', math.max(0, tonumber(nxt[2]) - t)) end
return out
