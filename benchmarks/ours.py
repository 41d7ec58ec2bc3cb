"""Our system's parts of the suite: drain, latency (idle and loaded), enqueue, growth.

Every part runs against the runner's private redis-server with a fresh hub (in a
process of its own, or with ``place="main"`` in the runner's process; see
:func:`benchmarks.common.hub_at`), the GPU worker process
(:func:`benchmarks.common.worker`: G sockets that complete each pushed job at once)
in another, and the client in the runner's process; everything talks over
127.0.0.1. Each part gets a fresh namespace and a fresh hub.

* ``drain``: N jobs queued with no worker (the engine's ``submit_job``, 64 in
  flight), then one worker process with G GPU sockets; jobs/s from the moment it
  starts connecting until its N-th ``ack`` (both ends timed in the worker; Redis'
  totals are checked after), plus the CPU seconds the hub, the worker and
  redis-server spent per job and Redis' command counts over the window.
* ``latency``: one job at a time into an idle system (submit -> ``job_assigned`` at
  a worker with one idle GPU socket, submit -> ``job_completed`` at the client);
  then the saturated rate (a client keeps ``window`` jobs in flight through the hub
  to a G-socket worker) and open-loop Poisson arrivals at fractions of that rate.
* ``enqueue``: submits through the hub with no worker, one at a time (await each
  ``job_accepted``) and batched (``window`` in flight).
* ``growth``: with 10^3 ... 10^6 jobs queued, submit -> ``job_accepted`` and the
  dispatch round trip of a free worker (``complete_job`` sent -> next
  ``job_assigned`` received, i.e. the claim from the deep queue); and the drain
  rate with 1, 4, 16, 64 GPU sockets.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from websockets.asyncio.client import ClientConnection

from benchmarks.common import (
    JOB_TYPE,
    TIMEOUT_S,
    HubProc,
    complete_frame,
    cpu_s,
    hub_at,
    ms,
    one_at_a_time,
    open_client,
    open_connections,
    open_worker,
    queue_jobs,
    spawn,
    submit_frame,
    used_memory,
    worker,
)
from redisq_lab.frames import percentiles
from redisq_server import AsyncRedisService, EngineLimits
from redisq_server.protocol import MessageType
from redisq_server.scripts import function_name

# ----------------------------------------------------------------------- drain


def _pids(hub: HubProc, **others: int) -> dict[str, tuple[int, ...]]:
    """The processes whose CPU a part reads, by role. A hub in this process shares
    it with the part's client, if there is one: that process is read once, as
    ``hub+client``. Several hub processes count together, as ``hub``."""
    roles: dict[str, tuple[int, ...]] = {k: (p,) for k, p in others.items()}
    if hub.pid == os.getpid() and "client" in others:
        roles["hub+client"] = roles.pop("client")
        return roles
    return {"hub": hub.cpu_pids(), **roles}


def _cpu(pids: dict[str, tuple[int, ...]]) -> dict[str, float]:
    return {k: sum(cpu_s(p) for p in ps) for k, ps in pids.items()}


async def drain(
    redis_url: str,
    namespace: str,
    jobs: int,
    gpus: int,
    redis_pid: int,
    *,
    place: str = "process",
    loop: str = "asyncio",
    profile: str = "",
    processes: int = 1,
    prefetch: int = 0,
) -> dict[str, Any]:
    """N jobs queued with no worker; then one worker process with G GPU sockets, each
    with prefetch window ``prefetch`` (through ``processes`` hub processes on one
    port when > 1)."""
    svc = AsyncRedisService(redis_url, limits=EngineLimits(namespace=namespace))
    try:
        await open_connections(svc)
        mem0 = await used_memory(svc)
        t0 = time.perf_counter()
        await queue_jobs(svc, jobs)
        prequeue_s = time.perf_counter() - t0
        mem1 = await used_memory(svc)
        async with hub_at(
            place, redis_url, namespace, loop=loop, profile=profile, processes=processes
        ) as hub:
            await svc.redis.config_resetstat()
            async with spawn(worker, hub.url, gpus, jobs, prefetch) as w:
                await w.recv()  # "ready": every GPU registered
                pids = _pids(hub, worker=w.pid, redis=redis_pid)
                cpu0 = _cpu(pids)
                res = await w.recv()
                cpu1 = _cpu(pids)
            stats = await svc.redis.info("commandstats")
        counts = await svc.get_stats()
    finally:
        await svc.aclose()
    if not res["ok"] or counts["totals"]["completed"] != jobs or counts["queued"]:
        raise RuntimeError(f"drain: {res['acked']}/{jobs} acked, {res['errors']}; {counts}")
    seconds = (res["t_end"] - res["t_start"]) / 1e9
    # Redis counts the commands a function runs as well as the function itself, so
    # FCALL's time includes the others' (the rest of it is the Lua interpreter)
    commands = {
        name.removeprefix("cmdstat_"): {
            "calls_per_job": v["calls"] / jobs,
            "usec_per_call": float(v["usec_per_call"]),
            "usec_per_job": float(v["usec"]) / jobs,
        }
        for name, v in sorted(stats.items(), key=lambda kv: -float(kv[1]["usec"]))
        if name.startswith("cmdstat_")
    }
    return {
        "jobs": jobs,
        "gpus": gpus,
        "prefetch": prefetch,
        "hub": place,
        "hub_processes": processes,
        "loop": loop,
        "seconds": seconds,
        "jobs_per_s": jobs / seconds,
        "enqueue_jobs_per_s": jobs / prequeue_s,
        "redis_bytes_per_job": (mem1 - mem0) / jobs,
        "cpu_ms_per_job": {k: 1000 * (cpu1[k] - cpu0[k]) / jobs for k in cpu0},
        "cpu_busy": {k: (cpu1[k] - cpu0[k]) / seconds for k in cpu0},
        "redis_commands": commands,
    }


# --------------------------------------------------------------------- latency


async def idle_latency(hub_url: str, samples: int) -> dict[str, dict[str, float | None]]:
    """One job at a time through a client socket here and a worker process with one
    idle GPU socket: submit -> ``job_assigned`` (read by the worker) and submit ->
    ``job_completed`` (read by the client), in ms."""
    async with spawn(worker, hub_url, 1, samples, 0) as w:
        await w.recv()  # "ready": the worker's GPU is registered and idle
        sent, completed = await one_at_a_time(hub_url, samples, "lat")
        res = await w.recv()
    if not res["ok"]:
        raise RuntimeError(f"latency: {res['acked']}/{samples} acked, {res['errors']}")
    assigned = res["assigned"]
    return {
        "submit->job_assigned": percentiles(ms(assigned[j] - t for j, t in sent.items())),
        "submit->job_completed": percentiles(ms(completed[j] - t for j, t in sent.items())),
    }


async def _client_load(
    hub_url: str,
    n: int,
    *,
    window: int = 0,
    rate: float = 0.0,
    seed: int = 1,
    client: str = "load",
) -> dict[str, Any]:
    """Submit ``n`` jobs through one client socket, either keeping ``window`` in
    flight (closed loop) or at Poisson arrivals of ``rate``/s (open loop); wait for
    every ``job_completed``. Returns send and completion times by job id."""
    sent: dict[str, int] = {}
    done: dict[str, int] = {}
    lateness: list[int] = []
    frames = [(f"{client}-{i}", submit_frame(i, f"{client}-{i}")) for i in range(n)]
    ws = await open_client(hub_url, client)
    try:
        slots = asyncio.Semaphore(window) if window else None
        finished = asyncio.get_running_loop().create_future()

        async def reader() -> None:
            async for raw in ws:
                m = json.loads(raw)
                if m["type"] == MessageType.JOB_COMPLETED:
                    done[m["job_id"]] = time.monotonic_ns()
                    if slots is not None:
                        slots.release()
                    if len(done) >= n:
                        finished.set_result(None)
                        return
                elif m["type"] == MessageType.ERROR:
                    raise RuntimeError(f"hub error: {m}")

        task = asyncio.create_task(reader())
        rng = random.Random(seed)
        due = time.monotonic_ns()
        for job_id, frame in frames:
            if task.done():
                break
            if slots is not None:
                await slots.acquire()
            elif rate:
                due += int(rng.expovariate(rate) * 1e9)
                delay = (due - time.monotonic_ns()) / 1e9
                if delay > 0:
                    await asyncio.sleep(delay)
                lateness.append(time.monotonic_ns() - due)
            sent[job_id] = time.monotonic_ns()
            await ws.send(frame)
        await asyncio.wait({task, finished}, timeout=TIMEOUT_S, return_when="FIRST_COMPLETED")
        if task.done() and task.exception():
            raise RuntimeError(f"client: {task.exception()!r}")
        task.cancel()
        if len(done) < n:
            raise RuntimeError(f"client: {len(done)}/{n} jobs completed within {TIMEOUT_S} s")
    finally:
        await ws.close()
    return {"sent": sent, "done": done, "lateness": lateness}


async def _load_run(
    hub: HubProc,
    gpus: int,
    n: int,
    *,
    window: int = 0,
    rate: float = 0.0,
    client: str,
    prefetch: int = 0,
) -> dict[str, Any]:
    """One load run: a G-socket worker process (each socket with prefetch window
    ``prefetch``) and a client here (this process)."""
    async with spawn(worker, hub.url, gpus, n, prefetch) as w:
        await w.recv()  # ready
        pids = _pids(hub, worker=w.pid, client=os.getpid())
        cpu0, t0 = _cpu(pids), time.monotonic()
        c = await _client_load(hub.url, n, window=window, rate=rate, client=client)
        cpu1, t1 = _cpu(pids), time.monotonic()
        res = await w.recv()
    if not res["ok"]:
        raise RuntimeError(f"load: {res['acked']}/{n} acked, {res['errors']}")
    sent, done, assigned = c["sent"], c["done"], res["assigned"]
    first, last_sent, last_done = min(sent.values()), max(sent.values()), max(done.values())
    out: dict[str, Any] = {
        "jobs": n,
        "completed_per_s": n / ((last_done - first) / 1e9),
        "offered_per_s": (n - 1) / ((last_sent - first) / 1e9) if n > 1 else float("nan"),
        "submit->job_assigned": percentiles(ms(assigned[j] - t for j, t in sent.items())),
        "submit->job_completed": percentiles(ms(done[j] - t for j, t in sent.items())),
        "cpu_busy": {k: (cpu1[k] - cpu0[k]) / (t1 - t0) for k in cpu0},
    }
    if c["lateness"]:
        out["send_lateness_ms"] = percentiles(ms(c["lateness"]))
    return out


async def latency(
    redis_url: str,
    namespace: str,
    *,
    samples: int,
    gpus: int,
    saturate_jobs: int,
    window: int,
    loads: tuple[float, ...],
    load_seconds: float,
    load_max_jobs: int,
    place: str = "process",
    loop: str = "asyncio",
    processes: int = 1,
    prefetch: int = 0,
    wide_gpus: int = 0,
) -> dict[str, Any]:
    """Idle one-at-a-time latency, the saturated rate, then Poisson load at
    ``loads`` fractions of it (each ``load_seconds`` long, at most ``load_max_jobs``),
    then the saturated rate again (``max_rate_again_per_s``) and, with ``wide_gpus``,
    once more through that many GPU sockets (``max_rate_wide_per_s``).
    The loaded runs' GPU sockets register with prefetch window ``prefetch``; with 1,
    "start" is when a job reaches its GPU, which runs it at once when it is free."""
    async with hub_at(place, redis_url, namespace, loop=loop, processes=processes) as hub:
        idle = await idle_latency(hub.url, samples)
        sat = await _load_run(
            hub, gpus, saturate_jobs, window=window, client="sat", prefetch=prefetch
        )
        sat["window"] = window
        max_rate = sat["completed_per_s"]
        loaded = []
        for k, f in enumerate(loads):
            rate = f * max_rate
            n = int(min(load_max_jobs, max(50, rate * load_seconds)))
            r = await _load_run(hub, gpus, n, rate=rate, client=f"poisson{k}", prefetch=prefetch)
            loaded.append({"load": f, "target_per_s": rate, **r})
        # the machine's speed drifts: the saturated rate again, after the loaded runs,
        # tells whether their fractions of the max still held
        again = await _load_run(
            hub, gpus, saturate_jobs, window=window, client="sat-again", prefetch=prefetch
        )
        again["window"] = window
        wide = None
        if wide_gpus:
            wide = await _load_run(
                hub, wide_gpus, saturate_jobs, window=window, client="sat-wide", prefetch=prefetch
            )
            wide.update(window=window, gpus=wide_gpus)
    return {
        "samples": samples,
        "hub": place,
        "idle": idle,
        "gpus": gpus,
        "prefetch": prefetch,
        "saturated": sat,
        "max_rate_per_s": max_rate,
        "loaded": loaded,
        "saturated_again": again,
        "max_rate_again_per_s": again["completed_per_s"],
        **(
            {"saturated_wide": wide, "max_rate_wide_per_s": wide["completed_per_s"]}
            if wide is not None
            else {}
        ),
    }


# --------------------------------------------------------------------- enqueue


async def _await_ref(ws: ClientConnection, ref: int) -> None:
    """Read frames until the reply to request ``ref`` (raising on an ``error``)."""
    while True:
        m = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
        if m["type"] == MessageType.ERROR:
            raise RuntimeError(f"hub error: {m}")
        if m.get("ref") == ref:
            return


async def _enqueue_client(hub_url: str, n: int, window: int, client: str) -> float:
    """Submits/s through one client socket (no worker): ``window`` 1 is request/reply."""
    frames = [submit_frame(i, f"{client}-{i}") for i in range(n)]
    ws = await open_client(hub_url, client)
    try:
        if window <= 1:
            t0 = time.perf_counter()
            for i, frame in enumerate(frames):
                await ws.send(frame)
                await _await_ref(ws, i)
            return n / (time.perf_counter() - t0)
        slots = asyncio.Semaphore(window)
        accepted = 0
        all_in = asyncio.get_running_loop().create_future()

        async def reader() -> None:
            nonlocal accepted
            async for raw in ws:
                m = json.loads(raw)
                if m["type"] == MessageType.JOB_ACCEPTED:
                    accepted += 1
                    slots.release()
                    if accepted >= n:
                        all_in.set_result(None)
                        return
                elif m["type"] == MessageType.ERROR:
                    raise RuntimeError(f"hub error: {m}")

        t0 = time.perf_counter()
        task = asyncio.create_task(reader())
        for frame in frames:
            await slots.acquire()
            if task.done():
                break
            await ws.send(frame)
        await asyncio.wait({task, all_in}, timeout=TIMEOUT_S, return_when="FIRST_COMPLETED")
        elapsed = time.perf_counter() - t0
        if task.done() and task.exception():
            raise RuntimeError(f"enqueue: {task.exception()!r}")
        task.cancel()
        if accepted < n:
            raise RuntimeError(f"enqueue: {accepted}/{n} accepted within {TIMEOUT_S} s")
        return n / elapsed
    finally:
        await ws.close()


async def enqueue(
    redis_url: str,
    namespace: str,
    jobs: int,
    window: int,
    *,
    place: str = "process",
    loop: str = "asyncio",
) -> dict[str, Any]:
    """Jobs/s from one client socket, request/reply and batched. A socket follows at
    most 10,000 unfinished jobs (HUB_MAX_SUBSCRIPTIONS), so each mode uses its own."""
    async with hub_at(place, redis_url, namespace, loop=loop) as hub:
        one = await _enqueue_client(hub.url, jobs, 1, "enq-one")
        batched = await _enqueue_client(hub.url, jobs, window, "enq-batch")
    return {"jobs": jobs, "window": window, "one_at_a_time_per_s": one, "batched_per_s": batched}


# ---------------------------------------------------------------------- growth


async def _fill(svc: AsyncRedisService, start: int, stop: int, chunk: int = 2000) -> None:
    """Queue jobs ``g<start>`` .. ``g<stop-1>`` with the engine's own submit function,
    pipelined (two pipelines in flight), so that 10^6 jobs take seconds, not minutes.
    Each is exactly what ``submit_job`` would write."""
    await svc.get_stats()  # the engine loads its library into Redis if it is missing
    template = svc.ops.submit(JOB_TYPE, 0, {})
    fn, head = function_name("submit"), [svc.keys.events, svc.ops.header("")]
    tail = list(template.args[1:])

    async def one(a: int, b: int) -> None:
        async with svc.redis.pipeline(transaction=False) as p:
            for k in range(a, b):
                p.fcall(fn, 1, *head, f"g{k}", *tail)
            await p.execute()

    bounds = list(range(start, stop, chunk))
    for i in range(0, len(bounds), 2):
        pair = bounds[i : i + 2]
        await asyncio.gather(*(one(a, min(a + chunk, stop)) for a in pair))


async def _submit_latency(hub_url: str, samples: int) -> dict[str, float | None]:
    """Submit -> job_accepted, one at a time, from a client socket (no worker), in ms."""
    out: list[int] = []
    stamp = time.time_ns()
    frames = [submit_frame(i, f"depth-{stamp}-{i}") for i in range(samples)]
    ws = await open_client(hub_url, "depth")
    try:
        for i, frame in enumerate(frames):
            t0 = time.monotonic_ns()
            await ws.send(frame)
            await _await_ref(ws, i)
            out.append(time.monotonic_ns() - t0)
    finally:
        await ws.close()
    return percentiles(ms(out))


async def _depth_worker(hub_url: str, samples: int, conn: Connection) -> None:
    """One GPU socket taking jobs from a deep queue: the time from sending
    ``complete_job`` to receiving the next ``job_assigned``, ``samples`` times."""
    gaps: list[int] = []
    ws = await open_worker(hub_url, "depth:gpu0")
    try:
        sent_at = 0
        async for raw in ws:
            m = json.loads(raw)
            if m["type"] == MessageType.JOB_ASSIGNED:
                now = time.monotonic_ns()
                if sent_at:
                    gaps.append(now - sent_at)
                if len(gaps) >= samples:
                    break
                frame = complete_frame(m)
                sent_at = time.monotonic_ns()
                await ws.send(frame)
            elif m["type"] == MessageType.ERROR:
                raise RuntimeError(f"hub error: {m}")
    finally:
        await ws.close()
    conn.send(gaps)


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


async def growth_depth(
    redis_url: str,
    namespace: str,
    depths: list[int],
    samples: int,
    budget_s: float,
    log: Callable[[str], None] = print,
    *,
    place: str = "process",
    loop: str = "asyncio",
) -> list[dict[str, Any]]:
    """Fill the queue to each depth in turn (the hub is stopped while filling, so it
    starts past those events), then measure with a fresh hub. A depth whose fill
    would not fit in ``budget_s`` or in the free memory is skipped, with the reason."""
    svc = AsyncRedisService(redis_url, limits=EngineLimits(namespace=namespace))
    rows: list[dict[str, Any]] = []
    began = time.monotonic()
    filled, fill_s = 0, 0.0
    try:
        mem0 = await used_memory(svc)
        for depth in depths:
            need = depth - filled
            if filled and need > 0:
                per_job = (await used_memory(svc) - mem0) / filled
                est_s = need * fill_s / filled
                est_bytes = need * per_job
                left = budget_s - (time.monotonic() - began)
                if est_s * 1.5 > left:
                    why = f"filling {need:,} more jobs would take ~{est_s:.0f} s; {left:.0f} s left"
                    rows.append({"depth": depth, "skipped": why})
                    log(f"  depth {depth:,}: skipped: {why}")
                    continue
                if est_bytes * 2 > mem_available_bytes():
                    why = f"~{est_bytes / 2**20:,.0f} MiB more Redis memory needed"
                    rows.append({"depth": depth, "skipped": why})
                    log(f"  depth {depth:,}: skipped: {why}")
                    continue
            t0 = time.perf_counter()
            await _fill(svc, filled, depth)
            fill_s += time.perf_counter() - t0
            filled = max(filled, depth)
            queued = (await svc.get_stats())["queued"]
            async with hub_at(place, redis_url, namespace, loop=loop) as hub:
                accepted = await _submit_latency(hub.url, samples)
                async with spawn(_depth_worker, hub.url, samples) as w:
                    gaps = await w.recv()
            rows.append(
                {
                    "depth": depth,
                    "queued": queued,
                    "redis_bytes_per_job": (await used_memory(svc) - mem0) / max(1, filled),
                    "fill_jobs_per_s": filled / fill_s,
                    "submit->job_accepted": accepted,
                    "complete->next_job_assigned": percentiles(ms(gaps)),
                }
            )
            p = rows[-1]["complete->next_job_assigned"]
            log(f"  depth {depth:,}: dispatch p50 {p['p50']:.2f} ms, p99 {p['p99']:.2f} ms")
    finally:
        await svc.aclose()
    return rows


async def drain_median(
    redis_url: str,
    namespace: str,
    jobs: int,
    gpus: int,
    redis_pid: int,
    reps: int,
    *,
    place: str = "process",
    loop: str = "asyncio",
    processes: int = 1,
    prefetch: int = 0,
) -> dict[str, Any]:
    """:func:`drain` ``reps`` times (fresh namespace and hub each); the median run,
    with every run's rate in ``runs_per_s``. On a small shared machine one run can be
    off by a third (where the scheduler puts the hub, the worker and Redis)."""
    runs = [
        await drain(
            redis_url,
            f"{namespace}-r{i}",
            jobs,
            gpus,
            redis_pid,
            place=place,
            loop=loop,
            processes=processes,
            prefetch=prefetch,
        )
        for i in range(reps)
    ]
    runs.sort(key=lambda r: r["jobs_per_s"])
    return {**runs[len(runs) // 2], "runs_per_s": [r["jobs_per_s"] for r in runs]}


async def growth_gpus(
    redis_url: str,
    namespace: str,
    jobs: int,
    gpus_list: list[int],
    redis_pid: int,
    reps: int,
    *,
    place: str = "process",
    loop: str = "asyncio",
) -> list[dict[str, Any]]:
    return [
        await drain_median(
            redis_url, f"{namespace}-g{g}", jobs, g, redis_pid, reps, place=place, loop=loop
        )
        for g in gpus_list
    ]
