-- An idle worker leaves this shard to serve another shard of a sharded namespace
-- (docs/deploy.md): it is taken out of service here only while it holds no job, so
-- no job is ever at risk. No-op unless `session` is the worker's current one.
-- A(1) worker id  A(2) session
-- Returns the worker's assignment number here (0 or more) if it left, -1 if not
-- (e.g. it was assigned a job meanwhile). The shard it goes to continues from that
-- number (arrive.lua), so the hub's "newest pushed" check keeps holding.
local w = A(1)
local wk = K.worker(w)
local h = redis.call('HMGET', wk, 'session', 'job', 'types', 'status')
if h[1] ~= A(2) or h[4] ~= 'idle' or not blank(h[2]) then return -1 end
local t = now()
unidle(w, split(h[3]))
redis.call('HSET', wk, 'status', 'offline', 'hub', '', 'seen', ts(t))
redis.call('ZREM', K.workers(), w)
redis.call('EXPIRE', wk, TTL)
return tonumber(redis.call('HGET', wk, 'n') or '0')
