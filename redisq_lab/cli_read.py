"""The ``redisq`` subcommands that only read: the queue (``summary``, ``jobs``,
``job``, ``workers``, ``worker``) and the environment (``token``).

Each reads through :mod:`redisq_lab.monitors` (``token`` through
``$REDISQ_AUTH_SECRETS``) and prints with :func:`redisq_lab.cli_base.emit`; importing
this module registers them.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any, Final

import pandas as pd

from redisq_server.auth import DEFAULT_TTL_S, parse_secrets, sign
from redisq_server.config import environ

from .cli_base import (
    UsageError,
    command,
    emit,
    frame_table,
    mapping_table,
    open_monitors,
    positive_int,
)
from .frames import policy_text
from .monitors import JOB_STATUSES

__all__ = ["machine_table"]

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
        "scheduled": stats["scheduled"],
        "policy": policy_text(stats["policy"]),
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


def _jobs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--status", choices=JOB_STATUSES, required=True, help="which jobs to list")
    p.add_argument(
        "--limit",
        type=positive_int,
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
        type=positive_int,
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
        raise UsageError(str(exc)) from None
    print(token)
    return 0
