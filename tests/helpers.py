"""Test helpers: waiting on conditions (never a bare sleep) and engine invariants."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import redis

from redisq_server import EngineLimits, Keys, Settings


def hub_settings(redis_url: str, limits: EngineLimits, **kw: Any) -> Settings:
    """Settings for a test hub on a free port; ``kw`` overrides any field."""
    return replace(Settings(redis_url=redis_url, hub_port=0, limits=limits), **kw)


async def wait_for(
    cond: Callable[[], Awaitable[Any]], timeout: float = 10.0, what: str = ""
) -> Any:
    """Await ``cond()`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")
        await asyncio.sleep(0.005)


def wait_sync(cond: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")
        time.sleep(0.005)


# An atomic snapshot check of the engine's invariants (read-only).
INVARIANTS_LUA = """
local P = ARGV[1]
local bad = {}
local held = {}
for _, jt in ipairs(redis.call('SMEMBERS', P .. 'types')) do
  local q = redis.call('ZCARD', P .. 'queue:' .. jt)
  if q > 0 then
    -- an idle worker may wait next to queued jobs only while each of them avoids
    -- its machine (requeued after a loss there)
    for _, w in ipairs(redis.call('ZRANGE', P .. 'idle:' .. jt, 0, -1)) do
      local avoiding = 0
      for _, id in ipairs(redis.call('SMEMBERS', P .. 'avoided:' .. string.match(w, '^[^:]*'))) do
        if redis.call('ZSCORE', P .. 'queue:' .. jt, id) then avoiding = avoiding + 1 end
      end
      if avoiding < q then
        bad[#bad + 1] = jt .. ': ' .. q - avoiding .. ' queued while ' .. w .. ' is idle'
      end
    end
  end
end
for _, w in ipairs(redis.call('ZRANGE', P .. 'workers', 0, -1)) do
  local h = redis.call('HMGET', P .. 'worker:' .. w, 'status', 'job', 'next')
  if h[3] and h[3] ~= '' then
    -- a job held ahead (prefetch): only by a busy worker, assigned to it, held once
    if h[1] ~= 'busy' then bad[#bad + 1] = w .. ' holds ' .. h[3] .. ' ahead while ' .. tostring(h[1]) end
    if held[h[3]] then bad[#bad + 1] = h[3] .. ' held by ' .. held[h[3]] .. ' and ' .. w end
    held[h[3]] = w
    local j = redis.call('HMGET', P .. 'job:' .. h[3], 'worker', 'status', 'ahead')
    if j[1] ~= w or j[2] ~= 'assigned' or j[3] ~= '1' then
      bad[#bad + 1] = w .. ' holds ' .. h[3] .. ' ahead, which is ' .. tostring(j[2]) .. ' on ' .. tostring(j[1])
    end
  end
  if h[1] == 'busy' then
    if not h[2] or h[2] == '' then bad[#bad + 1] = w .. ' busy without a job' end
    if held[h[2]] then bad[#bad + 1] = h[2] .. ' held by ' .. held[h[2]] .. ' and ' .. w end
    held[h[2]] = w
    local j = redis.call('HMGET', P .. 'job:' .. h[2], 'worker', 'status', 'ahead')
    if j[2] ~= 'cancelled' and j[1] ~= w then
      bad[#bad + 1] = w .. ' holds ' .. h[2] .. ' whose worker is ' .. tostring(j[1])
    end
    if j[3] == '1' then bad[#bad + 1] = w .. ' runs ' .. h[2] .. ', still marked held ahead' end
  elseif h[1] == 'idle' then
    if h[2] and h[2] ~= '' then bad[#bad + 1] = w .. ' idle with job ' .. h[2] end
  end
end
for _, id in ipairs(redis.call('ZRANGE', P .. 'leases', 0, -1)) do
  local st = redis.call('HGET', P .. 'job:' .. id, 'status')
  if st ~= 'assigned' and st ~= 'running' then bad[#bad + 1] = 'lease on ' .. id .. ' in ' .. tostring(st) end
  if not held[id] then bad[#bad + 1] = 'lease on ' .. id .. ' held by no live worker' end
end
-- and every job a live worker holds, unless cancelled, has a lease (else no reaper
-- would ever requeue it after its hub dies)
for id, w in pairs(held) do
  local st = redis.call('HGET', P .. 'job:' .. id, 'status')
  if st ~= 'cancelled' and not redis.call('ZSCORE', P .. 'leases', id) then
    bad[#bad + 1] = id .. ' held by ' .. w .. ' without a lease'
  end
end
return bad
"""


async def invariant_violations(client: Any, keys: Keys) -> list[str]:
    """Violations of the engine's invariants in one atomic snapshot (empty: all hold)."""
    return list(await client.eval(INVARIANTS_LUA, 1, keys.events, keys.prefix))


def invariant_violations_sync(client: redis.Redis, keys: Keys) -> list[str]:
    return list(client.eval(INVARIANTS_LUA, 1, keys.events, keys.prefix))  # type: ignore[arg-type]


def namespace_keys(client: redis.Redis, keys: Keys) -> dict[str, Any]:
    """Every key of a namespace with a dump of its value (tests only: uses SCAN)."""
    out: dict[str, Any] = {}
    for k in sorted(
        client.scan_iter(match=keys.prefix.replace("{", "\\{").replace("}", "\\}") + "*")
    ):
        out[k] = client.dump(k)
    return out


async def wait_running(client: Any, job_id: str, timeout: float = 10.0) -> None:
    """Wait until ``client`` (a QueueClient that may read the job) sees job
    ``job_id`` running (its worker's first progress report)."""

    async def running() -> bool:
        return bool((await client.status(job_id))["status"] == "running")

    await wait_for(running, timeout, "the job to run")
