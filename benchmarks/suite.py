"""One runner for every benchmark: ``python -m benchmarks``.

Starts its own redis-server (a free loopback port, never the Redis on 6379), runs
the selected parts of our system (:mod:`benchmarks.ours`,
:mod:`benchmarks.footprint`, :mod:`benchmarks.engine`) and the peer queues
(:mod:`benchmarks.peers`), prints tables, checks the issue's targets, and writes
JSON (default ``benchmarks/results/latest.json``) and a plotly HTML plot next to it
(PNG too when kaleido is installed). Every load is bounded in count and in time.
What they share is in :mod:`benchmarks.common`.

    python -m benchmarks                         # everything (~10 min on 2 cores)
    python -m benchmarks --quick                 # tiny N, seconds per part
    python -m benchmarks --only drain,latency --peers none
    python -m benchmarks --only drain,latency --hub-place main  # hub in this process
    python -m benchmarks --only engine           # the engine alone, no hub
    python -m benchmarks --only policies --peers none  # scheduling policies vs strict
    python -m benchmarks --only shards --peers none    # one namespace on 1 and 3 shards
    python -m benchmarks --only prefetch --peers none  # GPU busy share, prefetch window 0 vs 1
    python -m benchmarks --only drain --prefetch 1     # the drain with a prefetch window
    python -m benchmarks --only peers --peers rq,arq
    python -m benchmarks --only drain --profile  # + a profile of the hub (pyinstrument, else cProfile)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from benchmarks import (
    engine,
    footprint,
    functions,
    hub_instructions,
    instructions,
    ours,
    peers,
    policies,
    prefetch,
    shards,
)
from benchmarks.common import HUB_PLACES, cpu_s
from redisq_lab.redis_process import RedisProcess
from redisq_server import AsyncRedisService
from redisq_server.main import served_loop

PARTS = (
    "drain",
    "latency",
    "enqueue",
    "memory",
    "growth",
    "engine",
    "policies",
    "shards",
    "prefetch",
    "functions",
    "instructions",
    "hub-instructions",
    "peers",
)
RESULTS = Path(__file__).resolve().parent / "results"
DB_OURS, DB_SCRATCH = 0, 1  # peers get databases 2, 3, ...


@dataclass(frozen=True)
class Sizes:
    """How big each part is; ``--quick`` swaps in :data:`QUICK`."""

    jobs: int = 5000  # drain N, ours and peers
    reps: int = 3  # each drain is run this often; the median is reported
    gpus: int = 4  # GPU sockets of our worker process in drain and latency
    prefetch: int = 0  # each drain GPU socket's prefetch window (0 or 1)
    samples: int = 500  # our one-at-a-time latency samples
    saturate_jobs: int = 4000
    window: int = 64  # jobs in flight when saturating
    # the saturated rate once more with this many GPU sockets: with 4 (8 places with
    # a window, for 64 jobs in flight) each socket's round trip bounds the rate; with
    # 16 no job waits for a GPU, and the bound is what the hub, client, worker and
    # Redis get of the machine's cores ("one hub saturated by one client")
    wide_gpus: int = 16
    loads: tuple[float, ...] = (0.5, 0.9)
    load_seconds: float = 5.0
    load_max_jobs: int = 5000
    enqueue_jobs: int = 5000
    enqueue_window: int = 256
    memory_jobs: int = 10_000
    socket_workers: int = 1000
    socket_clients: int = 10_000
    socket_samples: int = 300
    socket_budget_s: float = 180.0
    settle_s: float = 1.0
    depths: tuple[int, ...] = (1000, 10_000, 100_000, 1_000_000)
    depth_samples: int = 300
    depth_budget_s: float = 240.0
    gpus_list: tuple[int, ...] = (1, 4, 16, 64)
    peer_jobs: int = 5000
    peer_samples: int = 300
    peer_drain_budget_s: float = 15.0
    peer_latency_budget_s: float = 10.0
    engine_jobs: int = 20_000  # each operation of the engine part, per concurrency
    engine_concurrency: tuple[int, ...] = (8, 1)
    policy_jobs: int = 20_000  # the policies part: jobs per policy
    policy_gpus: int = 4
    policy_clients: int = 10
    shard_jobs: int = 20_000  # the shards part: jobs per shard count
    shard_workers: int = 24
    prefetch_jobs: int = 2000  # the prefetch part: jobs per run
    prefetch_gpus: int = 4
    prefetch_run_s: float = 0.002  # each job's run time on its mock GPU
    function_jobs: int = 20_000  # the functions part (with --base): jobs per run
    function_segment: int = 200  # its calls per segment
    instruction_jobs: int = 800  # the instructions part: N (and 2N) job lifecycles
    instruction_repeats: int = 1  # its counts per checkout (twice with --base, alternating)
    hub_one_jobs: int = 300  # the hub-instructions part: jobs per part, one at a time
    hub_drain_jobs: int = 1000  # and drained
    hub_parts: int = 3  # its parts per run (one run per checkout; two with --base)


QUICK = Sizes(
    jobs=300,
    reps=1,
    samples=50,
    saturate_jobs=300,
    loads=(0.5,),
    load_seconds=1.0,
    load_max_jobs=200,
    enqueue_jobs=300,
    memory_jobs=1000,
    socket_workers=50,
    socket_clients=200,
    socket_samples=20,
    socket_budget_s=20.0,
    settle_s=0.3,
    depths=(1000, 10_000),
    depth_samples=50,
    depth_budget_s=30.0,
    gpus_list=(1, 4),
    wide_gpus=8,
    peer_jobs=200,
    peer_samples=20,
    peer_drain_budget_s=5.0,
    peer_latency_budget_s=3.0,
    engine_jobs=500,
    policy_jobs=600,
    shard_jobs=600,
    prefetch_jobs=300,
    shard_workers=6,
    function_jobs=1200,
    function_segment=50,
    instruction_jobs=100,
    hub_one_jobs=50,
    hub_drain_jobs=200,
    hub_parts=2,
)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def cpu_idle() -> dict[str, Any]:
    """How an idle core waits, which sets what waking a process costs: the cpuidle
    driver and, in a VM on the ``haltpoll`` driver, how long an idle core polls
    before it halts (``guest_halt_poll_ns``; 0: it halts at once, so every wake-up
    of a sleeping process goes through the hypervisor). None where not exposed."""
    poll = _read("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
    return {
        "driver": _read("/sys/devices/system/cpu/cpuidle/current_driver"),
        "guest_halt_poll_ns": int(poll) if poll and poll.isdigit() else None,
    }


def _versions(names: list[str]) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "not installed"
    return out


def machine(redis_version: str) -> dict[str, Any]:
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "mem_total_gib": _mem_total_gib(),
        "kernel": platform.release(),
        "cpu_idle": cpu_idle(),
        "python": platform.python_version(),
        "redis_server": redis_version,
        "packages": _versions(
            [
                "redis",
                "hiredis",
                "websockets",
                "orjson",
                "rq",
                "arq",
                "saq",
                "dramatiq",
                "huey",
                "celery",
                "kombu",
                "aio-pika",
            ]
        ),
    }


# ------------------------------------------------------------ background load


class Background:
    """CPU that processes outside this run used while it ran (other users' work on
    a shared machine disturbs every figure): system-wide busy time from /proc/stat
    minus this process, its reaped children and the redis-server (the parts reap
    their children before they end). ``part(name)`` notes it per part, in cores.
    /proc/stat counts in clock ticks (10 ms), so a part shorter than
    :attr:`MIN_PART_S` (a skipped one, say) is not noted apart: its time counts
    toward the next part's."""

    MIN_PART_S = 0.5

    def __init__(self, redis_pid: int) -> None:
        self.redis_pid = redis_pid
        self.parts: dict[str, dict[str, float]] = {}
        self._mark = self._sample()

    def _sample(self) -> tuple[float, float, float, float]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        idle = fields[3] + fields[4]
        steal = fields[7] if len(fields) > 7 else 0
        busy = (sum(fields[:8]) - idle - steal) / tick
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours_s = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
        with contextlib.suppress(OSError):
            ours_s += cpu_s(self.redis_pid)
        return time.monotonic(), busy, ours_s, steal / tick

    def part(self, name: str) -> None:
        now = self._sample()
        wall = now[0] - self._mark[0]
        if wall < self.MIN_PART_S:  # one tick more or less would read as many cores
            return
        other = max(0.0, (now[1] - self._mark[1]) - (now[2] - self._mark[2]))
        self.parts[name] = {
            "seconds": wall,
            "other_cores": other / wall,
            "steal_cores": (now[3] - self._mark[3]) / wall,
            "cpu_speed": cpu_speed(),
        }
        self._mark = self._sample()


