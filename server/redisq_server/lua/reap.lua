-- Requeue what dead hubs left behind: workers past their liveness deadline and
-- jobs past their lease; forget hubs past theirs (their client lists and inboxes).
-- Safe to run from any number of hubs at once.
-- A(1) how many of each to handle in this call
-- Returns the number of workers dropped plus leases reclaimed.
local t = now()
local limit = tonumber(A(1))
local n = 0
for _, h in ipairs(redis.call('ZRANGEBYSCORE', K.hubs(), '-inf', ts(t), 'LIMIT', 0, limit)) do
  redis.call('ZREM', K.hubs(), h)
  redis.call('DEL', K.clients(h), K.inbox(h))
end
local dead = redis.call('ZRANGEBYSCORE', K.workers(), '-inf', ts(t), 'LIMIT', 0, limit)
-- every worker found dead leaves the idle sets before any job is requeued: a job must
-- not be handed to a GPU as dead as the one that lost it (each such hand-over would
-- count one more loss against the job)
local sessions = {}
for k, w in ipairs(dead) do
  local h = redis.call('HMGET', K.worker(w), 'session', 'types')
  sessions[k] = h[1]
  if h[2] then unidle(w, split(h[2])) end
end
for k, w in ipairs(dead) do
  if sessions[k] and drop_worker(w, sessions[k], t, 1) == 1 then n = n + 1
  else redis.call('ZREM', K.workers(), w) end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K.leases(), '-inf', ts(t), 'LIMIT', 0, limit)) do
  -- the lapsed lease goes first: the job may be requeued onto a worker at once, with
  -- a new lease that must stay
  redis.call('ZREM', K.leases(), id)
  local w = redis.call('HGET', K.job(id), 'worker')
  local h = blank(w) and {} or redis.call('HMGET', K.worker(w), 'session', 'job', 'next')
  if h[2] == id or h[3] == id then
    drop_worker(w, h[1], t, 1)
  else
    lose_job(id, w, t, 1)
  end
  n = n + 1
end
return n
