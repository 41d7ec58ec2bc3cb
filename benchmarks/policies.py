"""The scheduling policies' cost: each policy against strict priority, on the engine.

What is measured, for each policy in turn (strict, aging, fair share, both), on a
namespace of its own in the Redis it is given (the runner gives its private
redis-server, database 1), with no hub, so that only the scripts differ:

* ``submit``: N ``submit_job`` calls, one at a time, from ``clients`` client ids in
  turn at priorities 0, 5 and 10, with no worker registered (every job is queued).
  The client that submits every other job is a burst, so fair share has sub-queues
  of very different lengths.
* ``dispatch``: ``gpus`` workers register and each loops ``complete_job`` -> its next
  assignment until the queue is empty. The dispatch latency is the round trip of
  one such call (the completion and the claim of the next job are one script).

Redis CPU per job comes from the server itself: ``used_cpu_sys + used_cpu_user``
(``INFO cpu``) and the scripts' own time (``INFO commandstats``, ``fcall``
``usec``) over each phase, divided by N. The policies take turns in 3 rounds and
the median of each figure is reported. Run it with::

    python -m benchmarks --only policies --peers none
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import redis.asyncio as aredis

from benchmarks.common import JOB_TYPE, redis_counters
from redisq_lab.frames import percentiles
from redisq_server import AsyncRedisService, EngineLimits

#: policy name -> EngineLimits fields, in the order the table shows them
POLICIES: dict[str, dict[str, Any]] = {
    "strict": {},
    "aging": {"aging_s": 1.0},
    "fair share": {"fair_share": "client"},
    "aging + fair share": {"aging_s": 1.0, "fair_share": "client"},
}


def _per_job(
    before: tuple[float, float, int], after: tuple[float, float, int], n: int
) -> dict[str, float]:
    return {
        "redis_cpu_us_per_job": (after[0] - before[0]) * 1e6 / n,
        "script_us_per_job": (after[1] - before[1]) / n,
        "scripts_per_job": (after[2] - before[2]) / n,
    }


async def one_policy(
    url: str, namespace: str, limits: dict[str, Any], jobs: int, gpus: int, clients: int
) -> dict[str, Any]:
    """Submit ``jobs``, then drain them with ``gpus`` workers, under ``limits``."""
    svc = AsyncRedisService(url, limits=EngineLimits(namespace=namespace, **limits))
    raw: aredis.Redis = svc.redis
    try:
        await raw.ping()
        names = [f"c{i}" for i in range(clients)]
        before = await redis_counters(raw)
        submit_ns: list[int] = []
        start = time.perf_counter()
        for k in range(jobs):
            client = names[0] if k % 2 == 0 else names[1 + (k // 2) % (clients - 1)]
            t0 = time.monotonic_ns()
            r = await svc.submit_job(JOB_TYPE, (0, 5, 10)[k % 3], {"n": k}, client_id=client)
            submit_ns.append(time.monotonic_ns() - t0)
            if r.assignment is not None:
                raise RuntimeError("a worker took a job during the submit phase")
        submit_s = time.perf_counter() - start
        after_submit = await redis_counters(raw)

        assignments = [
            await svc.register_worker(f"m1:gpu{i}", [JOB_TYPE], session=f"s{i}")
            for i in range(gpus)
        ]
        dispatch_ns: list[int] = []

        async def worker(a: Any) -> None:
            while a is not None:
                t0 = time.monotonic_ns()
                r = await svc.complete_job(a.job_id, a.attempt, a.worker_id, None)
                dispatch_ns.append(time.monotonic_ns() - t0)
                a = r.next

        start = time.perf_counter()
        await asyncio.gather(*(worker(a) for a in assignments))
        drain_s = time.perf_counter() - start
        after_drain = await redis_counters(raw)
        stats = await svc.get_stats()
        if stats["totals"]["completed"] != jobs or stats["queued"]:
            raise RuntimeError(f"expected {jobs} completions: {stats['totals']}")
    finally:
        await svc.aclose()
    return {
        "submit": {
            "jobs_per_s": jobs / submit_s,
            "latency_ms": percentiles([d / 1e6 for d in submit_ns]),
            **_per_job(before, after_submit, jobs),
        },
        "dispatch": {
            "jobs_per_s": jobs / drain_s,
            "latency_ms": percentiles([d / 1e6 for d in dispatch_ns]),
            **_per_job(after_submit, after_drain, jobs),
        },
    }


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _combine(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every figure over repetitions (each percentile on its own)."""
    out: dict[str, Any] = {}
    for phase in ("submit", "dispatch"):
        first = reps[0][phase]
        out[phase] = {
            k: (
                {q: _median([r[phase][k][q] for r in reps]) for q in v}
                if isinstance(v, dict)
                else _median([r[phase][k] for r in reps])
            )
            for k, v in first.items()
        }
    return out


async def measure(
    url: str, namespace: str, jobs: int, gpus: int, clients: int, reps: int = 3
) -> dict[str, Any]:
    """:func:`one_policy` for every policy of :data:`POLICIES`, a namespace each, in
    ``reps`` rounds (the policies take turns, so a drift of the machine's speed
    touches them alike); the median of each figure."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in POLICIES}
    for rep in range(reps):
        for i, (name, limits) in enumerate(POLICIES.items()):
            ns = f"{namespace}-r{rep}-p{i}"
            results[name].append(await one_policy(url, ns, limits, jobs, gpus, clients))
    runs = {name: {"limits": POLICIES[name], **_combine(r)} for name, r in results.items()}
    return {"jobs": jobs, "gpus": gpus, "clients": clients, "reps": reps, "runs": runs}


def lines(p: dict[str, Any]) -> list[str]:
    """The policies part as a table: each policy, and its cost against strict."""
    strict = p["runs"]["strict"]
    out = [
        f"Scheduling policies on the engine (no hub): {p['jobs']:,} jobs from {p['clients']} "
        f"clients (one sends half) at priorities 0/5/10, queued one at a time, then drained "
        f"by {p['gpus']} workers (complete + claim next); median of {p.get('reps', 1)} rounds",
        f"{'policy':<20}{'phase':<10}{'jobs/s':>9}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'Redis CPU us/job':>18}{'vs strict':>10}{'script us/job':>15}",
    ]
    for name, r in p["runs"].items():
        for phase in ("submit", "dispatch"):
            x, s = r[phase], strict[phase]
            lat = x["latency_ms"]
            ratio = x["redis_cpu_us_per_job"] / s["redis_cpu_us_per_job"]
            out.append(
                f"{name:<20}{phase:<10}{x['jobs_per_s']:>9,.0f}{lat['p50']:>8.3f}{lat['p99']:>8.3f}"
                f"{x['redis_cpu_us_per_job']:>18.1f}{ratio:>10.2f}{x['script_us_per_job']:>15.1f}"
            )
    return out
