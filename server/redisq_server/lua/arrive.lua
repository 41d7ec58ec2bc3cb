-- A worker moving here from another shard of a sharded namespace (docs/deploy.md),
-- before it registers: its assignment numbers continue from those it had there.
-- A(1) worker id  A(2) its assignment number on the shard it left
local wk = K.worker(A(1))
if tonumber(A(2)) > tonumber(redis.call('HGET', wk, 'n') or '0') then
  redis.call('HSET', wk, 'n', A(2))
end
return 1
