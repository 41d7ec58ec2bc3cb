-- A consistent snapshot for summaries, in one round trip, with no scans: counters,
-- and per job type its queue depth, depth by priority and idle workers.
-- A(1) throughput window in seconds
-- Returns {counters, types, running, retrying, workers, idle, done in window, window, now,
-- scheduled, the policy the hubs run (flat HGETALL, empty before any hub started)}.
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
local n_idle = 0
for _, w in ipairs(redis.call('ZRANGE', K.workers(), 0, -1)) do
  -- bounded by the number of live workers, not by jobs
  if redis.call('HGET', K.worker(w), 'status') == 'idle' then n_idle = n_idle + 1 end
end
return {redis.call('HGETALL', K.stats()), types, redis.call('ZCARD', K.leases()),
  redis.call('ZCARD', K.delayed()) - n_scheduled, redis.call('ZCARD', K.workers()), n_idle,
  redis.call('ZCOUNT', K.done('completed'), ts(t - window), '+inf'), ts(window), ts(t),
  n_scheduled, redis.call('HGETALL', K.policy())}
