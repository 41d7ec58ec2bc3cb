"""Message dispatch: one handler per inbound message type, and event routing.

Each handler is a thin call into :class:`AsyncRedisService` that replies with a
result or a typed ``error``. :meth:`Router.route_events` delivers the engine events
meant for this hub (those its own calls produced, and its inbox) to its sockets: the
job's subscribed clients and the worker an assignment or cancel concerns.
:meth:`Router.tap_events` gives monitors that asked for events the whole stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.exceptions import RedisError

from .config import Settings
from .connections import Connection, Registry
from .models import (
    PROTOCOL_VERSION,
    TERMINAL_STATUSES,
    ErrorCode,
    JobModel,
    Message,
    MessageType,
    ProtocolError,
    Role,
    decode_message,
    encode,
    error_message,
)
from .redis_service import Assignment, AsyncRedisService, Event, FinishResult, new_job_id

__all__ = ["CLOSE_SESSION_EXPIRED", "CLOSE_UNAVAILABLE", "Router"]

log = logging.getLogger("redisq.hub")

CLOSE_SESSION_EXPIRED = 4001  # the worker's record was reaped; it must reconnect
CLOSE_UNAVAILABLE = 1011  # a worker's report or registration met a Redis outage

#: worker requests after which the worker moves on whatever the reply says
_WORKER_COMMITS = frozenset(
    {MessageType.REGISTER_WORKER, MessageType.COMPLETE_JOB, MessageType.FAIL_JOB}
)

#: event fields that describe hub internals, not the client's job
_PRIVATE_EVENT_FIELDS = frozenset({"hub", "session", "n"})

Handler = Callable[[Connection, Message], Awaitable[None]]


def _status_message(job: JobModel, ref: Any) -> dict[str, Any]:
    d = job.to_dict()
    d.pop("params", None)
    return {"type": MessageType.JOB_STATUS.value, "ref": ref, **d}


def _final_message(job: JobModel) -> dict[str, Any] | None:
    """The frame a follower gets for a job that has already finished (the same as
    the live one), or None if it has not finished."""
    if job.status not in TERMINAL_STATUSES:
        return None
    f = {
        "job": job.job_id,
        "attempt": str(job.attempt),
        "worker": job.worker_id or "",
        "status": job.status.value,
    }
    return client_frame(job.status.value, job.job_id, f, job.result, job.error)


class Router:
    """Dispatches one socket's frames and this hub's share of the event stream."""

    def __init__(
        self, service: AsyncRedisService, registry: Registry, settings: Settings, hub_id: str
    ) -> None:
        self.svc = service
        self.registry = registry
        self.settings = settings
        self.hub_id = hub_id
        self.retry_due = asyncio.Event()  # set when a retry is scheduled
        # events this hub's own calls produced (AsyncRedisService.on_events), in
        # order; routed by flush_local, or by the hub's local task (run_local)
        self._local: deque[list[Event]] = deque()
        self._local_ready = asyncio.Event()
        self._local_busy = False  # run_local is routing a batch (reading from Redis)
        # the monitors' tap: where it reads the stream from, and its wake-up
        self.tap_cursor: str | None = None
        self.tap_wanted = asyncio.Event()
        self.handlers: dict[MessageType, Handler] = {
            MessageType.SUBMIT_JOB: self.submit_job,
            MessageType.GET_JOB_STATUS: self.get_job_status,
            MessageType.SUBSCRIBE_JOB: self.subscribe_job,
            MessageType.CANCEL_JOB: self.cancel_job,
            MessageType.GET_STATS: self.get_stats,
            MessageType.GET_EVENTS: self.get_events,
            MessageType.REGISTER_WORKER: self.register_worker,
            MessageType.WORKER_HEARTBEAT: self.worker_heartbeat,
            MessageType.UPDATE_JOB_PROGRESS: self.update_progress,
            MessageType.COMPLETE_JOB: self.complete_job,
            MessageType.FAIL_JOB: self.fail_job,
            MessageType.SUBSCRIBE_STATS: self.subscribe_stats,
            MessageType.SUBSCRIBE_EVENTS: self.subscribe_events,
        }

    def welcome(self, conn: Connection) -> dict[str, Any]:
        return {
            "type": MessageType.WELCOME.value,
            "protocol": PROTOCOL_VERSION,
            "role": conn.role.value,
            "id": conn.id,
            "hub": self.hub_id,
            "max_frame_bytes": self.settings.max_frame_bytes,
        }

    async def handle(self, conn: Connection, raw: str | bytes) -> None:
        """Validate and dispatch one inbound frame; every failure becomes an ``error``
        reply on this socket and nothing else."""
        ref = None
        kind: MessageType | None = None
        try:
            msg = decode_message(raw, conn.role)
            ref, kind = msg.id, msg.type
            await self.handlers[msg.type](conn, msg)
            self.flush_local()
        except ProtocolError as err:
            err.ref = ref if err.ref is None else err.ref
            conn.send(err.to_message())
        except RedisError as exc:
            log.warning("%r: Redis error: %s", conn, exc)
            if kind in _WORKER_COMMITS:
                # The worker moves on whatever the reply; had its report not reached
                # Redis, this live socket would hold the job for ever (the sweep renews
                # its lease). Closing (instead of an `unavailable` reply) requeues the
                # job, now or by the reaper once Redis is back; the worker registers
                # afresh.
                conn.close(CLOSE_UNAVAILABLE, "the queue is unavailable; reconnect")
            else:
                conn.send(error_message(ErrorCode.UNAVAILABLE, "the queue is unavailable", ref))
        except Exception:
            log.exception("%r: handler failed", conn)
            conn.send(error_message(ErrorCode.INTERNAL, "internal error", ref))

    # ------------------------------------------------------------- clients

    async def _own_job(self, conn: Connection, job_id: str) -> JobModel:
        job = await self.svc.get_job(job_id)
        if job is None or (conn.role is Role.CLIENT and job.client_id != conn.id):
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no job {job_id} for this client")
        return job

    def _check_room(self, conn: Connection) -> None:
        if len(conn.jobs) >= self.settings.max_subscriptions:
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"this socket follows {len(conn.jobs)} unfinished jobs, the limit; "
                "wait for some to finish or open another socket",
            )

    async def submit_job(self, conn: Connection, msg: Message) -> None:
        f = msg.fields
        self._check_room(conn)
        job_id = f["job_id"] or new_job_id()
        if job_id in conn.jobs:
            raise ProtocolError(ErrorCode.DUPLICATE, f"job {job_id} already exists")
        self.registry.subscribe(conn, job_id, pending=True)
        try:
            result = await self.svc.submit_job(
                f["job_type"],
                f["priority"],
                f["params"],
                job_id=job_id,
                client_id=conn.id,
                max_attempts=f["max_attempts"],
            )
        except BaseException:
            self.registry.unsubscribe(conn, job_id)
            raise
        if result.assignment is not None:
            self.push(result.assignment)  # first: the GPU waits, the client only learns
        with conn.batch():  # the reply and the job's first update in one write
            conn.send(
                {
                    "type": MessageType.JOB_ACCEPTED.value,
                    "ref": msg.id,
                    "job_id": job_id,
                    "status": result.status.value,
                    "position": result.position,
                }
            )
            self.flush_local()
            conn.release_pending(job_id, keep=True)

    async def get_job_status(self, conn: Connection, msg: Message) -> None:
        job = await self._own_job(conn, msg.fields["job_id"])
        conn.send(_status_message(job, msg.id))

    async def subscribe_job(self, conn: Connection, msg: Message) -> None:
        job_id = msg.fields["job_id"]
        self._check_room(conn)
        self.registry.subscribe(conn, job_id, pending=True)
        try:
            job = await self._own_job(conn, job_id)
        except BaseException:
            self.registry.unsubscribe(conn, job_id)
            raise
        conn.send(
            {
                "type": MessageType.SUBSCRIBED.value,
                "ref": msg.id,
                "job_id": job_id,
                "status": job.status.value,
            }
        )
        final = _final_message(job)
        if final is not None:
            self.registry.unsubscribe(conn, job_id)
            conn.send(final)
        else:
            conn.release_pending(job_id, keep=True)

    async def cancel_job(self, conn: Connection, msg: Message) -> None:
        job_id = msg.fields["job_id"]
        await self.svc.cancel_job(job_id, client_id=conn.id)
        job = await self._own_job(conn, job_id)
        conn.send(_status_message(job, msg.id))

    async def get_stats(self, conn: Connection, msg: Message) -> None:
        conn.send(await self._stats(msg.id))

    async def _stats(self, ref: Any = None) -> dict[str, Any]:
        stats = await self.svc.get_stats()
        r = self.registry
        stats["hub"] = {
            "id": self.hub_id,
            "clients": sum(len(c) for c in r.clients.values()),
            "workers": len(r.workers),
            "monitors": len(r.monitors),
        }
        return {"type": MessageType.STATS.value, "ref": ref, **stats}

    async def get_events(self, conn: Connection, msg: Message) -> None:
        since, limit = msg.fields["since"], msg.fields["limit"]
        events = await self.svc.events_since(since, limit)
        last = events[-1].id if events else since
        more = len(events) == limit
        frames = [e.to_message() for e in events]
        if conn.role is Role.CLIENT:
            frames = [
                {k: v for k, v in m.items() if k not in _PRIVATE_EVENT_FIELDS}
                for m in frames
                if m.get("client") == conn.id
            ]
        conn.send(
            {
                "type": MessageType.EVENTS.value,
                "ref": msg.id,
                "events": frames,
                "last_id": last,
                "more": more,
            }
        )

    # ------------------------------------------------------------- workers

    def _require_registered(self, conn: Connection) -> None:
        if not conn.registered:
            raise ProtocolError(ErrorCode.NOT_ALLOWED, "send register_worker first")

    async def register_worker(self, conn: Connection, msg: Message) -> None:
        if conn.registered:
            raise ProtocolError(ErrorCode.NOT_ALLOWED, "this socket is already registered")
        old = self.registry.add_worker(conn)
        if old is not None:
            old.close(4000, "replaced by a newer connection for this worker id")
        conn.job_types = msg.fields["job_types"]
        try:
            assignment = await self.svc.register_worker(
                conn.id,
                conn.job_types,
                msg.fields["capabilities"],
                hub_id=self.hub_id,
                session=conn.session,
            )
        except BaseException:
            self.registry.remove_worker(conn)
            raise
        if assignment is not None:
            self.push(assignment)  # held in conn.early until the reply below is sent
        conn.send(
            {
                "type": MessageType.WORKER_REGISTERED.value,
                "ref": msg.id,
                "worker_id": conn.id,
                "job_types": conn.job_types,
                "lease_s": self.svc.limits.lease_s,
                "has_next": bool(conn.early),
            }
        )
        conn.registered = True
        for frame in conn.early:
            conn.send(frame)
        conn.early.clear()

    def _ack(self, conn: Connection, msg: Message, **extra: Any) -> None:
        if msg.id is not None:
            conn.send({"type": MessageType.ACK.value, "ref": msg.id, **extra})

    async def worker_heartbeat(self, conn: Connection, msg: Message) -> None:
        self._require_registered(conn)
        if await self.svc.touch([(conn.id, conn.session)]):
            conn.close(CLOSE_SESSION_EXPIRED, "worker record expired; reconnect")
            return
        self._ack(conn, msg)

    async def update_progress(self, conn: Connection, msg: Message) -> None:
        self._require_registered(conn)
        f = msg.fields
        await self.svc.update_progress(
            f["job_id"], f["attempt"], conn.id, f["progress"], f["message"]
        )
        self._ack(conn, msg, job_id=f["job_id"])

    def _finished(self, conn: Connection, msg: Message, res: FinishResult) -> None:
        conn.delivered = None
        # has_next tells the worker whether a job_assigned follows right away (so a
        # burst-mode worker knows, without waiting, that its queue is empty)
        with conn.batch():  # the ack and the next job in one write
            self._ack(
                conn,
                msg,
                job_id=msg.fields["job_id"],
                outcome=res.outcome,
                has_next=res.next is not None,
            )
            if res.next is not None:
                self.push(res.next)

    async def complete_job(self, conn: Connection, msg: Message) -> None:
        self._require_registered(conn)
        f = msg.fields
        res = await self.svc.complete_job(f["job_id"], f["attempt"], conn.id, f["result"])
        if res.outcome == "completed":  # first: the result is what its client waits for
            self._tell_final("completed", f["job_id"], f["attempt"], conn.id, result=f["result"])
        self._finished(conn, msg, res)

    async def fail_job(self, conn: Connection, msg: Message) -> None:
        self._require_registered(conn)
        f = msg.fields
        res = await self.svc.fail_job(
            f["job_id"], f["attempt"], conn.id, f["error"], f["retryable"]
        )
        if res.outcome == "retrying":
            self.retry_due.set()  # this hub's promoter moves it back when it is due
        if res.outcome == "failed":
            self._tell_final("failed", f["job_id"], f["attempt"], conn.id, error=f["error"])
        self._finished(conn, msg, res)

    def _tell_final(
        self, name: str, job: str, attempt: int, worker: str, result: Any = None, error: str = ""
    ) -> None:
        """Tell this hub's followers of ``job`` its outcome now, without waiting for the
        event stream, and end their subscriptions (so the stream's copy of the same
        event finds no one here to tell again)."""
        subs = self.registry.job_subs.get(job)
        if not subs:
            return
        fields = {"job": job, "attempt": str(attempt), "worker": worker}
        message = client_frame(name, job, fields, result, error or None)
        if message is not None:
            for c in list(subs):
                c.deliver(job, message)
        self.registry.drop_job(job)

    def push(self, a: Assignment) -> bool:
        """Deliver ``job_assigned`` if the worker's current socket is on this hub.
        Each assignment is pushed once, however many paths report it, and never
        after a newer one (assignment numbers only grow)."""
        conn = self.registry.workers.get(a.worker_id)
        if conn is None or conn.session != a.session or a.n <= conn.delivered_n:
            return False
        conn.delivered = (a.job_id, a.attempt)
        conn.delivered_n = a.n
        if not conn.registered:  # its worker_registered reply has not been sent yet
            conn.early.append(a.to_message())
            return True
        return conn.send(a.to_message())

    # ------------------------------------------------------------ monitors

    async def subscribe_stats(self, conn: Connection, msg: Message) -> None:
        if conn.stats_task is not None:
            conn.stats_task.cancel()
        interval = msg.fields["interval_ms"] / 1000
        conn.send(await self._stats(msg.id))
        conn.stats_task = asyncio.create_task(self._stats_loop(conn, interval))

    async def _stats_loop(self, conn: Connection, interval: float) -> None:
        while not conn.closing:
            await asyncio.sleep(interval)
            try:
                conn.send(await self._stats())
            except RedisError as exc:
                log.warning("stats for %r: %s", conn, exc)

    async def subscribe_events(self, conn: Connection, msg: Message) -> None:
        last = await self.svc.last_event_id()
        conn.events = True
        if self.tap_cursor is None:  # the tap is idle: it starts here
            self.tap_cursor = last
        self.tap_wanted.set()
        conn.send(
            {
                "type": MessageType.SUBSCRIBED.value,
                "ref": msg.id,
                "events": True,
                "last_id": last,
            }
        )

    # -------------------------------------------------------------- events

    def local_events(self, events: list[Event]) -> None:
        """Take the events a call of this hub produced for its sockets (the service's
        ``on_events``). They are routed in order, by :meth:`flush_local` once the
        request that made the call is answered, else by :meth:`run_local`."""
        self._local.append(events)
        # a request handler flushes them before it yields; only what it leaves (and
        # what background calls produce) needs the local task, woken after this turn
        asyncio.get_running_loop().call_soon(self._kick_local)

    def _kick_local(self) -> None:
        if self._local:
            self._local_ready.set()

    def flush_local(self) -> None:
        """Route the waiting local events now, up to the first batch that must read
        from Redis (that one and the rest are left to :meth:`run_local`)."""
        while self._local and not self._local_busy:
            if self._needs_fetch(self._local[0]):
                return
            for ev in self._local.popleft():
                self._route_one(ev, None)

    async def run_local(self) -> None:
        """Route the local events that :meth:`flush_local` left, in order; returns
        when none are left. The hub's local task calls it in a loop."""
        if not self._local:
            await self._local_ready.wait()
        self._local_ready.clear()
        while self._local:
            self._local_busy = True
            try:
                await self.route_events(self._local[0])
            finally:
                self._local.popleft()
                self._local_busy = False

    def tap_events(self, events: Sequence[Event]) -> None:
        """Give a batch of the whole event stream to the monitors that asked for it."""
        monitors = [m for m in self.registry.monitors if m.events]
        for ev in events:
            frame = encode(ev.to_message())
            for m in monitors:
                m.send_raw(frame)

    async def route_events(self, events: Sequence[Event]) -> None:
        """Deliver a batch of engine events to this hub's sockets, in order.

        Job fields that events do not carry (params for a push, a result) are read
        in one pipeline for the whole batch, and only for jobs someone here follows.
        """
        need = self._needs_fetch(events)
        fetched = await self.svc.job_payloads(need) if need else {}
        for ev in events:
            self._route_one(ev, fetched.get(ev.fields.get("job", "")))

    def _needs_fetch(self, events: Sequence[Event]) -> set[str]:
        """The jobs among ``events`` whose params (for a push) or result (for a
        follower) the events do not carry and must be read."""
        need: set[str] = set()
        subs = self.registry.job_subs
        for ev in events:
            f = ev.fields
            job = f.get("job", "")
            if (ev.name == "assigned" and "params" not in f and self._wants_push(f)) or (
                ev.name in ("completed", "failed") and "result" not in f and job in subs
            ):
                need.add(job)
        return need

    def _wants_push(self, f: dict[str, str]) -> bool:
        conn = self.registry.workers.get(f.get("worker", ""))
        return (
            conn is not None
            and conn.session == f.get("session")
            and int(f.get("n", 0)) > conn.delivered_n
        )

    def _route_one(self, ev: Event, row: list[Any] | None) -> None:
        """Route one event; ``row`` is the job's [params, result, error] if read."""
        f = ev.fields
        job = f.get("job")
        if job is None:
            return
        name = ev.name
        if name == "retrying":
            self.retry_due.set()
        if name == "assigned" and ("params" in f or row) and self._wants_push(f):
            params = f["params"] if "params" in f else row[0] if row else None
            self.push(
                Assignment(
                    job,
                    int(f["attempt"]),
                    f.get("jtype", ""),
                    int(f.get("priority", 0)),
                    _loads(params) or {},
                    f["worker"],
                    f.get("hub", ""),
                    f["session"],
                    int(f["n"]),
                )
            )
        elif name == "cancelled" and f.get("worker"):
            conn = self.registry.workers.get(f["worker"])
            if conn is not None and conn.delivered == (job, int(f.get("attempt", 0))):
                conn.send(
                    {
                        "type": MessageType.CANCEL_JOB.value,
                        "job_id": job,
                        "attempt": int(f["attempt"]),
                    }
                )
        subs = self.registry.job_subs.get(job)
        if not subs:
            return
        result = _loads(f["result"]) if "result" in f else _loads(row[1]) if row else None
        error = f.get("message") or (row[2] if row else None)
        message = client_frame(name, job, f, result, error)
        if message is None:
            return
        for conn in list(subs):
            conn.deliver(job, message)
        if name in _FINAL_EVENTS:
            self.registry.drop_job(job)


