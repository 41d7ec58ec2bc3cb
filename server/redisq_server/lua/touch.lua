-- Liveness: extend the deadline of each live worker and the lease of its job.
-- Run by a hub for all of its sockets, and for one worker on its heartbeat.
-- A(1), A(2), A(3), ...: worker id, session, and the highest assignment number the
-- hub has pushed to that socket ('' when the caller does not check), per worker.
-- Returns {stale, missed}: the workers whose session is no longer current (they
-- must re-register), and the assignments of live workers that their hub has not
-- pushed (a reply or an event lost to a Redis outage): the hub pushes them now,
-- so a worker never holds a job it was never told of. A worker whose current job
-- was cancelled before it was told of it is freed, and claims its next job.
local t = now()
local due = deadline(t)
local stale, missed = {}, {}
local i = 1
while A(i) do
  local w, session, pushed = A(i), A(i + 1), A(i + 2)
  local wk = K.worker(w)
  local h = redis.call('HMGET', wk, 'session', 'status', 'job', 'attempt', 'n', 'hub', 'jn',
    'next', 'next_attempt', 'nn')
  if h[1] ~= session or h[2] == 'offline' or not h[2] then
    stale[#stale + 1] = w
  else
    redis.call('ZADD', K.workers(), due, w)
    redis.call('HSET', wk, 'seen', ts(t))
    local current = tonumber(h[7] or h[5])
    if pushed ~= '' and not blank(h[3]) and current and current > tonumber(pushed)
        and redis.call('HGET', K.job(h[3]), 'status') == 'cancelled' then
      -- its current job was cancelled before its hub told it of the job: it cannot
      -- acknowledge a cancel it never heard of, so it is free now (it would stay
      -- busy for good); what it claims instead is pushed with the missed ones
      local a = release(w, t, false)
      for k = 1, 2 do
        if a[k] then missed[#missed + 1] = a[k] end
      end
      h[3], h[8] = '', '' -- nothing left to renew or push below
    end
    -- the current job (numbered `jn`; `n` before jn was kept) and one held ahead
    for _, held in ipairs({{h[3], h[4], h[7] or h[5]}, {h[8], h[9], h[10]}}) do
      local id, attempt, num = held[1], held[2], tonumber(held[3])
      if not blank(id) then
        redis.call('ZADD', K.leases(), 'XX', due, id)
        if pushed ~= '' and num and num > tonumber(pushed) then
          local j = redis.call('HMGET', K.job(id), 'type', 'priority', 'params', 'status',
            'attempt', 'worker')
          if (j[4] == 'assigned' or j[4] == 'running') and j[5] == attempt and j[6] == w then
            missed[#missed + 1] = {id, attempt, j[1], j[2], j[3] or '', w, h[6] or '', session,
              held[3]}
          end
        end
      end
    end
  end
  i = i + 3
end
return {stale, missed}
