"""RedisService: the only code that talks to Redis.

Every state change is one Lua script from ``lua/`` (loaded once, run by EVALSHA via
redis-py's ``register_script``), so each transition of the job state machine is
atomic. Each operation is built as a plain :class:`_Op` (script, arguments, parser)
and run by one of two thin shells: :class:`AsyncRedisService` (the hub) and
:class:`RedisService` (the sync facade used by monitors, scripts and the seed's
example). Both shells validate arguments through :mod:`models` before anything is
sent, so bad input raises :class:`~redisq_server.models.ProtocolError` and writes
nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache, partial
from importlib import resources
from typing import Any, Generic, TypeVar

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry as SyncRetry

from .config import EngineLimits, redis_url_from_env
from .keys import Keys, lua_prelude
from .models import (
    TERMINAL_STATUSES,
    ErrorCode,
    JobModel,
    JobStatus,
    MessageType,
    ProtocolError,
    WorkerModel,
    check_size,
    dumps,
    validate_client_id,
    validate_job_id,
    validate_job_type,
    validate_max_attempts,
    validate_params,
    validate_priority,
    validate_worker_id,
)

__all__ = [
    "Assignment",
    "AsyncRedisService",
    "CancelResult",
    "Event",
    "FinishResult",
    "RedisService",
    "SubmitResult",
    "connect_async",
    "connect_sync",
    "new_job_id",
]

T = TypeVar("T")

SCRIPT_NAMES = (
    "submit",
    "register",
    "complete",
    "fail",
    "progress",
    "touch",
    "lost",
    "reap",
    "promote",
    "cancel",
    "status",
    "stats",
    "hub",
)


@cache
def script_source(name: str) -> str:
    """The full Lua source of one script: prefix, generated keys, helpers, and the
    body, whose reply comes back as ``{reply, events for the calling hub}`` (an error
    reply as it is)."""
    lua = resources.files(__package__).joinpath("lua")
    lib = lua.joinpath("lib.lua").read_text()
    body = lua.joinpath(f"{name}.lua").read_text()
    return (
        "local P = ARGV[1]\n"
        + lua_prelude()
        + lib
        + "\nlocal function main()\n"
        + body
        + "\nend\nlocal r = main()\n"
        + "if type(r) == 'table' and r.err then return r end\n"
        + "if r == nil then r = false end\n"
        + "return {r, LOCAL}\n"
    )


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
            params=json.loads(r[4]) if r[4] else {},
            worker_id=r[5],
            hub_id=r[6],
            session=r[7],
            n=int(r[8]),
        )

    def to_message(self) -> dict[str, Any]:
        """The ``job_assigned`` frame for the worker."""
        return {
            "type": MessageType.JOB_ASSIGNED.value,
            "job_id": self.job_id,
            "attempt": self.attempt,
            "job_type": self.job_type,
            "priority": self.priority,
            "params": self.params,
        }


def _assignment(r: Any) -> Assignment | None:
    return Assignment.from_reply(r) if r else None


@dataclass(frozen=True)
class SubmitResult:
    job_id: str
    status: JobStatus
    position: int | None  # jobs ahead of it in its queue; None when assigned
    assignment: Assignment | None


@dataclass(frozen=True)
class FinishResult:
    """Outcome of complete/fail: ``completed``, ``retrying``, ``failed`` or ``cancelled``
    (the job had been cancelled; the report was dropped), and the worker's next job."""

    outcome: str
    next: Assignment | None


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
        return {"type": MessageType.EVENT.value, "event_id": self.id, **self.fields}


# ------------------------------------------------------------- operations


@dataclass(frozen=True)
class _Op(Generic[T]):
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
}


def _engine_error(exc: ResponseError) -> Exception:
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