_FINAL_EVENTS = frozenset({"completed", "failed", "cancelled"})
_UPDATE_EVENTS = frozenset(
    {"assigned", "progress", "retrying", "requeued", "promoted", "cancelled"}
)


def client_frame(
    name: str, job: str, f: dict[str, str], result: Any = None, error: str | None = None
) -> dict[str, Any] | None:
    """The frame a follower of ``job`` gets for engine event ``name`` with fields ``f``
    (None: clients do not see that event). ``result`` and ``error`` are the job's,
    for ``completed`` and ``failed``."""
    if name == "completed":
        return {
            "type": MessageType.JOB_COMPLETED.value,
            "job_id": job,
            "result": result,
            "attempt": int(f.get("attempt", 0)),
            "worker_id": f.get("worker") or None,
        }
    if name == "failed":
        return {
            "type": MessageType.JOB_FAILED.value,
            "job_id": job,
            "error": error,
            "attempt": int(f.get("attempt", 0)),
        }
    if name not in _UPDATE_EVENTS:
        return None
    m: dict[str, Any] = {
        "type": MessageType.JOB_UPDATE.value,
        "job_id": job,
        "status": f.get("status"),
        "event": name,
    }
    for src, dst in (("worker", "worker_id"), ("message", "message")):
        if f.get(src):
            m[dst] = f[src]
    if "progress" in f:
        m["progress"] = float(f["progress"])
    if "attempt" in f:
        m["attempt"] = int(f["attempt"])
    return m


def _loads(raw: str | None) -> Any:
    return json.loads(raw) if raw else None
