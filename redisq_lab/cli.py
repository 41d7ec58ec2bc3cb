"""The ``redisq`` command: look at a running queue from a terminal, and run one.

``summary``, ``jobs``, ``job``, ``workers`` and ``worker`` read the queue; ``serve``
runs a hub (on a private redis-server unless ``--redis-url`` is given),
``mock-workers`` runs simulated GPU machines, ``submit`` sends jobs through a hub and
``demo`` runs the whole thing end to end.

Every subcommand reads through :mod:`redisq_lab.monitors` and prints a table for
people or, with ``--format json``, plain JSON for ``jq`` (times as ISO 8601 strings,
missing values as ``null``)::

    redisq summary --redis-url redis://127.0.0.1:6390/0
    redisq jobs --status failed --limit 5 --format json | jq '.[].error'

``--redis-url`` and ``--namespace`` may come before or after the subcommand.

Exit codes: 0 success; 1 not found (an unknown job or worker) or not finished
(``submit --wait --timeout`` gave up); 2 a usage error (bad arguments, ``--params``
that is not a JSON object, a job the hub refuses) or Redis or the hub unreachable;
130 interrupted (Ctrl-C); 141 the reader of a pipe stopped early (``| head``), quietly,
like other Unix tools. Errors are one line on stderr, without a traceback.

Adding a subcommand takes a function and a decorator::

    @command("ping", "check that Redis answers", formats=False)
    def _ping(args: argparse.Namespace) -> int:
        with open_monitors(args) as m:
            m.redis.service.ping()
        return 0

``configure`` (optional) adds the subcommand's own arguments to its parser.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
import redis
from websockets.exceptions import InvalidHandshake

from redisq_server.auth import DEFAULT_TTL_S, parse_secrets, sign
from redisq_server.config import (
    RedisURLError,
    check_redis_url,
    environ,
    redis_url_from_env,
    safe_url,
)
from redisq_server.protocol import ProtocolError

from ._source import hub_url_of
from .client import JobFailed, QueueClient, RequestError
from .mock_worker import DEFAULT_JOB_TYPES, MockWorker
from .monitors import JOB_STATUSES, JobMonitor, NotFoundError, RedisMonitor, WorkerMonitor
from .redis_process import RedisNotInstalled

__all__ = [
    "COMMANDS",
    "Command",
    "Monitors",
    "UsageError",
    "build_parser",
    "command",
    "emit",
    "frame_records",
    "frame_table",
    "jsonable",
    "main",
    "mapping_table",
    "open_monitors",
]

PROG: Final = "redisq"

Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    """One subcommand: ``run(args)`` returns the exit code; ``configure(parser)``
    adds its arguments; ``formats`` adds ``--format table|json``."""

    name: str
    help: str
    run: Handler
    configure: Callable[[argparse.ArgumentParser], None] | None = None
    formats: bool = True


#: Every subcommand by name, in the order ``--help`` lists them.
COMMANDS: dict[str, Command] = {}


def command(
    name: str,
    help: str,
    *,
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
    formats: bool = True,
) -> Callable[[Handler], Handler]:
    """Register the decorated function as subcommand ``name`` (see the module docs)."""

    def register(run: Handler) -> Handler:
        COMMANDS[name] = Command(name, help, run, configure, formats)
        return run

    return register


class UsageError(Exception):
    """A mistake by the user (bad namespace, ...): printed as one line, exit code 2."""


class NotFinished(Exception):
    """``submit --wait`` gave up before its jobs finished: one line, exit code 1."""


# ----------------------------------------------------------------- monitors


@dataclass(frozen=True)
class Monitors:
    """The three monitors, sharing one connection."""

    jobs: JobMonitor
    workers: WorkerMonitor
    redis: RedisMonitor


@contextmanager
def open_monitors(args: argparse.Namespace) -> Iterator[Monitors]:
    """Monitors for ``--redis-url`` and ``--namespace`` (the environment when not
    given); the connection closes when the block ends."""
    check_redis_url(args.redis_url or redis_url_from_env())
    try:
        jobs = JobMonitor(args.redis_url, namespace=args.namespace)
    except ValueError as exc:  # e.g. a namespace that cannot be a key prefix
        raise UsageError(str(exc)) from None
    try:
        yield Monitors(
            jobs, WorkerMonitor(service=jobs.service), RedisMonitor(service=jobs.service)
        )
    finally:
        jobs.close()


# ------------------------------------------------------------------- output


def jsonable(value: Any) -> Any:
    """``value`` with Timestamps as ISO strings, NaN/NA/NaT as None, numpy scalars
    as Python numbers, and mapping keys as strings: ready for :func:`json.dumps`."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def frame_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """A frame as JSON-ready records, its index as the first field."""
    return [jsonable(r) for r in frame.reset_index().to_dict(orient="records")]


def _cell(value: Any, width: int = 60) -> str:
    """One value for a table: times to the second (``Z``: UTC), 3-decimal floats,
    ``-`` when missing, texts on one line and cut at ``width``."""
    if isinstance(value, datetime) and value is not pd.NaT:
        return value.strftime("%Y-%m-%d %H:%M:%SZ")
    value = jsonable(value)
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict | list):
        value = json.dumps(value, ensure_ascii=False)
    text = " ".join(str(value).splitlines())
    return text if len(text) <= width else text[: width - 1] + "…"


def frame_table(frame: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    """``frame`` (optionally only ``columns``) as an aligned text table."""
    if frame.empty:
        return "(none)"
    shown = frame if columns is None else frame[[c for c in columns if c in frame.columns]]
    cells = shown.reset_index().astype(object).map(_cell)
    return str(cells.to_string(index=False))


def mapping_table(data: Mapping[str, Any]) -> str:
    """A dict as ``key  value`` lines."""
    width = max((len(k) for k in data), default=0)
    return "\n".join(f"{k:<{width}}  {_cell(v, 200)}" for k, v in data.items())


def emit(args: argparse.Namespace, data: Any, table: Callable[[], str]) -> int:
    """Print ``data`` as JSON or ``table()`` as text, per ``--format``; return 0."""
    if getattr(args, "format", "table") == "json":
        if isinstance(data, pd.DataFrame):
            data = frame_records(data)
        print(json.dumps(jsonable(data), indent=2, ensure_ascii=False))
    else:
        print(table())
    return 0


# ---------------------------------------------------------------- commands

_JOB_TABLE: Final = (
    "job_type",
    "priority",
    "status",
    "worker_id",
    "attempt",
    "progress",
    "created",
    "wait_s",
    "run_s",
    "error",
)
_WORKER_TABLE: Final = (
    "machine_id",
    "status",
    "job_types",
    "current_job",
    "jobs_done",
    "jobs_failed",
    "busy_s",
    "busy_share",
    "last_heartbeat",
)


def _summary_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--window", type=float, default=60.0, help="throughput window in seconds (default 60)"
    )


def _summary_table(stats: Mapping[str, Any]) -> str:
    totals = "  ".join(f"{k} {v}" for k, v in stats["totals"].items())
    head = {
        "namespace": stats["namespace"],
        "time": stats["time"],
        "queued": stats["queued"],
        "running": stats["running"],
        "retrying": stats["retrying"],
        "workers": f"{stats['workers']} ({stats['workers_idle']} idle, "
        f"{stats['workers_busy']} busy)",
        "throughput": f"{stats['throughput_per_s']:.3f} jobs/s over {stats['window_s']:g} s",
        "totals": totals,
    }
    lat = stats["latency"]
    latency = pd.DataFrame({k: lat[k] for k in ("wait_s", "run_s")}).T
    latency.index.name = f"latency (last {lat['sample']} completed)"
    depth = pd.DataFrame(
        [(jt, p, n) for jt, t in stats["job_types"].items() for p, n in t["by_priority"].items()],
        columns=["job_type", "priority", "queued"],
    ).set_index(["job_type", "priority"])
    return "\n\n".join(
        [mapping_table(head), frame_table(latency), "queue depth\n" + frame_table(depth)]
    )


@command("summary", "queue depth, workers, throughput and latency", configure=_summary_args)
def _summary(args: argparse.Namespace) -> int:
    with open_monitors(args) as m:
        stats = m.redis.get_queue_stats(window_s=args.window)
    return emit(args, stats, lambda: _summary_table(stats))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _jobs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--status", choices=JOB_STATUSES, required=True, help="which jobs to list")
    p.add_argument(
        "--limit",
        type=_positive_int,
        help="most jobs to list (default 1000 queued/active, 10 finished)",
    )


@command("jobs", "list jobs in one status", configure=_jobs_args)
def _jobs(args: argparse.Namespace) -> int:
    with open_monitors(args) as m:
        frame = m.jobs.get_jobs(args.status, args.limit)
    return emit(args, frame, lambda: frame_table(frame, _JOB_TABLE))


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_id", metavar="ID", help="the job's id")


@command("job", "one job in detail", configure=_job_args)
def _job(args: argparse.Namespace) -> int:
    with open_monitors(args) as m:
        details = m.jobs.get_job_details(args.job_id)
    return emit(args, details, lambda: mapping_table(details))


def _workers_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--by",
        choices=("worker", "machine"),
        default="worker",
        help="one row per worker (default) or totals per machine (uptime_s: the machine's)",
    )


def machine_table(workers: pd.DataFrame, stats: pd.DataFrame) -> pd.DataFrame:
    """``stats`` (the monitors' per-machine sums) with ``uptime_s`` the machine's own:
    the longest uptime among its live GPUs, not their sum (``busy_share`` stays busy
    GPU-seconds over available GPU-seconds)."""
    if stats.empty:
        return stats
    out = stats.copy()
    out["uptime_s"] = workers.groupby("machine_id")["uptime_s"].max().reindex(out.index)
    return out


@command("workers", "live GPU workers, or totals per machine", configure=_workers_args)
def _workers(args: argparse.Namespace) -> int:
    with open_monitors(args) as m:
        if args.by == "machine":
            frame = machine_table(
                m.workers.get_all_workers(), m.workers.get_worker_stats("machine")
            )
            return emit(args, frame, lambda: frame_table(frame))
        frame = m.workers.get_all_workers()
    caps = [c for c in frame.columns if c.startswith("cap_")]
    return emit(args, frame, lambda: frame_table(frame, [*_WORKER_TABLE, *caps]))


def _worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("worker_id", metavar="ID", help="the worker's id, e.g. machine1:gpu0")


@command("worker", "one worker in detail", configure=_worker_args)
def _worker(args: argparse.Namespace) -> int:
    with open_monitors(args) as m:
        details = m.workers.get_worker_by_id(args.worker_id)
    return emit(args, details, lambda: mapping_table(details))


# ------------------------------------------------------------------ tokens


def _token_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--role", choices=("client", "worker", "monitor"), required=True)
    p.add_argument(
        "--id",
        dest="ident",
        metavar="ID",
        required=True,
        help="the client id, the monitor id, or the worker's machine id (its GPUs share it)",
    )
    p.add_argument(
        "--ttl",
        type=_positive_int,
        default=DEFAULT_TTL_S,
        metavar="SECONDS",
        help=f"how long the token is valid (default {DEFAULT_TTL_S})",
    )


@command(
    "token",
    "print a signed token for one client, monitor or worker machine ($REDISQ_AUTH_SECRETS)",
    configure=_token_args,
    formats=False,
)
def _token(args: argparse.Namespace) -> int:
    """Signs with the first secret of ``REDISQ_AUTH_SECRETS`` (the hubs' variable);
    a missing secret or an invalid id is a usage error (exit 2)."""
    try:
        secrets = parse_secrets(environ().get("REDISQ_AUTH_SECRETS"))
        token = sign(secrets, args.role, args.ident, args.ttl)
    except ValueError as exc:
        return _fail(str(exc), 2)
    print(token)
    return 0


# ------------------------------------------------------------------- main


# ------------------------------------------------------- running things


def _hub_url(args: argparse.Namespace) -> str:
    return hub_url_of(args.hub_url) if args.hub_url else hub_url_of()


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="hub address (default 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=8000, help="hub port, 0 for a free one (default 8000)"
    )
    p.add_argument("--machines", type=int, default=0, help="also start this many mock machines")
    p.add_argument("--gpus", type=int, default=2, help="GPUs per mock machine (default 2)")
    p.add_argument("--debug", action="store_true", help="serve the debug page at /debug")


@command(
    "serve",
    "run a hub: on a private redis-server, or on --redis-url",
    configure=_serve_args,
    formats=False,
)
def _serve(args: argparse.Namespace) -> int:
    from redisq_server.config import Settings
    from redisq_server.main import main as hub_main

    if args.redis_url:  # a hub on an existing Redis: the same as redisq-server
        check_redis_url(args.redis_url)
        settings = Settings.from_env(
            redis_url=args.redis_url,
            hub_host=args.host,
            hub_port=args.port,
            debug=args.debug,
            **({"namespace": args.namespace} if args.namespace else {}),
        )
        print(_readers_hint(safe_url(args.redis_url), settings.limits.namespace), flush=True)
        asyncio.run(hub_main(settings))
        return 0
    from .stack import LocalStack

    with LocalStack(
        namespace=args.namespace or "redisq",
        hub_host=args.host,
        hub_port=args.port,
        debug=args.debug,
    ) as stack:
        if args.machines:
            stack.add_workers(args.machines, args.gpus)
        page = stack.hub_url.replace("ws://", "http://", 1)
        print(f"hub   {stack.hub_url}\nredis {stack.redis_url}\nnamespace {stack.namespace}")
        print(f"dashboard {page}/dashboard\nmetrics   {page}/metrics")
        print(_readers_hint(stack.redis_url, stack.namespace))
        print("press Ctrl-C to stop", flush=True)
        _wait_for_signal()
    return 0


def _readers_hint(redis_url: str, namespace: str) -> str:
    """What the reading commands (summary, jobs, top, ...) need to find this queue."""
    ns = "" if namespace == "redisq" else f" REDISQ_NAMESPACE={namespace}"
    flag = "" if namespace == "redisq" else f" --namespace {namespace}"
    return (
        f"read it with: export REDIS_URL={redis_url}{ns}\n"
        f"          or: redisq summary --redis-url {redis_url}{flag}"
    )


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def _mock_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--hub-url", help="ws://host:port (default: $HUB_URL, else ws://$HUB_HOST:$HUB_PORT)"
    )
    p.add_argument("--machines", type=int, default=1)
    p.add_argument("--gpus", type=int, default=2, help="GPUs per machine")
    p.add_argument("--prefix", default="mock", help="machine ids are <prefix>1, <prefix>2, ...")
    p.add_argument("--job-types", default=",".join(DEFAULT_JOB_TYPES), help="comma-separated")
    p.add_argument("--run-time", type=float, default=0.1, help="mean seconds per job (exponential)")
    p.add_argument("--failure-rate", type=float, default=0.0)
    p.add_argument("--disconnect-rate", type=float, default=0.0)
    p.add_argument("--burst", action="store_true", help="stop when there is nothing left to do")
    p.add_argument("--seed", type=int)
    p.add_argument("--token", help="worker token, if the hub requires one")


@command(
    "mock-workers",
    "run mock GPU machines against a hub until Ctrl-C",
    configure=_mock_args,
    formats=False,
)
def _mock_workers(args: argparse.Namespace) -> int:
    async def run() -> None:
        workers = [
            MockWorker(
                f"{args.prefix}{i + 1}",
                args.gpus,
                hub=_hub_url(args),
                job_types=[t for t in args.job_types.split(",") if t],
                run_time=("exponential", args.run_time) if args.run_time > 0 else 0.0,
                failure_rate=args.failure_rate,
                disconnect_rate=args.disconnect_rate,
                burst=args.burst,
                seed=None if args.seed is None else args.seed + i,
                token=args.token,
            )
            for i in range(args.machines)
        ]
        for w in workers:
            await w.start()
        print(
            f"{args.machines} machines x {args.gpus} GPUs connected to {workers[0].hub_url}",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        async def all_done() -> None:
            for w in workers:
                await w.join()

        done: asyncio.Task[Any] = asyncio.create_task(all_done())
        stopped: asyncio.Task[Any] = asyncio.create_task(stop.wait())
        await asyncio.wait([done, stopped], return_when=asyncio.FIRST_COMPLETED)
        done.cancel()
        stopped.cancel()
        for w in workers:
            await w.stop()
        total = sum(w.completed for w in workers)
        print(f"completed {total} jobs, failed {sum(w.failed for w in workers)}", flush=True)

    asyncio.run(run())
    return 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_type")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--params", default="{}", help="JSON object")
    p.add_argument("--count", type=_positive_int, default=1)
    p.add_argument("--wait", action="store_true", help="wait for the results")
    p.add_argument(
        "--timeout",
        type=_positive_float,
        help="with --wait: give up after this many seconds (exit 1); default: wait until done",
    )
    p.add_argument(
        "--hub-url", help="ws://host:port (default: $HUB_URL, else ws://$HUB_HOST:$HUB_PORT)"
    )
    p.add_argument("--client-id", default="cli")
    p.add_argument("--token", help="client token, if the hub requires one")


def job_params(text: str) -> dict[str, Any]:
    """``--params``: a JSON object, else a :class:`UsageError`."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--params is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(
            f"--params must be a JSON object such as '{{\"n\": 1}}', not {type(value).__name__}"
        )
    return value


#: how often ``submit --wait`` checks whether any connected worker takes the job type
NOBODY_CHECK_S: Final = 1.0


async def nobody_takes(client: QueueClient, job_id: str) -> bool:
    """True when no connected worker accepts ``job_id``'s type: no worker is busy and
    the job is still queued (the engine never leaves a job queued while a worker
    that accepts it is idle). Stats are read first, so the answer is never a guess."""
    stats = await client.stats()
    if stats["workers_busy"] > 0:
        return False
    status = await client.status(job_id)
    return bool(status.get("status") == "queued")


async def wait_for_results(
    client: QueueClient, rows: list[dict[str, Any]], job_type: str, timeout: float | None
) -> None:
    """Fill in each row's ``status`` and ``result`` or ``error``. Says once on stderr
    when no connected worker accepts ``job_type``; raises :class:`NotFinished` after
    ``timeout`` seconds (None: wait until every job finished)."""

    async def one(row: dict[str, Any]) -> None:
        try:
            row["result"] = await client.result(row["job_id"])
            row["status"] = "completed"
        except JobFailed as exc:
            row["status"], row["error"] = exc.status, exc.error

    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    tasks = [asyncio.create_task(one(r)) for r in rows]
    nobody = False
    try:
        while True:  # check at once, then every NOBODY_CHECK_S until done or the deadline
            if not nobody and await nobody_takes(client, rows[0]["job_id"]):
                nobody = True
                then = "until --timeout" if timeout is not None else "(Ctrl-C to stop)"
                print(
                    f"{PROG}: no connected worker accepts job type {job_type!r}; waiting {then}",
                    file=sys.stderr,
                    flush=True,
                )
            left = NOBODY_CHECK_S if deadline is None else deadline - loop.time()
            if left <= 0:
                unfinished = [r for r in rows if "result" not in r and "error" not in r]
                for r in unfinished:
                    r["status"] = client.traces[r["job_id"]].status
                why = f"; no connected worker accepts job type {job_type!r}" if nobody else ""
                raise NotFinished(
                    f"timed out after {timeout:g} s: {len(unfinished)} of {len(rows)} jobs "
                    f"not finished{why}"
                )
            _, pending = await asyncio.wait(tasks, timeout=min(NOBODY_CHECK_S, left))
            if not pending:
                for task in tasks:
                    task.result()  # raises what a wait raised (the socket closed, ...)
                return
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@command("submit", "submit jobs through a hub (and wait for their results)", configure=_submit_args)
def _submit(args: argparse.Namespace) -> int:
    """Prints one row per job: its id and status (and with ``--wait`` its result or
    error), as a table or JSON."""
    params = job_params(args.params)
    rows: list[dict[str, Any]] = []

    async def run() -> None:
        async with QueueClient(_hub_url(args), args.client_id, token=args.token) as client:
            spec = {"job_type": args.job_type, "priority": args.priority, "params": params}
            ids = await client.submit_many([spec] * args.count)
            rows.extend({"job_id": j, "status": client.traces[j].status} for j in ids)
            if args.wait:
                await wait_for_results(client, rows, args.job_type, args.timeout)

    def show() -> None:
        emit(args, rows, lambda: frame_table(pd.DataFrame(rows).set_index("job_id")))

    try:
        asyncio.run(run())
    except RequestError as exc:
        if exc.code == "not_found":
            raise NotFoundError(str(exc)) from None
        raise UsageError(str(exc)) from None
    except NotFinished:
        show()
        raise
    show()
    return 0


# --------------------------------------------------------------------- top


def _top_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--interval", type=_positive_float, default=1.0, help="seconds between refreshes"
    )
    p.add_argument(
        "--iterations",
        type=_positive_int,
        help="stop after this many refreshes (default: until Ctrl-C)",
    )
    p.add_argument(
        "--window", type=_positive_float, default=60.0, help="throughput window in seconds"
    )


