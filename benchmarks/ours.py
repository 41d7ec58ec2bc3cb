"""Our system's parts of the suite: drain, latency (idle and loaded), enqueue, growth.

Every part runs against the runner's private redis-server with the hub in a process
of its own (``spawn``), the GPU worker process (the worker of
:mod:`benchmarks.hub`: G sockets that complete each pushed job at once) in another,
and the client in the runner's process; everything talks over 127.0.0.1. Each part
gets a fresh namespace and a fresh hub.

* ``drain``: :mod:`benchmarks.hub`'s drain (N jobs queued with no worker, then one
  worker process with G GPU sockets; jobs/s until its N-th ack), plus the CPU
  seconds the hub, the worker and redis-server spent per job and Redis' command
  counts over the window.
* ``latency``: :mod:`benchmarks.hub`'s one-job-at-a-time latency (submit ->
  ``job_assigned`` at the worker, submit -> ``job_completed`` at the client); then
  the saturated rate (a client keeps ``window`` jobs in flight through the hub to a
  G-socket worker) and open-loop Poisson arrivals at fractions of that rate.
* ``enqueue``: submits through the hub with no worker, one at a time (await each
  ``job_accepted``) and batched (``window`` in flight).
* ``growth``: with 10^3 ... 10^6 jobs queued, submit -> ``job_accepted`` and the
  dispatch round trip of a free worker (``complete_job`` sent -> next
  ``job_assigned`` received, i.e. the claim from the deep queue); and the drain
  rate with 1, 4, 16, 64 GPU sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from benchmarks.hub import JOB_TYPE, TIMEOUT_S, _latency, _percentiles, _worker
from redisq_server import AsyncRedisService, EngineLimits, Settings
from redisq_server.main import Hub
from redisq_server.scripts import script_source

# ------------------------------------------------------------------- processes


@dataclass
class Child:
    """A spawned child: its pid, ``await recv()`` (its next message) and ``send``."""

    pid: int
    recv: Callable[[], Awaitable[Any]]
    send: Callable[[Any], None]


def _child_main(loop: str, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
    if loop == "uvloop":
        import uvloop

        uvloop.run(fn(*args))
    else:
        asyncio.run(fn(*args))


@asynccontextmanager
async def spawn(
    fn: Callable[..., Coroutine[Any, Any, None]], *args: Any, loop: str = "asyncio"
) -> AsyncIterator[Child]:
    """Run ``fn(*args, pipe_end)`` in a spawned process on event loop ``loop``
    (``asyncio`` or ``uvloop``). ``recv()`` raises if the child exits first or is
    silent for TIMEOUT_S. On exit the child gets ``"stop"`` and is joined (killed if
    it lingers)."""
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_child_main, args=(loop, fn, *args, theirs), daemon=True)
    proc.start()
    theirs.close()

    async def recv() -> Any:
        if ours in await asyncio.to_thread(lambda: wait([ours, proc.sentinel], TIMEOUT_S)):
            with contextlib.suppress(EOFError):
                return ours.recv()
        raise RuntimeError(f"{fn.__name__} process ended or timed out (see its stderr)")

    assert proc.pid is not None
    try:
        yield Child(proc.pid, recv, ours.send)
    finally:
        with contextlib.suppress(OSError):
            ours.send("stop")
        await asyncio.to_thread(proc.join, 30)
        if proc.is_alive():
            proc.kill()
            await asyncio.to_thread(proc.join, 5)
        ours.close()


def raise_nofile() -> int:
    """Raise this process's open-files soft limit to its hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) ``pid`` has used; works on a zombie too."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def used_memory(svc: AsyncRedisService) -> int:
    return int((await svc.redis.info("memory"))["used_memory"])


async def open_connections(svc: AsyncRedisService, n: int = 64) -> None:
    """Open ``n`` pooled connections now, so that their buffers are not counted in
    a ``used_memory`` delta taken around ``n`` concurrent calls."""
    await asyncio.gather(*(svc.redis.ping() for _ in range(n)))


