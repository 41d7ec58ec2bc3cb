-- Cancel a job. Queued, scheduled or retrying: removed at once. Assigned or running: cancelled
-- at once, and the event tells the worker's hub to push cancel_job; the worker stays
-- busy until it acknowledges with complete_job or fail_job for that attempt.
-- Finished jobs are left as they are.
-- A(1) job id  A(2) client id that must own the job, or '' for any
-- Returns {status after the call, worker or false, attempt}.
local id, client = A(1), A(2)
local jk = K.job(id)
local j = redis.call('HMGET', jk, 'status', 'client', 'type', 'priority', 'worker', 'attempt',
  'ahead', 'avoid')
if not j[1] or (client ~= '' and j[2] ~= client) then
  return redis.error_reply('NOT_FOUND no job ' .. id .. ' for this client')
end
local st = j[1]
if st == 'completed' or st == 'failed' or st == 'cancelled' then return {st, false, j[6]} end
local t = now()
local hub = false
-- a job that avoided a machine (lost there) stops avoiding it: no GPU of that machine
-- need skip it any more
if not blank(j[8]) then unshun(id, j[8]) end
if st == 'queued' then
  local nxt = unqueue(id, j[3], j[2], t)
  depth_add(j[3], j[4], -1)
  if nxt then offer_head(nxt, j[3], t) end
elseif st == 'retrying' or st == 'scheduled' then
  redis.call('ZREM', K.delayed(), id)
  redis.call('ZREM', K.scheduled(), id)
else
  local wk = K.worker(j[5])
  local h = redis.call('HMGET', wk, 'hub', 'next')
  hub = h[1]
  -- a job held ahead leaves the worker's prefetch slot now: the worker is busy with
  -- the job before it, and its acknowledgement will free nothing (fence)
  if j[7] == '1' and h[2] == id then
    redis.call('HSET', wk, unpack(EMPTY_SLOT))
  end
end
finish(id, 'cancelled', t)
emit(t, 'cancelled', {'job', id, 'status', 'cancelled', 'client', j[2], 'worker',
  (st == 'assigned' or st == 'running') and j[5] or '', 'hub', hub, 'attempt', j[6]},
  hubs_for(j[2], hub))
if st == 'assigned' or st == 'running' then return {'cancelled', j[5], j[6]} end
return {'cancelled', false, j[6]}
