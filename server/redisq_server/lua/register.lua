-- A worker (one GPU socket) registers, or re-registers after a reconnect, and
-- becomes ready: it claims its best queued job or is marked idle.
-- A(1) worker id  A(2) machine id  A(3) job types, comma-separated  A(4) capabilities
-- JSON  A(5) hub id  A(6) session (unique per connection)  A(7) prefetch window: '1'
-- to hold one queued job ahead while busy, '0' not to
-- A job still held by an earlier session of this worker is requeued first (and may
-- come straight back: a worker that registers has been heard from, see shun).
-- Returns {assignment or false, false, false} (claim_next; the first job is never
-- held ahead: the window fills when the worker next reports).
local w = A(1)
local t = now()
local wk = K.worker(w)
local old = redis.call('HMGET', wk, 'session', 'status')
-- the same session again (a rerun of this registration after its reply was lost, or
-- a worker registering twice on one socket): what it holds was not lost by a fault
-- of the job's, so no loss is counted
if old[1] and old[2] ~= 'offline' then drop_worker(w, old[1], t, old[1] == A(6) and 0 or 1) end
-- counters (done, failed, busy_s) are kept across reconnects; `registered` is the
-- first registration, so busy_s / (now - registered) stays a share of wall time
redis.call('HSETNX', wk, 'registered', ts(t))
redis.call('HSET', wk, 'id', w, 'machine', A(2), 'types', A(3), 'caps', A(4), 'hub', A(5),
  'session', A(6), 'status', 'idle', 'job', '', 'attempt', '', 'seen', ts(t), 'since', ts(t),
  'heard', ts(t), 'prefetch', A(7))
redis.call('PERSIST', wk)
as_table(wk) -- read and written on every report
redis.call('ZADD', K.workers(), deadline(t), w)
for _, jt in ipairs(split(A(3))) do redis.call('SADD', K.types(), jt) end
emit(t, 'worker_up', {'worker', w, 'hub', A(5)})
return claim_next(w, t)
