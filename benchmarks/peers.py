"""The queues people use today, measured the same way as ours, on the same machine.

For every peer and setting (``fast``: its fastest fair configuration on this
machine; ``default``: what its docs and CLI give you, with one worker process),
a *driver* subprocess runs, against the peer's own fresh Redis database on the
runner's private redis-server (or the local RabbitMQ on 127.0.0.1:5672):

* ``drain``: N no-op jobs are enqueued one at a time with no worker running
  (enqueue jobs/s and Redis ``used_memory`` growth per job are noted on the way),
  then ONE worker process starts. Jobs/s from the start of the first job to the
  end of the N-th (read from files the task body writes, so worker start-up does
  not count), bounded by a time budget: a slow peer reports the rate of what it
  finished. CPU seconds of the worker (with its children) and of redis-server over
  that window are recorded too.
* ``latency``: a long-running worker; the driver submits one job at a time and
  blocks until the result is known to it. Submit -> result (and submit -> job
  start, from the start time the job returns) p50/p95/p99 over up to S samples or
  a time budget, whichever ends first, after three warm-up jobs.

The driver prints nothing but writes its results as JSON; any failure of a peer
(not installed, cannot start, times out) becomes ``{"skipped": reason}`` for that
peer alone. The adapters (which knobs each setting turns) are in
:mod:`benchmarks.peer_apps`. Run peers alone from the repository root with::

    python -m benchmarks --only peers [--peers rq,arq] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import ms
from benchmarks.peer_apps import AMQP_URL
from redisq_lab.frames import percentiles

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ("fast", "default")
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class PeerSpec:
    name: str
    label: str
    module: str  # import name that must be installed
    transport: str  # "redis" or "amqp"
    settings: tuple[str, ...] = SETTINGS
    baseline: bool = False  # a transport, not a job queue: not a "peer" for the targets


PEERS: dict[str, PeerSpec] = {
    p.name: p
    for p in (
        PeerSpec("rq", "RQ", "rq", "redis"),
        PeerSpec("arq", "arq", "arq", "redis"),
        PeerSpec("saq", "SAQ", "saq", "redis"),
        PeerSpec("dramatiq", "Dramatiq", "dramatiq", "redis"),
        PeerSpec("huey", "Huey", "huey", "redis"),
        PeerSpec("celery", "Celery", "celery", "redis"),
        PeerSpec("rabbitmq", "RabbitMQ (aio-pika)", "aio_pika", "amqp", ("fast",), baseline=True),
        PeerSpec("celery-rabbitmq", "Celery on RabbitMQ", "celery", "amqp"),
    )
}

#: what each setting is, for the table and the JSON (see peer_apps for the code)
SETTING_NOTES: dict[str, dict[str, str]] = {
    "rq": {
        "fast": "SimpleWorker, burst, log WARNING",
        "default": "Worker (fork per job), burst, log INFO",
    },
    "arq": {
        "fast": "poll_delay 1 ms (worker and result), max_jobs 100, burst",
        "default": "poll_delay 0.5 s, max_jobs 10, burst",
    },
    "saq": {"fast": "concurrency 20, burst", "default": "concurrency 10, burst"},
    "dramatiq": {
        "fast": "1 process, 2 threads, worker_timeout 1 ms",
        "default": "1 process, 8 threads, worker_timeout 1 s",
    },
    "huey": {
        "fast": "1 thread, notify_result (BLPOP), no scheduler",
        "default": "1 thread, result polled from 50 ms",
    },
    "celery": {
        "fast": "solo pool, no gossip/mingle/heartbeat, prefetch x64, no-op results ignored",
        "default": "prefork pool, concurrency 1, results stored",
    },
    "rabbitmq": {"fast": "aio-pika publish + ack, prefetch 256; reply_to round trip"},
    "celery-rabbitmq": {
        "fast": "solo pool, no gossip/mingle/heartbeat, prefetch x64, rpc:// results",
        "default": "prefork pool, concurrency 1, rpc:// results",
    },
}


def amqp_answers(host: str = "127.0.0.1", port: int = 5672) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def db_url(url: str, db: int) -> str:
    """``url`` (``redis://host:port/N``) pointing at database ``db`` instead."""
    base, _, _ = url.rpartition("/")
    return f"{base}/{db}"


# ------------------------------------------------------------------ the runner


def run_peers(
    redis_url: str,
    redis_pid: int,
    names: list[str],
    *,
    jobs: int,
    samples: int,
    drain_budget_s: float,
    latency_budget_s: float,
    reps: int = 1,
    first_db: int = 2,
    log: Callable[[str], None] = print,
    on_done: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Measure each peer in ``names``; returns ``{peer: {setting: result}}`` where a
    result is the driver's JSON or ``{"skipped": reason}``."""
    out: dict[str, dict[str, Any]] = {}
    db = first_db
    for name in names:
        spec = PEERS[name]
        out[name] = {}
        reason = _cannot_run(spec)
        for setting in spec.settings:
            if reason:
                res: dict[str, Any] = {"skipped": reason}
            else:
                url = AMQP_URL
                if spec.transport == "redis":
                    url = db_url(redis_url, db)
                    db += 1
                res = _drive(
                    spec,
                    setting,
                    url,
                    redis_url,
                    redis_pid,
                    jobs,
                    samples,
                    drain_budget_s,
                    latency_budget_s,
                    reps,
                )
            res["setting"] = SETTING_NOTES.get(name, {}).get(setting, setting)
            out[name][setting] = res
            log(f"  {spec.label} ({setting}): {_summary(res)}")
            if on_done is not None:
                on_done(f"{name} {setting}")
    return out


def _cannot_run(spec: PeerSpec) -> str | None:
    if importlib.util.find_spec(spec.module) is None:
        extra = spec.module.replace("_", "-")
        return f"not installed (pip install {extra}, or pip install -e '.[bench]')"
    if spec.transport == "amqp" and not amqp_answers():
        return "RabbitMQ does not answer on 127.0.0.1:5672"
    return None


def _summary(res: dict[str, Any]) -> str:
    if "skipped" in res:
        return f"skipped: {res['skipped']}"
    d, lat = res["drain"], res["latency"]
    part = "" if d["complete"] else f" (only {d['done']}/{d['jobs']} in the budget)"
    p = lat["submit->result"]
    return (
        f"drain {d['jobs_per_s']:,.0f} jobs/s{part}; submit->result p50 {p['p50']:.2f} ms, "
        f"p99 {p['p99']:.2f} ms ({lat['samples']} samples)"
    )


def _drive(
    spec: PeerSpec,
    setting: str,
    url: str,
    info_url: str,
    redis_pid: int,
    jobs: int,
    samples: int,
    drain_budget_s: float,
    latency_budget_s: float,
    reps: int = 1,
) -> dict[str, Any]:
    """Run the driver subprocess for one peer and setting; never raises."""
    limit = reps * (drain_budget_s + START_TIMEOUT_S + jobs / 200)
    limit += latency_budget_s + 2 * START_TIMEOUT_S
    with tempfile.TemporaryDirectory(prefix=f"redisq-bench-{spec.name}-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable, "-m", "benchmarks.peers", "drive",
            "--peer", spec.name, "--setting", setting, "--url", url,
            "--info-url", info_url, "--redis-pid", str(redis_pid),
            "--jobs", str(jobs), "--samples", str(samples),
            "--drain-budget", str(drain_budget_s), "--latency-budget", str(latency_budget_s),
            "--reps", str(reps),
            "--workdir", tmp, "--out", str(out),
        ]  # fmt: skip
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit, check=False
            )
        except subprocess.TimeoutExpired:
            return {"skipped": f"did not finish within {limit:.0f} s"}
        if out.exists():
            res: dict[str, Any] = json.loads(out.read_text())
            return res
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"skipped": f"driver failed (exit {proc.returncode}): {tail[0][:300]}"}