def cpu_speed() -> float:
    """Millions of iterations/s of a fixed pure-Python loop (about 10 ms): the
    machine's single-core speed right now. On a shared VM it drifts, and every
    figure drifts with it."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        x = 0
        for i in range(100_000):
            x += i * i
        best = min(best, time.perf_counter() - t0)
    return 0.1 / best


# ----------------------------------------------------------------------- run


async def _ours(
    args: argparse.Namespace, sz: Sizes, proc: RedisProcess, parts: list[str], bg: Background
) -> dict[str, Any]:
    """Our parts, in order. A part that fails is logged and recorded under
    ``errors``; the others still run."""
    url = proc.url
    scratch = peers.db_url(url, DB_SCRATCH)
    assert proc.proc is not None
    pid = proc.proc.pid
    run = f"b{os.getpid()}"
    loop, place = args.hub_loop, args.hub_place
    res: dict[str, Any] = {}

    async def flush_scratch() -> None:
        svc = AsyncRedisService(scratch)
        await svc.redis.flushdb()
        await svc.aclose()

    async def drain() -> Any:
        window = f", prefetch {sz.prefetch}" if sz.prefetch else ""
        _log(f"drain: {sz.jobs:,} queued jobs, 1 worker process x {sz.gpus} GPU sockets{window}")
        r = await ours.drain_median(
            url,
            f"{run}-drain",
            sz.jobs,
            sz.gpus,
            pid,
            sz.reps,
            place=place,
            loop=loop,
            processes=args.hub_processes,
            prefetch=sz.prefetch,
        )
        runs = ", ".join(f"{x:,.0f}" for x in r["runs_per_s"])
        _log(f"  {r['jobs_per_s']:,.0f} jobs/s (median of {runs})")
        return r

    async def profile() -> Any:
        stem = str(args.json.with_name(args.json.stem + "-hub-profile"))
        _log(f"profile: a drain with the hub profiled -> {stem}.txt")
        prof = await ours.drain(url, f"{run}-prof", sz.jobs, sz.gpus, pid, loop=loop, profile=stem)
        summary = json.loads(await asyncio.to_thread(Path(stem + ".json").read_text))
        shown = await asyncio.to_thread(os.path.relpath, stem + ".txt")
        return {"drain": prof, "text": shown, **summary}

    async def latency() -> Any:
        _log(f"latency: {sz.samples} jobs one at a time, then saturated and Poisson load")
        return await ours.latency(
            url,
            f"{run}-lat",
            samples=sz.samples,
            gpus=sz.gpus,
            saturate_jobs=sz.saturate_jobs,
            window=sz.window,
            loads=sz.loads,
            load_seconds=sz.load_seconds,
            load_max_jobs=sz.load_max_jobs,
            place=place,
            loop=loop,
            processes=args.hub_processes,
            prefetch=sz.prefetch,
            wide_gpus=sz.wide_gpus,
        )

    async def enqueue() -> Any:
        _log(
            f"enqueue: {sz.enqueue_jobs:,} submits one at a time and {sz.enqueue_window} in flight"
        )
        return await ours.enqueue(
            url, f"{run}-enq", sz.enqueue_jobs, sz.enqueue_window, place=place, loop=loop
        )

    async def memory() -> Any:
        _log(f"memory: Redis bytes for {sz.memory_jobs:,} queued jobs")
        await flush_scratch()
        try:
            out = {"redis": await footprint.redis_bytes(scratch, "mem", sz.memory_jobs)}
            await flush_scratch()
            _log(
                f"memory: hub RSS with {sz.socket_workers:,} worker + "
                f"{sz.socket_clients:,} client sockets"
            )
            out["hub"] = await footprint.hub_sockets(
                scratch,
                "sockets",
                sz.socket_workers,
                sz.socket_clients,
                sz.socket_samples,
                sz.socket_budget_s,
                sz.settle_s,
            )
        finally:
            await flush_scratch()
        return out

    async def growth() -> Any:
        _log(f"growth: dispatch with {', '.join(f'{d:,}' for d in sz.depths)} jobs queued")
        await flush_scratch()
        try:
            depth = await ours.growth_depth(
                scratch,
                "depth",
                list(sz.depths),
                sz.depth_samples,
                sz.depth_budget_s,
                _log,
                place=place,
            )
        finally:
            await flush_scratch()
        bg.part("growth: depth")
        _log(f"growth: drain with {', '.join(map(str, sz.gpus_list))} GPU sockets")
        gpus = await ours.growth_gpus(
            url, f"{run}-gpus", sz.jobs, list(sz.gpus_list), pid, sz.reps, place=place, loop=loop
        )
        return {"depth": depth, "gpus": gpus}

    async def engine_alone() -> Any:
        counts = ", ".join(map(str, sz.engine_concurrency))
        _log(f"engine: {sz.engine_jobs:,} of each operation, no hub, concurrency {counts}")
        await flush_scratch()
        try:
            return await engine.measure(
                scratch, "engine", sz.engine_jobs, list(sz.engine_concurrency)
            )
        finally:
            await flush_scratch()

    async def policies_cost() -> Any:
        _log(
            f"policies: {sz.policy_jobs:,} jobs per policy from {sz.policy_clients} clients, "
            f"{sz.policy_gpus} workers, no hub"
        )
        await flush_scratch()
        try:
            return await policies.measure(
                scratch, "policies", sz.policy_jobs, sz.policy_gpus, sz.policy_clients, sz.reps
            )
        finally:
            await flush_scratch()

    async def shards_cost() -> Any:
        _log(f"shards: {sz.shard_jobs:,} jobs with 1 and 3 shards, {sz.shard_workers} workers")
        return await shards.measure(sz.shard_jobs, sz.shard_workers)

    async def prefetch_gap() -> Any:
        _log(
            f"prefetch: {sz.prefetch_jobs:,} jobs of {sz.prefetch_run_s * 1000:g} ms, "
            f"{sz.prefetch_gpus} GPUs, window 0 and 1"
        )
        try:
            return await prefetch.measure(
                scratch, "prefetch", sz.prefetch_jobs, sz.prefetch_gpus, sz.prefetch_run_s, sz.reps
            )
        finally:
            await flush_scratch()

    async def functions_ab() -> Any:
        if args.base is None:
            return {"skipped": "give --base <another checkout> to compare its library"}
        _log(f"functions: this library against {args.base}'s, {sz.function_jobs:,} jobs")
        source = await asyncio.to_thread(functions.base_library, args.base)
        return await functions.compare(url, source, sz.function_jobs, sz.function_segment)

    async def instruction_counts() -> Any:
        _log(
            f"instructions: Redis under callgrind, {sz.instruction_jobs:,} and "
            f"{2 * sz.instruction_jobs:,} job lifecycles"
            + (f", against {args.base}" if args.base else "")
        )
        repeats = sz.instruction_repeats * (2 if args.base else 1)
        return await asyncio.to_thread(
            instructions.measure, sz.instruction_jobs, args.base, repeats
        )

    async def hub_instruction_counts() -> Any:
        _log(
            f"hub-instructions: the hub under callgrind, {sz.hub_parts} parts of "
            f"{sz.hub_one_jobs:,} jobs one at a time and of {sz.hub_drain_jobs:,} drained"
            + (f", against {args.base}" if args.base else "")
        )
        return await asyncio.to_thread(
            hub_instructions.measure,
            sz.hub_one_jobs,
            sz.hub_drain_jobs,
            sz.hub_parts,
            args.base,
            2 if args.base else 1,
        )

    steps: dict[str, Callable[[], Awaitable[Any]]] = {
        "drain": drain,
        "profile": profile,
        "latency": latency,
        "enqueue": enqueue,
        "memory": memory,
        "growth": growth,
        "engine": engine_alone,
        "policies": policies_cost,
        "shards": shards_cost,
        "prefetch": prefetch_gap,
        "functions": functions_ab,
        "instructions": instruction_counts,
        "hub-instructions": hub_instruction_counts,
    }
    wanted = [p for p in steps if p in parts or (p == "profile" and args.profile)]
    for name in wanted:
        try:
            res[name] = await steps[name]()
        except Exception as exc:
            _log(f"{name} failed:\n{traceback.format_exc()}")
            res.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:1000]
        bg.part(name if name != "growth" else "growth: sockets")
    return res


def _run_loop(args: argparse.Namespace, coro: Coroutine[Any, Any, Any]) -> Any:
    """Run our parts on the runner's event loop: asyncio's own, or uvloop when the hub
    runs in this process (``--hub-place main``) and ``--hub-loop`` names it."""
    if args.hub_place == "main" and args.hub_loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def run(args: argparse.Namespace) -> dict[str, Any]:
    sz = QUICK if args.quick else Sizes()
    if args.jobs:
        sz = replace(sz, jobs=args.jobs, peer_jobs=args.jobs)
    if args.gpus:
        sz = replace(sz, gpus=args.gpus)
    if args.prefetch:
        sz = replace(sz, prefetch=args.prefetch)
    if args.samples:
        sz = replace(sz, samples=args.samples)
    parts = args.only
    began = time.monotonic()
    result: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    with RedisProcess(extra_args=("--databases", "64")) as proc:
        assert proc.proc is not None
        svc = AsyncRedisService(proc.url)

        async def info() -> str:
            try:
                return str((await svc.redis.info("server"))["redis_version"])
            finally:
                await svc.aclose()

        result["machine"] = machine(asyncio.run(info()))
        result["load_average_at_start"] = os.getloadavg()
        bg = Background(proc.proc.pid)
        result["sizes"] = asdict(sz) | {
            "quick": args.quick,
            "hub_loop": args.hub_loop,
            "hub_place": args.hub_place,
            "hub_processes": args.hub_processes,
        }
        ours_parts = [p for p in parts if p != "peers"]
        if ours_parts or args.profile:
            result["ours"] = _run_loop(args, _ours(args, sz, proc, ours_parts, bg))
        if "peers" in parts and args.peers:
            _log(
                f"peers: {', '.join(args.peers)} ({sz.peer_jobs:,} jobs, <= {sz.peer_samples} samples)"
            )
            result["peers"] = peers.run_peers(
                proc.url,
                proc.proc.pid,
                args.peers,
                jobs=sz.peer_jobs,
                samples=sz.peer_samples,
                drain_budget_s=sz.peer_drain_budget_s,
                latency_budget_s=sz.peer_latency_budget_s,
                reps=sz.reps,
                log=_log,
                on_done=lambda key: bg.part(f"peers: {key}"),
            )
        result["background_cpu"] = bg.parts
    result["wall_s"] = time.monotonic() - began
    result["targets"] = targets(result)
    return result


# -------------------------------------------------------------------- targets


def _best_peer(result: dict[str, Any], transport: str = "") -> tuple[str, float] | None:
    """The job queue (not a bare transport) that drained fastest in this run, on
    ``transport`` if given ("redis" or "amqp"): its label and jobs/s."""
    best: tuple[str, float] | None = None
    for name, settings in result.get("peers", {}).items():
        spec = peers.PEERS[name]
        if spec.baseline or (transport and spec.transport != transport):
            continue
        for setting, r in settings.items():
            d = r.get("drain")
            if d and d["complete"] and (best is None or d["jobs_per_s"] > best[1]):
                best = (f"{peers.PEERS[name].label} ({setting})", d["jobs_per_s"])
    return best


def _by(x: float, limit: float, lower_is_better: bool = True) -> tuple[bool, str]:
    met = x <= limit if lower_is_better else x >= limit
    if met:
        return True, "met"
    factor = x / limit if lower_is_better else limit / x
    return False, f"missed by {factor:.1f}x" if factor >= 1.5 else f"missed by {factor - 1:.0%}"


def _hub_busy(run: dict[str, Any]) -> str:
    """``, hub N% busy`` for a load run that read the hub's CPU, else nothing."""
    busy = run.get("cpu_busy", {}).get("hub")
    return "" if busy is None else f", hub {busy:.0%} busy"


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets with what this run measured (parts not run are omitted)."""
    o = result.get("ours", {})
    rows: list[dict[str, Any]] = []

    def add(target: str, measured: str, met: bool | None, status: str) -> None:
        rows.append({"target": target, "measured": measured, "met": met, "status": status})

    best = _best_peer(result)
    if "drain" in o and best:
        ratio = o["drain"]["jobs_per_s"] / best[1]
        met, status = _by(ratio, 2.0, lower_is_better=False)
        add("drain >= 2x the best peer", _drain_versus(o, *best), met, status)
    if "latency" in o:
        idle = o["latency"]["idle"]
        start, res = idle["submit->job_assigned"], idle["submit->job_completed"]
        for name, x, limit in (
            ("submit->start p50 <= 0.5 ms", start["p50"], 0.5),
            ("submit->start p99 <= 2 ms", start["p99"], 2.0),
            ("submit->result p50 <= 1 ms", res["p50"], 1.0),
        ):
            add(name, f"{x:.2f} ms", *_by(x, limit))
    rows += _speed_targets(result, best)
    if "memory" in o:
        b = o["memory"]["redis"]["bytes_per_job"]
        add("Redis <= 400 bytes per queued job", f"{b:,.0f} bytes", *_by(b, 400))
        h = o["memory"]["hub"]
        w, c = h["workers"]["opened"], h["clients"]["opened"]
        rss = h["rss_mb"]["with_clients"]
        est = h["rss_mb"]["baseline"] + h["mb_per_1000_workers"] + 10 * h["mb_per_1000_clients"]
        p99 = h["submit->job_assigned"]["p99"]
        reached = w >= 1000 and c >= 10_000
        measured = (
            f"{w:,} workers + {c:,} clients: RSS {rss:,.0f} MiB"
            + ("" if reached else f" (extrapolated to 1,000 + 10,000: {est:,.0f} MiB)")
            + f"; dispatch p99 {p99:.2f} ms"
        )
        ok = (rss if reached else est) < 500 and p99 < 10
        status = "met" if ok else "missed"
        if not reached:
            status += " (extrapolated)"
        add(
            "1,000 worker + 10,000 client sockets < 500 MB RSS, dispatch p99 < 10 ms",
            measured,
            ok,
            status,
        )
    if "growth" in o:
        rows_d = [r for r in o["growth"]["depth"] if "skipped" not in r]
        if len(rows_d) >= 2:
            lo, hi = rows_d[0], rows_d[-1]
            a = lo["complete->next_job_assigned"]["p50"]
            b = hi["complete->next_job_assigned"]["p50"]
            flat = b <= 1.25 * a
            skipped = [r["depth"] for r in o["growth"]["depth"] if "skipped" in r]
            measured = f"p50 {a:.2f} ms at {lo['depth']:,} -> {b:.2f} ms at {hi['depth']:,}"
            if skipped:
                measured += f" ({', '.join(f'{d:,}' for d in skipped)} skipped)"
            status = "met (within 25%)" if flat else f"missed: {b / a:.2f}x"
            add("dispatch flat from 10^3 to 10^6 queued", measured, flat, status)
    return rows


def _drain_versus(ours: dict[str, Any], peer: str, rate: float) -> str:
    """Our drain against ``peer``'s ``rate``, and the fastest drain of the growth
    part's socket counts if that is another count (the status stays the drain's)."""
    drain = ours["drain"]
    text = (
        f"{drain['jobs_per_s']:,.0f} jobs/s ({drain['gpus']} GPU sockets) = "
        f"{drain['jobs_per_s'] / rate:.2f}x {peer} ({rate:,.0f})"
    )
    top = max(ours.get("growth", {}).get("gpus", []), key=lambda r: r["jobs_per_s"], default=None)
    if top and top["gpus"] != drain["gpus"]:
        text += f"; {top['jobs_per_s']:,.0f} with {top['gpus']} sockets = {top['jobs_per_s'] / rate:.2f}x"
    return text


def _at90(lat: dict[str, Any], run: dict[str, Any]) -> str:
    """The start p50 at 90 % of the max, with the rate offered and the saturated
    rate before and (if measured) after the loaded runs: a machine that slowed in
    between turns 90 % of the first into more than it can take."""
    text = f"{run['submit->job_assigned']['p50']:.2f} ms"
    if "offered_per_s" in run:
        text += f" at {run['offered_per_s']:,.0f}/s (max {lat['max_rate_per_s']:,.0f}"
        again = lat.get("max_rate_again_per_s")
        text += f" before, {again:,.0f} after)" if again else ")"
    return text


def _speed_targets(result: dict[str, Any], best: tuple[str, float] | None) -> list[dict[str, Any]]:
    """Issue 18's targets (speed), from the parts of this run that measure them."""
    o, rows = result.get("ours", {}), []

    def add(target: str, measured: str, met: bool, status: str) -> None:
        rows.append({"target": target, "measured": measured, "met": met, "status": status})

    drain, peer = o.get("drain"), result.get("peers", {})
    if drain:
        hub_us = drain["cpu_ms_per_job"]["hub"] * 1000
        add("hub CPU per drained job <= 100 us", f"{hub_us:.0f} us", *_by(hub_us, 100))
        on_redis = _best_peer(result, transport="redis")
        if on_redis:
            ratio = drain["jobs_per_s"] / on_redis[1]
            add(
                "drain >= 2x the best Redis-backed peer",
                _drain_versus(o, *on_redis),
                *_by(ratio, 2.0, lower_is_better=False),
            )
        amqp = peer.get("rabbitmq", {}).get("fast", {}).get("drain")
        if amqp and amqp["complete"]:
            ratio = drain["jobs_per_s"] / amqp["jobs_per_s"]
            add(
                "drain above RabbitMQ via aio-pika",
                _drain_versus(o, f"{peers.PEERS['rabbitmq'].label} (fast)", amqp["jobs_per_s"]),
                *_by(ratio, 1.0, lower_is_better=False),
            )
    engine = {r["concurrency"]: r for r in o.get("engine", {}).get("runs", [])}
    if 8 in engine and "redis_us_per_job" in engine[8]:
        us = engine[8]["redis_us_per_job"]["cpu"]
        add(
            "Redis CPU per job, whole lifecycle <= 60 us",
            f"{us:.0f} us (engine part, 8 calls in flight)",
            *_by(us, 60),
        )
    lat = o.get("latency")
    if lat:
        at90 = [r for r in lat["loaded"] if abs(r["load"] - 0.9) < 1e-9]
        if at90:
            x = at90[0]["submit->job_assigned"]["p50"]
            add("submit->start p50 at 90% of the max <= 5 ms", _at90(lat, at90[0]), *_by(x, 5.0))
        rate = lat["max_rate_per_s"]
        shown = (
            f"{rate:,.0f} jobs/s ({lat['gpus']} GPU sockets{_hub_busy(lat.get('saturated', {}))})"
        )
        if "max_rate_wide_per_s" in lat:  # no job waits for a GPU socket there
            rate = lat["max_rate_wide_per_s"]
            wide = lat["saturated_wide"]
            shown = f"{rate:,.0f} jobs/s ({wide['gpus']} GPU sockets{_hub_busy(wide)}); " + shown
        add(
            "one client through one hub >= 5,000 jobs/s",
            shown,
            *_by(rate, 5000, lower_is_better=False),
        )
        peer_p50 = [
            (f"{peers.PEERS[name].label} ({setting})", r["latency"]["submit->result"]["p50"])
            for name, settings in peer.items()
            for setting, r in settings.items()
            if r.get("latency") and r["latency"]["submit->result"].get("p50") is not None
        ]
        if peer_p50:
            label, p50 = min(peer_p50, key=lambda t: t[1])
            ours = lat["idle"]["submit->job_completed"]["p50"]
            add(
                "submit->result p50 at idle below the best peer's",
                f"{ours:.2f} ms vs {label} {p50:.2f} ms",
                ours < p50,
                "met" if ours < p50 else f"missed by {ours / p50 - 1:.0%}",
            )
    return rows


