"""What the benchmark scenarios share: the job type, the time limit, spawned child
processes, the hub (in a process of its own or in this one), the GPU worker
process, the client's frames and a few /proc readings.

Everything talks to the hub over 127.0.0.1, in protocol v1 frames built with
:mod:`redisq_server.protocol`. Durations are ``time.monotonic_ns()`` differences
(CLOCK_MONOTONIC, system-wide on Linux, so processes can compare them); they are
summarised with :func:`redisq_lab.frames.percentiles` after :func:`ms` turns them
into milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import resource
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from redisq_server import AsyncRedisService, EngineLimits, Settings, protocol
from redisq_server.main import Hub
from redisq_server.protocol import MessageType

JOB_TYPE = "bench"
#: the longest any step waits for a child, a reply or a drain
TIMEOUT_S = 120.0
#: where the hub runs: a spawned process of its own, or the runner's process (on
#: the runner's event loop, which the client shares)
HUB_PLACES = ("process", "main")


def ms(durations_ns: Iterable[int]) -> list[float]:
    """Durations in nanoseconds as milliseconds (for ``percentiles``)."""
    return [d / 1e6 for d in durations_ns]


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


async def redis_counters(raw: Any) -> tuple[float, float, int]:
    """Redis' own counters so far: (process CPU seconds, user + sys, from ``INFO
    cpu``; microseconds inside ``FCALL`` and ``FCALL`` calls, from ``INFO
    commandstats``; a function's commands count inside its ``FCALL`` too)."""
    cpu = await raw.info("cpu")
    fcall = (await raw.info("commandstats")).get("cmdstat_fcall", {"usec": 0, "calls": 0})
    return (
        float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
        float(fcall["usec"]),
        int(fcall["calls"]),
    )


async def queue_jobs(svc: AsyncRedisService, n: int, job_type: str = JOB_TYPE) -> None:
    """Queue ``n`` no-op jobs of ``job_type`` (priority 0), 64 submits in flight."""
    for k in range(0, n, 64):
        m = min(64, n - k)
        await asyncio.gather(*(svc.submit_job(job_type, 0, {}) for _ in range(m)))


async def used_memory(svc: AsyncRedisService) -> int:
    return int((await svc.redis.info("memory"))["used_memory"])


async def open_connections(svc: AsyncRedisService, n: int = 64) -> None:
    """Open ``n`` pooled connections now, so that their buffers are not counted in
    a ``used_memory`` delta taken around ``n`` concurrent calls."""
    await asyncio.gather(*(svc.redis.ping() for _ in range(n)))


# ------------------------------------------------------------------------- hub


@dataclass
class HubProc:
    """A running hub: its ws:// URL and the pid of the process it runs in (with
    several hub processes, ``pids`` are theirs and ``pid`` their parent's)."""

    url: str
    pid: int
    pids: tuple[int, ...] = ()

    def cpu_pids(self) -> tuple[int, ...]:
        """The processes whose CPU is the hub's."""
        return self.pids or (self.pid,)


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
    return _frames_summary(total, [(*key, t) for key, t in top], by_pkg)


