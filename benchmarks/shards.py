"""One namespace with 1 and with 3 shards on a private 3-master Redis Cluster.

For each shard count: ``jobs`` jobs of three priorities are submitted (no worker
registered, so all are queued), then ``workers`` engine workers register and each
loops ``complete_job`` -> next assignment until nothing is left (the drain). What
is reported per run: submit and drain rates, and the Redis CPU each master used
during the drain (``INFO cpu``: user + sys seconds, per master), with its share.

The engine is called without the hub (one asyncio process, one cluster client), as
in ``benchmarks/engine.py``. On a small machine the three masters and the client
share the cores, so the drain rate is bounded by the client and the shared CPU; the
figure that carries over is **Redis CPU per job per master**: a master saturates at
1 CPU-second per second, so the ceiling of a namespace on M masters is projected as
``M / (CPU-seconds per job on the busiest master x M / S')`` with S' = min(S, M)
masters doing the work, i.e. ``1 / max over masters of (CPU-seconds per job on
that master)`` jobs/s, scaled to the share each master carries.

Run it as a part of the one runner::

    python -m benchmarks --only shards --peers none
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis

from redisq_lab.redis_cluster import RedisClusterProcess
from redisq_server import AsyncRedisService, EngineLimits
from redisq_server.sharding_async import AsyncShardedService


def _cpu(node: redis.Redis) -> float:
    info = node.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _drain(svc: AsyncRedisService, workers: int) -> int:
    async def work(w: str) -> int:
        n = 0
        a = await svc.register_worker(w, ["t"], session="s")
        while a is not None:
            a = (await svc.complete_job(a.job_id, a.attempt, w, None)).next
            n += 1
        return n

    return sum(await asyncio.gather(*(work(f"bench:gpu{i}") for i in range(workers))))


async def _run(
    url: str, nodes: dict[int, redis.Redis], shards: int, jobs: int, workers: int
) -> dict[str, Any]:
    """Submit ``jobs``, then drain them with ``workers``; the figures of one run."""
    ns = f"bench{shards}"
    limits = EngineLimits(namespace=ns, shards=shards)
    svc = (
        AsyncShardedService(url, limits=limits)
        if shards > 1
        else AsyncRedisService(url, limits=limits)
    )
    try:
        await svc.ping()  # the cluster client learns the slots before the burst
        sem = asyncio.Semaphore(workers)

        async def submit(i: int) -> None:
            async with sem:
                await svc.submit_job("t", (0, 5, 10)[i % 3], {}, job_id=f"{ns}-{i}")

        t0 = time.perf_counter()
        await asyncio.gather(*(submit(i) for i in range(jobs)))
        submit_s = time.perf_counter() - t0
        before = {p: _cpu(n) for p, n in nodes.items()}
        t0 = time.perf_counter()
        done = await _drain(svc, workers)
        drain_s = time.perf_counter() - t0
        cpu = [_cpu(n) - before[p] for p, n in nodes.items()]
    finally:
        await svc.aclose()
    busiest = max(cpu)
    return {
        "shards": shards,
        "jobs": jobs,
        "workers": workers,
        "submit_per_s": round(jobs / submit_s),
        "drained": done,
        "drain_per_s": round(done / drain_s),
        "redis_cpu_s_per_master": [round(v, 3) for v in cpu],
        "cpu_us_per_job_busiest_master": round(busiest / done * 1e6, 1),
        # the busiest master saturates first, at 1 CPU-second per second
        "projected_ceiling_per_s": round(done / busiest) if busiest else None,
    }


async def measure(jobs: int, workers: int) -> list[dict[str, Any]]:
    """The figures of one run with 1 shard and one with 3, on a private 3-master
    cluster started (and stopped) here."""
    with RedisClusterProcess(masters=3) as cluster:
        nodes = {port: cluster.node_client(port) for port in cluster.ports}
        try:
            return [await _run(cluster.url, nodes, s, jobs, workers) for s in (1, 3)]
        finally:
            for n in nodes.values():
                n.close()


def lines(runs: list[dict[str, Any]]) -> list[str]:
    """The part's table: per shard count, rates and Redis CPU per master."""
    out = [
        "Sharded namespace on a local 3-master cluster (engine only, no hub): "
        "Redis CPU per job on the busiest master, projected ceiling = 1 / that",
        f"{'shards':>6} {'drain/s':>9} {'CPU s per master':>24} {'us/job':>8} {'ceiling/s':>10}",
    ]
    for r in runs:
        per_master = " ".join(f"{v:.2f}" for v in r["redis_cpu_s_per_master"])
        out.append(
            f"{r['shards']:>6} {r['drain_per_s']:>9,} {per_master:>24} "
            f"{r['cpu_us_per_job_busiest_master']:>8} {r['projected_ceiling_per_s'] or 0:>10,}"
        )
    return out