# ---------------------------------------------------------------------- table


def _ms(p: dict[str, float | None] | None, key: str) -> str:
    x = p.get(key) if p else None
    return f"{x:.2f}" if x is not None else "-"


def _idle_text(idle: dict[str, Any] | None) -> str:
    """The idle cores' wait, for the machine line ('' when unknown)."""
    if not idle or idle.get("driver") is None:
        return ""
    poll = idle.get("guest_halt_poll_ns")
    return f", idle cores: {idle['driver']}" + (
        f" (poll {poll:,} ns before halting)" if poll is not None else ""
    )


def format_tables(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"{m['nproc']} cores ({m['cpu_model']}), {m['mem_total_gib']:.0f} GiB, Python {m['python']}, "
        f"Redis {m['redis_server']}, websockets {m['packages']['websockets']}"
        + _idle_text(m.get("cpu_idle"))
        + (" - QUICK sizes" if result["sizes"]["quick"] else "")
        + (
            " - our hub in the runner's process"
            if result["sizes"].get("hub_place") == "main"
            else ""
        ),
    ]
    o = result.get("ours", {})
    sz = result["sizes"]
    side = _side_by_side(result)
    counts = []
    if "drain" in o:
        counts.append(f"{o['drain']['jobs']:,} (ours)")
    if result.get("peers"):
        counts.append(f"{sz['peer_jobs']:,} (peers)")
    drained = " / ".join(counts) or "-"
    if side:
        lines += [
            "",
            f"Side by side: drain = {drained} no-op jobs queued, then ONE worker process, "
            "jobs/s; enqueue = one at a time from one client (ours: through the hub); B/job = "
            "Redis used_memory per queued no-op job; latency = one job at a time into an idle "
            "system (ms; start = the job starts on the worker, result = known to the "
            "submitting client)",
            SIDE_HEADER,
        ]
        lines += side
        notes = {
            f"{peers.PEERS[n].label} ({s})": r["setting"]
            for n, ss in result.get("peers", {}).items()
            for s, r in ss.items()
        }
        if notes:
            lines.append("settings:")
            lines += [f"  {k}: {v}" for k, v in notes.items()]
    cpu_rows = _cpu_table(result)
    if cpu_rows:
        lines += ["", *cpu_rows]
    if "latency" in o:
        lat = o["latency"]
        sat = lat["saturated"]
        lines += [
            "",
            f"Our latency under load ({lat['gpus']} GPU sockets"
            + (f", prefetch {lat['prefetch']}" if lat.get("prefetch") else "")
            + f"; saturated = {sat['window']} jobs "
            f"in flight from one client: {lat['max_rate_per_s']:,.0f} jobs/s end to end"
            + (
                f"; {lat['max_rate_again_per_s']:,.0f} jobs/s again after the Poisson runs"
                if "max_rate_again_per_s" in lat
                else ""
            )
            + (
                f"; {lat['max_rate_wide_per_s']:,.0f} jobs/s with "
                f"{lat['saturated_wide']['gpus']} GPU sockets"
                f"{_hub_busy(lat['saturated_wide'])}"
                if "max_rate_wide_per_s" in lat
                else ""
            )
            + ")",
            "  start = submit -> job_assigned at the worker, result = submit -> job_completed"
            " at the client, ms (one machine's monotonic clock); rate/s = offered (Poisson)"
            " or completed",
            f"{'load':<24}{'jobs':>6}{'rate/s':>9}{'start p50':>10}{'p95':>7}{'p99':>8}"
            f"{'result p50':>11}{'p95':>7}{'p99':>8}",
        ]
        rows = [
            (
                "idle, one at a time",
                {"jobs": lat["samples"], "completed_per_s": None, **lat["idle"]},
            )
        ]
        rows += [(f"Poisson {int(r['load'] * 100)}% of max", r) for r in lat["loaded"]]
        rows += [("saturated", sat)]
        if "saturated_again" in lat:
            rows += [("saturated, again", lat["saturated_again"])]
        for name, r in rows:
            a, c = r["submit->job_assigned"], r["submit->job_completed"]
            rate = (
                f"{r['offered_per_s']:,.0f}"
                if "offered_per_s" in r and r.get("load")
                else (f"{r['completed_per_s']:,.0f}" if r.get("completed_per_s") else "-")
            )
            lines.append(
                f"{name:<24}{r['jobs']:>6}{rate:>9}{a['p50']:>10.2f}{a['p95']:>7.2f}{a['p99']:>8.2f}"
                f"{c['p50']:>11.2f}{c['p95']:>7.2f}{c['p99']:>8.2f}"
            )
    if "enqueue" in o:
        e = o["enqueue"]
        lines += [
            "",
            f"Our enqueue through the hub, one client socket, {e['jobs']:,} jobs: "
            f"{e['one_at_a_time_per_s']:,.0f}/s one at a time, "
            f"{e['batched_per_s']:,.0f}/s with {e['window']} in flight",
        ]
    if "memory" in o:
        r, h = o["memory"]["redis"], o["memory"]["hub"]
        br = ", ".join(f"{k} {v:,.0f}" for k, v in r["breakdown_bytes_per_job"].items())
        lines += [
            "",
            f"Memory: Redis {r['bytes_per_job']:,.0f} bytes per queued job ({r['jobs']:,} jobs, "
            f"params {r['params']}; {br})",
            f"Hub RSS: baseline {h['rss_mb']['baseline']:,.1f} MiB; "
            f"+{h['mb_per_1000_workers']:,.1f} MiB per 1,000 worker sockets "
            f"({h['workers']['opened']:,} opened in {h['workers']['seconds']:.1f} s); "
            f"+{h['mb_per_1000_clients']:,.1f} MiB per 1,000 client sockets "
            f"({h['clients']['opened']:,} opened in {h['clients']['seconds']:.1f} s); "
            f"total {h['rss_mb']['with_clients']:,.1f} MiB",
            f"  with all open, {h['dispatch_samples']} jobs one at a time: submit->start p50 "
            f"{h['submit->job_assigned']['p50']:.2f} / p99 {h['submit->job_assigned']['p99']:.2f} ms, "
            f"submit->result p50 {h['submit->job_completed']['p50']:.2f} / p99 "
            f"{h['submit->job_completed']['p99']:.2f} ms",
        ]
        for step in ("workers", "clients"):
            if h[step].get("error"):
                lines.append(f"  {step}: stopped at {h[step]['opened']:,}: {h[step]['error']}")
    if "growth" in o:
        g = o["growth"]
        lines += [
            "",
            "Growth: with D jobs queued, submit->accepted (client) and dispatch = complete_job "
            "sent -> next job_assigned (worker), ms",
            f"{'queued':>10}{'accept p50':>11}{'p99':>7}{'dispatch p50':>13}{'p95':>7}{'p99':>7}{'B/job':>8}",
        ]
        for r in g["depth"]:
            if "skipped" in r:
                lines.append(f"{r['depth']:>10,}  skipped: {r['skipped']}")
                continue
            a, d = r["submit->job_accepted"], r["complete->next_job_assigned"]
            lines.append(
                f"{r['queued']:>10,}{a['p50']:>11.2f}{a['p99']:>7.2f}{d['p50']:>13.2f}"
                f"{d['p95']:>7.2f}{d['p99']:>7.2f}{r['redis_bytes_per_job']:>8,.0f}"
            )
        lines.append(
            "Drain by GPU sockets (one worker process): "
            + ", ".join(f"{r['gpus']}: {r['jobs_per_s']:,.0f}/s" for r in g["gpus"])
        )
    if "engine" in o:
        lines += ["", *_engine_lines(o["engine"])]
    if "policies" in o:
        lines += ["", *policies.lines(o["policies"])]
    if "shards" in o:
        lines += ["", *shards.lines(o["shards"])]
    if "prefetch" in o:
        lines += ["", *prefetch.lines(o["prefetch"])]
    if "functions" in o:
        lines += ["", *functions.lines(o["functions"])]
    if "instructions" in o:
        lines += ["", *instructions.lines(o["instructions"])]
    if "hub-instructions" in o:
        lines += ["", *hub_instructions.lines(o["hub-instructions"])]
    if "drain" in o:
        d = o["drain"]
        cpu = ", ".join(f"{k} {v:.3f}" for k, v in d["cpu_ms_per_job"].items())
        busy = ", ".join(f"{k} {v:.0%}" for k, v in d["cpu_busy"].items())
        cmds = d["redis_commands"]
        inner = ", ".join(
            f"{k} {v['calls_per_job']:.1f}x {v['usec_per_job']:.1f}"
            for k, v in list(cmds.items())[:10]
        )
        lines += [
            "",
            f"Our drain CPU, ms per job: {cpu}; busy: {busy}",
            f"  Redis us per job by command (a function's commands are inside FCALL's): {inner}",
        ]
    if "profile" in o:
        p = o["profile"]
        pkgs = ", ".join(
            f"{k} {v['busy_share']:.0%}" for k, v in p["by_package"].items() if v["busy_share"]
        )
        lines += [
            "",
            f"Hub profile during a drain at {p['drain']['jobs_per_s']:,.0f} jobs/s ({p['text']})",
            f"  busy {p['busy_s'] / p['total_s']:.0%} of the time; busy time by package: {pkgs}",
            "  top self time:",
        ]
        for f in p["top_self"][:12]:
            lines.append(f"  {f['share']:>6.1%}  {f['function']}  {f['file']}:{f['line']}")
    bg = result.get("background_cpu", {})
    disturbed = {k: v for k, v in bg.items() if v["other_cores"] >= 0.1}
    speeds = [v["cpu_speed"] for v in bg.values() if "cpu_speed" in v]
    if speeds and max(speeds) > 1.15 * min(speeds):
        lines += [
            "",
            f"The machine's single-core speed varied during this run: {min(speeds):.1f} to "
            f"{max(speeds):.1f} M loop iterations/s (see background_cpu in the JSON)",
        ]
    if disturbed:
        lines += [
            "",
            "Other processes used CPU during these parts (cores, average; RabbitMQ parts "
            "include the RabbitMQ server):",
            "  " + ", ".join(f"{k} {v['other_cores']:.2f}" for k, v in disturbed.items()),
        ]
    if result.get("targets"):
        width = max(len(t["target"]) for t in result["targets"]) + 2
        lines += ["", f"{'target':<{width}}{'status':<22}measured"]
        for t in result["targets"]:
            lines.append(f"{t['target']:<{width}}{t['status']:<22}{t['measured']}")
    for name, err in o.get("errors", {}).items():
        lines.append(f"FAILED: {name}: {err}")
    lines += ["", f"wall time {result['wall_s']:.0f} s"]
    return "\n".join(lines)


