-- Submit a job: assign it to an idle worker that accepts its type, else queue it.
-- A(1) job id  A(2) job type  A(3) priority  A(4) params JSON  A(5) client id
-- A(6) max attempts  A(7) delay in seconds or ''  A(8) due Unix time or '' (not both)
-- A job with a due time still ahead is `scheduled`: it waits in `delayed` (and the
-- `scheduled` index) until the promoter (promote.lua) queues or assigns it.
-- Returns {status, position (-1 when assigned or scheduled), assignment or false}.
-- The job's own client sending the same id again (say, after `unavailable`) gets
-- the stored job's status and position, whatever it sends: the stored job stands
-- and nothing changes. Any other caller gets DUPLICATE.
local id, jt, priority = A(1), A(2), A(3)
local jk = K.job(id)
if redis.call('EXISTS', jk) == 1 then
  local h = redis.call('HMGET', jk, 'client', 'status', 'type')
  if A(5) == '' or h[1] ~= A(5) then
    return redis.error_reply('DUPLICATE job ' .. id .. ' already exists')
  end
  local pos = -1
  if h[2] == 'queued' then pos = queued_position(id, h[3], h[1]) end
  return {h[2], pos, false}
end
local t = now()
local due = nil
if A(7) ~= '' then due = t + tonumber(A(7)) elseif A(8) ~= '' then due = tonumber(A(8)) end
if due and due - t > MAX_DELAY_S then
  return redis.error_reply('INVALID_FIELD run_at is more than ' .. MAX_DELAY_S .. ' s ahead')
end
if due and due <= t then due = nil end
local seq = redis.call('INCR', K.seq())
-- Only what is not derivable: the key holds the id, a missing attempt/lost/failures
-- is 0, a missing client or worker is none, a missing `queued` equals `created`
-- (see models.JobModel.from_redis). Every byte here is paid per queued job.
local fields = {'type', jt, 'priority', priority, 'params', A(4),
  'status', due and 'scheduled' or 'queued', 'max_attempts', A(6), 'seq', seq, 'created', ts(t)}
if A(5) ~= '' then fields[#fields + 1], fields[#fields + 2] = 'client', A(5) end
if due then fields[#fields + 1], fields[#fields + 2] = 'due', ts(due) end
redis.call('HSET', jk, unpack(fields))
-- counted per type only (the total is the sum); the type's first job adds it to the
-- types (nothing removes one)
if redis.call('HINCRBY', K.stats(), 'submitted:' .. jt, '1') == 1 then
  redis.call('SADD', K.types(), jt)
end
if due then
  redis.call('ZADD', K.delayed(), ts(due), id)
  redis.call('ZADD', K.scheduled(), ts(due), id)
  emit(t, 'submitted', {'job', id, 'status', 'scheduled', 'jtype', jt, 'priority', priority,
    'client', A(5), 'due', ts(due)})
  return {'scheduled', -1, false}
end
emit(t, 'submitted', {'job', id, 'status', 'queued', 'jtype', jt, 'priority', priority,
  'client', A(5)})
local a, pos = enqueue(id, t, true, true,
  {jt, priority, seq, A(5) ~= '' and A(5) or false, A(4), false, ts(t), false})
if a then return {'assigned', -1, a} end
return {'queued', pos, false}
