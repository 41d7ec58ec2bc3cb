"""The job model: statuses, the job state machine, the job and worker records.

Pure: nothing here touches a socket or Redis. The Lua scripts are the only writers
of job state; :data:`TRANSITIONS` is what they implement and what the tests check
them against. What a valid field is (ids, priorities, sizes) is the protocol's
rule (:mod:`redisq_server.protocol`); the engine validates through the same rules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Final

from .protocol import MAX_PRIORITY, loads_stored, validate_priority

__all__ = [
    "AGED_TIE_BITS",
    "AGED_TIME_BITS",
    "AGING_EPOCH_MS",
    "MAX_AGING_MS",
    "MAX_SEQ",
    "SEQ_BITS",
    "TERMINAL_STATUSES",
    "TRANSITIONS",
    "JobModel",
    "JobStatus",
    "WorkerModel",
    "WorkerStatus",
    "aged_score",
    "can_transition",
    "decode_score",
    "entered_ms",
    "queue_score",
]

#: Bits of the queue score that hold the submission sequence number. The rest hold
#: the inverted priority; together they stay below 2**53, so a double is exact.
SEQ_BITS: Final = 36
MAX_SEQ: Final = (1 << SEQ_BITS) - 1


class JobStatus(StrEnum):
    """Where a job is in its lifecycle (see TRANSITIONS)."""

    SCHEDULED = "scheduled"  # submitted with a delay: waits in `delayed` until due
    QUEUED = "queued"
    ASSIGNED = "assigned"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETRYING = "retrying"


TERMINAL_STATUSES: Final = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})

#: The job state machine. The Lua scripts are its only writers; this table is what
#: they implement and what the tests check them against.
TRANSITIONS: Final[Mapping[JobStatus | None, frozenset[JobStatus]]] = {
    None: frozenset({JobStatus.QUEUED, JobStatus.ASSIGNED, JobStatus.SCHEDULED}),  # submit
    # due (the promoter): queued, or straight onto an idle worker; or cancelled first
    JobStatus.SCHEDULED: frozenset({JobStatus.QUEUED, JobStatus.ASSIGNED, JobStatus.CANCELLED}),
    JobStatus.QUEUED: frozenset({JobStatus.ASSIGNED, JobStatus.CANCELLED}),
    JobStatus.ASSIGNED: frozenset(
        {
            JobStatus.RUNNING,  # first progress
            JobStatus.COMPLETED,
            JobStatus.FAILED,
            JobStatus.RETRYING,
            JobStatus.CANCELLED,
            JobStatus.QUEUED,  # worker lost: requeued at its old position
            JobStatus.ASSIGNED,  # worker lost, requeued straight onto an idle worker
        }
    ),
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.COMPLETED,
            JobStatus.FAILED,
            JobStatus.RETRYING,
            JobStatus.CANCELLED,
            JobStatus.QUEUED,
            JobStatus.ASSIGNED,
        }
    ),
    JobStatus.RETRYING: frozenset({JobStatus.QUEUED, JobStatus.ASSIGNED, JobStatus.CANCELLED}),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


def can_transition(old: JobStatus | None, new: JobStatus) -> bool:
    """Return True when the state machine allows ``old -> new``."""
    return new in TRANSITIONS[old]


class WorkerStatus(StrEnum):
    IDLE = "idle"
    BUSY = "busy"
    OFFLINE = "offline"


# ------------------------------------------------------------------ queue score


def queue_score(priority: int, seq: int) -> int:
    """The ZSET score of a queued job: higher priority first, then FIFO by ``seq``.

    Exact as a double: the result is below 2**52. The Lua scripts compute the same.
    """
    validate_priority(priority)
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"seq {seq} outside 0..{MAX_SEQ}")
    return ((MAX_PRIORITY - priority) << SEQ_BITS) + seq


def decode_score(score: float) -> tuple[int, int]:
    """Inverse of :func:`queue_score`: ``(priority, seq)``."""
    s = int(score)
    return MAX_PRIORITY - (s >> SEQ_BITS), s & MAX_SEQ


#: Aging (docs/scheduling.md): times count in milliseconds from this epoch
#: (2025-01-01 UTC), so that they fit :data:`AGED_TIME_BITS` bits until 2059.
AGING_EPOCH_MS: Final = 1_735_689_600_000
AGED_TIME_BITS: Final = 40
#: the longest aging step, in ms (config.MAX_AGING_S)
MAX_AGING_MS: Final = 3_600_000
#: low bits of an aged score: the sequence number modulo 4096 breaks exact ties
AGED_TIE_BITS: Final = 12


def entered_ms(unix_s: float) -> int:
    """A job's time of entering its queue (Unix seconds, as stored: ``created``, or
    ``due`` for a delayed job) as whole ms since :data:`AGING_EPOCH_MS`, clamped to
    the range an aged score holds. The Lua scripts compute the same from the same text."""
    ms = math.floor(unix_s * 1000) - AGING_EPOCH_MS
    return min(max(ms, 0), (1 << AGED_TIME_BITS) - 1)


def aged_score(priority: int, entered: int, aging_ms: int, seq: int) -> int:
    """The ZSET score of a queued job under aging with a step of ``aging_ms``: the
    job that entered its queue at ``entered`` (:func:`entered_ms`) with ``priority``
    runs before another iff ``aging_ms * priority - entered`` is larger, i.e. a
    waiting job gains one priority step per ``aging_ms`` continuously, with no
    rescoring. Exact ties go by ``seq`` modulo 4096.

    Exact as a double: ``entered < 2**40`` and ``aging_ms * (MAX_PRIORITY - priority)
    < 2**38``, so the key is below ``2**41`` and the score below ``2**53``."""
    validate_priority(priority)
    if not 0 <= entered < 1 << AGED_TIME_BITS:
        raise ValueError(f"entered {entered} outside 0..2**{AGED_TIME_BITS}")
    if not 0 < aging_ms <= MAX_AGING_MS:
        raise ValueError(f"aging_ms {aging_ms} outside 1..{MAX_AGING_MS}")
    if seq < 0:
        raise ValueError(f"seq {seq} is negative")
    key = entered + aging_ms * (MAX_PRIORITY - priority)
    return (key << AGED_TIE_BITS) + (seq & ((1 << AGED_TIE_BITS) - 1))


# ------------------------------------------------------------------- the models


def _opt_float(v: str | None) -> float | None:
    return float(v) if v not in (None, "") else None


def _opt_str(v: str | None) -> str | None:
    return v if v not in (None, "") else None


@dataclass
class JobModel:
    """A job as stored in its Redis hash (times are Unix seconds, server clock)."""

    job_id: str
    job_type: str
    priority: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    client_id: str | None = None
    status: JobStatus = JobStatus.QUEUED
    worker_id: str | None = None
    attempt: int = 0
    max_attempts: int = 3
    lost: int = 0
    failures: int = 0
    progress: float | None = None
    message: str | None = None
    result: Any = None
    error: str | None = None
    position: int | None = None
    created: float | None = None
    queued: float | None = None
    held: float | None = None  # sent ahead to a worker's prefetch window (this attempt)
    assigned: float | None = None  # became its worker's job (the end of a held job's wait)
    started: float | None = None
    finished: float | None = None
    due: float | None = None  # a delayed job's run time (set while it is scheduled, kept after)

    @classmethod
    def from_redis(cls, job_id: str, h: Mapping[str, str], position: int | None = None) -> JobModel:
        """Build job ``job_id`` from its hash (decoded strings); ``position`` comes
        from ZRANK. The hash leaves out what it can derive: the id (its key holds
        it), zero counters, an empty client or worker, and ``queued`` while it
        equals ``created``."""
        created = _opt_float(h.get("created"))
        queued = _opt_float(h.get("queued"))
        return cls(
            job_id=job_id,
            job_type=h["type"],
            priority=int(h.get("priority", 0)),
            params=loads_stored(h.get("params")) or {},
            client_id=_opt_str(h.get("client")),
            status=JobStatus(h["status"]),
            worker_id=_opt_str(h.get("worker")),
            attempt=int(h.get("attempt") or 0),
            max_attempts=int(h.get("max_attempts") or 1),
            lost=int(h.get("lost") or 0),
            failures=int(h.get("failures") or 0),
            progress=_opt_float(h.get("progress")),
            message=_opt_str(h.get("message")),
            result=loads_stored(h.get("result")),
            error=_opt_str(h.get("error")),
            position=position,
            created=created,
            queued=created if queued is None else queued,
            held=_opt_float(h.get("held")),
            assigned=_opt_float(h.get("assigned")),
            started=_opt_float(h.get("started")),
            finished=_opt_float(h.get("finished")),
            due=_opt_float(h.get("due")),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        return d


@dataclass
class WorkerModel:
    """A GPU worker as stored in its Redis hash."""

    worker_id: str
    machine_id: str
    status: WorkerStatus
    job_types: list[str]
    capabilities: dict[str, Any] = field(default_factory=dict)
    current_job: str | None = None
    hub_id: str | None = None
    registered: float | None = None
    last_seen: float | None = None
    jobs_done: int = 0
    jobs_failed: int = 0
    busy_s: float = 0.0

    @classmethod
    def from_redis(cls, h: Mapping[str, str]) -> WorkerModel:
        return cls(
            worker_id=h["id"],
            machine_id=h.get("machine", ""),
            status=WorkerStatus(h.get("status", "offline")),
            job_types=[t for t in h.get("types", "").split(",") if t],
            capabilities=loads_stored(h.get("caps")) or {},
            current_job=_opt_str(h.get("job")),
            hub_id=_opt_str(h.get("hub")),
            registered=_opt_float(h.get("registered")),
            last_seen=_opt_float(h.get("seen")),
            jobs_done=int(h.get("done") or 0),
            jobs_failed=int(h.get("failed") or 0),
            busy_s=float(h.get("busy_s") or 0.0),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        return d
