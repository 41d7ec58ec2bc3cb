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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, Self

import numpy as np
import pandas as pd
from pandas.api.extensions import ExtensionArray

from redisq_server import (
    Event,
    JobModel,
    JobStatus,
    ProtocolError,
    RedisService,
    WorkerModel,
    WorkerStatus,
)

if TYPE_CHECKING:
    from .dashboard import Dashboard

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

#: The statuses :meth:`JobMonitor.get_jobs` accepts; ``active`` is assigned,
#: running and retrying jobs together.
JOB_STATUSES: Final = ("queued", "active", "completed", "failed", "cancelled")

#: Lifecycle steps with a time column in job frames, in order.
JOB_TIMES: Final = ("created", "queued", "assigned", "started", "finished")

_STR: Final = pd.StringDtype()
_TIME: Final = "datetime64[ns, UTC]"
_JOB_STATUS: Final = pd.CategoricalDtype([s.value for s in JobStatus])
_WORKER_STATUS: Final = pd.CategoricalDtype([s.value for s in WorkerStatus])
_DEFAULT_LIMIT: Final = {"queued": 1000, "active": 1000, "completed": 10, "failed": 10}

#: Columns of every job frame, in order (index: ``job_id``).
JOB_COLUMNS: Final = (
    "job_type",
    "priority",
    "status",
    "worker_id",
    "client_id",
    "attempt",
    "max_attempts",
    "progress",
    "message",
    "error",
    *JOB_TIMES,
    "wait_s",
    "run_s",
    "total_s",
)

#: Columns every worker frame starts with (index: ``worker_id``); flattened
#: capabilities (``cap_*``) follow.
WORKER_COLUMNS: Final = (
    "machine_id",
    "status",
    "job_types",
    "current_job",
    "hub_id",
    "registered",
    "last_heartbeat",
    "jobs_done",
    "jobs_failed",
    "busy_s",
    "uptime_s",
    "busy_share",
)

_EVENT_COLUMNS: Final[dict[str, tuple[str, Any]]] = {
    # column -> (stream field, dtype); other fields follow as string columns
    "time": ("t", _TIME),
    "event": ("e", _STR),
    "job": ("job", _STR),
    "job_type": ("jtype", _STR),
    "priority": ("priority", "Int64"),
    "status": ("status", _STR),
    "worker": ("worker", _STR),
    "hub": ("hub", _STR),
    "client": ("client", _STR),
    "attempt": ("attempt", "Int64"),
    "progress": ("progress", "float64"),
    "message": ("message", _STR),
    "due": ("due", _TIME),
    "session": ("session", _STR),
    "assignment_n": ("n", "Int64"),
    "params": ("params", _STR),  # JSON text, only when small enough to ride along
    "result": ("result", _STR),
}


class NotFoundError(KeyError):
    """No job or worker with the requested id (never existed, expired, or not an id)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


class RedisTarget(Protocol):
    """Anything that names a Redis and a namespace, e.g. a local stack."""

    @property
    def redis_url(self) -> str: ...

    @property
    def namespace(self) -> str: ...


# ------------------------------------------------------------------ connecting


def _service(
    source: str | RedisTarget | None = None,
    *,
    url: str | None = None,
    host: str | None = None,
    port: int | None = None,
    db: int | None = None,
    password: str | None = None,
    namespace: str | None = None,
    service: RedisService | None = None,
) -> tuple[RedisService, bool]:
    """The service a monitor reads through, and whether the monitor owns (closes) it.

    ``source`` is a URL or an object with ``redis_url`` and ``namespace``; an explicit
    ``namespace`` wins over the source's. ``service`` excludes every other argument.
    """
    if service is not None:
        given = (source, url, host, port, db, password, namespace)
        if any(v is not None for v in given):
            raise TypeError("pass either service= or connection arguments, not both")
        return service, False
    if source is not None:
        if url is not None:
            raise TypeError("pass the Redis URL once: as source or as url=")
        if isinstance(source, str):
            url = source
        else:
            url = source.redis_url
            namespace = source.namespace if namespace is None else namespace
    return RedisService(host, port, db, password, url=url, namespace=namespace), True


def _server_time(service: RedisService) -> float:
    """Now, by the Redis server's clock (the clock every stored time uses)."""
    r: Any = service.redis
    sec, usec = r.time()
    return float(sec) + float(usec) / 1e6