# ------------------------------------------------------------------------- hub


@dataclass
class HubProc:
    url: str
    pid: int


_PACKAGES = (
    ("redisq_server/", "hub code (redisq_server)"),
    ("redis/", "redis-py client"),
    ("websockets/", "websockets"),
    ("asyncio/", "asyncio event loop"),
    ("selectors", "asyncio event loop"),
    ("json/", "json"),
)


def _package(path: str) -> str:
    for prefix, name in _PACKAGES:
        if prefix in path:
            return name
    return "other"


def _top_frames(session: Any, n: int = 25) -> dict[str, Any]:
    """Where a pyinstrument session's samples went: the functions with the most
    self time, and self time by package (a built-in, e.g. ``socket.send``, counts
    for the package that called it; ``epoll.poll`` is the loop waiting: idle)."""
    by_fn: dict[tuple[str, str, int], float] = {}
    by_pkg: dict[str, float] = {}
    root = session.root_frame()
    total = root.time if root is not None else 0.0
    stack: list[tuple[Any, str]] = [(root, "other")] if root is not None else []
    while stack:
        f, parent_pkg = stack.pop()
        path = f.file_path_short or ""
        pkg = parent_pkg if path.startswith("<") or not path else _package(path)
        if f.function in ("epoll.poll", "poll") and path.startswith("<"):
            pkg = "idle (epoll wait)"
        elif f.function.startswith("socket.") and path.startswith("<"):
            pkg = "socket syscalls"
        stack.extend((c, pkg) for c in f.children)
        if f.is_synthetic:
            continue
        key = (f.function, path, f.line_no or 0)
        by_fn[key] = by_fn.get(key, 0.0) + f.total_self_time
        by_pkg[pkg] = by_pkg.get(pkg, 0.0) + f.total_self_time
    top = sorted(by_fn.items(), key=lambda kv: -kv[1])[:n]
    busy = total - by_pkg.get("idle (epoll wait)", 0.0)
    return {
        "total_s": total,
        "top_self": [
            {"function": fn, "file": path, "line": line, "self_s": t, "share": t / total}
            for (fn, path, line), t in top
        ],
        "busy_s": busy,
        "by_package": {
            k: {
                "self_s": v,
                "share": v / total,
                "busy_share": v / busy if "idle" not in k else None,
            }
            for k, v in sorted(by_pkg.items(), key=lambda kv: -kv[1])
        },
    }


async def _hub_child(redis_url: str, namespace: str, profile: str, conn: Connection) -> None:
    """A hub until the parent says stop; first sends its URL and pid. With
    ``profile`` (a path stem) it runs under pyinstrument and writes
    ``<stem>.txt`` (the call tree) and ``<stem>.json`` (top self-time frames)."""
    raise_nofile()
    settings = Settings(
        redis_url=redis_url,
        hub_port=0,
        log_level="WARNING",
        limits=EngineLimits(namespace=namespace),
    )
    profiler: Any = None
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
    try:
        async with Hub(settings) as hub:
            conn.send({"url": hub.url, "pid": os.getpid()})
            await asyncio.to_thread(conn.recv)  # "stop", or EOF if the parent is gone
    finally:
        if profiler is not None:
            session = profiler.stop()
            stem = Path(profile)
            text = profiler.output_text(unicode=False, color=False, show_all=False)
            stem.with_suffix(".txt").write_text(text)
            summary = {"duration_s": session.duration, **_top_frames(session)}
            stem.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")


@asynccontextmanager
async def hub_process(
    redis_url: str, namespace: str, *, loop: str = "asyncio", profile: str = ""
) -> AsyncIterator[HubProc]:
    async with spawn(_hub_child, redis_url, namespace, profile, loop=loop) as child:
        hello = await child.recv()
        yield HubProc(hello["url"], hello["pid"])


# ----------------------------------------------------------------------- drain


