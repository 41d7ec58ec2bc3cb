"""The ``redisq`` subcommands that run things: ``serve`` (a hub), ``mock-workers``
(simulated GPU machines), ``submit`` (jobs through a hub) and ``demo`` (all of it end
to end). Importing this module registers them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Final

import pandas as pd

from redisq_server.config import check_redis_url, safe_url

from ._source import hub_url_of
from .cli_base import (
    PROG,
    NotFinished,
    UsageError,
    command,
    emit,
    frame_table,
    jsonable,
    positive_float,
    positive_int,
)
from .client import JobFailed, QueueClient, RequestError
from .mock_worker import DEFAULT_JOB_TYPES, MockWorker
from .monitors import NotFoundError

__all__ = ["NOBODY_CHECK_S", "job_params", "nobody_takes", "wait_for_results"]


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


def _submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_type")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--params", default="{}", help="JSON object")
    p.add_argument("--count", type=positive_int, default=1)
    p.add_argument("--wait", action="store_true", help="wait for the results")
    p.add_argument(
        "--timeout",
        type=positive_float,
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


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--machines", type=positive_int, default=2)
    p.add_argument("--gpus", type=positive_int, default=4, help="GPUs per machine")
    p.add_argument("--jobs", type=positive_int, default=1200)
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
