"""Read-only monitors of a redisq namespace, returning pandas DataFrames and dicts.

Three monitors share one way of connecting: :class:`JobMonitor` (jobs by status and
one job in detail), :class:`WorkerMonitor` (GPU workers, per worker or per machine)
and :class:`RedisMonitor` (queue depth, throughput, latency percentiles, events).
They never write to Redis, and they read with pipelines only (no ``KEYS``, no
``SCAN``), so 10,000 jobs come back in a fraction of a second.

Connect with a URL, with ``host``/``port``/``db``/``password``, from the
environment (``REDIS_URL`` or ``REDIS_HOST``/``REDIS_PORT``/``REDIS_DB``/
``REDIS_PASSWORD``, and ``REDISQ_NAMESPACE``) when nothing is given, from any object
with ``redis_url`` and ``namespace`` attributes (a local stack), or share one
:class:`~redisq_server.RedisService` between monitors with ``service=``::

    with JobMonitor("redis://127.0.0.1:6390/0", namespace="lab") as jobs:
        df = jobs.get_completed_jobs(limit=100)
        df[["wait_s", "run_s"]].describe()

Times are the Redis server's clock, as ``datetime64[ns, UTC]`` columns (or
``pandas.Timestamp`` values in dicts); durations are float seconds.

The frames and their columns are built by :mod:`redisq_lab.frames` (``jobs_frame``,
``JOB_COLUMNS``, ... are re-exported here), connecting is :mod:`redisq_lab.connect`'s,
and the live tables and dashboards are :mod:`redisq_lab.dashboard`'s.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import numpy as np
import pandas as pd

from redisq_server import JobModel, ProtocolError, RedisService

from .connect import NamespaceReader, RedisTarget
from .dashboard import Dashboard, jobs_widget, queue_widget, workers_widget
from .frames import (
    JOB_COLUMNS,
    JOB_STATUSES,
    JOB_TIMES,
    STRING,
    WORKER_COLUMNS,
    depth_by_priority,
    events_frame,
    job_spans,
    jobs_frame,
    percentiles,
    seconds,
    server_time,
    timestamp,
    uptime_and_share,
    workers_frame,
)

__all__ = [
    "JOB_COLUMNS",
    "JOB_STATUSES",
    "JOB_TIMES",
    "WORKER_COLUMNS",
    "JobMonitor",
    "NotFoundError",
    "RedisMonitor",
    "RedisTarget",
    "WorkerMonitor",
    "events_frame",
    "jobs_frame",
    "workers_frame",
]

_DEFAULT_LIMIT: Final = {
    "queued": 1000,
    "active": 1000,
    "scheduled": 1000,
    "completed": 10,
    "failed": 10,
}


class NotFoundError(KeyError):
    """No job or worker with the requested id (never existed, expired, or not an id)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


# ------------------------------------------------------------------- reading


def _check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit: expected a positive integer, got {limit!r}")
    return limit


def _read_jobs(service: RedisService, status: str, limit: int) -> list[JobModel]:
    """Up to ``limit`` jobs in ``status`` (one of :data:`JOB_STATUSES`), in index order."""
    if status not in JOB_STATUSES:
        raise ValueError(f"status: expected one of {', '.join(JOB_STATUSES)}, got {status!r}")
    return service.get_jobs(service.job_ids(status, _check_limit(limit)))