def _engine_lines(e: dict[str, Any]) -> list[str]:
    """The engine part: ops/s by operation and concurrency, and each against the raw
    Redis baselines of the same concurrency."""
    runs = e["runs"]
    head = f"{'operation':<16}" + "".join(
        f"{'c=' + str(r['concurrency']) + ' ops/s':>14}{'vs PING':>9}{'vs ZADD+ZPOPMIN':>17}"
        for r in runs
    )
    lines = [
        f"The engine without the hub: {e['jobs']:,} of each operation at concurrency "
        f"{', '.join(str(r['concurrency']) for r in runs)}, hiredis={e['hiredis']} - "
        f"{e['clients']}",
        head,
    ]
    for name in engine.OPERATIONS:
        row = f"{name:<16}"
        for r in runs:
            ops = r["ops_per_s"]
            v = ops[name]
            row += f"{v:>14,.0f}{v / ops['PING']:>9.2f}{v / ops['ZADD+ZPOPMIN']:>17.2f}"
        lines.append(row)
    lines.append(
        "Redis per job, whole lifecycle (submit + complete+claim; Redis' own counters): "
        + "; ".join(
            f"c={r['concurrency']}: process CPU {r['redis_us_per_job']['cpu']:.0f} us, "
            f"inside FCALL {r['redis_us_per_job']['fcall']:.0f} us"
            for r in runs
        )
    )
    return lines


