-- A worker's socket closed: take it out of service and requeue its job at once,
-- at its original position. No-op unless `session` is the worker's current one.
-- A(1) worker id  A(2) session  A(3) 1 to count the loss against the job, else 0
-- Returns 1 if the worker was dropped, 0 otherwise.
return drop_worker(A(1), A(2), now(), tonumber(A(3)))
