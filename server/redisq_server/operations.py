"""The engine's operations as plain data: what to run and how to read the reply.

Pure: nothing here talks to Redis. :class:`Operations` validates a call's
arguments (through the protocol's field rules, so bad input is refused before
anything is sent) and returns an :class:`Op`: a script name, its arguments and a
parser of its reply. The result types (:class:`Assignment`, :class:`SubmitResult`,
...) and the parsing of stats and events live here too. The two shells in
:mod:`.redis_service` run the same operations, one blocking and one asyncio.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Generic, TypeVar

from redis.exceptions import ResponseError

from . import protocol
from .config import EngineLimits
from .keys import Keys
from .models import JobModel, JobStatus
from .protocol import (
    ErrorCode,
    ProtocolError,
    check_size,
    dumps,
    validate_attempt,
    validate_capabilities,
    validate_client_id,
    validate_delay,
    validate_error_text,
    validate_job_id,
    validate_job_type,
    validate_job_types,
    validate_max_attempts,
    validate_params,
    validate_prefetch,
    validate_priority,
    validate_progress,
    validate_run_at,
    validate_worker_id,
)

__all__ = [
    "Assignment",
    "CancelResult",
    "Event",
    "FinishResult",
    "Op",
    "Operations",
    "Renewal",
    "SubmitResult",
    "engine_error",
    "event_from_entry",
    "new_job_id",
]

T = TypeVar("T")


def new_job_id() -> str:
    """A fresh random job id (32 hex characters)."""
    return secrets.token_hex(16)


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class Assignment:
    """A job given to a worker; the hub that owns ``worker_id``'s socket pushes it."""

    job_id: str
    attempt: int
    job_type: str
    priority: int
    params: dict[str, Any]
    worker_id: str
    hub_id: str
    session: str
    n: int = 0  # this worker's assignment number: later assignments have larger n

    @classmethod
    def from_reply(cls, r: Sequence[Any]) -> Assignment:
        return cls(
            job_id=r[0],
            attempt=int(r[1]),
            job_type=r[2],
            priority=int(r[3]),
            params=protocol.loads(r[4]) if r[4] else {},
            worker_id=r[5],
            hub_id=r[6],
            session=r[7],
            n=int(r[8]),
        )

    def to_message(self) -> dict[str, Any]:
        """The ``job_assigned`` frame for the worker."""
        return protocol.job_assigned(
            self.job_id, self.attempt, self.job_type, self.priority, self.params
        )


def _assignment(r: Any) -> Assignment | None:
    return Assignment.from_reply(r) if r else None


@dataclass(frozen=True)
class SubmitResult:
    job_id: str
    status: JobStatus
    position: int | None  # jobs ahead of it in its queue; None when not queued
    assignment: Assignment | None


@dataclass(frozen=True)
class FinishResult:
    """Outcome of complete/fail: ``completed``, ``retrying``, ``failed`` or ``cancelled``
    (the job had been cancelled; the report was dropped), the worker's next job to
    run, and the job it now holds ahead (a worker registered with a prefetch window).
    The caller pushes ``next`` then ``ahead``. ``took_ahead``: the job the worker held
    ahead became its current one (pushed already, when taken; ``next`` is None and the
    worker is busy)."""

    outcome: str
    next: Assignment | None
    ahead: Assignment | None = None
    took_ahead: bool = False

    @classmethod
    def from_reply(cls, outcome: str, r: Sequence[Any]) -> FinishResult:
        """From ``outcome`` and the script's {outcome as sent, current, ahead,
        took_ahead} reply (lib.lua's report_reply)."""
        return cls(outcome, _assignment(r[1]), _assignment(r[2]), bool(r[3]))


@dataclass(frozen=True)
class Renewal:
    """What renewing workers found: ``stale`` workers (their session is not current:
    close them) and ``missed`` assignments their hub never pushed (push them)."""

    stale: list[str]
    missed: list[Assignment]


@dataclass(frozen=True)
class CancelResult:
    job_id: str
    status: JobStatus
    worker_id: str | None  # set when a running worker must be told to stop
    attempt: int