class JobMonitor(NamespaceReader):
    """Jobs of one namespace as DataFrames (see :func:`jobs_frame` for the columns).

    Queued jobs come in queue order (priority, then submission, or the order aging
    gives; under fair share the heads in order, then the clients' next jobs round
    by round: see docs/scheduling.md); active jobs by lease deadline, then retrying
    and scheduled ones; scheduled jobs by due time; finished jobs newest first.
    Finished jobs are kept for the engine's result TTL (a day by default).
    """

    def get_jobs(self, status: str, limit: int | None = None) -> pd.DataFrame:
        """Up to ``limit`` jobs in ``status``: ``queued``, ``active`` (assigned,
        running, retrying or scheduled), ``scheduled`` (delayed jobs not yet due,
        soonest first), ``completed``, ``failed`` or ``cancelled``. The default
        limit is 1000 for queued, active and scheduled jobs and 10 for finished ones.
        Raises ValueError for any other status or a limit below 1."""
        if limit is None:
            limit = _DEFAULT_LIMIT.get(status, 10)
        return jobs_frame(_read_jobs(self.service, status, limit))

    def get_queued_jobs(self, limit: int = 1000) -> pd.DataFrame:
        """Jobs waiting for a worker, next to run first."""
        return self.get_jobs("queued", limit)

    def get_active_jobs(self, limit: int = 1000) -> pd.DataFrame:
        """Jobs held by a worker (assigned or running), waiting to retry, or scheduled."""
        return self.get_jobs("active", limit)

    def get_scheduled_jobs(self, limit: int = 1000) -> pd.DataFrame:
        """Delayed jobs not yet due (``scheduled``), soonest first."""
        return self.get_jobs("scheduled", limit)

    def get_completed_jobs(self, limit: int = 10) -> pd.DataFrame:
        """The most recently completed jobs, newest first."""
        return self.get_jobs("completed", limit)

    def get_failed_jobs(self, limit: int = 10) -> pd.DataFrame:
        """The most recent jobs that failed for good, newest first (see ``error``)."""
        return self.get_jobs("failed", limit)

    def get_cancelled_jobs(self, limit: int = 10) -> pd.DataFrame:
        """The most recently cancelled jobs, newest first."""
        return self.get_jobs("cancelled", limit)

    def widget(self, interval: float = 1.0, limit: int = 20) -> Any:
        """A live HTML table of active and next queued jobs, refreshed every
        ``interval`` s from a task on the running loop; ``.stop()`` it when done."""
        return jobs_widget(self, interval, limit)

    def get_job_details(self, job_id: str) -> dict[str, Any]:
        """One job as a dict: every stored field (``params``, ``result``, ``position``
        in its queue, ...), times as UTC ``Timestamp`` (or None) and ``wait_s``,
        ``run_s``, ``total_s`` (or None). Raises :class:`NotFoundError` (a KeyError)
        when there is no such job in this namespace."""
        try:
            job = self.service.get_job(job_id)
        except ProtocolError:
            raise NotFoundError(f"no job {job_id!r}: not a valid job id") from None
        if job is None:
            raise NotFoundError(
                f"no job {job_id!r} in namespace {self.namespace!r} "
                "(never submitted, or expired after its result TTL)"
            )
        details = job.to_dict()
        details.update({name: timestamp(getattr(job, name)) for name in JOB_TIMES})
        for name, value in job_spans([job]).items():
            details[name] = None if np.isnan(value[0]) else float(value[0])
        return details


WorkerStatsBy = Literal["worker", "machine"]


