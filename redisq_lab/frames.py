"""Models to numbers and DataFrames: the one place the lab computes its statistics.

Percentiles, the server clock, the depth-by-priority sum, job spans (wait, run,
total seconds) and the job, worker and event frames are defined here once;
monitors, dashboards and the load generator use them. Nothing here keeps a
connection: the one read, :func:`server_time`, goes through the caller's service.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import numpy as np
import pandas as pd
from pandas.api.extensions import ExtensionArray

from redisq_server import Event, JobModel, JobStatus, RedisService, WorkerModel, WorkerStatus

__all__ = [
    "JOB_COLUMNS",
    "JOB_SPANS",
    "JOB_STATUSES",
    "JOB_TIMES",
    "QUANTILES",
    "STRING",
    "WORKER_COLUMNS",
    "depth_by_priority",
    "events_frame",
    "job_spans",
    "jobs_frame",
    "percentiles",
    "policy_text",
    "seconds",
    "server_time",
    "timestamp",
    "uptime_and_share",
    "workers_frame",
]

#: the percentiles every summary reports
QUANTILES: Final = (50, 95, 99)

#: The statuses :meth:`~redisq_lab.monitors.JobMonitor.get_jobs` accepts; ``active``
#: is assigned, running and retrying jobs together.
JOB_STATUSES: Final = ("queued", "active", "scheduled", "completed", "failed", "cancelled")

#: Lifecycle steps with a time column in job frames, in order. ``held``: when a job
#: was sent ahead to a worker's prefetch window (NaT without one); ``assigned``:
#: when it became that worker's job (for a held job, when the job before it ended).
JOB_TIMES: Final = ("created", "queued", "held", "assigned", "started", "finished")

#: Job spans in seconds -> the (start, end) lifecycle steps they measure.
#: ``wait_s`` is the wait for a GPU, with or without a prefetch window.
JOB_SPANS: Final = {
    "wait_s": ("queued", "assigned"),
    "run_s": ("started", "finished"),
    "total_s": ("created", "finished"),
}

#: The dtype of id and text columns.
STRING: Final = pd.StringDtype()
_TIME: Final = "datetime64[ns, UTC]"
_JOB_STATUS: Final = pd.CategoricalDtype([s.value for s in JobStatus])
_WORKER_STATUS: Final = pd.CategoricalDtype([s.value for s in WorkerStatus])

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
    *JOB_SPANS,
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
    "event": ("e", STRING),
    "job": ("job", STRING),
    "job_type": ("jtype", STRING),
    "priority": ("priority", "Int64"),
    "status": ("status", STRING),
    "worker": ("worker", STRING),
    "hub": ("hub", STRING),
    "client": ("client", STRING),
    "attempt": ("attempt", "Int64"),
    "progress": ("progress", "float64"),
    "message": ("message", STRING),
    "due": ("due", _TIME),
    "session": ("session", STRING),
    "assignment_n": ("n", "Int64"),
    "params": ("params", STRING),  # JSON text, only when small enough to ride along
    "result": ("result", STRING),
}


# ------------------------------------------------------------------ numbers


def percentiles(
    values: Iterable[float | None], qs: Sequence[float] = QUANTILES
) -> dict[str, float | None]:
    """``{"p50": ..., "p95": ..., "p99": ...}`` of the finite numbers in ``values``
    (linear interpolation, as numpy and pandas compute them); every value is None
    when there are none."""
    clean = np.array([v for v in values if v is not None and math.isfinite(v)], dtype="float64")
    if clean.size == 0:
        return {f"p{q:g}": None for q in qs}
    got = np.percentile(clean, list(qs))
    return {f"p{q:g}": float(v) for q, v in zip(qs, got, strict=True)}


def server_time(service: RedisService) -> float:
    """Now as Unix seconds by the Redis server's clock (the clock every stored time
    uses): one ``TIME`` round trip through ``service``, which the caller owns."""
    r: Any = service.redis
    sec, usec = r.time()
    return float(sec) + float(usec) / 1e6


def depth_by_priority(job_types: Mapping[str, Any]) -> dict[int, int]:
    """Queued jobs per priority over all job types, highest priority first.

    Pass the ``job_types`` of a stats reply (``{job_type: {"by_priority":
    {priority: queued}, ...}}``, as :meth:`~redisq_server.RedisService.get_stats`
    returns it)."""
    depth: dict[int, int] = {}
    for t in job_types.values():
        for priority, n in t["by_priority"].items():
            depth[int(priority)] = depth.get(int(priority), 0) + int(n)
    return dict(sorted(depth.items(), reverse=True))


def seconds(values: Sequence[float | None]) -> np.ndarray:
    """Optional Unix seconds (or any optional numbers) as a float array, NaN where
    missing."""
    return np.array([np.nan if v is None else v for v in values], dtype="float64")


def job_spans(jobs: Sequence[JobModel]) -> dict[str, np.ndarray]:
    """The :data:`JOB_SPANS` of each job, as float seconds arrays in ``jobs`` order:
    ``wait_s`` (queued -> assigned), ``run_s`` (started -> finished) and ``total_s``
    (created -> finished). A span is NaN when a step is missing or the end comes
    before the start (a requeued job waiting again after its last assignment)."""
    out: dict[str, np.ndarray] = {}
    for name, (start, end) in JOB_SPANS.items():
        span = seconds([getattr(j, end) for j in jobs]) - seconds([getattr(j, start) for j in jobs])
        out[name] = np.where(span >= 0, span, np.nan)
    return out


def uptime_and_share(
    registered: np.ndarray, busy_s: np.ndarray, now: float
) -> tuple[np.ndarray, np.ndarray]:
    """Seconds since registration and the share of it spent on finished jobs.

    Pass registration times and busy seconds as float arrays of one length (see
    :func:`seconds`) and ``now`` by the server clock (:func:`server_time`)."""
    uptime = now - registered
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(uptime > 0, busy_s / uptime, np.nan)
    return uptime, share


# ------------------------------------------------------------------ columns


def _datetimes(secs: np.ndarray) -> pd.DatetimeIndex:
    """Unix seconds (NaN: missing) as UTC datetimes, exact to the microsecond."""
    stamps = pd.to_datetime(np.round(secs * 1e6), unit="us", utc=True)
    return pd.DatetimeIndex(stamps.astype(_TIME))


def timestamp(secs: float | None) -> pd.Timestamp | None:
    """One optional Unix time as a UTC Timestamp (exact to the microsecond), or None."""
    return None if secs is None else _datetimes(seconds([secs]))[0]


def _strings(values: Sequence[str | None]) -> ExtensionArray:
    """Optional texts as a string array (NA where missing)."""
    return pd.array(list(values), dtype=STRING)


# ------------------------------------------------------------------- frames


def jobs_frame(jobs: Sequence[JobModel]) -> pd.DataFrame:
    """Jobs as a frame indexed by ``job_id`` with the columns of :data:`JOB_COLUMNS`.

    Dtypes: ``job_type`` and ``status`` category, ``priority``/``attempt``/
    ``max_attempts`` int64, ``progress`` float64, ids and texts string, one
    ``datetime64[ns, UTC]`` column per :data:`JOB_TIMES` step and float seconds
    ``wait_s``, ``run_s``, ``total_s`` (see :func:`job_spans`). An empty ``jobs``
    gives an empty frame with the same columns and dtypes.
    """
    data: dict[str, Any] = {
        "job_type": pd.Categorical([j.job_type for j in jobs]),
        "priority": np.array([j.priority for j in jobs], dtype="int64"),
        "status": pd.Categorical([j.status.value for j in jobs], dtype=_JOB_STATUS),
        "worker_id": _strings([j.worker_id for j in jobs]),
        "client_id": _strings([j.client_id for j in jobs]),
        "attempt": np.array([j.attempt for j in jobs], dtype="int64"),
        "max_attempts": np.array([j.max_attempts for j in jobs], dtype="int64"),
        "progress": seconds([j.progress for j in jobs]),
        "message": _strings([j.message for j in jobs]),
        "error": _strings([j.error for j in jobs]),
        **{name: _datetimes(seconds([getattr(j, name) for j in jobs])) for name in JOB_TIMES},
        **job_spans(jobs),
    }
    index = pd.Index([j.job_id for j in jobs], dtype=STRING, name="job_id")
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


def workers_frame(workers: Sequence[WorkerModel], now: float) -> pd.DataFrame:
    """Workers as a frame indexed by ``worker_id``: :data:`WORKER_COLUMNS`, then
    the capabilities flattened into ``cap_*`` columns (``cap_gpu_model``, ...).

    ``now`` is the Redis server time (Unix seconds, see :func:`server_time`).
    ``job_types`` is a comma-separated string; ``busy_s`` counts finished jobs only
    (a busy worker's current job adds to it when it ends); ``busy_share`` is
    ``busy_s / uptime_s``.
    """
    registered = seconds([w.registered for w in workers])
    busy = np.array([w.busy_s for w in workers], dtype="float64")
    uptime, share = uptime_and_share(registered, busy, now)
    data: dict[str, Any] = {
        "machine_id": _strings([w.machine_id for w in workers]),
        "status": pd.Categorical([w.status.value for w in workers], dtype=_WORKER_STATUS),
        "job_types": _strings([",".join(w.job_types) for w in workers]),
        "current_job": _strings([w.current_job for w in workers]),
        "hub_id": _strings([w.hub_id for w in workers]),
        "registered": _datetimes(registered),
        "last_heartbeat": _datetimes(seconds([w.last_seen for w in workers])),
        "jobs_done": np.array([w.jobs_done for w in workers], dtype="int64"),
        "jobs_failed": np.array([w.jobs_failed for w in workers], dtype="int64"),
        "busy_s": busy,
        "uptime_s": uptime,
        "busy_share": share,
    }
    index = pd.Index([w.worker_id for w in workers], dtype=STRING, name="worker_id")
    frame = pd.DataFrame(data, index=index, columns=list(WORKER_COLUMNS))
    caps = pd.DataFrame([_flatten(w.capabilities) for w in workers], index=index)
    return frame.join(caps[sorted(caps.columns)]) if len(caps.columns) else frame


def _event_column(values: list[Any], dtype: Any) -> Any:
    if dtype == _TIME:
        return _datetimes(seconds([None if v is None else float(v) for v in values]))
    if dtype == "float64":
        return seconds([None if v is None else float(v) for v in values])
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


def policy_text(policy: Mapping[str, Any] | None) -> str:
    """The scheduling policy in one line, e.g. ``strict priority`` or ``aging 1 s/step,
    fair share by client``; ``unknown (no hub started)`` for None."""
    if policy is None:
        return "unknown (no hub started)"
    parts = []
    if policy["aging_s"]:
        parts.append(f"aging {policy['aging_s']:g} s/step")
    if policy["fair_share"] != "off":
        parts.append(f"fair share by {policy['fair_share']}")
    return ", ".join(parts) or "strict priority"