def _cpu_table(result: dict[str, Any]) -> list[str]:
    """CPU ms per job in the drain, per system and process: ours (hub, worker,
    Redis), each peer (its worker and Redis; an AMQP peer's broker is not counted).
    Each is process CPU time over the drain window divided by the jobs drained: on a
    noisy machine the comparison that moves least between runs."""
    rows: list[tuple[str, str, float | None, float | None, float | None]] = []
    d = result.get("ours", {}).get("drain")
    if d:
        c = d["cpu_ms_per_job"]
        hub = c.get("hub", c.get("hub+client"))
        label = f"{d['gpus']} GPUs" + (f" pf{d['prefetch']}" if d.get("prefetch") else "")
        rows.append(("redisq (hub)", label, hub, c.get("worker"), c.get("redis")))
    for name, settings in result.get("peers", {}).items():
        spec = peers.PEERS[name]
        for setting, r in settings.items():
            c = (r.get("drain") or {}).get("cpu_ms_per_job")
            if not c:
                continue
            redis_ms = c.get("redis") if spec.transport == "redis" else None
            rows.append((spec.label, setting, None, c.get("worker"), redis_ms))
    if not rows:
        return []

    def num(x: float | None) -> str:
        return f"{x:>9.3f}" if x is not None and x == x else f"{'-':>9}"

    out = [
        "CPU per job in the drain, ms (process CPU over the drain / jobs; peers on "
        "RabbitMQ: broker not counted)",
        f"{'system':<22}{'setting':<9}{'hub':>9}{'worker':>9}{'redis':>9}{'total':>9}",
    ]
    for system, setting, hub, wk, rd in rows:
        parts = [x for x in (hub, wk, rd) if x is not None and x == x]
        total = sum(parts) if parts else None
        out.append(f"{system[:21]:<22}{setting:<9}{num(hub)}{num(wk)}{num(rd)}{num(total)}")
    return out


