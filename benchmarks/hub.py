"""Throughput and latency of the WebSocket hub, end to end, on a private redis-server.

What is measured (against a redis-server this script starts on a free loopback
port, never the Redis on 6379), once per hub placement:

* ``drain``: N no-op jobs are queued with no worker connected
  (``AsyncRedisService.submit_job``); then ONE worker process opens G GPU sockets,
  registers each and completes every pushed ``job_assigned`` at once. Jobs/s from
  the moment the worker process starts connecting and registering until it gets the
  hub's ``ack`` of the N-th ``complete_job`` (sent once the completion is recorded
  in Redis); both ends are timed in the worker, and Redis' totals are checked after.
* ``latency``: S jobs, one at a time, into an idle system: a client socket in this
  process submits, a worker process with one idle GPU socket completes. Submit ->
  ``job_assigned`` seen by the worker and submit -> ``job_completed`` seen by the
  client, p50/p95/p99 in ms; both processes read ``time.monotonic_ns``
  (CLOCK_MONOTONIC, which is system-wide on Linux).

Hub placements: ``main`` (this process, sharing its event loop with the latency
client) and ``process`` (a child of its own). Children start with multiprocessing's
``spawn``; all sockets are on 127.0.0.1. Run from the repository root::

    python -m benchmarks.hub [--jobs 5000] [--gpus 4] [--samples 500] [--hub both]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from importlib.metadata import version
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from redisq_lab.redis_process import RedisProcess
from redisq_server import AsyncRedisService, EngineLimits, Settings
from redisq_server.main import Hub

JOB_TYPE = "bench"
TIMEOUT_S = 120.0
HUB_MODES = ("main", "process")
Recv = Callable[[], Awaitable[Any]]


def _child_main(fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
    """Entry point of a spawned child: run the coroutine function ``fn(*args)``."""
    asyncio.run(fn(*args))


@asynccontextmanager
async def _child(fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> AsyncIterator[Recv]:
    """Run ``fn(*args, pipe_end)`` in a spawned process; yield ``recv()``, which awaits
    the child's next message (raising if it exits first or sends nothing for
    TIMEOUT_S). On exit the child gets ``"stop"`` and is joined (killed if it lingers)."""
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_child_main, args=(fn, *args, theirs), daemon=True)
    proc.start()
    theirs.close()

    async def recv() -> Any:
        if ours in await asyncio.to_thread(lambda: wait([ours, proc.sentinel], TIMEOUT_S)):
            with contextlib.suppress(EOFError):
                return ours.recv()
        raise RuntimeError(f"{fn.__name__} process ended or timed out (see its stderr)")

    try:
        yield recv
    finally:
        with contextlib.suppress(OSError):
            ours.send("stop")
        await asyncio.to_thread(proc.join, 15)
        if proc.is_alive():
            proc.kill()
        ours.close()


async def _worker(url: str, gpus: int, total: int, conn: Connection) -> None:
    """G GPU sockets completing each pushed job at once until ``total`` completions are
    acked (or a socket fails); sends "ready" once all are registered, then the times."""
    assigned: dict[str, int] = {}  # job id -> when its job_assigned arrived
    acked = 0
    t_start = time.monotonic_ns()

    async def serve(ws: ClientConnection) -> None:
        nonlocal acked
        async for raw in ws:
            m = json.loads(raw)
            if m["type"] == "job_assigned":
                assigned[m["job_id"]] = time.monotonic_ns()
                reply = {"type": "complete_job", "id": 1, "job_id": m["job_id"]}
                await ws.send(json.dumps({**reply, "attempt": m["attempt"], "result": {}}))
            elif m["type"] == "ack":
                acked += 1
                if acked >= total:
                    return
            elif m["type"] == "error":
                raise RuntimeError(f"hub error: {m}")

    async def open_gpu(i: int) -> ClientConnection:
        ws = await connect(f"{url}/ws/worker/bench:gpu{i}", compression=None, max_size=None)
        await ws.recv()  # welcome
        await ws.send(json.dumps({"type": "register_worker", "job_types": [JOB_TYPE]}))
        reply = json.loads(await ws.recv())  # comes before a job pushed on registration
        if reply["type"] != "worker_registered":
            raise RuntimeError(f"register_worker failed: {reply}")
        return ws

    sockets = await asyncio.gather(*(open_gpu(i) for i in range(gpus)))
    tasks = [asyncio.create_task(serve(ws)) for ws in sockets]
    conn.send("ready")
    await asyncio.wait(tasks, timeout=TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    t_end = time.monotonic_ns()
    errors = [repr(t.exception()) for t in tasks if t.done() and t.exception()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*(ws.close() for ws in sockets))
    conn.send(
        {"ok": acked >= total, "acked": acked, "errors": errors, "assigned": assigned}
        | {"t_start": t_start, "t_end": t_end}
    )


async def _hub(redis_url: str, namespace: str, conn: Connection) -> None:
    """A hub until the parent says stop (or goes away)."""
    settings = Settings(redis_url=redis_url, hub_port=0, limits=EngineLimits(namespace=namespace))
    async with Hub(settings) as hub:
        conn.send(hub.url)
        await asyncio.to_thread(conn.recv)  # "stop", or EOF if the parent is gone


def _percentiles(ns: list[int]) -> dict[str, float]:
    """Nearest-rank p50/p95/p99 of durations in nanoseconds, in milliseconds."""
    s = sorted(ns)
    return {f"p{p}": s[max(0, math.ceil(p / 100 * len(s)) - 1)] / 1e6 for p in (50, 95, 99)}


async def _drain(hub_url: str, svc: AsyncRedisService, jobs: int, gpus: int) -> dict[str, Any]:
    """Queue ``jobs`` with no worker, then let one worker process drain them."""
    for k in range(0, jobs, 64):  # 64 submits in flight at a time
        await asyncio.gather(*(svc.submit_job(JOB_TYPE, 0, {}) for _ in range(min(64, jobs - k))))
    async with _child(_worker, hub_url, gpus, jobs) as recv:
        await recv()  # "ready"
        res = await recv()
    stats = await svc.get_stats()
    if not res["ok"] or stats["totals"]["completed"] != jobs or stats["queued"]:
        raise RuntimeError(f"drain: {res['acked']}/{jobs} acked, {res['errors']}; {stats}")
    seconds = (res["t_end"] - res["t_start"]) / 1e9
    return {"jobs": jobs, "gpus": gpus, "seconds": seconds, "jobs_per_s": jobs / seconds}


async def _latency(hub_url: str, samples: int) -> dict[str, dict[str, float]]:
    """One job at a time through a client socket here and an idle worker process."""
    sent: dict[str, int] = {}
    completed: dict[str, int] = {}
    async with (
        _child(_worker, hub_url, 1, samples) as recv,
        connect(f"{hub_url}/ws/client/bench", compression=None, max_size=None) as ws,
    ):
        await recv()  # "ready": the worker's GPU is registered and idle
        for i in range(samples):
            job_id = f"lat-{i}"
            msg = {"type": "submit_job", "id": i, "job_id": job_id, "job_type": JOB_TYPE}
            frame = json.dumps({**msg, "priority": 0, "params": {}})
            sent[job_id] = time.monotonic_ns()
            await ws.send(frame)
            while job_id not in completed:
                m = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
                if m["type"] == "error":
                    raise RuntimeError(f"hub error: {m}")
                if m["type"] == "job_completed":
                    completed[m["job_id"]] = time.monotonic_ns()
        res = await recv()
    if not res["ok"]:
        raise RuntimeError(f"latency: {res['acked']}/{samples} acked, {res['errors']}")
    return {
        "submit->job_assigned": _percentiles([res["assigned"][j] - t for j, t in sent.items()]),
        "submit->job_completed": _percentiles([completed[j] - t for j, t in sent.items()]),
    }


@asynccontextmanager
async def _hub_at(mode: str, url: str, namespace: str) -> AsyncIterator[str]:
    """A hub in this process (``main``) or a child (``process``); yield its ws:// URL."""
    if mode == "main":
        settings = Settings(redis_url=url, hub_port=0, limits=EngineLimits(namespace=namespace))
        async with Hub(settings) as hub:
            yield hub.url
    elif mode == "process":
        async with _child(_hub, url, namespace) as recv:
            yield await recv()
    else:
        raise ValueError(f"unknown hub placement {mode!r}")


