"""Throughput of the queue engine against raw Redis, on a private redis-server.

What is measured (all against one redis-server this script starts on a free
loopback port, never the Redis on 6379):

* ``submit``: N ``submit_job`` calls with no workers registered, so every job is
  queued (one Lua script each).
* ``complete+claim``: with those N jobs queued, ``concurrency`` workers register
  and each loops ``complete_job`` -> next assignment until the queue is empty;
  completions per second (each is one script that finishes a job and claims the
  next).
* ``PING`` and ``ZADD+ZPOPMIN``: raw redis.asyncio baselines, N each (a pair
  counts as one op), to show the engine's cost relative to the floor.

Every phase runs ``concurrency`` coroutines sharing one ``redis.asyncio`` client,
i.e. one connection pool (each in-flight coroutine holds its own connection),
``decode_responses=True``, on the default asyncio event loop.

Run from the repository root::

    python -m benchmarks.engine [--jobs 20000] [--concurrency 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aredis
from redis.utils import HIREDIS_AVAILABLE

from redisq_lab.redis_process import RedisProcess
from redisq_server import AsyncRedisService, EngineLimits

JOB_TYPE = "bench"


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


async def run_benchmark(
    url: str, jobs: int = 20_000, concurrency: int = 8, namespace: str = "bench"
) -> dict[str, Any]:
    """Measure every operation against the Redis at ``url``; return the results."""
    svc = AsyncRedisService(url, limits=EngineLimits(namespace=namespace))
    raw: aredis.Redis = svc.redis  # same client and pool for the baselines
    zkey = f"{namespace}:bench:zset"
    try:
        info = await raw.info("server")
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
        stats = await svc.get_stats()
        if not sum(completed) == jobs == stats["totals"]["completed"] or stats["queued"]:
            raise RuntimeError(f"expected {jobs} completions, got {completed}; {stats}")
    finally:
        await raw.delete(zkey)
        await svc.aclose()
    return {
        "redis_version": info["redis_version"],
        "python_version": platform.python_version(),
        "hiredis": HIREDIS_AVAILABLE,
        "jobs": jobs,
        "concurrency": concurrency,
        "clients": "one shared redis.asyncio client and connection pool",
        "ops_per_s": ops,
    }


def format_table(res: dict[str, Any]) -> str:
    """The results as an aligned text table with a header."""
    ops: dict[str, float] = res["ops_per_s"]
    ping, pair = ops["PING"], ops["ZADD+ZPOPMIN"]
    lines = [
        f"Redis {res['redis_version']}, Python {res['python_version']}, "
        f"hiredis={res['hiredis']}, jobs={res['jobs']}, concurrency={res['concurrency']} "
        f"- {res['clients']}",
        f"{'operation':<16}{'ops/s':>12}{'vs PING':>10}{'vs ZADD+ZPOPMIN':>18}",
    ]
    for name in ("submit", "complete+claim", "PING", "ZADD+ZPOPMIN"):
        v = ops[name]
        lines.append(f"{name:<16}{v:>12,.0f}{v / ping:>10.2f}{v / pair:>18.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=20_000, help="N (default 20000)")
    parser.add_argument("--concurrency", type=int, default=8, help="coroutines (default 8)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    args = parser.parse_args(argv)
    with RedisProcess() as proc:
        res = asyncio.run(run_benchmark(proc.url, args.jobs, args.concurrency))
    print(format_table(res))
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