SIDE_HEADER = (
    f"{'system':<22}{'setting':<9}{'drain/s':>9}{'enqueue/s':>10}{'B/job':>7}"
    f"{'start p50':>10}{'p99':>9}{'result p50':>11}{'p95':>9}{'p99':>9}{'n':>5}"
)


def _side_row(
    system: str,
    setting: str,
    drain: str,
    enqueue: float | None,
    bpj: float | None,
    start: dict[str, float | None] | None,
    res: dict[str, float | None] | None,
    n: int | None,
) -> str:
    def num(x: float | None, w: int) -> str:
        return f"{x:>{w},.0f}" if x is not None else f"{'-':>{w}}"

    return (
        f"{system[:21]:<22}{setting:<9}{drain:>9}{num(enqueue, 10)}{num(bpj, 7)}"
        f"{_ms(start, 'p50'):>10}{_ms(start, 'p99'):>9}{_ms(res, 'p50'):>11}"
        f"{_ms(res, 'p95'):>9}{_ms(res, 'p99'):>9}{n if n is not None else '-':>5}"
    )


def _side_by_side(result: dict[str, Any]) -> list[str]:
    rows: list[str] = []
    partial = False
    o = result.get("ours", {})
    if "drain" in o or "latency" in o:
        d, e, lat = o.get("drain"), o.get("enqueue"), o.get("latency")
        idle = lat["idle"] if lat else {}
        main = result["sizes"].get("hub_place") == "main"
        rows.append(
            _side_row(
                "redisq (hub: main)" if main else "redisq (hub)",
                f"{result['sizes']['gpus']} GPUs"
                + (f" pf{result['sizes']['prefetch']}" if result["sizes"].get("prefetch") else ""),
                f"{d['jobs_per_s']:,.0f}" if d else "-",
                e["one_at_a_time_per_s"] if e else None,
                d["redis_bytes_per_job"] if d else None,
                idle.get("submit->job_assigned"),
                idle.get("submit->job_completed"),
                lat["samples"] if lat else None,
            )
        )
    for name, settings in result.get("peers", {}).items():
        label = peers.PEERS[name].label
        for setting, r in settings.items():
            if "skipped" in r:
                rows.append(f"{label[:21]:<22}{setting:<9}skipped: {r['skipped']}")
                continue
            d, lat = r["drain"], r["latency"]
            partial = partial or not d["complete"]
            rows.append(
                _side_row(
                    label,
                    setting,
                    f"{d['jobs_per_s']:,.0f}" + ("" if d["complete"] else "*"),
                    d["enqueue_jobs_per_s"],
                    d.get("redis_bytes_per_job"),
                    lat["submit->start"],
                    lat["submit->result"],
                    lat["samples"],
                )
            )
    if partial:
        rows.append("* the time budget ended first: the rate of the jobs it finished")
    return rows


