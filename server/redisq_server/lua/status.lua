-- Read one job with its queue position (jobs ahead of it, 0 = next) in one trip.
-- Under fair share the position of a job behind its client's head is a lower bound.
-- A(1) job id
-- Returns {flat HGETALL, position or -1}, or false when there is no such job.
local jk = K.job(A(1))
local h = redis.call('HGETALL', jk)
if #h == 0 then return false end
local st, jt
for i = 1, #h, 2 do
  if h[i] == 'status' then st = h[i + 1] elseif h[i] == 'type' then jt = h[i + 1] end
end
local pos = -1
if st == 'queued' then pos = queued_position(A(1), jt, redis.call('HGET', jk, 'client')) end
return {h, pos}