class _Ops:
    """Builds :class:`_Op` values for one namespace and limits, validating inputs."""

    def __init__(self, limits: EngineLimits) -> None:
        self.limits = limits
        self.keys = Keys(limits.namespace)
        self.header = (
            self.keys.prefix,
            repr(float(limits.lease_s)),
            str(int(limits.result_ttl_s)),
            str(int(limits.events_maxlen)),
            str(int(limits.max_lost)),
            repr(float(limits.backoff_base_s)),
            repr(float(limits.backoff_max_s)),
        )

    def submit(
        self,
        job_type: str,
        priority: int = 0,
        params: Mapping[str, Any] | None = None,
        *,
        job_id: str | None = None,
        client_id: str | None = None,
        max_attempts: int | None = None,
    ) -> _Op[SubmitResult]:
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

        args = (jid, job_type, str(priority), encoded, client, str(attempts))
        return _Op("submit", args, parse)

    def register(
        self,
        worker_id: str,
        job_types: Iterable[str],
        capabilities: Mapping[str, Any] | None,
        hub_id: str,
        session: str,
    ) -> _Op[Assignment | None]:
        validate_worker_id(worker_id)
        types = sorted({validate_job_type(t) for t in job_types})
        if not types:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "job_types: at least one is required")
        caps = validate_params(dict(capabilities or {}), 64 * 1024, "capabilities")
        machine = worker_id.split(":", 1)[0]
        args = (worker_id, machine, ",".join(types), caps, hub_id, session)
        return _Op("register", args, _assignment)

    def _report(self, job_id: str, attempt: int, worker_id: str) -> tuple[str, str, str]:
        validate_job_id(job_id)
        validate_worker_id(worker_id)
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "attempt: expected a positive integer")
        return job_id, str(attempt), worker_id

    def complete(
        self, job_id: str, attempt: int, worker_id: str, result: Any = None
    ) -> _Op[FinishResult]:
        head = self._report(job_id, attempt, worker_id)
        encoded = dumps(result, "result")
        check_size(encoded, self.limits.max_result_bytes, "result")

        def parse(r: Any) -> FinishResult:
            outcome = "completed" if r[0] == "ok" else r[0]
            return FinishResult(outcome, _assignment(r[1]))

        return _Op("complete", (*head, encoded), parse)

    def fail(
        self, job_id: str, attempt: int, worker_id: str, error: str, retryable: bool = True
    ) -> _Op[FinishResult]:
        head = self._report(job_id, attempt, worker_id)
        if not isinstance(error, str):
            raise ProtocolError(ErrorCode.INVALID_FIELD, "error: expected a string")
        return _Op(
            "fail",
            (*head, error[:8192], "1" if retryable else "0"),
            lambda r: FinishResult(r[0], _assignment(r[1])),
        )

    def progress(
        self, job_id: str, attempt: int, worker_id: str, progress: float, message: str | None
    ) -> _Op[str]:
        head = self._report(job_id, attempt, worker_id)
        if isinstance(progress, bool) or not isinstance(progress, int | float):
            raise ProtocolError(ErrorCode.INVALID_FIELD, "progress: expected a number")
        if not 0 <= progress <= 100:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "progress: outside 0..100")
        return _Op("progress", (*head, repr(float(progress)), message or ""), str)

    def touch(self, workers: Iterable[tuple[str, str]]) -> _Op[list[str]]:
        flat = tuple(x for pair in workers for x in pair)
        return _Op("touch", flat, list)

    def lost(self, worker_id: str, session: str, count: bool = True) -> _Op[bool]:
        return _Op("lost", (worker_id, session, "1" if count else "0"), lambda r: bool(r))

    def reap(self, limit: int = 100) -> _Op[int]:
        return _Op("reap", (str(limit),), int)

    def promote(self, limit: int = 100) -> _Op[tuple[int, float | None, list[Assignment]]]:
        def parse(r: Any) -> tuple[int, float | None, list[Assignment]]:
            nxt = float(r[1])
            return int(r[0]), (nxt if nxt >= 0 else None), [Assignment.from_reply(a) for a in r[2:]]

        return _Op("promote", (str(limit),), parse)

    def cancel(self, job_id: str, client_id: str | None = None) -> _Op[CancelResult]:
        validate_job_id(job_id)
        client = validate_client_id(client_id) if client_id is not None else ""

        def parse(r: Any) -> CancelResult:
            return CancelResult(job_id, JobStatus(r[0]), r[1] or None, int(r[2] or 0))

        return _Op("cancel", (job_id, client), parse)

    def status(self, job_id: str) -> _Op[JobModel | None]:
        validate_job_id(job_id)
        return _Op("status", (job_id,), partial(_status_reply, job_id))

    def stats(self, window_s: float = 60.0) -> _Op[dict[str, Any]]:
        return _Op("stats", (repr(float(window_s)),), _parse_stats)

    def hub(self, action: str, *args: str) -> _Op[int]:
        """The calling hub's presence (see hub.lua): start, alive, join, leave, stop."""
        return _Op("hub", (action, *args), int)

    @property
    def hub_ttl(self) -> str:
        """How long a hub stays listed without renewing: three leases."""
        return repr(3.0 * float(self.limits.lease_s))


