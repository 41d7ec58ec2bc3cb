"""The per-GPU prefetch window with jobs that take time: how busy the GPUs stay.

For each window (0, then 1, alternating ``reps`` times): ``jobs`` jobs are queued,
then one mock machine with ``gpus`` GPU sockets (``redisq_lab.MockWorker``, in the
runner's process, ``burst=True``: it stops when the queue is empty) runs each for
``run_s`` seconds. A hub runs in a process of its own on the runner's Redis.

What is reported per window (the median run):

* ``jobs_per_s``: jobs over the wall time from the start of the machine (its GPUs
  registering) to the end of its last job, runner clock;
* ``gpu_busy``: the GPUs' share of that wall time spent running jobs, by the mock
  GPUs' own start and end times of each job (the rest is the dispatch gap: the
  report, the hub, Redis and the next assignment on its way back).

Without a window a GPU waits one round trip between jobs; with one, the next job
is already on the machine. Run it as a part of the one runner::

    python -m benchmarks --only prefetch --peers none
"""

from __future__ import annotations

import time
from statistics import median
from typing import Any

from benchmarks.common import hub_at, queue_jobs
from redisq_lab.mock_worker import MockWorker
from redisq_server import AsyncRedisService, EngineLimits

JOB_TYPE = "pf"


async def _one(
    redis_url: str, namespace: str, jobs: int, gpus: int, run_s: float, window: int
) -> dict[str, float]:
    svc = AsyncRedisService(redis_url, limits=EngineLimits(namespace=namespace))
    try:
        await queue_jobs(svc, jobs, JOB_TYPE)
        async with hub_at("process", redis_url, namespace) as hub:
            machine = MockWorker(
                f"pf{window}",
                gpu_count=gpus,
                hub=hub.url,
                job_types=[JOB_TYPE],
                run_time=("fixed", run_s),
                progress_steps=0,
                burst=True,
                prefetch=window,
            )
            t0 = time.perf_counter()
            await machine.start()
            await machine.join(timeout=600)
            wall = time.perf_counter() - t0
        stats = await svc.get_stats()
    finally:
        await svc.aclose()
    if machine.completed != jobs or stats["queued"]:
        raise RuntimeError(f"prefetch {window}: {machine.completed}/{jobs} completed; {stats}")
    busy = sum(r.finished - r.started for r in machine.history if r.started and r.finished)
    return {"jobs_per_s": jobs / wall, "gpu_busy": busy / (gpus * wall)}


async def measure(
    redis_url: str, namespace: str, jobs: int, gpus: int, run_s: float, reps: int
) -> dict[str, Any]:
    """Windows 0 and 1, alternating, ``reps`` runs each (a namespace each)."""
    runs: dict[int, list[dict[str, float]]] = {0: [], 1: []}
    for rep in range(reps):
        for window in (0, 1):
            ns = f"{namespace}-w{window}-r{rep}"
            runs[window].append(await _one(redis_url, ns, jobs, gpus, run_s, window))
    return {
        "jobs": jobs,
        "gpus": gpus,
        "run_ms": run_s * 1000,
        "windows": {
            str(w): {
                "jobs_per_s": median(r["jobs_per_s"] for r in rs),
                "gpu_busy": median(r["gpu_busy"] for r in rs),
                "runs": rs,
            }
            for w, rs in runs.items()
        },
    }


def lines(p: dict[str, Any]) -> list[str]:
    """The part's table: per window, jobs/s and the GPUs' busy share (medians)."""
    out = [
        f"Prefetch window: {p['jobs']:,} jobs of {p['run_ms']:g} ms on one machine with "
        f"{p['gpus']} GPUs (runner clock for the wall time, the mock GPUs' clock for "
        "their busy time; medians)",
        f"{'window':>6} {'jobs/s':>9} {'GPU busy':>9}   runs (jobs/s, busy)",
    ]
    for w, r in p["windows"].items():
        each = ", ".join(f"{x['jobs_per_s']:,.0f} {x['gpu_busy']:.0%}" for x in r["runs"])
        out.append(f"{w:>6} {r['jobs_per_s']:>9,.0f} {r['gpu_busy']:>9.0%}   {each}")
    return out
