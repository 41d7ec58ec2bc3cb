-- A consistent snapshot for summaries, in one round trip, with no scans: counters,
-- and per job type its queue depth, depth by priority and idle workers.
-- A(1) throughput window in seconds
-- Returns {counters, types, running, retrying, workers, idle, done in window, window, now,
-- scheduled, the policy the hubs run (flat HGETALL, empty before any hub started),
-- held ahead}. `running` counts the jobs holding a lease but those a live worker
-- holds ahead in its prefetch window (assigned, not started: `held ahead`).
local t = now()
local window = tonumber(A(1))
local types = {}
for _, jt in ipairs(redis.call('SMEMBERS', K.types())) do
  -- every queued job, also those behind their client's head (fair share)
  local depth = redis.call('HGETALL', K.depth(jt))
  local queued = 0
  for i = 2, #depth, 2 do queued = queued + tonumber(depth[i]) end
  types[#types + 1] = {jt, queued, depth, redis.call('ZCARD', K.idle(jt))}
end
local n_scheduled = redis.call('ZCARD', K.scheduled())
local n_idle, n_ahead = 0, 0
for _, w in ipairs(redis.call('ZRANGE', K.workers(), 0, -1)) do
  -- bounded by the number of live workers, not by jobs
  local h = redis.call('HMGET', K.worker(w), 'status', 'next')
  if h[1] == 'idle' then n_idle = n_idle + 1 end
  if not blank(h[2]) then n_ahead = n_ahead + 1 end
end
return {redis.call('HGETALL', K.stats()), types, redis.call('ZCARD', K.leases()) - n_ahead,
  redis.call('ZCARD', K.delayed()) - n_scheduled, redis.call('ZCARD', K.workers()), n_idle,
  redis.call('ZCOUNT', K.done('completed'), ts(t - window), '+inf'), ts(window), ts(t),
  n_scheduled, redis.call('HGETALL', K.policy()), n_ahead}
