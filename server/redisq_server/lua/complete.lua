-- A worker completes its job and claims its next one, in one step.
-- A(1) job id  A(2) attempt  A(3) worker id  A(4) result JSON
-- Returns {'ok' | 'cancelled', next assignment, assignment held ahead, took_ahead}
-- (report_reply, claim_next); 'cancelled' means the job had been cancelled: the result
-- is dropped, the worker is still freed (unless the job was held ahead).
local id, attempt, w = A(1), A(2), A(3)
local err, j = fence(id, attempt, w, 'started', 'client', 'type')
local t = now()
if err == 'CANCELLED' then return report_reply('cancelled', release(w, t, false)) end
if err == 'CANCELLED_AHEAD' then return {'cancelled', false, false, false} end
if err then return redis.error_reply(err) end
local fields = {'result', A(4), 'progress', '100'}
if blank(j[5]) then fields[5], fields[6] = 'started', ts(t) end
finish(id, 'completed', t, j[7], fields)
local client = j[6]
emit(t, 'completed', {'job', id, 'status', 'completed', 'client', client, 'worker', w,
  'attempt', attempt, 'result', #A(4) <= INLINE_MAX and A(4) or false}, hubs_for(client), true)
return report_reply('ok', release(w, t, 'done'))