async def drain(
    redis_url: str,
    namespace: str,
    jobs: int,
    gpus: int,
    redis_pid: int,
    *,
    loop: str = "asyncio",
    profile: str = "",
) -> dict[str, Any]:
    """N jobs queued with no worker; then one worker process with G GPU sockets."""
    svc = AsyncRedisService(redis_url, limits=EngineLimits(namespace=namespace))
    try:
        await open_connections(svc)
        mem0 = await used_memory(svc)
        t0 = time.perf_counter()
        for k in range(0, jobs, 64):  # 64 submits in flight at a time
            n = min(64, jobs - k)
            await asyncio.gather(*(svc.submit_job(JOB_TYPE, 0, {}) for _ in range(n)))
        prequeue_s = time.perf_counter() - t0
        mem1 = await used_memory(svc)
        async with hub_process(redis_url, namespace, loop=loop, profile=profile) as hub:
            await svc.redis.config_resetstat()
            async with spawn(_worker, hub.url, gpus, jobs) as w:
                await w.recv()  # "ready": every GPU registered
                pids = {"hub": hub.pid, "worker": w.pid, "redis": redis_pid}
                cpu0 = {k: cpu_s(p) for k, p in pids.items()}
                res = await w.recv()
                cpu1 = {k: cpu_s(p) for k, p in pids.items()}
            stats = await svc.redis.info("commandstats")
        totals = (await svc.get_stats())["totals"]
    finally:
        await svc.aclose()
    if not res["ok"] or totals["completed"] != jobs:
        raise RuntimeError(f"drain: {res['acked']}/{jobs} acked, {res['errors']}; {totals}")
    seconds = (res["t_end"] - res["t_start"]) / 1e9
    # Redis counts the commands a script runs as well as the script itself, so
    # EVALSHA's time includes the others' (the rest of it is the Lua interpreter)
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


def _submit_frame(i: int, job_id: str) -> str:
    msg = {"type": "submit_job", "id": i, "job_id": job_id, "job_type": JOB_TYPE}
    return json.dumps({**msg, "priority": 0, "params": {}})


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
    async with connect(f"{hub_url}/ws/client/{client}", compression=None, max_size=None) as ws:
        await ws.recv()  # welcome
        slots = asyncio.Semaphore(window) if window else None
        finished = asyncio.get_running_loop().create_future()

        async def reader() -> None:
            async for raw in ws:
                m = json.loads(raw)
                if m["type"] == "job_completed":
                    done[m["job_id"]] = time.monotonic_ns()
                    if slots is not None:
                        slots.release()
                    if len(done) >= n:
                        finished.set_result(None)
                        return
                elif m["type"] == "error":
                    raise RuntimeError(f"hub error: {m}")

        task = asyncio.create_task(reader())
        rng = random.Random(seed)
        due = time.monotonic_ns()
        for i in range(n):
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
            job_id = f"{client}-{i}"
            sent[job_id] = time.monotonic_ns()
            await ws.send(_submit_frame(i, job_id))
        await asyncio.wait({task, finished}, timeout=TIMEOUT_S, return_when="FIRST_COMPLETED")
        if task.done() and task.exception():
            raise RuntimeError(f"client: {task.exception()!r}")
        task.cancel()
        if len(done) < n:
            raise RuntimeError(f"client: {len(done)}/{n} jobs completed within {TIMEOUT_S} s")
    return {"sent": sent, "done": done, "lateness": lateness}