# ---------------------------------------------------------- the driver (child)


def _cpu_s(pid: int) -> float:
    """CPU seconds of ``pid``, its reaped children and its live descendants."""
    import psutil

    try:
        p = psutil.Process(pid)
        t = p.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in p.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
        return float(total)
    except psutil.Error:
        return float("nan")


def _used_memory(info: Any) -> int:
    return int(info.info("memory")["used_memory"])


def _spawn_worker(
    args: argparse.Namespace, mode: str, workdir: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = workdir / f"worker-{mode}.log"
    cmd = [
        sys.executable, "-m", "benchmarks.peers", "work",
        "--peer", args.peer, "--setting", args.setting, "--url", args.url, "--mode", mode,
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so stop() reaches its children
        )
    return proc, log_path


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the worker's process group, then SIGKILL it if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # children left behind by a clean exit


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-400:]


def _read(path: Path) -> list[int] | None:
    try:
        return [int(x) for x in path.read_text().split()]
    except (OSError, ValueError):
        return None


def _drive_drain(args: argparse.Namespace, adapter: Any, info: Any) -> dict[str, Any]:
    workdir = Path(args.workdir)
    n = args.jobs
    mem0 = _used_memory(info) if info is not None else 0
    t0 = time.perf_counter()
    for i in range(n):
        adapter.enqueue(i)
    enqueue_s = time.perf_counter() - t0
    mem1 = _used_memory(info) if info is not None else 0
    progress, start = workdir / "progress", workdir / "start"
    progress.unlink(missing_ok=True)  # left by an earlier repetition
    start.unlink(missing_ok=True)
    env = {
        "BENCH_PROGRESS": str(progress),
        "BENCH_START": str(start),
        "BENCH_TOTAL": str(n),
        "BENCH_BY_INDEX": "1" if adapter.by_index else "0",
    }
    proc, log_path = _spawn_worker(args, "drain", workdir, env)
    t_start: int | None = None
    done, t_last = 0, 0
    cpu0: dict[str, float] = {}
    launched = time.monotonic()
    error = None
    try:
        while True:
            time.sleep(0.01)
            if t_start is None:
                s = _read(start)
                if s:
                    t_start = s[0]
                    cpu0 = {"worker": _cpu_s(proc.pid), "redis": _cpu_s(args.redis_pid)}
                elif time.monotonic() - launched > START_TIMEOUT_S:
                    error = f"worker ran no job within {START_TIMEOUT_S:.0f} s"
                    break
            p = _read(progress)
            if p:
                done, t_last = p
            if done >= n:
                break
            if proc.poll() is not None:
                time.sleep(0.1)
                p = _read(progress)
                if p:
                    done, t_last = p
                if done < n:
                    error = f"worker exited ({proc.returncode}) after {done}/{n} jobs"
                break
            if t_start is not None and (time.monotonic_ns() - t_start) / 1e9 > args.drain_budget:
                break
        cpu1 = {"worker": _cpu_s(proc.pid), "redis": _cpu_s(args.redis_pid)}
    finally:
        _stop(proc)
    if error or t_start is None or done < 2:
        raise RuntimeError(f"drain: {error or 'no progress'}; worker log: {_tail(log_path)}")
    seconds = (t_last - t_start) / 1e9
    cpu = {k: cpu1[k] - cpu0.get(k, cpu1[k]) for k in cpu1}
    return {
        "jobs": n,
        "done": done,
        "complete": done >= n,
        "seconds": seconds,
        "jobs_per_s": done / seconds if seconds > 0 else float("nan"),
        "enqueue_jobs_per_s": n / enqueue_s,
        "redis_bytes_per_job": (mem1 - mem0) / n if info is not None else None,
        "cpu_ms_per_job": {k: 1000 * v / done for k, v in cpu.items()},
    }