@dataclass(frozen=True)
class Event:
    """One entry of the ``{ns}:events`` stream: its id and fields (``e`` is the name)."""

    id: str
    fields: dict[str, str]

    @property
    def name(self) -> str:
        return self.fields.get("e", "")

    def to_message(self) -> dict[str, Any]:
        return protocol.event(self.id, self.fields)


# ------------------------------------------------------------- operations


@dataclass(frozen=True)
class Op(Generic[T]):
    """One script call: what to run and how to read its reply. Pure data."""

    script: str
    args: tuple[str, ...]
    parse: Callable[[Any], T]


_ERROR_CODES = {
    "DUPLICATE": ErrorCode.DUPLICATE,
    "NOT_FOUND": ErrorCode.NOT_FOUND,
    "STALE_ATTEMPT": ErrorCode.STALE_ATTEMPT,
    "CANCELLED": ErrorCode.JOB_CANCELLED,
    "BAD_STATE": ErrorCode.BAD_STATE,
    "INVALID_FIELD": ErrorCode.INVALID_FIELD,
}


def engine_error(exc: ResponseError) -> Exception:
    """A script's ``error_reply('CODE text')`` as a typed ProtocolError; any other
    Redis error as it is."""
    code, _, message = str(exc).partition(" ")
    if code in _ERROR_CODES:
        return ProtocolError(_ERROR_CODES[code], message)
    return exc


def _status_reply(job_id: str, r: Any) -> JobModel | None:
    if not r:
        return None
    flat, pos = r
    h = dict(zip(flat[::2], flat[1::2], strict=True))
    return JobModel.from_redis(job_id, h, position=int(pos) if int(pos) >= 0 else None)


