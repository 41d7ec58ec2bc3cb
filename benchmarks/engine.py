"""The queue engine without the hub, against raw Redis baselines.

What is measured (against the Redis it is given; the runner gives its private
redis-server), for each concurrency in turn:

* ``submit``: N ``submit_job`` calls with no workers registered, so every job is
  queued (one Lua script each).
* ``complete+claim``: with those N jobs queued, ``concurrency`` workers register
  and each loops ``complete_job`` -> next assignment until the queue is empty;
  completions per second (each is one script that finishes a job and claims the
  next).
* ``PING`` and ``ZADD+ZPOPMIN``: raw redis.asyncio baselines, N each (a pair
  counts as one op), to show the engine's cost relative to the floor.
* Redis' own cost per job over the whole lifecycle (the submit, then the
  complete+claim that finishes it): Redis process CPU (``INFO cpu``, user + sys,
  which includes reading and writing the sockets) and the time inside the engine's
  functions (``INFO commandstats``, ``fcall``), each over both phases divided by N.

Every phase runs ``concurrency`` coroutines sharing one ``redis.asyncio`` client,
i.e. one connection pool (each in-flight coroutine holds its own connection),
``decode_responses=True``, on the runner's event loop. No WebSocket is involved:
this is the ceiling one hub process could reach. Run it with::

    python -m benchmarks --only engine --peers none
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aredis
from redis.utils import HIREDIS_AVAILABLE

from benchmarks.common import JOB_TYPE, redis_counters
from redisq_server import AsyncRedisService, EngineLimits

#: the operations measured, in the order the tables show them
OPERATIONS = ("submit", "complete+claim", "PING", "ZADD+ZPOPMIN")


def _shares(total: int, parts: int) -> list[int]:
    """Split ``total`` into ``parts`` near-equal counts."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def _timed(
    concurrency: int, total: int, loop: Callable[[int, int], Awaitable[None]]
) -> float:
    """Run ``loop(index, count)`` in ``concurrency`` coroutines; return ops/s."""
    start = time.perf_counter()
    await asyncio.gather(*(loop(i, n) for i, n in enumerate(_shares(total, concurrency))))
    return total / (time.perf_counter() - start)


async def ops_per_s(url: str, namespace: str, jobs: int, concurrency: int) -> dict[str, Any]:
    """Every operation, ``jobs`` times, in ``concurrency`` coroutines against the Redis
    at ``url`` (the engine's keys under ``namespace``): ``ops_per_s`` by operation and
    ``redis_us_per_job`` (``cpu`` and ``fcall``) over a job's whole lifecycle."""
    svc = AsyncRedisService(url, limits=EngineLimits(namespace=namespace))
    raw: aredis.Redis = svc.redis  # same client and pool for the baselines
    zkey = f"{namespace}:bench:zset"
    try:
        await raw.ping()

        async def ping_loop(_i: int, n: int) -> None:
            for _ in range(n):
                await raw.ping()

        async def zset_loop(i: int, n: int) -> None:
            for k in range(n):
                await raw.zadd(zkey, {f"{i}:{k}": k})
                await raw.zpopmin(zkey)

        async def submit_loop(_i: int, n: int) -> None:
            for _ in range(n):
                r = await svc.submit_job(JOB_TYPE, 0, {"n": 1})
                if r.assignment is not None:
                    raise RuntimeError("a worker took a job during the submit phase")

        ops: dict[str, float] = {}
        ops["PING"] = await _timed(concurrency, jobs, ping_loop)
        ops["ZADD+ZPOPMIN"] = await _timed(concurrency, jobs, zset_loop)
        before = await redis_counters(raw)
        ops["submit"] = await _timed(concurrency, jobs, submit_loop)
        assignments = [
            await svc.register_worker(f"m1:gpu{i}", [JOB_TYPE], session=f"s{i}")
            for i in range(concurrency)
        ]
        completed = [0] * concurrency

        async def complete_loop(i: int) -> None:
            a = assignments[i]
            while a is not None:
                r = await svc.complete_job(a.job_id, a.attempt, a.worker_id, {"ok": True})
                completed[i] += 1
                a = r.next

        start = time.perf_counter()
        await asyncio.gather(*(complete_loop(i) for i in range(concurrency)))
        ops["complete+claim"] = sum(completed) / (time.perf_counter() - start)
        after = await redis_counters(raw)
        stats = await svc.get_stats()
        if not sum(completed) == jobs == stats["totals"]["completed"] or stats["queued"]:
            raise RuntimeError(f"expected {jobs} completions, got {completed}; {stats}")
    finally:
        await raw.delete(zkey)
        await svc.aclose()
    cost = {"cpu": 1e6 * (after[0] - before[0]) / jobs, "fcall": (after[1] - before[1]) / jobs}
    return {"ops_per_s": {name: ops[name] for name in OPERATIONS}, "redis_us_per_job": cost}


async def measure(
    url: str, namespace: str, jobs: int, concurrencies: Sequence[int]
) -> dict[str, Any]:
    """:func:`ops_per_s` at each concurrency (a namespace of its own each)."""
    runs = [
        {"concurrency": c, **await ops_per_s(url, f"{namespace}-c{c}", jobs, c)}
        for c in concurrencies
    ]
    return {
        "jobs": jobs,
        "hiredis": HIREDIS_AVAILABLE,
        "clients": "one shared redis.asyncio client and connection pool",
        "runs": runs,
    }
