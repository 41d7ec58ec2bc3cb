-- A worker reports progress on its job; the first report marks it running.
-- Extends the job's lease and the worker's liveness (the worker was heard from).
-- A(1) job id  A(2) attempt  A(3) worker id  A(4) progress 0-100  A(5) message
-- Returns the job's status after the update.
local id, attempt, w = A(1), A(2), A(3)
local err, j = fence(id, attempt, w, 'client')
if err == 'CANCELLED' or err == 'CANCELLED_AHEAD' then return redis.error_reply('CANCELLED job ' .. id .. ' was cancelled') end
if err then return redis.error_reply(err) end
local t = now()
local jk = K.job(id)
if j[1] == 'assigned' then redis.call('HSET', jk, 'status', 'running', 'started', ts(t)) end
redis.call('HSET', jk, 'progress', A(4), 'message', A(5))
redis.call('ZADD', K.leases(), 'XX', deadline(t), id)
redis.call('ZADD', K.workers(), 'XX', deadline(t), w)
redis.call('HSET', K.worker(w), 'seen', ts(t), 'heard', ts(t))
emit(t, 'progress', {'job', id, 'status', 'running', 'client', j[5], 'worker', w,
  'attempt', attempt, 'progress', A(4), 'message', A(5)}, hubs_for(j[5]))
return 'running'