class Operations:
    """Builds :class:`Op` values for one namespace and limits, validating inputs."""

    def __init__(self, limits: EngineLimits, shard: int = 0) -> None:
        self.limits = limits
        self.keys = Keys(limits.namespace, shard)
        self._header = "|".join(
            (
                self.keys.prefix,
                repr(float(limits.lease_s)),
                str(int(limits.result_ttl_s)),
                str(int(limits.events_maxlen)),
                str(int(limits.max_lost)),
                repr(float(limits.backoff_base_s)),
                repr(float(limits.backoff_max_s)),
                str(round(limits.aging_s * 1000)),  # aging step in ms (0: off)
                limits.fair_share,
                "",
            )
        )

    def header(self, caller: str) -> str:
        """The first argument of every function call made for hub ``caller`` ('' when
        the caller is not a hub): this namespace's prefix and limits and the caller,
        joined by ``|`` (lib.lua parses each header text once and keeps it)."""
        return self._header + caller

    def submit(
        self,
        job_type: str,
        priority: int = 0,
        params: Mapping[str, Any] | None = None,
        *,
        job_id: str | None = None,
        client_id: str | None = None,
        max_attempts: int | None = None,
        delay_s: float | None = None,
        run_at: float | None = None,
    ) -> Op[SubmitResult]:
        """``delay_s`` or ``run_at`` (not both): the job is ``scheduled`` until then."""
        job_type = validate_job_type(job_type)
        priority = validate_priority(priority)
        encoded = validate_params(
            dict(params) if params is not None else {}, self.limits.max_params_bytes
        )
        jid = validate_job_id(job_id) if job_id is not None else new_job_id()
        client = validate_client_id(client_id) if client_id is not None else ""
        attempts = validate_max_attempts(
            max_attempts if max_attempts is not None else self.limits.default_max_attempts
        )

        def parse(r: Any) -> SubmitResult:
            status, pos, a = r
            return SubmitResult(
                jid, JobStatus(status), int(pos) if int(pos) >= 0 else None, _assignment(a)
            )

        if delay_s is not None and run_at is not None:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "delay_s, run_at: give one, not both")
        delay = repr(validate_delay(delay_s)) if delay_s is not None else ""
        at = repr(validate_run_at(run_at)) if run_at is not None else ""
        args = (jid, job_type, str(priority), encoded, client, str(attempts), delay, at)
        return Op("submit", args, parse)

    def register(
        self,
        worker_id: str,
        job_types: Iterable[str],
        capabilities: Mapping[str, Any] | None,
        hub_id: str,
        session: str,
        prefetch: int = 0,
    ) -> Op[Assignment | None]:
        validate_worker_id(worker_id)
        types = validate_job_types(list(job_types))
        caps = validate_capabilities(dict(capabilities or {}))
        window = validate_prefetch(prefetch)
        machine = worker_id.split(":", 1)[0]
        args = (worker_id, machine, ",".join(types), caps, hub_id, session, str(window))
        return Op("register", args, lambda r: _assignment(r[0]))

    def _report(self, job_id: str, attempt: int, worker_id: str) -> tuple[str, str, str]:
        validate_job_id(job_id)
        validate_worker_id(worker_id)
        return job_id, str(validate_attempt(attempt)), worker_id

    def complete(
        self, job_id: str, attempt: int, worker_id: str, result: Any = None
    ) -> Op[FinishResult]:
        head = self._report(job_id, attempt, worker_id)
        encoded = dumps(result, "result")
        check_size(encoded, self.limits.max_result_bytes, "result")

        def parse(r: Any) -> FinishResult:
            outcome = "completed" if r[0] == "ok" else r[0]
            return FinishResult.from_reply(outcome, r)

        return Op("complete", (*head, encoded), parse)

    def fail(
        self, job_id: str, attempt: int, worker_id: str, error: str, retryable: bool = True
    ) -> Op[FinishResult]:
        head = self._report(job_id, attempt, worker_id)
        return Op(
            "fail",
            (*head, validate_error_text(error), "1" if retryable else "0"),
            lambda r: FinishResult.from_reply(r[0], r),
        )

    def progress(
        self, job_id: str, attempt: int, worker_id: str, progress: float, message: str | None
    ) -> Op[str]:
        head = self._report(job_id, attempt, worker_id)
        value = validate_progress(progress)
        return Op("progress", (*head, repr(value), message or ""), str)

    def touch(self, workers: Iterable[tuple[str, str, int | None]]) -> Op[Renewal]:
        """Extend ``(worker_id, session, pushed)`` workers; ``pushed`` is the highest
        assignment number the hub pushed to that socket (None: do not check)."""
        flat = tuple(x for w, s, n in workers for x in (w, s, "" if n is None else str(int(n))))

        def parse(r: Any) -> Renewal:
            return Renewal(list(r[0]), [Assignment.from_reply(a) for a in r[1]])

        return Op("touch", flat, parse)

    def lost(self, worker_id: str, session: str, count: bool = True) -> Op[bool]:
        return Op("lost", (worker_id, session, "1" if count else "0"), lambda r: bool(r))

    def leave(self, worker_id: str, session: str) -> Op[int | None]:
        """An idle worker leaves this shard (sharded namespaces): its assignment
        number here if it left, None if it stays (it holds a job)."""
        return Op("leave", (worker_id, session), lambda r: int(r) if int(r) >= 0 else None)

    def arrive(self, worker_id: str, n: int) -> Op[int]:
        """A worker moving to this shard continues its assignment numbers from ``n``."""
        return Op("arrive", (worker_id, str(n)), int)

    def reap(self, limit: int = 100) -> Op[int]:
        return Op("reap", (str(limit),), int)

    def promote(self, limit: int = 100) -> Op[tuple[int, float | None, list[Assignment]]]:
        def parse(r: Any) -> tuple[int, float | None, list[Assignment]]:
            nxt = float(r[1])
            return int(r[0]), (nxt if nxt >= 0 else None), [Assignment.from_reply(a) for a in r[2:]]

        return Op("promote", (str(limit),), parse)

    def cancel(self, job_id: str, client_id: str | None = None) -> Op[CancelResult]:
        validate_job_id(job_id)
        client = validate_client_id(client_id) if client_id is not None else ""

        def parse(r: Any) -> CancelResult:
            return CancelResult(job_id, JobStatus(r[0]), r[1] or None, int(r[2] or 0))

        return Op("cancel", (job_id, client), parse)

    def status(self, job_id: str) -> Op[JobModel | None]:
        validate_job_id(job_id)
        return Op("status", (job_id,), partial(_status_reply, job_id))

    def stats(self, window_s: float = 60.0) -> Op[dict[str, Any]]:
        return Op("stats", (repr(float(window_s)),), _parse_stats)

    def hub(self, action: str, *args: str) -> Op[int]:
        """The calling hub's presence (see hub.lua): start, alive, join, leave, stop."""
        return Op("hub", (action, *args), int)

    @property
    def hub_ttl(self) -> str:
        """How long a hub stays listed without renewing: three leases."""
        return repr(3.0 * float(self.limits.lease_s))


