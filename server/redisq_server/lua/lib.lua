-- Shared helpers of the engine's function library (scripts.library_source puts the
-- generated key functions K.* before them and registers each state change after
-- them). Each registered function is one atomic state change.
--
-- ARGV[1] is the header, one string, the same for every call of one caller
-- (operations.Operations.header): nine fields and the caller joined by '|'
--   prefix "{ns}:" | lease seconds | result TTL seconds | events MAXLEN |
--   max lost-worker requeues | retry backoff base s | retry backoff cap s |
--   aging step in ms (0: off) | fair share 'off' or 'client' | the calling hub's id
--   ('' when the caller is not a hub; the only field that may hold a '|')
-- Function arguments follow from ARGV[2] on: use A(i).
--
-- The library is loaded once and its helpers live on between calls, so everything
-- a call's header sets is (re)set by `setup` at the start of every call: these
-- locals hold the current call's values only (Redis runs one call at a time). A
-- header is parsed once and kept (one per caller, a few): one argument instead of
-- ten took about 1.2 us of Redis CPU off each call (docs/benchmarks.md, section 18).
--
-- Every function's reply is wrapped as {reply, LOCAL}, or {reply} when LOCAL is
-- empty (scripts.library_source): LOCAL holds the events for the calling hub's own
-- sockets, so that a hub never reads back through Redis what its own calls did.
-- Redis turns each table of a reply into its reply after looking up seven special
-- names in it (err, ok, double, ...), about 2,500 instructions a table: replies keep
-- few tables.

local ARGV, LEASE, TTL, MAXLEN, MAX_LOST, BACKOFF_BASE, BACKOFF_MAX, AGING_MS, FAIR, CALLER
local LOCAL, AVOID_S, TTL_S, FAIR_ARG
-- what hubs_for found in this call: the live hubs (false until read), and per
-- client the hubs holding a socket of it
local HUBS, CLIENT_HUBS
local function A(i) return ARGV[1 + i] end

-- parsed headers by their text; emptied when it holds more than HEADERS_MAX (hubs
-- come and go under new ids)
local HEADERS, HEADERS_N, HEADERS_MAX = {}, 0, 64
local HEADER_RE = '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$'

local function parse_header(text)
  local f = {string.match(text, HEADER_RE)}
  if #f ~= 10 then error('redisq: a malformed call header: ' .. text) end
  local lease = tonumber(f[2])
  return {
    prefix = f[1], lease = lease, ttl = tonumber(f[3]), ttl_s = f[3], maxlen = f[4],
    max_lost = tonumber(f[5]), backoff_base = tonumber(f[6]), backoff_max = tonumber(f[7]),
    aging_ms = tonumber(f[8]), fair_arg = f[9], fair = f[9] == 'client', caller = f[10],
    -- A job whose worker was lost avoids that worker's machine this long (see shun):
    -- the machine's other sockets may be dying too.
    avoid_s = math.min(5, lease),
  }
end

local function setup(args)
  ARGV = args
  local h = HEADERS[args[1]]
  if not h then
    h = parse_header(args[1])
    if HEADERS_N >= HEADERS_MAX then HEADERS, HEADERS_N = {}, 0 end
    HEADERS[args[1]], HEADERS_N = h, HEADERS_N + 1
  end
  P = h.prefix
  LEASE, TTL, TTL_S, MAXLEN, MAX_LOST = h.lease, h.ttl, h.ttl_s, h.maxlen, h.max_lost
  BACKOFF_BASE, BACKOFF_MAX, AGING_MS = h.backoff_base, h.backoff_max, h.aging_ms
  FAIR, FAIR_ARG, CALLER, AVOID_S = h.fair, h.fair_arg, h.caller, h.avoid_s
  LOCAL = {}
  HUBS, CLIENT_HUBS = false, {}
end

local NONE = {} -- unpack(NONE): no more fields
local EMPTY_SLOT = {'next', '', 'next_attempt', '', 'nn', ''} -- a worker holding none
local HELD = {'held'} -- an earlier attempt's time in a prefetch window, cleared by a new one

local SEQ_SPACE = 68719476736 -- 2^36, models.SEQ_BITS
local INLINE_MAX = 512 -- params/results up to this size are copied into events
local MAX_PRIORITY = 32767
local MAX_DELAY_S = 31622400 -- protocol.MAX_DELAY_S

-- a script formats the same few times many times over: keep the last one
local last_t, last_ts = nil, nil
local function ts(t)
  if t ~= last_t then last_t, last_ts = t, string.format('%.6f', t) end
  return last_ts