class TopView:
    """What ``redisq top`` shows, read afresh by each :meth:`render` (one stats call
    with the latency sample, one read of the workers)."""

    def __init__(self, monitors: Monitors, window_s: float) -> None:
        self.m = monitors
        self.window_s = window_s
        self._last: tuple[float, int] | None = None  # (monotonic time, completed total)

    def render(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        stats = self.m.redis.get_queue_stats(window_s=self.window_s, sample=200)
        workers = self.m.workers.get_all_workers()
        now, done = time.monotonic(), int(stats["totals"]["completed"])
        rate_now = stats["throughput_per_s"]
        if self._last is not None and now > self._last[0]:
            rate_now = (done - self._last[1]) / (now - self._last[0])
        self._last = (now, done)

        head = Table.grid(padding=(0, 2))
        head.add_column(style="bold")
        head.add_column()
        head.add_row(
            "redisq top", f"{stats['namespace']}  {_cell(stats['time'])}  (Ctrl-C to quit)"
        )
        head.add_row(
            "jobs",
            f"{stats['queued']} queued  {stats['running']} running  {stats['retrying']} retrying",
        )
        head.add_row(
            "workers",
            f"{stats['workers']} GPUs: {stats['workers_busy']} busy, {stats['workers_idle']} idle",
        )
        head.add_row(
            "throughput",
            f"{rate_now:.1f} jobs/s now, {stats['throughput_per_s']:.1f} jobs/s over "
            f"{stats['window_s']:.0f} s",
        )
        totals = [f"{k} {v}" for k, v in stats["totals"].items()]
        head.add_row("totals", "  ".join(totals[:3]))
        head.add_row("", "  ".join(totals[3:]))

        lat = stats["latency"]
        latency = Table(title=f"latency, s (last {lat['sample']} completed)", title_justify="left")
        latency.add_column("")
        for q in ("p50", "p95", "p99"):
            latency.add_column(q, justify="right")
        for key, label in (("wait_s", "wait for a GPU"), ("run_s", "run")):
            latency.add_row(label, *(_cell(lat[key][q]) for q in ("p50", "p95", "p99")))

        queue = Table(title="queue", title_justify="left")
        queue.add_column("job type")
        queue.add_column("priority", justify="right")
        queue.add_column("queued", justify="right")
        for jt, t in sorted(stats["job_types"].items()):
            for priority, n in t["by_priority"].items():
                queue.add_row(jt, str(priority), str(n))
        if not queue.row_count:
            queue.add_row("-", "-", "0")

        machines = Table(title="workers by machine", title_justify="left")
        for col in ("machine", "GPUs", "busy", "idle", "done", "failed", "uptime s"):
            machines.add_column(col, justify="left" if col == "machine" else "right")
        if not workers.empty:
            per = machine_table(workers, self.m.workers.get_worker_stats("machine"))
            for r in per.reset_index().to_dict(orient="records"):
                counts = ("workers", "busy", "idle", "jobs_done", "jobs_failed")
                machines.add_row(
                    str(r["machine_id"]),
                    *(str(int(r[k])) for k in counts),
                    f"{r['uptime_s']:.0f}",
                )
        else:
            machines.add_row("-", "0", "0", "0", "-", "-", "-")
        return Group(head, "", queue, latency, machines)


@command(
    "top",
    "a live view of the queue, workers and throughput, refreshed in place",
    configure=_top_args,
    formats=False,
)
def _top(args: argparse.Namespace) -> int:
    """On a terminal the view refreshes in place (rich's Live); into a pipe or file
    each refresh is printed after the last, like ``top -b``. Ctrl-C quits (exit 0)."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    n = 0
    try:
        with open_monitors(args) as m:
            view = TopView(m, args.window)
            if not console.is_terminal:
                while True:
                    console.print(view.render())
                    n += 1
                    if args.iterations and n >= args.iterations:
                        return 0
                    console.print()
                    time.sleep(args.interval)
            with Live(view.render(), console=console, auto_refresh=False) as live:
                n = 1
                while not args.iterations or n < args.iterations:
                    time.sleep(args.interval)
                    live.update(view.render(), refresh=True)
                    n += 1
    except KeyboardInterrupt:
        pass
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--machines", type=_positive_int, default=2)
    p.add_argument("--gpus", type=_positive_int, default=4, help="GPUs per machine")
    p.add_argument("--jobs", type=_positive_int, default=1200)
    p.add_argument("--rate", type=float, help="jobs/s, Poisson arrivals (default: all at once)")
    p.add_argument("--seed", type=int, default=7, help="workload and run-time seed")
    p.add_argument(
        "--report", default="reports/redisq-demo.html", help="HTML report path ('' for none)"
    )


@command(
    "demo",
    "local stack + mock GPUs + a mixed workload, with a summary and a report",
    configure=_demo_args,
)
def _demo(args: argparse.Namespace) -> int:
    """With ``--format json`` the progress and the text summary go to stderr and the
    summary is the last line on stdout, one JSON object."""
    from .demo import run_demo

    as_json = args.format == "json"
    summary = run_demo(
        args.machines,
        args.gpus,
        args.jobs,
        args.rate,
        Path(args.report) if args.report else None,
        seed=args.seed,
        out=sys.stderr if as_json else sys.stdout,
    )
    if as_json:
        print(json.dumps(jsonable(summary), ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser for every registered subcommand (see :data:`COMMANDS`)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Watch and run a redisq job queue: jobs, workers, queue stats, hubs and mock GPUs.",
    )
    _queue_options(parser, None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        # the same options after the subcommand; given there, they win
        _queue_options(p, argparse.SUPPRESS)
        if cmd.configure is not None:
            cmd.configure(p)
        if cmd.formats:
            p.add_argument(
                "--format", choices=("table", "json"), default="table", help="default: table"
            )
        p.set_defaults(run=cmd.run)
    return parser


def _queue_options(p: argparse.ArgumentParser, default: Any) -> None:
    """``--redis-url`` and ``--namespace``, on the main parser and on each subcommand's."""
    p.add_argument(
        "--redis-url",
        default=default,
        help="Redis URL (default: $REDIS_URL, else built from $REDIS_HOST, $REDIS_PORT, "
        "$REDIS_DB, $REDIS_PASSWORD, else redis://localhost:6379/0)",
    )
    p.add_argument(
        "--namespace",
        default=default,
        help="key namespace (default: $REDISQ_NAMESPACE, else redisq)",
    )


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {' '.join(message.split())}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run ``redisq`` with ``argv`` (default: the command line); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return exc.code if isinstance(exc.code, int) else 2
    try:
        run: Handler = args.run
        code = run(args)
        sys.stdout.flush()  # here, so that a closed pipe is caught below
        return code
    except BrokenPipeError:  # `redisq ... | head`: the reader has all it wanted
        _silence_stdout()
        return 141
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        url = safe_url(args.redis_url or redis_url_from_env())
        return _fail(f"cannot reach Redis at {url}: {exc}", 2)
    except RedisURLError as exc:
        return _fail(str(exc), 2)
    except (NotFoundError, NotFinished) as exc:
        return _fail(str(exc), 1)
    except (UsageError, ProtocolError) as exc:
        return _fail(str(exc), 2)
    except (OSError, InvalidHandshake) as exc:  # the hub (or redis-server) is not there
        return _fail(f"cannot connect: {exc}", 2)
    except RedisNotInstalled as exc:
        return _fail(str(exc), 2)
    except KeyboardInterrupt:
        return 130


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's final flush of what is left in
    its buffer does not fail once more with "Broken pipe"."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (captured): nothing to silence
        pass
    finally:
        os.close(devnull)


if __name__ == "__main__":
    raise SystemExit(main())