class _Monitor:
    """Connection handling shared by the monitors.

    Pass a Redis URL or an object with ``redis_url`` and ``namespace`` as ``source``
    (or ``url=``), or ``host``/``port``/``db``/``password``; with none of them the
    environment decides. ``namespace`` overrides the source's and the environment's.
    Or pass ``service=`` to share one :class:`~redisq_server.RedisService` (then no
    other argument). Nothing connects until the first read. Call :meth:`close`, or
    use the monitor in a ``with`` block, when done.
    """

    def __init__(
        self,
        source: str | RedisTarget | None = None,
        *,
        url: str | None = None,
        host: str | None = None,
        port: int | None = None,
        db: int | None = None,
        password: str | None = None,
        namespace: str | None = None,
        service: RedisService | None = None,
    ) -> None:
        self.service, self._owns_service = _service(
            source,
            url=url,
            host=host,
            port=port,
            db=db,
            password=password,
            namespace=namespace,
            service=service,
        )

    @property
    def namespace(self) -> str:
        """The key namespace this monitor reads."""
        return self.service.limits.namespace

    def close(self) -> None:
        """Close the connection, unless it was passed in with ``service=``."""
        if self._owns_service:
            self.service.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# ------------------------------------------------------------ building frames


def _seconds(values: Sequence[float | None]) -> np.ndarray:
    """Optional Unix seconds as a float array (NaN where missing)."""
    return np.array([np.nan if v is None else v for v in values], dtype="float64")


def _datetimes(seconds: np.ndarray) -> pd.DatetimeIndex:
    """Unix seconds (NaN: missing) as UTC datetimes, exact to the microsecond."""
    stamps = pd.to_datetime(np.round(seconds * 1e6), unit="us", utc=True)
    return pd.DatetimeIndex(stamps.astype(_TIME))


def _timestamp(seconds: float | None) -> pd.Timestamp | None:
    """One optional Unix time as a UTC Timestamp, or None."""
    return None if seconds is None else _datetimes(_seconds([seconds]))[0]


def _strings(values: Sequence[str | None]) -> ExtensionArray:
    """Optional texts as a string array (NA where missing)."""
    return pd.array(list(values), dtype=_STR)