def _parse_stats(r: Any) -> dict[str, Any]:
    counters_flat, types_flat, running, retrying, workers, idle, done_window, window, now = r
    counters = {k: int(v) for k, v in zip(counters_flat[::2], counters_flat[1::2], strict=True)}
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
    totals = {k: v for k, v in counters.items() if ":" not in k}
    n_workers, n_idle = int(workers), int(idle)
    return {
        "time": float(now),
        "queued": sum(t["queued"] for t in by_type.values()),
        "running": int(running),
        "retrying": int(retrying),
        "workers": n_workers,
        "workers_idle": n_idle,
        "workers_busy": n_workers - n_idle,
        "throughput_per_s": int(done_window) / float(window),
        "totals": {
            k: totals.get(k, 0)
            for k in ("submitted", "completed", "failed", "cancelled", "retried", "requeued")
        },
        "job_types": by_type,
    }


# ------------------------------------------------------------------ reading


def _hash_rows(replies: Iterable[Mapping[str, str]]) -> list[dict[str, str]]:
    return [dict(h) for h in replies if h]


def _event(entry: Sequence[Any]) -> Event:
    return Event(entry[0], dict(entry[1]))


def _kwargs(
    url: str | None, host: str | None, port: int | None, db: int | None, password: str | None
) -> tuple[str, dict[str, Any]]:
    if url is None and host is None and port is None and db is None:
        url = redis_url_from_env()
    if url is None:
        env_default = dict(os.environ)
        if host is not None:
            env_default["REDIS_HOST"] = host
        if port is not None:
            env_default["REDIS_PORT"] = str(port)
        if db is not None:
            env_default["REDIS_DB"] = str(db)
        env_default.pop("REDIS_URL", None)
        url = redis_url_from_env(env_default)
    extra: dict[str, Any] = {"decode_responses": True}
    if password is not None:
        extra["password"] = password
    return url, extra


CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def _cluster_url(url: str) -> str | None:
    """``redis+cluster://host:port`` -> ``redis://host:port`` (None: not a cluster URL)."""
    for scheme in CLUSTER_SCHEMES:
        if url.startswith(scheme):
            return scheme.replace("+cluster", "") + url[len(scheme) :]
    return None


def _retry_stale_connections(kwargs: dict[str, Any], retry_class: Any) -> None:
    """Retry a command (twice, quickly) when its connection turns out to be closed,
    as pooled connections are after a Redis restart. Only connection errors are
    retried, not timeouts. A script whose reply was lost with its connection may run
    twice: fencing turns the second run into a refused report (``bad_state``,
    ``stale_attempt``, ``duplicate``), or for a registration into one extra requeue;
    never into a job completed twice."""
    kwargs.setdefault("retry", retry_class(ExponentialBackoff(cap=0.5, base=0.02), 2))
    kwargs.setdefault("retry_on_error", [RedisConnectionError])


#: how long one engine call may take before it fails with a Redis TimeoutError
CALL_TIMEOUT_S = 5.0


