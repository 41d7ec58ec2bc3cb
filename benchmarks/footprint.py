"""Memory: Redis bytes per queued job, hub RSS per 1,000 worker and client sockets.

* ``redis_bytes``: Redis ``used_memory`` before and after N jobs with small params
  (``{"i": k}``) are queued with no worker, divided by N; and where those bytes go
  (``MEMORY USAGE`` of job hashes, of the queue's sorted set and of the event
  stream, which gets one ``submitted`` entry per job and is capped at
  ``REDISQ_EVENTS_MAXLEN`` entries).
* ``hub_sockets``: the hub runs in a process of its own; another process (the
  *opener*) opens a few warm-up sockets, then W worker sockets (each registered,
  so idle in Redis too), then C client sockets. The hub's VmRSS is read from
  /proc after each step (after a short settle), so the figures are the growth per
  socket, not the interpreter. With everything open, S jobs are submitted one at a
  time from a client here; an idle worker socket in the opener completes each:
  submit -> ``job_assigned`` (dispatch) and submit -> ``job_completed`` p50/p95/p99.
  The opener stops opening at the time budget or at the first error (e.g. the
  open-files limit, which both processes raise to the hard limit) and reports how
  many it reached.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

from websockets.asyncio.client import ClientConnection

from benchmarks.common import (
    JOB_TYPE,
    complete_frame,
    hub_at,
    ms,
    one_at_a_time,
    open_client,
    open_connections,
    open_worker,
    raise_nofile,
    rss_mb,
    spawn,
    used_memory,
)
from redisq_lab.frames import percentiles
from redisq_server import AsyncRedisService, EngineLimits
from redisq_server.protocol import MessageType

WARM = 10  # worker and client sockets opened before the baseline reading


async def redis_bytes(redis_url: str, namespace: str, jobs: int) -> dict[str, Any]:
    svc = AsyncRedisService(redis_url, limits=EngineLimits(namespace=namespace))
    r: Any = svc.redis
    try:
        await open_connections(svc)
        mem0 = await used_memory(svc)
        for k in range(0, jobs, 64):
            n = min(64, jobs - k)
            await asyncio.gather(
                *(svc.submit_job(JOB_TYPE, 0, {"i": k + j}, job_id=f"m{k + j}") for j in range(n))
            )
        mem1 = await used_memory(svc)
        sample = [f"m{k}" for k in range(0, jobs, max(1, jobs // 50))]
        job_bytes = [await r.memory_usage(svc.keys.job(j), samples=0) for j in sample]
        queue_bytes = await r.memory_usage(svc.keys.queue(JOB_TYPE), samples=0)
        stream_bytes = await r.memory_usage(svc.keys.events, samples=0)
        stream_len = await r.xlen(svc.keys.events)
        job_key = svc.keys.job(sample[0])
        encoding = await r.object("encoding", job_key)
        fields = await r.hlen(job_key)
    finally:
        await svc.aclose()
    per_job = sum(job_bytes) / len(job_bytes)
    return {
        "jobs": jobs,
        "params": '{"i": k}',
        "bytes_per_job": (mem1 - mem0) / jobs,
        "breakdown_bytes_per_job": {
            "job hash (MEMORY USAGE)": per_job,
            "queue sorted-set entry": queue_bytes / jobs,
            "event stream entry": stream_bytes / max(1, stream_len),
        },
        "job_hash": {"fields": fields, "encoding": encoding},
        "events_in_stream": stream_len,
    }


async def _open_many(
    opener: Callable[[int], Awaitable[ClientConnection]],
    start: int,
    count: int,
    deadline: float,
    parallel: int,
) -> tuple[list[ClientConnection], str | None]:
    """Open ``count`` sockets, ``parallel`` at a time, until done, the deadline or an
    error; returns those opened and the error, if any."""
    opened: list[ClientConnection] = []
    for a in range(start, start + count, parallel):
        if time.monotonic() > deadline:
            return opened, "time budget reached"
        batch = range(a, min(a + parallel, start + count))
        results = await asyncio.gather(*(opener(i) for i in batch), return_exceptions=True)
        errors = [e for e in results if isinstance(e, BaseException)]
        opened += [ws for ws in results if not isinstance(ws, BaseException)]
        if errors:
            return opened, repr(errors[0])[:300]
    return opened, None


async def _opener(
    hub_url: str, workers: int, clients: int, budget_s: float, conn: Connection
) -> None:
    """Open sockets to the hub in steps the parent paces (see the module docstring)."""
    raise_nofile()
    assigned: dict[str, int] = {}
    tasks: list[asyncio.Task[None]] = []

    async def command() -> Any:
        return await asyncio.to_thread(conn.recv)

    async def serve(ws: ClientConnection) -> None:
        async for raw in ws:
            m = json.loads(raw)
            if m["type"] == MessageType.JOB_ASSIGNED:
                assigned[m["job_id"]] = time.monotonic_ns()
                await ws.send(complete_frame(m))

    async def worker_socket(i: int) -> ClientConnection:
        ws = await open_worker(hub_url, f"m{i // 8}:gpu{i % 8}")
        tasks.append(asyncio.create_task(serve(ws)))
        return ws

    async def client_socket(i: int) -> ClientConnection:
        return await open_client(hub_url, f"idle{i}")

    deadline = time.monotonic() + budget_s
    sockets, _ = await _open_many(worker_socket, 0, WARM, deadline, WARM)
    more, _ = await _open_many(client_socket, 0, WARM, deadline, WARM)
    sockets += more
    conn.send("warm")
    steps = (("workers", worker_socket, workers), ("clients", client_socket, clients))
    for step, fn, count in steps:
        if await command() != step:
            return
        t0 = time.perf_counter()
        more, error = await _open_many(fn, WARM, count, deadline, 50)
        sockets += more
        conn.send({"opened": len(more), "seconds": time.perf_counter() - t0, "error": error})
    if await command() != "report":
        return
    conn.send({"assigned": assigned})
    await command()  # "stop"
    for t in tasks:
        t.cancel()


async def hub_sockets(
    redis_url: str,
    namespace: str,
    workers: int,
    clients: int,
    samples: int,
    budget_s: float,
    settle_s: float = 1.0,
) -> dict[str, Any]:
    async with (
        hub_at("process", redis_url, namespace) as hub,
        spawn(_opener, hub.url, workers, clients, budget_s) as op,
    ):
        if await op.recv() != "warm":
            raise RuntimeError("socket opener did not start")
        await asyncio.sleep(settle_s)
        rss = {"baseline": rss_mb(hub.pid)}
        steps: dict[str, Any] = {}
        for step in ("workers", "clients"):
            op.send(step)
            steps[step] = await op.recv()
            await asyncio.sleep(settle_s)
            rss[f"with_{step}"] = rss_mb(hub.pid)
        sent, done = await one_at_a_time(hub.url, samples, "probe")
        op.send("report")
        assigned = (await op.recv())["assigned"]
        rss["after_dispatch"] = rss_mb(hub.pid)
    w, c = steps["workers"]["opened"], steps["clients"]["opened"]
    per_w = (rss["with_workers"] - rss["baseline"]) / w * 1000 if w else float("nan")
    per_c = (rss["with_clients"] - rss["with_workers"]) / c * 1000 if c else float("nan")
    return {
        "workers": {"asked": workers, **steps["workers"]},
        "clients": {"asked": clients, **steps["clients"]},
        "warm_up_sockets": 2 * WARM,
        "rss_mb": rss,
        "mb_per_1000_workers": per_w,
        "mb_per_1000_clients": per_c,
        "dispatch_samples": samples,
        "submit->job_assigned": percentiles(ms(assigned[j] - t for j, t in sent.items())),
        "submit->job_completed": percentiles(ms(done[j] - t for j, t in sent.items())),
    }