#: the counters the scripts keep per job type only (their totals are sums)
_COUNTED_PER_TYPE: Final = frozenset({"submitted", "completed", "failed", "cancelled"})


def _parse_stats(r: Any) -> dict[str, Any]:
    counters_flat, types_flat, running, retrying, workers, idle, done_window, window, now = r[:9]
    scheduled, policy_flat, held_ahead = r[9], r[10], r[11]
    pol = dict(zip(policy_flat[::2], policy_flat[1::2], strict=True))
    policy = (
        {"aging_s": int(pol["aging_ms"]) / 1000, "fair_share": pol["fair_share"]} if pol else None
    )
    fields = dict(zip(counters_flat[::2], counters_flat[1::2], strict=True))
    since = float(fields.pop("since")) if "since" in fields else None
    counters = {k: int(v) for k, v in fields.items()}
    t = float(now)
    # the window covers no time before the namespace's first hub started
    covered = float(window) if since is None else max(1e-3, min(float(window), t - since))
    by_type: dict[str, Any] = {}
    for entry in types_flat:
        jt, queued, depth_flat, idle_n = entry
        depth = {int(p): int(n) for p, n in zip(depth_flat[::2], depth_flat[1::2], strict=True)}
        by_type[jt] = {
            "queued": int(queued),
            "by_priority": dict(sorted(depth.items(), reverse=True)),
            "idle_workers": int(idle_n),
            "submitted": counters.get(f"submitted:{jt}", 0),
            "completed": counters.get(f"completed:{jt}", 0),
            "failed": counters.get(f"failed:{jt}", 0),
            "cancelled": counters.get(f"cancelled:{jt}", 0),
        }
    # a job's submit and its end are counted per type only (`submitted:<type>`): the
    # totals are their sums; retried and requeued are counted as totals only
    totals: dict[str, int] = {}
    for k, v in counters.items():
        name = k.split(":", 1)[0]
        if name in _COUNTED_PER_TYPE:
            if name != k:
                totals[name] = totals.get(name, 0) + v
        elif name == k:
            totals[k] = v
    n_workers, n_idle = int(workers), int(idle)
    return {
        "time": t,
        "since": since,
        "queued": sum(t["queued"] for t in by_type.values()),
        "running": int(running),  # not counting the jobs held ahead
        "held_ahead": int(held_ahead),
        "retrying": int(retrying),
        "scheduled": int(scheduled),
        "policy": policy,  # as the last hub to start runs it; None before any hub
        "workers": n_workers,
        "workers_idle": n_idle,
        "workers_busy": n_workers - n_idle,
        "throughput_per_s": int(done_window) / covered,
        "window_s": covered,
        "totals": {
            k: totals.get(k, 0)
            for k in ("submitted", "completed", "failed", "cancelled", "retried", "requeued")
        },
        "job_types": by_type,
    }


def event_from_entry(entry: Sequence[Any]) -> Event:
    """A stream entry ``(id, fields)`` as an :class:`Event`."""
    return Event(entry[0], dict(entry[1]))


def event_id_key(event_id: str) -> tuple[int, int]:
    """A stream id as a sort key: (milliseconds, sequence)."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)