# ----------------------------------------------------------------------- plot


def write_plot(result: dict[str, Any], path: Path) -> list[Path]:
    """A 2x2 plotly figure: drain, latency, dispatch by depth, drain by sockets."""
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        return []
    fig = make_subplots(
        rows=2,
        cols=2,
        subplot_titles=(
            "Drain, one worker process (jobs/s)",
            "Submit -> result, one job at a time (ms, log)",
            "Dispatch with D jobs queued (ms)",
            "Our drain by GPU sockets (jobs/s)",
        ),
    )
    names, drains, p50, p99 = [], [], [], []
    o = result.get("ours", {})
    if "drain" in o or "latency" in o:
        names.append("redisq")
        drains.append(o.get("drain", {}).get("jobs_per_s"))
        idle = o.get("latency", {}).get("idle", {}).get("submit->job_completed")
        p50.append(idle["p50"] if idle else None)
        p99.append(idle["p99"] if idle else None)
    for name, settings in result.get("peers", {}).items():
        for setting, r in settings.items():
            if "skipped" in r:
                continue
            names.append(f"{peers.PEERS[name].label} {setting}")
            drains.append(r["drain"]["jobs_per_s"])
            p50.append(r["latency"]["submit->result"]["p50"])
            p99.append(r["latency"]["submit->result"]["p99"])
    fig.add_trace(go.Bar(x=names, y=drains, name="drain"), row=1, col=1)
    fig.add_trace(go.Bar(x=names, y=p50, name="p50"), row=1, col=2)
    fig.add_trace(go.Bar(x=names, y=p99, name="p99"), row=1, col=2)
    fig.update_yaxes(type="log", row=1, col=2)
    g = o.get("growth")
    if g:
        rows = [r for r in g["depth"] if "skipped" not in r]
        for key in ("p50", "p99"):
            fig.add_trace(
                go.Scatter(
                    x=[r["queued"] for r in rows],
                    y=[r["complete->next_job_assigned"][key] for r in rows],
                    name=f"dispatch {key}",
                    mode="lines+markers",
                ),
                row=2,
                col=1,
            )
        fig.update_xaxes(type="log", row=2, col=1)
        fig.add_trace(
            go.Scatter(
                x=[r["gpus"] for r in g["gpus"]],
                y=[r["jobs_per_s"] for r in g["gpus"]],
                name="drain by sockets",
                mode="lines+markers",
            ),
            row=2,
            col=2,
        )
        fig.update_xaxes(type="log", row=2, col=2)
    fig.update_layout(height=800, width=1200, title="redisq benchmarks", barmode="group")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(path, include_plotlyjs="cdn")
    written = [path]
    try:
        import kaleido  # noqa: F401

        fig.write_image(path.with_suffix(".png"))
        written.append(path.with_suffix(".png"))
    except Exception:
        pass
    return written