def _job_durations(times: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``wait_s`` (queued -> assigned; NaN while the job waits again after a requeue),
    ``run_s`` (started -> finished) and ``total_s`` (created -> finished)."""
    waited = times["assigned"] - times["queued"]
    return {
        "wait_s": np.where(waited >= 0, waited, np.nan),
        "run_s": times["finished"] - times["started"],
        "total_s": times["finished"] - times["created"],
    }


def jobs_frame(jobs: Sequence[JobModel]) -> pd.DataFrame:
    """Jobs as a frame indexed by ``job_id`` with the columns of :data:`JOB_COLUMNS`.

    Dtypes: ``job_type`` and ``status`` category, ``priority``/``attempt``/
    ``max_attempts`` int64, ``progress`` float64, ids and texts string, one
    ``datetime64[ns, UTC]`` column per :data:`JOB_TIMES` step and float seconds
    ``wait_s``, ``run_s``, ``total_s`` (NaN when a step is missing). An empty
    ``jobs`` gives an empty frame with the same columns and dtypes.
    """
    times = {name: _seconds([getattr(j, name) for j in jobs]) for name in JOB_TIMES}
    data: dict[str, Any] = {
        "job_type": pd.Categorical([j.job_type for j in jobs]),
        "priority": np.array([j.priority for j in jobs], dtype="int64"),
        "status": pd.Categorical([j.status.value for j in jobs], dtype=_JOB_STATUS),
        "worker_id": _strings([j.worker_id for j in jobs]),
        "client_id": _strings([j.client_id for j in jobs]),
        "attempt": np.array([j.attempt for j in jobs], dtype="int64"),
        "max_attempts": np.array([j.max_attempts for j in jobs], dtype="int64"),
        "progress": _seconds([j.progress for j in jobs]),
        "message": _strings([j.message for j in jobs]),
        "error": _strings([j.error for j in jobs]),
        **{name: _datetimes(times[name]) for name in JOB_TIMES},
        **_job_durations(times),
    }
    index = pd.Index([j.job_id for j in jobs], dtype=_STR, name="job_id")
    return pd.DataFrame(data, index=index, columns=list(JOB_COLUMNS))


def _flatten(caps: Mapping[str, Any], prefix: str = "cap_") -> dict[str, Any]:
    """``{"gpu": {"model": "A100"}}`` -> ``{"cap_gpu_model": "A100"}``."""
    flat: dict[str, Any] = {}
    for key, value in caps.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}_"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _uptime_and_share(
    registered: np.ndarray, busy_s: np.ndarray, now: float
) -> tuple[np.ndarray, np.ndarray]:
    """Seconds since registration and the share of it spent on finished jobs."""
    uptime = now - registered
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(uptime > 0, busy_s / uptime, np.nan)
    return uptime, share


def workers_frame(workers: Sequence[WorkerModel], now: float) -> pd.DataFrame:
    """Workers as a frame indexed by ``worker_id``: :data:`WORKER_COLUMNS`, then
    the capabilities flattened into ``cap_*`` columns (``cap_gpu_model``, ...).

    ``now`` is the Redis server time (Unix seconds). ``job_types`` is a
    comma-separated string; ``busy_s`` counts finished jobs only (a busy worker's
    current job adds to it when it ends); ``busy_share`` is ``busy_s / uptime_s``.
    """
    registered = _seconds([w.registered for w in workers])
    busy = np.array([w.busy_s for w in workers], dtype="float64")
    uptime, share = _uptime_and_share(registered, busy, now)
    data: dict[str, Any] = {
        "machine_id": _strings([w.machine_id for w in workers]),
        "status": pd.Categorical([w.status.value for w in workers], dtype=_WORKER_STATUS),
        "job_types": _strings([",".join(w.job_types) for w in workers]),
        "current_job": _strings([w.current_job for w in workers]),
        "hub_id": _strings([w.hub_id for w in workers]),
        "registered": _datetimes(registered),
        "last_heartbeat": _datetimes(_seconds([w.last_seen for w in workers])),
        "jobs_done": np.array([w.jobs_done for w in workers], dtype="int64"),
        "jobs_failed": np.array([w.jobs_failed for w in workers], dtype="int64"),
        "busy_s": busy,
        "uptime_s": uptime,
        "busy_share": share,
    }
    index = pd.Index([w.worker_id for w in workers], dtype=_STR, name="worker_id")
    frame = pd.DataFrame(data, index=index, columns=list(WORKER_COLUMNS))
    caps = pd.DataFrame([_flatten(w.capabilities) for w in workers], index=index)
    return frame.join(caps[sorted(caps.columns)]) if len(caps.columns) else frame


def _event_column(values: list[Any], dtype: Any) -> Any:
    if dtype == _TIME:
        return _datetimes(_seconds([None if v is None else float(v) for v in values]))
    if dtype == "float64":
        return _seconds([None if v is None else float(v) for v in values])
    if dtype == "Int64":
        return pd.array([None if v is None else int(v) for v in values], dtype="Int64")
    return _strings(values)


def events_frame(events: Sequence[Event]) -> pd.DataFrame:
    """Stream events as a frame, oldest first: ``event_id``, ``time``, ``event``
    (its name), ``job``, ``job_type``, ``priority``, ``status``, ``worker``, ``hub``,
    ``client``, ``attempt``, ``progress``, ``message``, ``due`` (retry time),
    ``session`` and ``assignment_n`` (the worker's connection and assignment number),
    then any other fields as string columns. Missing values are NA/NaN/NaT."""
    known = {field for field, _ in _EVENT_COLUMNS.values()}
    extra = sorted({k for e in events for k in e.fields} - known)
    data: dict[str, Any] = {"event_id": _strings([e.id for e in events])}
    for column, (field, dtype) in _EVENT_COLUMNS.items():
        data[column] = _event_column([e.fields.get(field) for e in events], dtype)
    for field in extra:
        data[field] = _strings([e.fields.get(field) for e in events])
    return pd.DataFrame(data, columns=["event_id", *_EVENT_COLUMNS, *extra])


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


class JobMonitor(_Monitor):
    """Jobs of one namespace as DataFrames (see :func:`jobs_frame` for the columns).

    Queued jobs come in queue order (priority, then submission); active jobs by
    lease deadline, then retrying ones; finished jobs newest first. Finished jobs
    are kept for the engine's result TTL (a day by default).
    """

    def get_jobs(self, status: str, limit: int | None = None) -> pd.DataFrame:
        """Up to ``limit`` jobs in ``status``: ``queued``, ``active`` (assigned,
        running or retrying), ``completed``, ``failed`` or ``cancelled``. The default
        limit is 1000 for queued and active jobs and 10 for finished ones.
        Raises ValueError for any other status or a limit below 1."""
        if limit is None:
            limit = _DEFAULT_LIMIT.get(status, 10)
        return jobs_frame(_read_jobs(self.service, status, limit))

    def get_queued_jobs(self, limit: int = 1000) -> pd.DataFrame:
        """Jobs waiting for a worker, next to run first."""
        return self.get_jobs("queued", limit)

    def get_active_jobs(self, limit: int = 1000) -> pd.DataFrame:
        """Jobs held by a worker (assigned or running) or waiting to retry."""
        return self.get_jobs("active", limit)

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
        from .dashboard import jobs_widget

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
        times = {name: _seconds([getattr(job, name)]) for name in JOB_TIMES}
        details.update({name: _timestamp(getattr(job, name)) for name in JOB_TIMES})
        for name, value in _job_durations(times).items():
            details[name] = None if np.isnan(value[0]) else float(value[0])
        return details


WorkerStatsBy = Literal["worker", "machine"]


class WorkerMonitor(_Monitor):
    """Live GPU workers of one namespace (see :func:`workers_frame` for the columns).

    Workers leave the live set when their socket closes or their lease expires;
    :meth:`get_worker_by_id` still finds such an offline worker until its record
    expires.
    """

    def get_all_workers(self) -> pd.DataFrame:
        """Every live worker, sorted by id (one ZRANGE, one pipeline, one TIME)."""
        workers = self.service.get_workers()
        return workers_frame(workers, _server_time(self.service))

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
        uptime, share = _uptime_and_share(
            _seconds([worker.registered]), np.array([worker.busy_s]), _server_time(self.service)
        )
        details.update(
            registered=_timestamp(worker.registered),
            last_heartbeat=_timestamp(worker.last_seen),
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
        from .dashboard import workers_widget

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
    sums.index = sums.index.astype(_STR)
    sums.index.name = "machine_id"
    return sums


def _percentiles(values: pd.Series) -> dict[str, float | None]:
    """p50/p95/p99 of ``values`` ignoring NaN (None when there are none)."""
    clean = values.dropna()
    if clean.empty:
        return {"p50": None, "p95": None, "p99": None}
    q = clean.quantile([0.5, 0.95, 0.99])
    return {"p50": float(q.iloc[0]), "p95": float(q.iloc[1]), "p99": float(q.iloc[2])}


class RedisMonitor(_Monitor):
    """The queue as a whole: depth, throughput, latency and the event stream."""

    def get_queue_stats(self, window_s: float = 60.0, sample: int = 1000) -> dict[str, Any]:
        """A snapshot of the queue as a dict.

        Keys: ``time`` (server time, UTC Timestamp), ``namespace``, ``queued``,
        ``running`` (jobs held by a worker: assigned or running), ``retrying``,
        ``depth_by_type`` (``{job_type: queued}``), ``depth_by_priority``
        (``{priority: queued}`` over all types, highest first), ``workers``,
        ``workers_idle``, ``workers_busy``, ``throughput_per_s`` (jobs completed per
        second over the last ``window_s``), ``window_s``, ``totals`` (counters since
        the namespace began), ``job_types`` (per type: queued, by_priority,
        idle_workers and its counters), and ``latency``: ``{"sample": n, "wait_s":
        {"p50", "p95", "p99"}, "run_s": {...}}`` over the ``sample`` most recently
        completed jobs (values None when there are none).
        """
        stats = self.service.get_stats(window_s)
        done = jobs_frame(_read_jobs(self.service, "completed", _check_limit(sample)))
        return {
            "time": _timestamp(stats["time"]),
            "namespace": self.namespace,
            "queued": stats["queued"],
            "running": stats["running"],
            "retrying": stats["retrying"],
            "depth_by_type": {jt: t["queued"] for jt, t in sorted(stats["job_types"].items())},
            "depth_by_priority": _depth_by_priority(stats["job_types"]),
            "workers": stats["workers"],
            "workers_idle": stats["workers_idle"],
            "workers_busy": stats["workers_busy"],
            "throughput_per_s": stats["throughput_per_s"],
            "window_s": float(window_s),
            "totals": stats["totals"],
            "job_types": dict(sorted(stats["job_types"].items())),
            "latency": {
                "sample": len(done),
                "wait_s": _percentiles(done["wait_s"]),
                "run_s": _percentiles(done["run_s"]),
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
                pd.Index([r[0] for r in rows], dtype=_STR),
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
        from .dashboard import queue_widget

        return queue_widget(self, interval)

    def dashboard(self, **kw: Any) -> Dashboard:
        """A live :class:`~redisq_lab.dashboard.Dashboard` on this monitor's connection
        (charts of depth, throughput, latency and workers, and a jobs table); ``kw``
        goes to it (``interval=``, ``window=``, ...). Display it, ``.stop()`` it."""
        from .dashboard import Dashboard

        return Dashboard(self, **kw)


def _depth_by_priority(job_types: Mapping[str, Any]) -> dict[int, int]:
    depth: dict[int, int] = {}
    for t in job_types.values():
        for priority, n in t["by_priority"].items():
            depth[priority] = depth.get(priority, 0) + n
    return dict(sorted(depth.items(), reverse=True))