def connect_async(url: str, **kwargs: Any) -> Any:
    """An asyncio client for ``url`` with strings decoded: a Redis Cluster client for
    ``redis+cluster://`` / ``rediss+cluster://`` (any node as the seed), else a
    plain one (``redis://``, ``rediss://`` for TLS, ``unix://``).

    The plain client has no socket timeout of its own: redis-py would wrap every
    send in ``asyncio.wait_for``, a task per command on Python 3.11 (about a tenth of
    a hub's time per request). :class:`AsyncRedisService` bounds each engine call by
    ``CALL_TIMEOUT_S`` instead; callers of ``.redis`` directly must bound theirs."""
    kwargs.setdefault("decode_responses", True)
    plain = _cluster_url(url)
    if plain is not None:
        return aredis.RedisCluster.from_url(plain, **kwargs)
    _retry_stale_connections(kwargs, AsyncRetry)
    kwargs.setdefault("socket_timeout", None)
    # a blocking pool: many concurrent calls wait for a connection instead of failing
    kwargs.setdefault("max_connections", 256)
    pool = aredis.BlockingConnectionPool.from_url(url, **kwargs)
    client = aredis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # aclose() closes the pool too
    return client


def connect_sync(url: str, **kwargs: Any) -> Any:
    """A blocking client for ``url``; see :func:`connect_async`."""
    kwargs.setdefault("decode_responses", True)
    plain = _cluster_url(url)
    if plain is not None:
        return redis.RedisCluster.from_url(plain, **kwargs)
    _retry_stale_connections(kwargs, SyncRetry)
    return redis.Redis.from_url(url, **kwargs)


def _limits(limits: EngineLimits | None, namespace: str | None) -> EngineLimits:
    limits = limits or EngineLimits(namespace=os.environ.get("REDISQ_NAMESPACE", "redisq"))
    return replace(limits, namespace=namespace) if namespace is not None else limits


class _Shell:
    """What both shells share: the operations for one namespace and the scripts."""

    ops: _Ops
    keys: Keys
    limits: EngineLimits
    _scripts: dict[str, Any]
    #: the hub this service calls for ('' if none). A hub sets it with ``on_events``.
    hub_id: str = ""
    #: gets the events a call produced for the sockets of hub ``hub_id`` (the engine
    #: writes them to no inbox); called before the call returns
    on_events: Callable[[list[Event]], None] | None = None

    def _setup(self, client: Any, limits: EngineLimits | None, namespace: str | None) -> None:
        self.ops = _Ops(_limits(limits, namespace))
        self.keys = self.ops.keys
        self.limits = self.ops.limits
        self._scripts = {n: client.register_script(script_source(n)) for n in SCRIPT_NAMES}

    def _call(self, op: _Op[Any]) -> dict[str, list[str]]:
        """EVALSHA arguments for ``op``: the routing key and the common header."""
        return {"keys": [self.keys.events], "args": [*self.ops.header, self.hub_id, *op.args]}

    def _reply(self, op: _Op[T], wrapped: Any) -> T:
        """Hand the events for this hub to ``on_events``; parse the reply proper."""
        reply, local = wrapped
        if local and self.on_events is not None:
            self.on_events([Event(i, dict(zip(f[::2], f[1::2], strict=True))) for i, f in local])
        return op.parse(reply)


