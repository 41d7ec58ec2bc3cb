-- A worker moving here from another shard of a sharded namespace (docs/deploy.md),
-- before it registers: its assignment numbers continue from those it had there.
-- A(1) worker id  A(2) its assignment number on the shard it left
local wk = K.worker(A(1))
local known = redis.call('EXISTS', wk) == 1
if tonumber(A(2)) > tonumber(redis.call('HGET', wk, 'n') or '0') then
  redis.call('HSET', wk, 'n', A(2))
end
-- a worker new to this shard: its record holds only `n` until it registers here
-- (register.lua persists it); if it never does, the record goes, as an offline
-- worker's does
if not known then redis.call('EXPIRE', wk, TTL_S) end
return 1