async def run_benchmark(
    url: str,
    jobs: int = 5000,
    gpus: int = 4,
    samples: int = 500,
    namespace: str = "bench-hub",
    hubs: tuple[str, ...] = HUB_MODES,
) -> dict[str, Any]:
    """Run both phases for each hub placement in ``hubs`` against the Redis at ``url``."""
    results: dict[str, Any] = {}
    redis_version = "?"
    for mode in hubs:
        ns = f"{namespace}-{mode}"
        svc = AsyncRedisService(url, limits=EngineLimits(namespace=ns))
        try:
            redis_version = (await svc.redis.info("server"))["redis_version"]
            async with _hub_at(mode, url, ns) as hub_url:
                drain = await _drain(hub_url, svc, jobs, gpus)
                latency = await _latency(hub_url, samples)
        finally:
            await svc.aclose()
        results[mode] = {"drain": drain, "latency_ms": latency}
    return {
        "python_version": platform.python_version(),
        "redis_version": redis_version,
        "websockets_version": version("websockets"),
        "cpu_count": os.cpu_count(),
        "jobs": jobs,
        "gpus": gpus,
        "samples": samples,
        "clock": "time.monotonic_ns (CLOCK_MONOTONIC, system-wide on Linux)",
        "results": results,
    }


def format_table(res: dict[str, Any]) -> str:
    """The results as an aligned text table with a header."""
    lines = [
        f"Python {res['python_version']}, Redis {res['redis_version']}, websockets "
        f"{res['websockets_version']}, {res['cpu_count']} cores",
        f"drain: {res['jobs']} queued jobs, 1 worker process x {res['gpus']} GPUs, until "
        f"its last ack; latency: {res['samples']} jobs one at a time, 1 idle GPU, "
        f"clock {res['clock']}",
        f"{'hub':<9}{'measure':<24}{'jobs/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}",
    ]
    for mode, r in res["results"].items():
        lines.append(f"{mode:<9}{'drain':<24}{r['drain']['jobs_per_s']:>10,.0f}")
        for name, p in r["latency_ms"].items():
            lines.append(
                f"{mode:<9}{name:<24}{'':>10}{p['p50']:>10.2f}{p['p95']:>10.2f}{p['p99']:>10.2f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=5000, help="N drained jobs (default 5000)")
    parser.add_argument("--gpus", type=int, default=4, help="G worker sockets (default 4)")
    parser.add_argument("--samples", type=int, default=500, help="S latency jobs (default 500)")
    parser.add_argument(
        "--hub", choices=[*HUB_MODES, "both"], default="both", help="hub placement (default both)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    args = parser.parse_args(argv)
    hubs = HUB_MODES if args.hub == "both" else (args.hub,)
    with RedisProcess() as proc:
        res = asyncio.run(run_benchmark(proc.url, args.jobs, args.gpus, args.samples, hubs=hubs))
    print(format_table(res))
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