# ------------------------------------------------------------------------ CLI


def _csv(allowed: tuple[str, ...], special: tuple[str, ...] = ()) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if len(items) == 1 and items[0] in special:
            return items
        bad = [x for x in items if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown: {', '.join(bad)}; choose from {', '.join(allowed)}"
            )
        return items

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="parts: " + ", ".join(PARTS) + "; peers: " + ", ".join(peers.PEERS),
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: seconds per part")
    p.add_argument(
        "--only",
        type=_csv(PARTS),
        default=list(PARTS),
        help="comma-separated parts to run (default: all)",
    )
    p.add_argument(
        "--peers",
        type=_csv(tuple(peers.PEERS), ("all", "none")),
        default=["all"],
        help="comma-separated peers, 'all' (default) or 'none'",
    )
    p.add_argument("--json", type=Path, default=RESULTS / "latest.json", help="results JSON path")
    p.add_argument("--plot", type=Path, help="plot path (default: the JSON path with .html)")
    p.add_argument("--jobs", type=int, help="drain N, ours and peers (default 5000)")
    p.add_argument("--gpus", type=int, help="our worker's GPU sockets (default 4)")
    p.add_argument(
        "--prefetch",
        type=int,
        choices=(0, 1),
        help="the GPU sockets of drain and latency under load register with this "
        "prefetch window (default 0)",
    )
    p.add_argument("--samples", type=int, help="our one-at-a-time latency samples (default 500)")
    p.add_argument(
        "--hub-loop",
        choices=("asyncio", "uvloop"),
        default=served_loop(),
        help="the hub's event loop (default: uvloop when installed, as redisq-server runs)",
    )
    p.add_argument(
        "--hub-place",
        choices=HUB_PLACES,
        default="process",
        help="where the hub of drain, latency, enqueue and growth runs: a process of its "
        "own (default) or this runner's process, sharing its event loop with the client "
        "(memory and --profile always use a process of their own)",
    )
    p.add_argument(
        "--hub-processes",
        type=int,
        default=1,
        metavar="N",
        help="drain and latency through `redisq-server --processes N` (N hubs on one "
        "port) instead of one hub (default 1)",
    )
    p.add_argument(
        "--base",
        type=Path,
        metavar="CHECKOUT",
        help="the functions part: compare this checkout's function library with "
        "CHECKOUT's, interleaved on one Redis; the instructions and hub-instructions "
        "parts: count CHECKOUT's Redis and hub instructions per job too",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile the hub (in a process of its own) during a drain",
    )
    args = p.parse_args(argv)
    if args.peers == ["all"]:
        args.peers = list(peers.PEERS)
    elif args.peers == ["none"]:
        args.peers = []
    explicit_peers = argv is not None and any(a.startswith("--peers") for a in argv)
    if args.peers and explicit_peers and "peers" not in args.only:
        args.only = [*args.only, "peers"]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = run(args)
    print(format_tables(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    written = write_plot(result, args.plot or args.json.with_suffix(".html"))
    _log(f"wrote {args.json}" + "".join(f", {w}" for w in written))
    errors = result.get("ours", {}).get("errors")
    if errors:
        _log("parts that failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
        raise SystemExit(1)
    return result