async def _load_run(
    hub: HubProc, gpus: int, n: int, *, window: int = 0, rate: float = 0.0, client: str
) -> dict[str, Any]:
    """One load run: a G-socket worker process and a client here (this process)."""
    async with spawn(_worker, hub.url, gpus, n) as w:
        await w.recv()  # ready
        pids = {"hub": hub.pid, "worker": w.pid, "client": os.getpid()}
        cpu0, t0 = {k: cpu_s(p) for k, p in pids.items()}, time.monotonic()
        c = await _client_load(hub.url, n, window=window, rate=rate, client=client)
        cpu1, t1 = {k: cpu_s(p) for k, p in pids.items()}, time.monotonic()
        res = await w.recv()
    if not res["ok"]:
        raise RuntimeError(f"load: {res['acked']}/{n} acked, {res['errors']}")
    sent, done, assigned = c["sent"], c["done"], res["assigned"]
    first, last_sent, last_done = min(sent.values()), max(sent.values()), max(done.values())
    out: dict[str, Any] = {
        "jobs": n,
        "completed_per_s": n / ((last_done - first) / 1e9),
        "offered_per_s": (n - 1) / ((last_sent - first) / 1e9) if n > 1 else float("nan"),
        "submit->job_assigned": _percentiles([assigned[j] - t for j, t in sent.items()]),
        "submit->job_completed": _percentiles([done[j] - t for j, t in sent.items()]),
        "cpu_busy": {k: (cpu1[k] - cpu0[k]) / (t1 - t0) for k in cpu0},
    }
    if c["lateness"]:
        out["send_lateness_ms"] = _percentiles(c["lateness"])
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
    loop: str = "asyncio",
) -> dict[str, Any]:
    """Idle one-at-a-time latency, the saturated rate, then Poisson load at
    ``loads`` fractions of it (each ``load_seconds`` long, at most ``load_max_jobs``)."""
    async with hub_process(redis_url, namespace, loop=loop) as hub:
        idle = await _latency(hub.url, samples)
        sat = await _load_run(hub, gpus, saturate_jobs, window=window, client="sat")
        sat["window"] = window
        max_rate = sat["completed_per_s"]
        loaded = []
        for k, f in enumerate(loads):
            rate = f * max_rate
            n = int(min(load_max_jobs, max(50, rate * load_seconds)))
            r = await _load_run(hub, gpus, n, rate=rate, client=f"poisson{k}")
            loaded.append({"load": f, "target_per_s": rate, **r})
    return {
        "samples": samples,
        "idle": idle,
        "gpus": gpus,
        "saturated": sat,
        "max_rate_per_s": max_rate,
        "loaded": loaded,
    }


# --------------------------------------------------------------------- enqueue


async def _enqueue_client(hub_url: str, n: int, window: int, client: str) -> float:
    """Submits/s through one client socket (no worker): ``window`` 1 is request/reply."""
    async with connect(f"{hub_url}/ws/client/{client}", compression=None, max_size=None) as ws:
        await ws.recv()  # welcome
        if window <= 1:
            t0 = time.perf_counter()
            for i in range(n):
                await ws.send(_submit_frame(i, f"{client}-{i}"))
                while True:
                    m = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
                    if m["type"] == "error":
                        raise RuntimeError(f"hub error: {m}")
                    if m.get("ref") == i:
                        break
            return n / (time.perf_counter() - t0)
        slots = asyncio.Semaphore(window)
        accepted = 0
        all_in = asyncio.get_running_loop().create_future()

        async def reader() -> None:
            nonlocal accepted
            async for raw in ws:
                m = json.loads(raw)
                if m["type"] == "job_accepted":
                    accepted += 1
                    slots.release()
                    if accepted >= n:
                        all_in.set_result(None)
                        return
                elif m["type"] == "error":
                    raise RuntimeError(f"hub error: {m}")

        t0 = time.perf_counter()
        task = asyncio.create_task(reader())
        for i in range(n):
            await slots.acquire()
            if task.done():
                break
            await ws.send(_submit_frame(i, f"{client}-{i}"))
        await asyncio.wait({task, all_in}, timeout=TIMEOUT_S, return_when="FIRST_COMPLETED")
        elapsed = time.perf_counter() - t0
        if task.done() and task.exception():
            raise RuntimeError(f"enqueue: {task.exception()!r}")
        task.cancel()
        if accepted < n:
            raise RuntimeError(f"enqueue: {accepted}/{n} accepted within {TIMEOUT_S} s")
        return n / elapsed