def _drive_latency(args: argparse.Namespace, adapter: Any) -> dict[str, Any]:
    workdir = Path(args.workdir)
    proc, log_path = _spawn_worker(args, "serve", workdir, {})
    start_ns: list[int] = []
    result_ns: list[int] = []
    try:
        for w in range(3):  # the first waits for the worker to come up
            try:
                adapter.roundtrip(-1 - w, START_TIMEOUT_S)
            except Exception as exc:
                raise RuntimeError(
                    f"latency warm-up: {exc!r}; worker log: {_tail(log_path)}"
                ) from None
        begin = time.monotonic()
        for i in range(args.samples):
            t0 = time.monotonic_ns()
            started = adapter.roundtrip(i, 30.0)
            t1 = time.monotonic_ns()
            start_ns.append(started - t0)
            result_ns.append(t1 - t0)
            if time.monotonic() - begin > args.latency_budget:
                break
    finally:
        _stop(proc)
    return {
        "samples": len(result_ns),
        "submit->start": percentiles(ms(start_ns)),
        "submit->result": percentiles(ms(result_ns)),
    }


def drive(args: argparse.Namespace) -> dict[str, Any]:
    """The driver's work (in its own process): drain, then latency."""
    from benchmarks.peer_apps import ADAPTERS

    try:
        adapter = ADAPTERS[args.peer](args.url, args.setting)
    except ImportError as exc:
        return {"skipped": f"not installed: {exc}"}
    info = None
    if args.url.startswith("redis"):
        from redis import Redis

        info = Redis.from_url(args.info_url)
    res: dict[str, Any] = {}
    try:
        runs = []
        for _ in range(args.reps):
            adapter.reset()
            runs.append(_drive_drain(args, adapter, info))
            if not runs[-1]["complete"]:
                break  # a peer slower than the budget: its rate is what it is
        runs.sort(key=lambda r: r["jobs_per_s"])
        res["drain"] = {**runs[len(runs) // 2], "runs_per_s": [r["jobs_per_s"] for r in runs]}
        adapter.reset()
        res["latency"] = _drive_latency(args, adapter)
    finally:
        with contextlib.suppress(Exception):
            adapter.reset()
        adapter.close()
    return res


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.peers",
        description="The subprocesses of the peers part; `python -m benchmarks` starts them.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("drive", help="measure one peer and setting (runs a worker)")
    w = sub.add_parser("work", help="run one peer's worker")
    for s in (d, w):
        s.add_argument("--peer", choices=sorted(PEERS), required=True)
        s.add_argument("--setting", choices=SETTINGS, required=True)
        s.add_argument("--url", required=True)
    w.add_argument("--mode", choices=("drain", "serve"), required=True)
    d.add_argument("--info-url", required=True)
    d.add_argument("--redis-pid", type=int, required=True)
    d.add_argument("--jobs", type=int, required=True)
    d.add_argument("--samples", type=int, required=True)
    d.add_argument("--drain-budget", type=float, required=True)
    d.add_argument("--latency-budget", type=float, required=True)
    d.add_argument("--reps", type=int, default=1)
    d.add_argument("--workdir", required=True)
    d.add_argument("--out", type=Path, required=True)
    return p


def main(argv: list[str] | None = None) -> None:
    """A peer's driver or worker subprocess (see :func:`_drive`, :func:`_spawn_worker`)."""
    args = _parser().parse_args(argv)
    if args.cmd == "work":
        from benchmarks.peer_apps import ADAPTERS

        ADAPTERS[args.peer](args.url, args.setting).work(args.mode)
        return
    try:
        res = drive(args)
    except Exception as exc:
        traceback.print_exc()
        res = {"skipped": f"{type(exc).__name__}: {exc}"[:500]}
    args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