def _frames_summary(
    total: float, top: list[tuple[str, str, int, float]], by_pkg: dict[str, float]
) -> dict[str, Any]:
    """The profile summary both profilers give: ``top`` (function, file, line, self
    time) and self time by package, as seconds and as shares of ``total`` and of
    the busy time (``total`` less the loop's idle wait)."""
    busy = total - by_pkg.get("idle (epoll wait)", 0.0)
    return {
        "total_s": total,
        "top_self": [
            {"function": fn, "file": path, "line": line, "self_s": t, "share": t / total}
            for fn, path, line, t in top
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


def _cprofile_frames(stats: Any, n: int = 25) -> dict[str, Any]:
    """:func:`_top_frames` for a cProfile run (used when pyinstrument is not
    installed): self time by function and by package. A built-in counts for the
    package of its most frequent caller; ``epoll.poll`` is the loop waiting (idle).
    Time the loop spends in C between callbacks (uvloop) is in no function."""
    entries = stats.stats  # (file, line, fn) -> (cc, nc, tt, ct, callers)
    by_pkg: dict[str, float] = {}
    rows: list[tuple[str, str, int, float]] = []
    for (path, line, fn), (_, _, tt, _, callers) in entries.items():
        if path == "~":
            if "poll" in fn and ("epoll" in fn or "select" in fn):
                pkg = "idle (epoll wait)"
            elif "socket" in fn:
                pkg = "socket syscalls"
            elif callers:
                top = max(callers.items(), key=lambda kv: kv[1][1])[0]
                pkg = _package(top[0])
            else:
                pkg = "other"
        else:
            pkg = _package(path)
        by_pkg[pkg] = by_pkg.get(pkg, 0.0) + tt
        rows.append((fn, path, line, tt))
    rows.sort(key=lambda r: -r[3])
    return _frames_summary(sum(by_pkg.values()), rows[:n], by_pkg)


def _hub_settings(redis_url: str, namespace: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        hub_port=0,
        log_level="WARNING",
        limits=EngineLimits(namespace=namespace),
    )


async def _hub_child(redis_url: str, namespace: str, profile: str, conn: Connection) -> None:
    """A hub until the parent says stop; first sends its URL and pid. With
    ``profile`` (a path stem) it runs under pyinstrument (cProfile when pyinstrument
    is not installed) and writes ``<stem>.txt`` (the call tree, or cProfile's table
    by self time) and ``<stem>.json`` (top self-time frames)."""
    raise_nofile()
    profiler: Any = None
    cprof: Any = None
    if profile:
        try:
            from pyinstrument import Profiler
        except ImportError:
            import cProfile

            cprof = cProfile.Profile()
            cprof.enable()
        else:
            profiler = Profiler(interval=0.0005, async_mode="disabled")
            profiler.start()
    try:
        async with Hub(_hub_settings(redis_url, namespace)) as hub:
            conn.send({"url": hub.url, "pid": os.getpid()})
            await asyncio.to_thread(conn.recv)  # "stop", or EOF if the parent is gone
    finally:
        if cprof is not None:
            import io
            import pstats

            cprof.disable()
            out = io.StringIO()
            stats = pstats.Stats(cprof, stream=out)
            stats.sort_stats("tottime").print_stats(60)
            stats.sort_stats("cumulative").print_stats(60)
            stem = Path(profile)
            stem.with_suffix(".txt").write_text(out.getvalue())
            summary = {"duration_s": getattr(stats, "total_tt", 0.0), "profiler": "cProfile"}
            summary |= _cprofile_frames(stats)
            stem.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
        if profiler is not None:
            session = profiler.stop()
            stem = Path(profile)
            text = profiler.output_text(unicode=False, color=False, show_all=False)
            stem.with_suffix(".txt").write_text(text)
            summary = {"duration_s": session.duration, **_top_frames(session)}
            stem.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")


@asynccontextmanager
async def _hub_processes(redis_url: str, namespace: str, processes: int) -> AsyncIterator[HubProc]:
    """``redisq-server --processes N`` on a free port (its own event loop choice,
    uvloop when installed); stopped with SIGTERM."""
    import psutil

    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "REDISQ_NAMESPACE": namespace,
        "LOG_LEVEL": "WARNING",
    }
    cmd = [sys.executable, "-m", "redisq_server", "--host", "127.0.0.1", "--port", "0"]
    proc = await asyncio.create_subprocess_exec(
        *cmd, "--processes", str(processes), env=env, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        url = ""
        async with asyncio.timeout(TIMEOUT_S):
            while not url:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError("redisq-server --processes exited (see its stderr)")
                if "listening on ws://" in line:
                    url = line.split("listening on ")[1].split()[0]
        kids = tuple(c.pid for c in psutil.Process(proc.pid).children())
        hubs = tuple(p for p in kids if "resource_tracker" not in " ".join(_cmdline(p)))
        yield HubProc(url, proc.pid, hubs)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except OSError:
        return []


@asynccontextmanager
async def hub_at(
    place: str,
    redis_url: str,
    namespace: str,
    *,
    loop: str = "asyncio",
    profile: str = "",
    processes: int = 1,
) -> AsyncIterator[HubProc]:
    """A fresh hub on ``redis_url`` and ``namespace``, placed as ``place`` (one of
    :data:`HUB_PLACES`): ``process`` spawns it on event loop ``loop`` (under
    pyinstrument with ``profile``, see :func:`_hub_child`); ``main`` runs it in this
    process, on the running loop. ``processes`` > 1 (with ``process``) runs
    ``redisq-server --processes N`` instead: N hubs on one port."""
    if place == "process" and processes > 1:
        if profile:
            raise ValueError("several hub processes are not profiled")
        async with _hub_processes(redis_url, namespace, processes) as hub:
            yield hub
    elif place == "process":
        async with spawn(_hub_child, redis_url, namespace, profile, loop=loop) as child:
            hello = await child.recv()
            yield HubProc(hello["url"], hello["pid"])
    elif place == "main":
        if profile or processes > 1:
            raise ValueError(
                "the hub is profiled, or runs as several, only in processes of its own"
            )
        async with Hub(_hub_settings(redis_url, namespace)) as hub:
            yield HubProc(hub.url, os.getpid())
    else:
        raise ValueError(f"unknown hub placement {place!r}; choose from {HUB_PLACES}")


# ---------------------------------------------------------------------- frames


def _register(prefetch: int) -> str:
    return protocol.encode(protocol.register_worker([JOB_TYPE], prefetch=prefetch, id="reg"))


def submit_frame(i: int, job_id: str) -> str:
    """A client's ``submit_job`` of a no-op ``JOB_TYPE`` job (request id ``i``)."""
    return protocol.encode(protocol.submit_job(JOB_TYPE, 0, {}, job_id=job_id, id=i))


def complete_frame(m: dict[str, Any], ack: bool = False) -> str:
    """The ``complete_job`` of the pushed ``job_assigned`` ``m``, with an empty result;
    with ``ack`` it carries an id, so the hub answers with ``ack``."""
    frame = protocol.complete_job(m["job_id"], m["attempt"], {}, id=1 if ack else None)
    return protocol.encode(frame)


async def open_client(hub_url: str, client_id: str) -> ClientConnection:
    """A client socket past its ``welcome``."""
    ws = await connect(
        f"{hub_url}/ws/client/{client_id}", compression=None, max_size=None, open_timeout=30
    )
    await ws.recv()  # welcome
    return ws


async def open_worker(hub_url: str, worker_id: str, prefetch: int = 0) -> ClientConnection:
    """A worker socket registered for ``JOB_TYPE`` with prefetch window ``prefetch``
    (its ``worker_registered`` read; a job pushed on registration comes after it)."""
    ws = await connect(
        f"{hub_url}/ws/worker/{worker_id}", compression=None, max_size=None, open_timeout=30
    )
    await ws.recv()  # welcome
    await ws.send(_register(prefetch))
    reply = json.loads(await ws.recv())
    if reply["type"] != MessageType.WORKER_REGISTERED:
        await ws.close()
        raise RuntimeError(f"register_worker failed: {reply}")
    return ws


# ---------------------------------------------------------------------- worker


async def worker(url: str, gpus: int, total: int, prefetch: int, conn: Connection) -> None:
    """The GPU worker process: G sockets completing each pushed job at once, in the
    order pushed, until ``total`` completions are acked (or a socket fails); each
    socket registers with prefetch window ``prefetch``. Sends "ready" once all are
    registered, then ``ok``, ``acked``, ``errors``, the ``job_assigned`` arrival
    time of each job id and its own start and end times."""
    assigned: dict[str, int] = {}  # job id -> when its job_assigned arrived
    acked = 0
    t_start = time.monotonic_ns()

    async def serve(ws: ClientConnection) -> None:
        nonlocal acked
        async for raw in ws:
            m = json.loads(raw)
            kind = m["type"]
            if kind == MessageType.JOB_ASSIGNED:
                assigned[m["job_id"]] = time.monotonic_ns()
                await ws.send(complete_frame(m, ack=True))
            elif kind == MessageType.ACK:
                acked += 1
                if acked >= total:
                    return
            elif kind == MessageType.ERROR:
                raise RuntimeError(f"hub error: {m}")

    sockets = await asyncio.gather(
        *(open_worker(url, f"bench:gpu{i}", prefetch) for i in range(gpus))
    )
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


async def one_at_a_time(
    hub_url: str, samples: int, client_id: str
) -> tuple[dict[str, int], dict[str, int]]:
    """``samples`` jobs, one at a time, from a client socket here, each awaited until
    its ``job_completed``; returns (sent, completed) ``monotonic_ns`` by job id."""
    sent: dict[str, int] = {}
    done: dict[str, int] = {}
    ws = await open_client(hub_url, client_id)
    try:
        for i in range(samples):
            job_id = f"{client_id}-{i}"
            frame = submit_frame(i, job_id)
            sent[job_id] = time.monotonic_ns()
            await ws.send(frame)
            while job_id not in done:
                m = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
                if m["type"] == MessageType.JOB_COMPLETED:
                    done[m["job_id"]] = time.monotonic_ns()
                elif m["type"] == MessageType.ERROR:
                    raise RuntimeError(f"hub error: {m}")
    finally:
        await ws.close()
    return sent, done
