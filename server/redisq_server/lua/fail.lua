-- A worker reports that its job failed, and claims its next one, in one step.
-- A(1) job id  A(2) attempt  A(3) worker id  A(4) error text  A(5) retryable 1|0
-- A retryable failure waits in `delayed` for an exponential backoff while the job
-- has failed fewer than max_attempts times (requeues after a lost worker do not
-- count: max_lost bounds those); otherwise it fails for good (kept until its TTL).
-- Returns {'retrying' | 'failed' | 'cancelled', next, ahead, took_ahead} as
-- complete.lua.
local id, attempt, w = A(1), A(2), A(3)
local err, j = fence(id, attempt, w, 'max_attempts', 'client', 'started', 'type')
local t = now()
if err == 'CANCELLED' then return report_reply('cancelled', release(w, t, false)) end
if err == 'CANCELLED_AHEAD' then return {'cancelled', false, false, false} end
if err then return redis.error_reply(err) end
local jk = K.job(id)
if blank(j[7]) then
  redis.call('HSET', jk, 'error', A(4), 'started', ts(t))
else
  redis.call('HSET', jk, 'error', A(4))
end
local failures = redis.call('HINCRBY', jk, 'failures', '1')
local outcome
if A(5) == '1' and failures < tonumber(j[5]) then
  local delay = math.min(BACKOFF_MAX, BACKOFF_BASE * 2 ^ (failures - 1))
  redis.call('HSET', jk, 'status', 'retrying', 'worker', '')
  redis.call('ZREM', K.leases(), id)
  redis.call('ZADD', K.delayed(), ts(t + delay), id)
  redis.call('HINCRBY', K.stats(), 'retried', '1')
  emit(t, 'retrying', {'job', id, 'status', 'retrying', 'client', j[6], 'worker', w,
    'attempt', attempt, 'message', A(4), 'due', ts(t + delay)}, hubs_for(j[6]))
  outcome = 'retrying'
else
  finish(id, 'failed', t, j[8])
  emit(t, 'failed', {'job', id, 'status', 'failed', 'client', j[6], 'worker', w,
    'attempt', attempt, 'message', A(4)}, hubs_for(j[6]), true)
  outcome = 'failed'
end
return report_reply(outcome, release(w, t, 'failed'))