class WorkerMonitor(NamespaceReader):
    """Live GPU workers of one namespace (see :func:`workers_frame` for the columns).

    Workers leave the live set when their socket closes or their lease expires;
    :meth:`get_worker_by_id` still finds such an offline worker until its record
    expires.
    """

    def get_all_workers(self) -> pd.DataFrame:
        """Every live worker, sorted by id (one ZRANGE, one pipeline, one TIME)."""
        workers = self.service.get_workers()
        return workers_frame(workers, server_time(self.service))

    def get_worker_by_id(self, worker_id: str) -> dict[str, Any]:
        """One worker (``"machine1:gpu0"``) as a dict: its stored fields with
        ``job_types`` a list and ``capabilities`` a dict, ``registered`` and
        ``last_heartbeat`` as UTC Timestamps, ``uptime_s`` and ``busy_share``.
        Raises :class:`NotFoundError` (a KeyError) for an unknown worker."""
        try:
            worker = self.service.get_worker(worker_id)
        except ProtocolError:
            raise NotFoundError(
                f"no worker {worker_id!r}: worker ids look like 'machine1:gpu0'"
            ) from None
        if worker is None:
            raise NotFoundError(f"no worker {worker_id!r} in namespace {self.namespace!r}")
        details = worker.to_dict()
        del details["last_seen"]
        uptime, share = uptime_and_share(
            seconds([worker.registered]), np.array([worker.busy_s]), server_time(self.service)
        )
        details.update(
            registered=timestamp(worker.registered),
            last_heartbeat=timestamp(worker.last_seen),
            uptime_s=None if np.isnan(uptime[0]) else float(uptime[0]),
            busy_share=None if np.isnan(share[0]) else float(share[0]),
        )
        return details

    def get_worker_stats(self, by: WorkerStatsBy = "worker") -> pd.DataFrame:
        """Work done, per live worker or per machine.

        ``by="worker"`` (index ``worker_id``): ``machine_id``, ``status``,
        ``jobs_done``, ``jobs_failed``, ``failure_rate`` (failed / finished, NaN
        before the first), ``busy_s``, ``uptime_s``, ``busy_share``.

        ``by="machine"`` (index ``machine_id``): ``workers``, ``busy``, ``idle``
        (counts of its live workers), the summed ``jobs_done``, ``jobs_failed``,
        ``busy_s``, ``uptime_s`` (GPU-seconds available), and ``failure_rate`` and
        ``busy_share`` over those sums.
        """
        if by not in ("worker", "machine"):
            raise ValueError(f"by: expected 'worker' or 'machine', got {by!r}")
        frame = self.get_all_workers()
        if by == "worker":
            stats = frame[["machine_id", "status", "jobs_done", "jobs_failed"]].copy()
            stats["failure_rate"] = _failure_rate(frame)
            return stats.join(frame[["busy_s", "uptime_s", "busy_share"]])
        return _per_machine(frame)

    def widget(self, interval: float = 1.0, limit: int = 32) -> Any:
        """A live HTML table of the workers, refreshed every ``interval`` s from a
        task on the running loop; ``.stop()`` it when done."""
        return workers_widget(self, interval, limit)


def _failure_rate(frame: pd.DataFrame) -> pd.Series:
    finished = (frame["jobs_done"] + frame["jobs_failed"]).astype("float64")
    return (frame["jobs_failed"] / finished.where(finished > 0)).astype("float64")


def _per_machine(frame: pd.DataFrame) -> pd.DataFrame:
    """Sum a worker frame per ``machine_id`` (see :meth:`WorkerMonitor.get_worker_stats`)."""
    status = frame["status"].astype("object")
    counted = pd.DataFrame(
        {
            "machine_id": frame["machine_id"],
            "workers": 1,
            "busy": (status == "busy").astype("int64"),
            "idle": (status == "idle").astype("int64"),
            "jobs_done": frame["jobs_done"],
            "jobs_failed": frame["jobs_failed"],
            "busy_s": frame["busy_s"],
            "uptime_s": frame["uptime_s"],
        }
    )
    sums = counted.groupby("machine_id", sort=True).sum()
    sums = sums.astype(
        {c: "int64" for c in ("workers", "busy", "idle", "jobs_done", "jobs_failed")}
        | {"busy_s": "float64", "uptime_s": "float64"}
    )
    sums["failure_rate"] = _failure_rate(sums)
    sums["busy_share"] = (sums["busy_s"] / sums["uptime_s"].where(sums["uptime_s"] > 0)).astype(
        "float64"
    )
    sums.index = sums.index.astype(STRING)
    sums.index.name = "machine_id"
    return sums


