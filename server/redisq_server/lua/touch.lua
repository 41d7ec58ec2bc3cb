-- Liveness: extend the deadline of each live worker and the lease of its job.
-- Run by a hub for all of its sockets, and for one worker on its heartbeat.
-- A(1), A(2), ...: worker id, session pairs.
-- Returns the workers whose session is no longer current (they must re-register).
local t = now()
local deadline = ts(t + LEASE)
local stale = {}
local i = 1
while A(i) do
  local w, session = A(i), A(i + 1)
  local h = redis.call('HMGET', K.worker(w), 'session', 'status', 'job')
  if h[1] ~= session or h[2] == 'offline' or not h[2] then
    stale[#stale + 1] = w
  else
    redis.call('ZADD', K.workers(), deadline, w)
    redis.call('HSET', K.worker(w), 'seen', ts(t))
    if not blank(h[3]) then redis.call('ZADD', K.leases(), 'XX', deadline, h[3]) end
  end
  i = i + 2
end
return stale