async def enqueue(
    redis_url: str, namespace: str, jobs: int, window: int, loop: str = "asyncio"
) -> dict[str, Any]:
    """Jobs/s from one client socket, request/reply and batched. A socket follows at
    most 10,000 unfinished jobs (HUB_MAX_SUBSCRIPTIONS), so each mode uses its own."""
    async with hub_process(redis_url, namespace, loop=loop) as hub:
        one = await _enqueue_client(hub.url, jobs, 1, "enq-one")
        batched = await _enqueue_client(hub.url, jobs, window, "enq-batch")
    return {"jobs": jobs, "window": window, "one_at_a_time_per_s": one, "batched_per_s": batched}


# ---------------------------------------------------------------------- growth


async def _fill(svc: AsyncRedisService, start: int, stop: int, chunk: int = 2000) -> None:
    """Queue jobs ``g<start>`` .. ``g<stop-1>`` with the engine's own submit script,
    pipelined (two pipelines in flight), so that 10^6 jobs take seconds, not minutes.
    Each is exactly what ``submit_job`` would write."""
    script = svc.redis.register_script(script_source("submit"))
    template = svc.ops.submit(JOB_TYPE, 0, {})
    keys, header, tail = [svc.keys.events], [*svc.ops.header, ""], list(template.args[1:])

    async def one(a: int, b: int) -> None:
        async with svc.redis.pipeline(transaction=False) as p:
            for k in range(a, b):
                await script(keys=keys, args=[*header, f"g{k}", *tail], client=p)
            await p.execute()

    bounds = list(range(start, stop, chunk))
    for i in range(0, len(bounds), 2):
        pair = bounds[i : i + 2]
        await asyncio.gather(*(one(a, min(a + chunk, stop)) for a in pair))


async def _submit_latency(hub_url: str, samples: int) -> dict[str, float]:
    """Submit -> job_accepted, one at a time, from a client socket (no worker)."""
    out: list[int] = []
    async with connect(f"{hub_url}/ws/client/depth", compression=None, max_size=None) as ws:
        await ws.recv()
        for i in range(samples):
            t0 = time.monotonic_ns()
            await ws.send(_submit_frame(i, f"depth-{time.time_ns()}-{i}"))
            while True:
                m = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
                if m["type"] == "error":
                    raise RuntimeError(f"hub error: {m}")
                if m.get("ref") == i:
                    out.append(time.monotonic_ns() - t0)
                    break
    return _percentiles(out)


async def _depth_worker(hub_url: str, samples: int, conn: Connection) -> None:
    """One GPU socket taking jobs from a deep queue: the time from sending
    ``complete_job`` to receiving the next ``job_assigned``, ``samples`` times."""
    gaps: list[int] = []
    async with connect(f"{hub_url}/ws/worker/depth:gpu0", compression=None) as ws:
        await ws.recv()  # welcome
        await ws.send(json.dumps({"type": "register_worker", "job_types": [JOB_TYPE]}))
        sent_at = 0
        async for raw in ws:
            m = json.loads(raw)
            if m["type"] == "job_assigned":
                now = time.monotonic_ns()
                if sent_at:
                    gaps.append(now - sent_at)
                if len(gaps) >= samples:
                    break
                reply = {"type": "complete_job", "job_id": m["job_id"], "attempt": m["attempt"]}
                sent_at = time.monotonic_ns()
                await ws.send(json.dumps({**reply, "result": {}}))
            elif m["type"] == "error":
                raise RuntimeError(f"hub error: {m}")
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
            async with hub_process(redis_url, namespace) as hub:
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
                    "complete->next_job_assigned": _percentiles(gaps),
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
    loop: str = "asyncio",
) -> dict[str, Any]:
    """:func:`drain` ``reps`` times (fresh namespace and hub each); the median run,
    with every run's rate in ``runs_per_s``. On a small shared machine one run can be
    off by a third (where the scheduler puts the hub, the worker and Redis)."""
    runs = [
        await drain(redis_url, f"{namespace}-r{i}", jobs, gpus, redis_pid, loop=loop)
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
    loop: str = "asyncio",
) -> list[dict[str, Any]]:
    return [
        await drain_median(redis_url, f"{namespace}-g{g}", jobs, g, redis_pid, reps, loop=loop)
        for g in gpus_list
    ]