class RedisMonitor(NamespaceReader):
    """The queue as a whole: depth, throughput, latency and the event stream."""

    def get_queue_stats(self, window_s: float = 60.0, sample: int = 1000) -> dict[str, Any]:
        """A snapshot of the queue as a dict.

        Keys: ``time`` (server time, UTC Timestamp), ``namespace``, ``queued``,
        ``running`` (jobs held by a worker: assigned or running), ``retrying``,
        ``scheduled`` (delayed jobs not yet due), ``policy`` (the scheduling policy
        the namespace's hubs run: ``{"aging_s", "fair_share"}``, None before a hub
        started),
        ``depth_by_type`` (``{job_type: queued}``), ``depth_by_priority``
        (``{priority: queued}`` over all types, highest first), ``workers``,
        ``workers_idle``, ``workers_busy``, ``throughput_per_s`` (jobs completed per
        second over the last ``window_s`` seconds, or since the namespace's first hub
        started when that is shorter), ``window_s`` (the time the rate really
        covers), ``totals`` (counters since
        the namespace began), ``job_types`` (per type: queued, by_priority,
        idle_workers and its counters), and ``latency``: ``{"sample": n, "wait_s":
        {"p50", "p95", "p99"}, "run_s": {...}}`` over the ``sample`` most recently
        completed jobs (values None when there are none).
        """
        stats = self.service.get_stats(window_s)
        done = jobs_frame(_read_jobs(self.service, "completed", _check_limit(sample)))
        return {
            "time": timestamp(stats["time"]),
            "namespace": self.namespace,
            "queued": stats["queued"],
            "running": stats["running"],
            "retrying": stats["retrying"],
            # absent when redisq_server is older than this lab (installed apart)
            "scheduled": stats.get("scheduled", 0),
            "policy": stats.get("policy"),
            "depth_by_type": {jt: t["queued"] for jt, t in sorted(stats["job_types"].items())},
            "depth_by_priority": depth_by_priority(stats["job_types"]),
            "workers": stats["workers"],
            "workers_idle": stats["workers_idle"],
            "workers_busy": stats["workers_busy"],
            "throughput_per_s": stats["throughput_per_s"],
            "window_s": stats["window_s"],
            "totals": stats["totals"],
            "job_types": dict(sorted(stats["job_types"].items())),
            "latency": {
                "sample": len(done),
                "wait_s": percentiles(done["wait_s"]),
                "run_s": percentiles(done["run_s"]),
            },
        }

    def get_queue_depth(self) -> pd.DataFrame:
        """Queued jobs per (``job_type``, ``priority``): a frame with that MultiIndex
        and one int64 column ``count``; types by name, priorities highest first.
        Only non-zero counts appear (one round trip, no scan)."""
        rows = [
            (jt, priority, n)
            for jt, t in sorted(self.service.get_stats()["job_types"].items())
            for priority, n in t["by_priority"].items()
        ]
        index = pd.MultiIndex.from_arrays(
            [
                pd.Index([r[0] for r in rows], dtype=STRING),
                pd.Index([r[1] for r in rows], dtype="int64"),
            ],
            names=["job_type", "priority"],
        )
        return pd.DataFrame({"count": np.array([r[2] for r in rows], dtype="int64")}, index=index)

    def get_events(self, since: str = "0", limit: int = 10_000) -> pd.DataFrame:
        """Up to ``limit`` events after event id ``since`` (``"0"``: from the oldest
        kept), oldest first; see :func:`events_frame` for the columns. To follow the
        stream, pass the last row's ``event_id`` as ``since`` next time."""
        return events_frame(self.service.events_since(since, _check_limit(limit)))

    def widget(self, interval: float = 1.0) -> Any:
        """A live summary of :meth:`get_queue_stats`, refreshed every ``interval`` s
        from a task on the running loop; ``.stop()`` it when done."""
        return queue_widget(self, interval)

    def dashboard(self, **kw: Any) -> Dashboard:
        """A live :class:`~redisq_lab.dashboard.Dashboard` on this monitor's connection
        (charts of depth, throughput, latency and workers, and a jobs table); ``kw``
        goes to it (``interval=``, ``window=``, ...). Display it, ``.stop()`` it."""
        return Dashboard(self, **kw)