end

-- Redis' clock, in Unix seconds. Its text (what ts gives for it) is made from TIME's
-- own digits: a '%.6f' format costs more than the rest of the call's arithmetic.
-- The seconds' number is kept for as long as its digits stay the same.
local ZEROS = {'00000', '0000', '000', '00', '0', ''}
local last_sec, last_sec_n = nil, nil
local function now()
  local t = redis.call('TIME')
  if t[1] ~= last_sec then last_sec, last_sec_n = t[1], tonumber(t[1]) end
  local n = last_sec_n + tonumber(t[2]) / 1000000
  last_t, last_ts = n, t[1] .. '.' .. ZEROS[#t[2]] .. t[2]
  return n
end

-- The deadline of a lease or a worker's liveness that starts at time t: t + LEASE,
-- as text. A lease of WHOLE_S or more ends on the next whole second (at most a
-- second, a tenth of it, late; the reaper runs once a second): a small sorted set
-- keeps a whole number as an integer, which Redis compares and writes without
-- parsing or formatting a decimal, and the text is made once a second. That is
-- about 4 % of Redis' instructions per job (docs/benchmarks.md, section 20).
-- Shorter leases (tests, demos) keep their microseconds.
local WHOLE_S = 10
local last_due, last_due_s = nil, nil
local function deadline(t)
  if LEASE < WHOLE_S then return ts(t + LEASE) end
  local due = math.ceil(t + LEASE)
  if due ~= last_due then last_due, last_due_s = due, string.format('%d', due) end
  return last_due_s
end

-- Hash `key` as a hash table from now on. Redis keeps a small hash as one list
-- (a listpack) that every field read or write scans from its start; it turns the
-- hash into a table once a value is longer than its hash-max-listpack-value (64
-- bytes unless configured), which this field's is, and keeps it so until it loads
-- the hash again from a snapshot (a restart, a replica's full sync; the worker's
-- next registration makes it a table again). A worker's hash has about 25 fields,
-- and each report reads and writes half of them: as a table, 4.5 % fewer Redis
-- instructions per job (docs/benchmarks.md, section 20), for about 1 KB more per
-- worker. Never for jobs, of which there are many.
local TABLE_FILL = nil -- 1 KB, made at the first call (no `string` while loading)
local function as_table(key)
  TABLE_FILL = TABLE_FILL or string.rep('-', 1024)
  redis.call('HSET', key, '-', TABLE_FILL)
  redis.call('HDEL', key, '-')
end

-- A worker's `seen` and `heard` fields at time t (it was just heard from).
local function heard_at(t) return {'seen', ts(t), 'heard', ts(t)} end

-- The queue score of a job (smaller runs first), formatted without an exponent.
-- Strict (AGING_MS 0): models.queue_score, priority then seq, exact below 2^53.
-- Aging: models.aged_score from `entered` (the job's `due` or `created` text, Unix
-- seconds): key = ms since the aging epoch + AGING_MS * (MAX_PRIORITY - priority),
-- below 2^41, times 4096 plus seq mod 4096; every step is an exact integer in a double.
local AGING_EPOCH_MS = 1735689600000 -- models.AGING_EPOCH_MS
local AGED_TIME_MAX = 1099511627775 -- 2^40 - 1, models.AGED_TIME_BITS
local function score(priority, seq, entered)
  if AGING_MS == 0 then
    return string.format('%.0f', (MAX_PRIORITY - tonumber(priority)) * SEQ_SPACE + tonumber(seq))
  end
  local ms = math.floor(tonumber(entered) * 1000) - AGING_EPOCH_MS
  ms = math.min(math.max(ms, 0), AGED_TIME_MAX)
  local key = ms + AGING_MS * (MAX_PRIORITY - tonumber(priority))
  return string.format('%.0f', key * 4096 + tonumber(seq) % 4096)
end

local function split(s)
  local out = {}
  if s then for x in string.gmatch(s, '[^,]+') do out[#out + 1] = x end end
  return out
end

local function blank(v) return v == nil or v == false or v == '' end

-- The hubs that hold a socket of client `c`, plus `extra` (a worker's hub) if set:
-- the hubs an event about one of c's jobs must reach, each once. Bounded by the
-- live hubs.
-- Read once per client and call (no function changes the hub lists after reading
-- them).
local function hubs_for(c, extra)
  local out = {}
  if not blank(extra) then out[1] = extra end
  if not blank(c) then
    local found = CLIENT_HUBS[c]
    if not found then
      HUBS = HUBS or redis.call('ZRANGE', K.hubs(), 0, -1)
      found = {}
      for _, h in ipairs(HUBS) do
        if redis.call('SISMEMBER', K.clients(h), c) == 1 then found[#found + 1] = h end
      end
      CLIENT_HUBS[c] = found
    end
    for _, h in ipairs(found) do if h ~= extra then out[#out + 1] = h end end
  end
  return out
end

-- Append one event to the capped stream (for monitors and catch-up) and deliver it
-- to the hubs in `to` (hubs_for: each once): the calling hub gets it with the
-- reply, any other hub through its inbox stream. fields: a new flat list of name,
-- value; blanks are dropped from it in place (no second list is built: a list that
-- grows is copied at every doubling). `told`: the calling hub tells its own sockets
-- itself (a job's final outcome, from its worker's report: routes.tell_final), so
-- the event is not handed back to it.
local function emit(t, name, fields, to, told)
  local n = 0
  for i = 1, #fields, 2 do
    local v = fields[i + 1]
    if v and v ~= '' then
      fields[n + 1], fields[n + 2] = fields[i], v
      n = n + 2
    end
  end
  local at = ts(t)
  local id = redis.call('XADD', K.events(), 'MAXLEN', '~', MAXLEN, '*', 'e', name, 't', at,
    unpack(fields, 1, n))
  for _, h in ipairs(to or NONE) do
    if h == CALLER then
      if not told then LOCAL[#LOCAL + 1] = {id, {'e', name, 't', at, unpack(fields, 1, n)}} end
    else
      redis.call('XADD', K.inbox(h), 'MAXLEN', '~', MAXLEN, '*', 'e', name, 't', at,
        unpack(fields, 1, n))
    end
  end
  return id
end

-- The machine of worker id `w` (`machine:gpu`).
local function machine_of(w) return string.match(w, '^[^:]*') end

local function unidle(w, types)
  for _, jt in ipairs(types) do redis.call('ZREM', K.idle(jt), w) end
end

local function depth_add(jt, priority, n)
  if redis.call('HINCRBY', K.depth(jt), priority, n == 1 and '1' or '-1') <= 0 then
    redis.call('HDEL', K.depth(jt), priority)
  end
end

-- Job `id`, lost at time `t` by a worker of `machine`, avoids that machine for
-- AVOID_S (promote.lua ends it): no GPU of it gets the job unless that GPU has been
-- heard from since the loss (a registration or a report sets its `heard` time). The
-- machine's other sockets may be dying too, and a requeued job must not bounce
-- through them. (The job's `queued` time is the time of the loss: lose_job.)
local function shun(id, machine, t)
  if blank(machine) then return end
  redis.call('HSET', K.job(id), 'avoid', machine)
  redis.call('ZADD', K.avoid(), ts(t + AVOID_S), id)
  local key = K.avoided(machine)
  redis.call('SADD', key, id)
  redis.call('EXPIRE', key, math.ceil(AVOID_S) + math.ceil(LEASE)) -- only if no hub lifts it
end

-- Job `id` no longer avoids `machine` (its `avoid` field).
local function unshun(id, machine)
  redis.call('HDEL', K.job(id), 'avoid')
  redis.call('ZREM', K.avoid(), id)
  redis.call('SREM', K.avoided(machine), id)
end

-- The longest-idle worker that accepts type `jt`, skipping machine `avoid` if set
-- (the job was just lost there: none of its idle GPUs has been heard from since).
-- Every worker skipped is a GPU of that one machine.
local function idle_worker(jt, avoid)
  local key = K.idle(jt)
  if blank(avoid) then return redis.call('ZRANGE', key, '0', '0')[1] end
  local prefix = avoid .. ':'
  local from = 0
  while true do
    local ws = redis.call('ZRANGE', key, from, from + 15)
    for _, w in ipairs(ws) do
      if string.sub(w, 1, #prefix) ~= prefix then return w end
    end
    if #ws < 16 then return nil end
    from = from + 16
  end
end

-- Give job `id` (`j`: its {type, priority, client, params, avoid, attempt}) to worker
-- `w`; j[6], the job's `attempt` field as read (false: none yet), is nil when the
-- caller did not read it. Returns the assignment the hub pushes:
-- {job_id, attempt, job_type, priority, params, worker, hub, session, n}.
-- `returned`: the script returns it to its caller, which pushes it if the worker
-- is its own (so the event need not reach that hub again). `from_idle`: w was
-- taken from the idle sets (a busy or just registered worker is in none). `wf`: the
-- worker's {types, hub, session} if the caller read them, and `wf.n` its `n` if
-- read (a number, updated here); `heard`: more fields for the worker's hash, written
-- in the same HSET (heard_at and counters; with `ahead`, claim_next's fields for the
-- job that became current) or nil. `ahead`: the worker is busy and holds the job
-- ahead, in its prefetch slot (`next`); the job's `ahead` field is '1' until the
-- worker's current job ends (claim_next: then '0') or the job leaves the slot
-- otherwise (deleted). Its `held` time is when it was sent ahead; `assigned` moves
-- to when it becomes the worker's current job (so queued -> assigned is the wait
-- for a GPU either way), and the `assigned` event carries `ahead`.
local function assign(id, w, t, returned, j, from_idle, wf, heard, ahead)
  local jk = K.job(id)
  if not blank(j[5]) then unshun(id, j[5]) end
  local attempt
  if j[6] == nil then
    attempt = redis.call('HINCRBY', jk, 'attempt', '1')
  else
    attempt = (tonumber(j[6]) or 0) + 1
  end
  -- numbers are formatted once here, not by every command and event that takes them
  local attempt_s = tostring(attempt)
  -- a first attempt has no earlier attempt's fields to clear
  redis.call('HSET', jk, 'status', 'assigned', 'worker', w, 'assigned', ts(t), 'attempt', attempt_s,
    unpack(ahead and {'ahead', '1', 'held', ts(t)} or NONE))
  if attempt > 1 then
    redis.call('HDEL', jk, 'started', 'progress', 'message', unpack(ahead and NONE or HELD))
  end
  local wk = K.worker(w)
  wf = wf or redis.call('HMGET', wk, 'types', 'hub', 'session')
  -- n orders this worker's assignments, so a hub never re-pushes an older one that
  -- reaches it late (through the event stream) after a newer one; `jn` and `nn` are
  -- the numbers of the current job and of the one held ahead (touch.lua)
  local n
  if wf.n then
    n = wf.n + 1
    wf.n = n
  else
    n = redis.call('HINCRBY', wk, 'n', '1')
  end
  local n_s = tostring(n)
  if ahead then
    redis.call('HSET', wk, 'next', id, 'next_attempt', attempt_s, 'nn', n_s, 'n', n_s,
      unpack(heard or NONE))
  else
    redis.call('HSET', wk, 'status', 'busy', 'job', id, 'attempt', attempt_s, 'since', ts(t),
      'jn', n_s, 'n', n_s, unpack(heard or NONE))
  end
  if from_idle then unidle(w, split(wf[1])) end
  redis.call('ZADD', K.leases(), deadline(t), id)
  -- small params ride along, so the worker's hub can push without reading the job
  local push_hub = wf[2]
  if returned and push_hub == CALLER then push_hub = false end
  emit(t, 'assigned', {'job', id, 'status', 'assigned', 'jtype', j[1], 'priority', j[2],
    'client', j[3], 'worker', w, 'hub', wf[2], 'session', wf[3], 'attempt', attempt_s, 'n', n_s,
    'ahead', ahead and '1' or false, 'params', #j[4] <= INLINE_MAX and j[4] or false},
    hubs_for(j[3], push_hub))
  return {id, attempt, j[1], j[2], j[4], w, wf[2] or '', wf[3] or '', n}
end

-- Fair share per client (docs/scheduling.md). Each client's queued jobs of a type
-- wait in its sub-queue K.sub(type:client) by their queue score; the type's queue
-- holds only each client's head (the first of its sub-queue), under its head
-- score: given once, when the job first becomes its client's head, and kept in its
-- `head` field, so a displaced, requeued or retried head gets its place back. A job
-- that becomes head for the first time as it enters the queue (submitted, due,
-- retried, requeued) takes its own queue score; one that becomes head when its
-- client's previous head leaves takes a fresh seq and the time now (head_score),
-- which puts it behind every head already waiting at its priority: the round-robin.
local function head_score(id, t)
  local h = redis.call('HMGET', K.job(id), 'head', 'priority')
  if h[1] then return h[1] end
  local s = score(h[2], redis.call('INCR', K.seq()), ts(t))
  redis.call('HSET', K.job(id), 'head', s)
  return s
end

-- Queue job `id` (type `jt`, client `c`, queue score `s`) in its client's sub-queue;
-- if it is now the client's first, it replaces the client's head in the type's queue.
-- Returns its position: exact for a head, else a lower bound (its head's position
-- plus the jobs ahead of it in the sub-queue).
local function fair_enqueue(id, jt, c, s, fresh)
  local sk = K.sub(jt .. ':' .. c)
  redis.call('ZADD', sk, s, id)
  redis.call('SADD', K.subs(jt), c)
  local first = redis.call('ZRANGE', sk, '0', '1')
  if first[1] == id then
    if first[2] then redis.call('ZREM', K.queue(jt), first[2]) end -- the old head waits again
    local hs = not fresh and redis.call('HGET', K.job(id), 'head')
    if not hs then
      hs = s
      redis.call('HSET', K.job(id), 'head', s)
    end
    redis.call('ZADD', K.queue(jt), hs, id)
    return redis.call('ZRANK', K.queue(jt), id)
  end
  return (redis.call('ZRANK', K.queue(jt), first[1]) or 0) + redis.call('ZRANK', sk, id)
end

-- Take queued job `id` (type `jt`, client `c` or false) out of its queue, and out of
-- its client's sub-queue if it is in one: then the client's next job, if any,
-- becomes its head. Works on the keys as they are, whatever the policy now.
-- The caller adjusts the depth count. Returns the next head when one entered the
-- queue (see offer_head), else false.
-- `popped`: the caller took it out of the type's queue already (ZPOPMIN).
local function unqueue(id, jt, c, t, popped)
  local was_head = popped or redis.call('ZREM', K.queue(jt), id) == 1
  c = c or ''
  local sk = K.sub(jt .. ':' .. c)
  if redis.call('ZREM', sk, id) == 1 then
    local nxt = redis.call('ZRANGE', sk, '0', '0')[1]
    if not nxt then
      redis.call('SREM', K.subs(jt), c)
    elseif was_head then
      redis.call('ZADD', K.queue(jt), head_score(nxt, t), nxt)
      return nxt
    end
  end
  return false
end

-- Job `id` has just become its client's head in the queue of type `jt` (unqueue):
-- like a job entering the queue, it goes to the longest-idle worker that may take
-- it, if one waits (one can, next to a head that avoided its machine), and so on
-- for the head after it. The caller must not be handing a job to a worker that is
-- still in an idle set.
local function offer_head(id, jt, t)
  while id and redis.call('ZRANGE', K.idle(jt), '0', '0')[1] do
    local j = redis.call('HMGET', K.job(id), 'type', 'priority', 'client', 'params', 'avoid',
      'attempt')
    local w = idle_worker(jt, j[5])
    if not w then return end
    local nxt = unqueue(id, jt, j[3], t)
    depth_add(jt, j[2], -1)
    assign(id, w, t, false, j, true)
    id = nxt
  end
end

-- The queue position of queued job `id` (type `jt`, client `c` or '') counted from
-- 0 (next); under fair share, for a job behind its client's head, a lower bound (its
-- head's position plus the jobs ahead of it in the sub-queue); -1 if in no queue.
local function queued_position(id, jt, c)
  local pos = redis.call('ZRANK', K.queue(jt), id)
  if pos then return pos end
  local sk = K.sub(jt .. ':' .. (c or ''))
  local r = redis.call('ZRANK', sk, id)
  local head = redis.call('ZRANGE', sk, 0, 0)[1]
  if r and head then return (redis.call('ZRANK', K.queue(jt), head) or 0) + r end
  return -1
end

-- Put job `id` where it belongs: onto the longest-idle worker that accepts its
-- type, else into its queue at the position its priority and seq give it. `fresh`:
-- just submitted (its `queued` time is its `created` time and it had no worker).
-- `j`: the job's {type, priority, seq, client, params, avoid, created, due} if the
-- caller has them (`avoid`, `due` false when unset; aging scores from due or created).
-- A job that avoids a machine (shun) goes to no worker of it.
-- Returns assignment, position (one of them is false); `returned` as for assign.
local function enqueue(id, t, fresh, returned, j)
  local jk = K.job(id)
  j = j or redis.call('HMGET', jk, 'type', 'priority', 'seq', 'client', 'params', 'avoid',
    'created', 'due')
  if not fresh then redis.call('HSET', jk, 'queued', ts(t), 'worker', '') end
  local w = idle_worker(j[1], j[6])
  if w then
    return assign(id, w, t, returned, {j[1], j[2], j[4], j[5], j[6], fresh and '0' or nil},
      true), false
  end
  if not fresh then redis.call('HSET', jk, 'status', 'queued') end -- a fresh job is queued
  local s = score(j[2], j[3], j[8] or j[7])
  depth_add(j[1], j[2], 1)
  if FAIR then return false, fair_enqueue(id, j[1], j[4] or '', s, fresh) end
  redis.call('ZADD', K.queue(j[1]), s, id)
  return false, redis.call('ZRANK', K.queue(j[1]), id)
end

-- The first job in the queue of type `jt` that worker `w` may take: one that does
-- not avoid w's machine (`avoided`: that machine's avoided set, false if none
-- avoids it), or was lost there before w was last `heard` from, or whose avoidance
-- has lapsed. Returns id, score or nil. Every job skipped avoids w's machine.
local function queue_head(jt, avoided, heard, t)
  local key = K.queue(jt)
  if not avoided then
    local top = redis.call('ZRANGE', key, '0', '0', 'WITHSCORES')
    return top[1], tonumber(top[2])
  end
  local from = 0
  while true do
    local page = redis.call('ZRANGE', key, from, from + 15, 'WITHSCORES')
    for i = 1, #page, 2 do
      local id = page[i]
      if redis.call('SISMEMBER', avoided, id) == 0 then return id, tonumber(page[i + 1]) end
      local until_t = tonumber(redis.call('ZSCORE', K.avoid(), id))
      local lost_at = tonumber(redis.call('HGET', K.job(id), 'queued'))
      if not until_t or until_t <= t or (heard and lost_at and heard >= lost_at) then
        return id, tonumber(page[i + 1])
      end
    end
    if #page < 32 then return nil end
    from = from + 16
  end
end

-- The best queued job over `types` (priority, then the global submission order)
-- for a worker that claims (claim_next), out of its queue: id and its fields {type,
-- priority, client, params, avoid, attempt, head}, or nil. No job avoids that worker
-- (shun): it claims because it registered, reported, or was renewed by its hub
-- (touch), each of which has it heard from since any loss on its machine.
local function take_best(types, t)
  local best, best_type = nil, nil
  local popped = #types == 1
  if popped then -- one queue: its first job, taken out in one call
    best, best_type = redis.call('ZPOPMIN', K.queue(types[1]))[1], types[1]
  else
    local best_score = nil
    for _, jt in ipairs(types) do
      local id, s = queue_head(jt, false)
      if id and (best_score == nil or s < best_score) then best, best_score, best_type = id, s, jt end
    end
  end
  if not best then return nil end
  local j = redis.call('HMGET', K.job(best), 'type', 'priority', 'client', 'params', 'avoid',
    'attempt', 'head')
  -- a job in the type's queue is in a client's sub-queue only as its head (fair
  -- share), which has a `head` score: one popped without it is out of every queue
  local nxt = (j[7] or not popped) and unqueue(best, best_type, j[3], t, popped)
  depth_add(best_type, j[2], -1)
  if nxt then offer_head(nxt, best_type, t) end
  return best, j
end

-- Worker `w` (accepting `types`, read if not given) is free and has just been
-- heard from (it registered or reported: its `heard` time is t). A job it holds
-- ahead becomes its current one; else it gets the best queued job it may take
-- (take_best), or is marked idle. A worker with a prefetch window then takes one
-- more queued job to hold ahead, if there is one.
-- `wf`: from release, the worker's {types, hub, session, next, next_attempt,
-- prefetch, nn}, its `n` (wf.n) and its updated counters (wf.counters: name, value
-- pairs); its `seen` and `heard` and those counters are then written here, with its
-- other fields.
-- Returns {current, ahead, took_ahead}: the assignments to push (either false) and
-- whether the job the worker held ahead became its current one (then current is
-- false: that job was pushed when it was taken ahead, and the worker is busy).
local function claim_next(w, t, types, wf)
  local wk = K.worker(w)
  types = types or split(redis.call('HGET', wk, 'types'))
  local out = {false, false, false}
  local heard = wf and heard_at(t)
  if wf then
    for _, x in ipairs(wf.counters) do heard[#heard + 1] = x end
  end
  -- the worker's fields when the job it held ahead becomes its current one: written
  -- with the next job it takes ahead, in one HSET, or alone (its slot emptied) below
  local took
  if wf and not blank(wf[4]) then
    out[3] = true
    took = {'status', 'busy', 'job', wf[4], 'attempt', wf[5], 'since', ts(t), 'jn', wf[7] or '',
      unpack(heard)}
    -- on its GPU now: its wait ends; `ahead` 0 (not held), set in the same command
    redis.call('HSET', K.job(wf[4]), 'ahead', '0', 'assigned', ts(t))
  else
    local best, j = take_best(types, t)
    if not best then
      redis.call('HSET', wk, 'status', 'idle', 'job', '', 'attempt', '', 'since', ts(t),
        unpack(heard or NONE))
      for _, jt in ipairs(types) do redis.call('ZADD', K.idle(jt), ts(t), w) end
      return out
    end
    out[1] = assign(best, w, t, true, j, false, wf, heard)
  end
  if wf and wf[6] == '1' then
    local best, j = take_best(types, t)
    if best then
      out[2] = assign(best, w, t, true, j, false, wf, took, true)
      took = nil
    end
  end
  if took then
    for _, x in ipairs(EMPTY_SLOT) do took[#took + 1] = x end
    redis.call('HSET', wk, unpack(took))
  end
  return out
end

-- Worker `w` is done with its job (any outcome: 'done', 'failed', or false when it
-- acknowledges a cancel): account for it and claim the next.
local function release(w, t, outcome)
  local wk = K.worker(w)
  local h = redis.call('HMGET', wk, 'since', 'types', 'hub', 'session', 'next', 'next_attempt',
    'prefetch', 'nn', 'n', 'busy_s', outcome or 'done')
  local counters = {}
  local since = tonumber(h[1])
  if since then
    counters = {'busy_s', string.format('%.6f', (tonumber(h[10]) or 0) + (t - since))}
  end
  if outcome then
    counters[#counters + 1], counters[#counters + 2] = outcome, (tonumber(h[11]) or 0) + 1
  end
  local wf = {h[2], h[3], h[4], h[5], h[6], h[7], h[8], n = tonumber(h[9]) or 0,
    counters = counters}
  return claim_next(w, t, split(h[2]), wf)
end

-- A worker's report's reply: {outcome, current, ahead, took_ahead}, claim_next's
-- three after the outcome (one table: see the reply note at the top).
local function report_reply(outcome, claim) return {outcome, claim[1], claim[2], claim[3]} end

-- The done index of each status drops the ids older than TTL once per this many
-- jobs of a type reaching it (their hashes have expired): at most this many stale
-- ids per job type stay.
local DONE_TRIM_EVERY = 64

-- Move job `id` (of type `jt`, read if not given) to terminal `status`: expire it
-- after TTL, index it, count it (per type: the totals are the sums, operations.stats).
-- `fields`: more name, value pairs for the job's hash.
local function finish(id, status, t, jt, fields)
  local jk = K.job(id)
  redis.call('HSET', jk, 'status', status, 'finished', ts(t), unpack(fields or NONE))
  redis.call('EXPIRE', jk, TTL_S)
  redis.call('ZREM', K.leases(), id)
  local dk = K.done(status)
  redis.call('ZADD', dk, ts(t), id)
  jt = jt or redis.call('HGET', jk, 'type')
  if redis.call('HINCRBY', K.stats(), status .. ':' .. jt, '1') % DONE_TRIM_EVERY == 0 then
    redis.call('ZREMRANGEBYSCORE', dk, '-inf', '(' .. ts(t - TTL))
  end
end

-- Fencing: may worker `w` report on attempt `attempt` of job `id`?
-- Returns the verdict and the job's {status, attempt, worker, ahead, ...} (`...`:
-- more fields the caller wants, read in the same call). The verdict is nil (yes),
-- 'CANCELLED' (it may, to acknowledge a cancel),
-- 'CANCELLED_AHEAD' (it may acknowledge the cancel of a job it held ahead: that
-- frees nothing, the worker is still busy) or an error text. A job held ahead
-- takes no report until the job before it ends (it is not running yet).
local function fence(id, attempt, w, ...)
  local j = redis.call('HMGET', K.job(id), 'status', 'attempt', 'worker', 'ahead', ...)
  if not j[1] then return 'NOT_FOUND no job ' .. id, j end
  if j[3] ~= w or j[2] ~= attempt then
    return 'STALE_ATTEMPT job ' .. id .. ' attempt ' .. attempt .. ' is not current for ' .. w, j
  end
  if j[1] == 'cancelled' and j[4] == '1' then return 'CANCELLED_AHEAD', j end
  if j[4] == '1' then
    return 'BAD_STATE job ' .. id .. ' is held ahead: report on the job before it first', j
  end
  if j[1] == 'cancelled' then
    -- the acknowledgement of a cancel frees the worker once, while it still holds the job
    if redis.call('HGET', K.worker(w), 'job') ~= id then
      return 'STALE_ATTEMPT job ' .. id .. ' was cancelled and already acknowledged', j
    end
    return 'CANCELLED', j
  end
  if j[1] ~= 'assigned' and j[1] ~= 'running' then
    return 'BAD_STATE job ' .. id .. ' is ' .. j[1], j
  end
  return nil, j
end

-- The worker holding job `id` is gone: requeue the job at its old position, or
-- fail it for good once it has lost more than MAX_LOST workers (a poison job).
local function lose_job(id, w, t, count)
  local jk = K.job(id)
  local j = redis.call('HMGET', jk, 'status', 'worker', 'lost', 'client', 'attempt')
  if j[2] ~= w or (j[1] ~= 'assigned' and j[1] ~= 'running') then return end
  redis.call('ZREM', K.leases(), id)
  local lost = redis.call('HINCRBY', jk, 'lost', count)
  if lost > MAX_LOST then
    redis.call('HSET', jk, 'error', 'worker lost ' .. lost .. ' times while running this job')
    finish(id, 'failed', t)
    emit(t, 'failed', {'job', id, 'status', 'failed', 'client', j[4], 'worker', w,
      'attempt', j[5]}, hubs_for(j[4]))
    return
  end
  redis.call('HINCRBY', K.stats(), 'requeued', '1')
  emit(t, 'requeued', {'job', id, 'status', 'queued', 'client', j[4], 'worker', w,
    'attempt', j[5]}, hubs_for(j[4]))
  if count > 0 then shun(id, machine_of(w), t) end
  enqueue(id, t, false, false)
end

-- Jobs `ids` avoid no machine any more (promote.lua): each one still queued goes,
-- in queue order, to the longest-idle worker that takes it (if any).
local function redispatch(ids, t)
  local queued = {}
  for _, id in ipairs(ids) do
    local j = redis.call('HMGET', K.job(id), 'status', 'type', 'priority', 'client', 'params')
    if j[1] == 'queued' then
      local s = redis.call('ZSCORE', K.queue(j[2]), id)
      if s then queued[#queued + 1] = {tonumber(s), id, j} end
    end
  end
  table.sort(queued, function(a, b) return a[1] < b[1] end)
  local promoted = {}
  for _, q in ipairs(queued) do
    local id, j = q[2], q[3]
    local w = redis.call('ZRANGE', K.idle(j[2]), 0, 0)[1]
    if w then
      if unqueue(id, j[2], j[4], t) then promoted[j[2]] = true end
      depth_add(j[2], j[3], -1)
      assign(id, w, t, false, {j[2], j[3], j[4], j[5]}, true)
    end
  end
  -- fair share: a head that entered the queue above may be one that other idle
  -- workers (of the machine its client's previous head avoided) can take now
  local types = {}
  for jt in pairs(promoted) do types[#types + 1] = jt end
  table.sort(types)
  for _, jt in ipairs(types) do
    for _, w in ipairs(redis.call('ZRANGE', K.idle(jt), 0, -1)) do
      local avoided = K.avoided(machine_of(w))
      local heard = nil
      if redis.call('EXISTS', avoided) == 0 then
        avoided = false
      else
        heard = tonumber(redis.call('HGET', K.worker(w), 'heard'))
      end
      local id = queue_head(jt, avoided, heard, t)
      if id then
        local j = redis.call('HMGET', K.job(id), 'type', 'priority', 'client', 'params', 'avoid')
        unqueue(id, jt, j[3], t)
        depth_add(jt, j[2], -1)
        assign(id, w, t, false, j, true)
      end
    end
  end
end

-- Take worker `w` out of service; requeue its job. Only if `session` is current.
-- A job it held ahead (prefetch) is requeued too, never counted: it did not run.
local function drop_worker(w, session, t, count)
  local wk = K.worker(w)
  local h = redis.call('HMGET', wk, 'session', 'job', 'types', 'status', 'next')
  if h[1] ~= session or h[4] == 'offline' then return 0 end
  unidle(w, split(h[3]))
  redis.call('HSET', wk, 'status', 'offline', 'job', '', 'attempt', '', 'hub', '', 'seen', ts(t),
    unpack(EMPTY_SLOT))
  redis.call('ZREM', K.workers(), w)
  redis.call('EXPIRE', wk, TTL_S)
  emit(t, 'worker_down', {'worker', w})
  if not blank(h[2]) then lose_job(h[2], w, t, count) end
  if not blank(h[5]) then
    redis.call('HDEL', K.job(h[5]), 'ahead')
    lose_job(h[5], w, t, 0)
  end
  return 1
end