class AsyncRedisService(_Shell):
    """The queue engine, asyncio flavour: what the hub and async tools call.

    Connect from ``url`` (or ``host``/``port``/``db``/``password``; the environment
    when none is given) or pass a ready ``client``. Call :meth:`aclose` when done.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        db: int | None = None,
        password: str | None = None,
        namespace: str | None = None,
        limits: EngineLimits | None = None,
        client: aredis.Redis | None = None,
        call_timeout_s: float = CALL_TIMEOUT_S,
    ) -> None:
        if client is None:
            url, extra = _kwargs(url, host, port, db, password)
            client = connect_async(url, **extra)
        self.redis = client
        self.call_timeout_s = call_timeout_s
        self._setup(client, limits, namespace)

    async def _run(self, op: _Op[T]) -> T:
        try:
            reply = await self._bounded(self._scripts[op.script](**self._call(op)), op.script)
        except ResponseError as exc:
            raise _engine_error(exc) from None
        return self._reply(op, reply)

    async def _bounded(self, call: Awaitable[Any], what: str, wait_s: float = 0.0) -> Any:
        """``await call``, failing with a Redis TimeoutError after ``call_timeout_s``
        (plus ``wait_s`` for a blocking read); redis-py drops the connection then."""
        try:
            async with asyncio.timeout(self.call_timeout_s + wait_s):
                return await call
        except TimeoutError:
            raise RedisTimeoutError(
                f"no reply from Redis within {self.call_timeout_s + wait_s:g} s ({what})"
            ) from None

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        return bool(await self._bounded(self.redis.ping(), "ping"))

    # -- jobs
    async def submit_job(
        self,
        job_type: str,
        priority: int = 0,
        params: Mapping[str, Any] | None = None,
        *,
        job_id: str | None = None,
        client_id: str | None = None,
        max_attempts: int | None = None,
    ) -> SubmitResult:
        """Queue a job, or assign it at once to an idle worker that accepts its type.

        If ``result.assignment`` is set, the caller (a hub) must deliver it to that
        worker; the ``assigned`` event tells the worker's hub as well.
        """
        return await self._run(
            self.ops.submit(
                job_type,
                priority,
                params,
                job_id=job_id,
                client_id=client_id,
                max_attempts=max_attempts,
            )
        )

    async def get_job(self, job_id: str) -> JobModel | None:
        """The job with its queue position, or None if unknown or expired."""
        return await self._run(self.ops.status(job_id))

    async def cancel_job(self, job_id: str, client_id: str | None = None) -> CancelResult:
        """Cancel a job (only ``client_id``'s own, when given). If the result names a
        worker, its hub must push ``cancel_job`` to it (the ``cancelled`` event does)."""
        return await self._run(self.ops.cancel(job_id, client_id))

    # -- workers
    async def register_worker(
        self,
        worker_id: str,
        job_types: Iterable[str],
        capabilities: Mapping[str, Any] | None = None,
        *,
        hub_id: str = "",
        session: str | None = None,
    ) -> Assignment | None:
        """Register (or re-register) a worker and claim its first job, if any.

        ``session`` identifies this connection; pass the same one to
        :meth:`worker_lost` and :meth:`touch` so that a stale connection cannot
        affect a newer one.
        """
        return await self._run(
            self.ops.register(
                worker_id, job_types, capabilities, hub_id, session or secrets.token_hex(8)
            )
        )

    async def complete_job(
        self, job_id: str, attempt: int, worker_id: str, result: Any = None
    ) -> FinishResult:
        """Record a result (fenced on ``attempt``) and claim the worker's next job."""
        return await self._run(self.ops.complete(job_id, attempt, worker_id, result))

    async def fail_job(
        self, job_id: str, attempt: int, worker_id: str, error: str, retryable: bool = True
    ) -> FinishResult:
        """Record a failure (retry with backoff or fail for good) and claim the next job."""
        return await self._run(self.ops.fail(job_id, attempt, worker_id, error, retryable))

    async def update_progress(
        self,
        job_id: str,
        attempt: int,
        worker_id: str,
        progress: float,
        message: str | None = None,
    ) -> str:
        """Record progress (0-100); marks the job running and extends its lease."""
        return await self._run(self.ops.progress(job_id, attempt, worker_id, progress, message))

    async def touch(self, workers: Iterable[tuple[str, str]]) -> list[str]:
        """Extend liveness for ``(worker_id, session)`` pairs; returns stale worker ids."""
        pairs = list(workers)
        if not pairs:
            return []
        return await self._run(self.ops.touch(pairs))

    async def worker_lost(self, worker_id: str, session: str, count: bool = True) -> bool:
        """The worker's socket closed: requeue its job now. ``count=False`` for a
        deliberate shutdown, which does not count against the job's ``max_lost``."""
        return await self._run(self.ops.lost(worker_id, session, count))

    async def reap(self, limit: int = 100) -> int:
        """Requeue jobs of workers and leases past their deadline (dead hubs)."""
        return await self._run(self.ops.reap(limit))

    async def promote(self, limit: int = 100) -> tuple[int, float | None, list[Assignment]]:
        """Move due retries back; returns (moved, seconds to the next due, assignments)."""
        return await self._run(self.ops.promote(limit))

    # -- reading
    async def get_stats(self, window_s: float = 60.0) -> dict[str, Any]:
        """Queue depth by type and priority, running, workers, totals: one round trip."""
        return await self._run(self.ops.stats(window_s))

    async def read_events(
        self, last_id: str, count: int = 1000, block_ms: int | None = None
    ) -> list[Event]:
        """Events after ``last_id`` (``$``: only new ones), waiting up to ``block_ms``."""
        return await self._xread(self.keys.events, last_id, count, block_ms)

    async def _xread(self, key: str, last_id: str, count: int, block_ms: int | None) -> list[Event]:
        """The entries of stream ``key`` after ``last_id``, waiting up to ``block_ms``."""
        r: Any = self.redis
        read = r.xread({key: last_id}, count=count, block=block_ms)
        reply = await self._bounded(read, "xread", (block_ms or 0) / 1000)
        if not reply:
            return []
        entries = reply[0][1] if isinstance(reply, list) else reply[key][0]
        return [_event(e) for e in entries]

    async def events_since(self, since: str = "0", limit: int = 1000) -> list[Event]:
        """Up to ``limit`` events strictly after ``since``, oldest first."""
        start = "-" if since in ("0", "") else f"({since}"
        r: Any = self.redis
        entries = await self._bounded(r.xrange(self.keys.events, start, "+", limit), "xrange")
        return [_event(e) for e in entries]

    async def last_event_id(self) -> str:
        r: Any = self.redis
        info = await self._bounded(r.xrevrange(self.keys.events, "+", "-", 1), "xrevrange")
        return str(info[0][0]) if info else "0-0"

    async def job_payloads(self, job_ids: Iterable[str]) -> dict[str, list[str | None]]:
        """``[params, result, error]`` of each of ``job_ids``, in one round trip."""
        ids = list(job_ids)
        r: Any = self.redis

        async def read() -> list[Any]:
            async with r.pipeline(transaction=False) as p:
                for job in ids:
                    p.hmget(self.keys.job(job), ["params", "result", "error"])
                return list(await p.execute())

        return dict(zip(ids, await self._bounded(read(), "hmget"), strict=True))

    # -- a hub's presence and inbox (only a hub calls these, with ``hub_id`` set)
    async def hub_start(self) -> None:
        """List this hub as live, with no clients and an empty inbox."""
        await self._run(self.ops.hub("start", self.ops.hub_ttl))

    async def hub_alive(self) -> bool:
        """Extend this hub's listing. True if it had lapsed: the caller must list its
        clients again with :meth:`clients_here`."""
        relisted: int = await self._run(self.ops.hub("alive", self.ops.hub_ttl))
        return relisted > 0

    async def clients_here(self, client_ids: Iterable[str]) -> None:
        """These client ids now have a socket on this hub: route their jobs' events here."""
        await self._run(self.ops.hub("join", *client_ids))

    async def clients_gone(self, client_ids: Iterable[str]) -> None:
        """These client ids have no socket on this hub any more."""
        await self._run(self.ops.hub("leave", *client_ids))

    async def hub_stop(self) -> None:
        """Unlist this hub and drop its client list and inbox."""
        await self._run(self.ops.hub("stop"))

    async def read_inbox(
        self, last_id: str, count: int = 1000, block_ms: int = 1000
    ) -> list[Event]:
        """Events for this hub's sockets that other callers caused, after ``last_id``
        (``0-0`` after :meth:`hub_start`), waiting up to ``block_ms``."""
        return await self._xread(self.keys.inbox(self.hub_id), last_id, count, block_ms)


class RedisService(_Shell):
    """The queue engine, blocking flavour: the seed's API for scripts and notebooks.

    >>> svc = RedisService(host="localhost", port=6379, db=0)        # doctest: +SKIP
    >>> svc.add_job(job_id="j1", job_type="image_generation", priority=5,
    ...             params={"prompt": "a sunset"}, client_id="me")  # doctest: +SKIP
    >>> svc.get_job_status("j1")["status"]                           # doctest: +SKIP
    'queued'
    """

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        db: int | None = None,
        password: str | None = None,
        *,
        url: str | None = None,
        namespace: str | None = None,
        limits: EngineLimits | None = None,
        client: redis.Redis | None = None,
    ) -> None:
        if client is None:
            url, extra = _kwargs(url, host, port, db, password)
            client = connect_sync(url, **extra)
        self.redis = client
        self._setup(client, limits, namespace)

    def _run(self, op: _Op[T]) -> T:
        try:
            reply = self._scripts[op.script](**self._call(op))
        except ResponseError as exc:
            raise _engine_error(exc) from None
        return self._reply(op, reply)

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> RedisService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ping(self) -> bool:
        return bool(self.redis.ping())

    def add_job(
        self,
        job_id: str | None = None,
        job_type: str = "default",
        priority: int = 0,
        params: Mapping[str, Any] | None = None,
        client_id: str | None = None,
        max_attempts: int | None = None,
    ) -> SubmitResult:
        """Submit a job (the seed's name). Workers connected to a hub get it pushed."""
        return self._run(
            self.ops.submit(
                job_type,
                priority,
                params,
                job_id=job_id,
                client_id=client_id,
                max_attempts=max_attempts,
            )
        )

    def get_job(self, job_id: str) -> JobModel | None:
        return self._run(self.ops.status(job_id))

    def get_job_status(self, job_id: str) -> dict[str, Any] | None:
        """The job as a dict (status, position, timestamps, ...) or None if unknown."""
        job = self.get_job(job_id)
        return job.to_dict() if job else None

    def cancel_job(self, job_id: str, client_id: str | None = None) -> CancelResult:
        return self._run(self.ops.cancel(job_id, client_id))

    def get_stats(self, window_s: float = 60.0) -> dict[str, Any]:
        return self._run(self.ops.stats(window_s))

    # -- bulk reads for monitors (pipelined; no KEYS, no SCAN)
    def job_ids(self, status: str, limit: int = 1000) -> list[str]:
        """Ids of jobs in ``status``: ``queued`` (queue order), ``active`` (assigned,
        running, retrying), or a finished status (newest first)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "limit: expected a positive integer")
        k = self.keys
        r: Any = self.redis
        if status == "queued":
            types = sorted(r.smembers(k.types))
            with r.pipeline(transaction=False) as p:
                for jt in types:
                    p.zrange(k.queue(jt), 0, limit - 1, withscores=True)
                per_type = p.execute()
            merged = sorted(
                ((score, jid) for rows in per_type for jid, score in rows), key=lambda x: x[0]
            )
            return [jid for _, jid in merged[:limit]]
        if status == "active":
            with r.pipeline(transaction=False) as p:
                p.zrange(k.leases, 0, limit - 1)
                p.zrange(k.delayed, 0, limit - 1)
                running, delayed = p.execute()
            return [*running, *delayed][:limit]
        if status in {s.value for s in TERMINAL_STATUSES}:
            return list(r.zrevrange(k.done(status), 0, limit - 1))
        raise ProtocolError(
            ErrorCode.INVALID_FIELD,
            "status: expected queued, active, completed, failed or cancelled",
        )

    def get_jobs(self, job_ids: Sequence[str]) -> list[JobModel]:
        """The jobs that still exist among ``job_ids``, in order (one pipeline)."""
        with self.redis.pipeline(transaction=False) as p:
            for jid in job_ids:
                p.hgetall(self.keys.job(jid))
            rows = p.execute()
        return [JobModel.from_redis(jid, h) for jid, h in zip(job_ids, rows, strict=True) if h]

    def get_worker(self, worker_id: str) -> WorkerModel | None:
        r: Any = self.redis
        h = r.hgetall(self.keys.worker(validate_worker_id(worker_id)))
        return WorkerModel.from_redis(h) if h else None

    def get_workers(self) -> list[WorkerModel]:
        """Every live worker (one ZRANGE and one pipeline)."""
        r: Any = self.redis
        ids = r.zrange(self.keys.workers, 0, -1)
        with r.pipeline(transaction=False) as p:
            for w in sorted(ids):
                p.hgetall(self.keys.worker(w))
            rows = _hash_rows(p.execute())
        return [WorkerModel.from_redis(h) for h in rows]

    def events_since(self, since: str = "0", limit: int = 10_000) -> list[Event]:
        start = "-" if since in ("0", "") else f"({since}"
        r: Any = self.redis
        return [_event(e) for e in r.xrange(self.keys.events, start, "+", limit)]
