"""Request handlers: one per inbound message type.

Each handler is a thin call into :class:`AsyncRedisService` that replies with a
result or a typed ``error`` (built by :mod:`.protocol`). Events the call produced
are routed by the hub's :class:`~redisq_server.routing.EventRouter` before the
handler yields.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from redis.exceptions import RedisError

from . import protocol
from .config import Settings
from .connections import Connection, Registry
from .models import TERMINAL_STATUSES, JobModel, JobStatus
from .operations import FinishResult, new_job_id
from .protocol import CloseCode, ErrorCode, Message, MessageType, ProtocolError, Role
from .redis_service import AsyncRedisService
from .routing import EventRouter, final_message

__all__ = ["IN_FLIGHT_BYTES", "IN_FLIGHT_PER_SOCKET", "Routes"]

log = logging.getLogger("redisq.hub")

#: worker requests after which the worker moves on whatever the reply says
_WORKER_COMMITS = frozenset(
    {MessageType.REGISTER_WORKER, MessageType.COMPLETE_JOB, MessageType.FAIL_JOB}
)

#: requests that need no answer to the socket's earlier ones before they start
_OVERLAP_ANY = frozenset({MessageType.SUBMIT_JOB})
#: the same, when the engine runs a socket's calls in order (one call per request).
#: Each of these is answered with a small frame: a request whose reply may be large
#: (a job's status holds its result) waits, so one socket cannot make the hub hold
#: many large replies at once.
_OVERLAP_ORDERED = _OVERLAP_ANY | {
    MessageType.COMPLETE_JOB,
    MessageType.FAIL_JOB,
    MessageType.UPDATE_JOB_PROGRESS,
    MessageType.WORKER_HEARTBEAT,
}

#: a socket's requests in flight at once; beyond it the hub reads no more of it
IN_FLIGHT_PER_SOCKET: Final = 64
#: the most bytes of a socket's frames in flight at once (a first frame may be larger)
IN_FLIGHT_BYTES: Final = 1 << 20

#: event fields that describe hub internals, not the client's job
_PRIVATE_EVENT_FIELDS = frozenset({"hub", "session", "n"})

Handler = Callable[[Connection, Message], Awaitable[None]]


def _unanswered(conn: Connection, before: int | None) -> dict[int, asyncio.Task[None]]:
    """The requests of ``conn`` in flight and not yet answered (a done task has sent
    its reply, though its entry leaves ``in_flight`` a turn later), by number;
    only those numbered below ``before``, if given."""
    return {
        k: t for k, t in conn.in_flight.items() if (before is None or k < before) and not t.done()
    }


class Routes:
    """Dispatches one socket's frames to their handlers (see :meth:`handle`)."""

    def __init__(
        self,
        service: AsyncRedisService,
        registry: Registry,
        events: EventRouter,
        settings: Settings,
        hub_id: str,
    ) -> None:
        self.svc = service
        self.registry = registry
        self.events = events
        self.settings = settings
        self.hub_id = hub_id
        # worker id -> the session of its socket that is gone with a loss that must
        # not count against its job (a close for this hub's Redis trouble, a
        # shutdown), until Redis has been told (see uncounted_loss)
        self._untold: dict[str, str] = {}
        #: requests a socket may have in flight together (see :meth:`handle`): a
        #: submit always (each is its own job); with an engine that keeps the order
        #: of calls, also a worker's reports and heartbeats
        self.overlapping = _OVERLAP_ORDERED if service.in_order else _OVERLAP_ANY
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
        """The first frame for ``conn``."""
        return protocol.welcome(conn.role, conn.id, self.hub_id, self.settings.max_frame_bytes)

    async def handle(self, conn: Connection, raw: str | bytes) -> None:
        """Take one inbound frame; every failure becomes an ``error`` reply on this
        socket and nothing else. Returns when the socket may read its next frame.

        A request of a kind in :attr:`overlapping` is started and this returns at
        once, so the socket's next frame is read (and its Redis call joins the same
        pipeline) while this one's call is in flight: what lets one client's
        submits, or a prefetching worker's reports, fill a pipeline. The engine runs
        calls in the order they are made, and each such request makes its call
        before it first waits, so they reach Redis in the socket's order, and their
        replies leave in it. Any other request (and a frame that does not decode)
        first waits until every earlier one of the socket is answered. At most
        :data:`IN_FLIGHT_PER_SOCKET` requests, of :data:`IN_FLIGHT_BYTES` in all, are in
        flight; then reading waits."""
        try:
            msg = protocol.decode_message(raw, conn.role)
        except ProtocolError as err:
            await self.settled(conn)
            conn.send(err.to_message())
            return
        if msg.type not in self.overlapping:
            await self.settled(conn)
            await self._answer(conn, msg)
            return
        size = len(raw)
        while conn.in_flight and (
            len(conn.in_flight) >= IN_FLIGHT_PER_SOCKET
            or conn.in_flight_bytes + size > IN_FLIGHT_BYTES
        ):
            await asyncio.wait(conn.in_flight.values(), return_when=asyncio.FIRST_COMPLETED)
        conn.requests += 1
        n = conn.requests
        task = asyncio.create_task(self._answer(conn, msg, n))
        conn.in_flight[n] = task
        conn.in_flight_bytes += size

        def done(_: object) -> None:
            del conn.in_flight[n]
            conn.in_flight_bytes -= size

        task.add_done_callback(done)

    @staticmethod
    async def settled(conn: Connection, before: int | None = None) -> None:
        """Wait until every request of ``conn`` in flight (numbered below ``before``,
        if given) is answered. A cancelled caller does not cancel them. Returns at
        once, without a loop turn, when they are (a done task has sent its reply,
        though its entry leaves ``in_flight`` a turn later): a refusal sent then
        keeps its place before the replies of later requests answered in the same
        turn."""
        tasks = _unanswered(conn, before)
        if tasks:
            await asyncio.wait(tasks.values())

    async def _answer(self, conn: Connection, msg: Message, n: int | None = None) -> None:
        """Run ``msg``'s handler; a failure becomes an ``error`` reply, sent after the
        replies to the socket's requests before request number ``n`` (a request
        refused before it reaches Redis keeps its place in the order of replies)."""
        deferred: int | None = None  # the request this one's error reply waits behind
        try:
            await self.handlers[msg.type](conn, msg)
            self.events.flush_local()
        except ProtocolError as err:
            err.ref = msg.id if err.ref is None else err.ref
            deferred = self._reply_in_place(conn, n, err.to_message())
        except RedisError as exc:
            log.warning("%r: Redis error: %s", conn, exc)
            if msg.type in _WORKER_COMMITS:
                # The worker moves on whatever the reply; had its report not reached
                # Redis, this live socket would hold the job for ever (the sweep renews
                # its lease). Closing (instead of an `unavailable` reply) requeues the
                # job, now or by the reaper once Redis is back; the worker registers
                # afresh. Remembered now, not when the socket's end is handled: the
                # worker may be back before then.
                if conn.registered:
                    self.uncounted_loss(conn.id, conn.session)
                conn.close(CloseCode.UNAVAILABLE, "the queue is unavailable; reconnect")
            else:
                message = protocol.error(ErrorCode.UNAVAILABLE, "the queue is unavailable", msg.id)
                deferred = self._reply_in_place(conn, n, message)
        except Exception:
            log.exception("%r: handler failed", conn)
            message = protocol.error(ErrorCode.INTERNAL, "internal error", msg.id)
            deferred = self._reply_in_place(conn, n, message)
        finally:
            # the error replies of later requests that waited behind this one go now,
            # in this turn, before any later request's reply; or, if this one's own
            # reply waits behind an earlier request, they wait there after it
            waiting = conn.after.pop(n, []) if n is not None else []
            if deferred is not None:
                conn.after[deferred].extend(waiting)
            else:
                for m in waiting:
                    conn.send(m)

    @staticmethod
    def _reply_in_place(conn: Connection, n: int | None, message: dict[str, Any]) -> int | None:
        """Send ``message``, the error reply of request number ``n``, after the
        replies of the socket's earlier requests: at once when they are answered,
        else right after the latest of them is (``_answer``'s ``finally``), in the same
        loop turn, so that no later request answered in that turn overtakes it.
        Returns the number of the request it waits behind, or None if sent."""
        if n is not None:
            earlier = _unanswered(conn, n)
            if earlier:
                k = max(earlier)
                conn.after.setdefault(k, []).append(message)
                return k
        conn.send(message)
        return None

    def closed_for_outage(self, conn: Connection) -> bool:
        """Whether this hub closed worker ``conn`` because Redis failed its report,
        and Redis has not heard of that loss yet (the hub asks when the socket is
        gone). Such a loss is not the worker's: it had finished its job (or had none
        yet), so it does not count against the job it held. (Once Redis has heard of
        it, that session is no longer the worker's, and a loss told again changes
        nothing.)"""
        return self._untold.get(conn.id) == conn.session

    def uncounted_loss(self, worker_id: str, session: str) -> None:
        """Remember that ``worker_id``'s socket of ``session`` is gone with a loss that
        must not count against its job (a shutdown, or a close for this hub's Redis
        trouble). The caller then tells Redis (``worker_lost`` with ``count=False``)
        and calls :meth:`told` if that worked; if it failed (Redis is away), the loss
        is told again before that worker registers here and by :meth:`tell_losses`,
        so neither its registration nor this hub's reaper counts it."""
        self._untold[worker_id] = session

    def told(self, worker_id: str, session: str) -> None:
        """Redis now knows of the uncounted loss of ``worker_id``'s ``session``."""
        if self._untold.get(worker_id) == session:
            del self._untold[worker_id]

    async def tell_losses(self, worker_id: str | None = None) -> None:
        """Tell Redis the remembered uncounted losses: each requeues the job that
        socket held without counting it, or does nothing if that session is no longer
        the worker's. Only ``worker_id``'s, if given (before it registers): a Redis
        error then propagates, as the registration would meet it too. Otherwise all
        of them (the sweep, the reaper): at the first Redis error the rest wait for
        the next try, logged, nothing raised. Whatever was not told is kept, but a
        loss the engine refused (which telling again cannot change) is dropped."""
        for w in [worker_id] if worker_id is not None else list(self._untold):
            session = self._untold.get(w)
            if session is None:
                continue
            try:
                await self.svc.worker_lost(w, session, count=False)
            except ProtocolError as exc:
                log.warning("the engine refused %s's uncounted loss: %s", w, exc)
            except RedisError as exc:
                if worker_id is not None:
                    raise
                log.warning(
                    "could not tell Redis of %d uncounted losses yet: %s", len(self._untold), exc
                )
                return
            self.told(w, session)

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
                delay_s=f.get("delay_s"),
                run_at=f.get("run_at"),
            )
            # the same job sent again by its client (after `unavailable`, or from a
            # new socket) is answered with its stored state; if it has finished, the
            # final frame follows the reply, as for subscribe_job
            finished = None
            if result.status in TERMINAL_STATUSES:
                finished = await self.svc.get_job(job_id)
        except BaseException:
            self.registry.unsubscribe(conn, job_id)
            raise
        if result.status is JobStatus.SCHEDULED:
            self.events.retry_scheduled()  # the promoter learns when it is due
        if result.assignment is not None:
            self.events.push(result.assignment)  # first: the GPU waits, the client only learns
        with conn.batch():  # the reply and the job's first update in one write
            conn.send(protocol.job_accepted(msg.id, job_id, result.status.value, result.position))
            self.events.flush_local()
            if result.status in TERMINAL_STATUSES:
                self.registry.unsubscribe(conn, job_id)
                final = final_message(finished) if finished is not None else None
                if final is not None:
                    conn.send(final)
            else:
                conn.release_pending(job_id, keep=True)

    async def get_job_status(self, conn: Connection, msg: Message) -> None:
        job = await self._own_job(conn, msg.fields["job_id"])
        conn.send(protocol.job_status(msg.id, job.to_dict()))

    async def subscribe_job(self, conn: Connection, msg: Message) -> None:
        job_id = msg.fields["job_id"]
        self._check_room(conn)
        # a socket that follows the job already (its own submit, an earlier
        # subscribe) keeps that subscription, whatever this request meets
        fresh = job_id not in conn.jobs
        if fresh:
            self.registry.subscribe(conn, job_id, pending=True)
        try:
            job = await self._own_job(conn, job_id)
        except BaseException:
            if fresh:
                self.registry.unsubscribe(conn, job_id)
            raise
        conn.send(protocol.subscribed_job(msg.id, job_id, job.status.value))
        final = final_message(job)
        if final is not None:
            if job_id in conn.jobs:  # not told yet (a subscription it had may have been)
                self.registry.unsubscribe(conn, job_id)
                conn.send(final)
        elif fresh:
            conn.release_pending(job_id, keep=True)

    async def cancel_job(self, conn: Connection, msg: Message) -> None:
        job_id = msg.fields["job_id"]
        try:
            await self.svc.cancel_job(job_id, client_id=conn.id)
        except RedisError:
            self.events.recheck(job_id)  # it may be cancelled once Redis catches up
            raise
        job = await self._own_job(conn, job_id)
        conn.send(protocol.job_status(msg.id, job.to_dict()))

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
        return protocol.stats(ref, stats)

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
        conn.send(protocol.events(msg.id, frames, last, more))

    # ------------------------------------------------------------- workers

    def _require_registered(self, conn: Connection) -> None:
        if not conn.registered:
            raise ProtocolError(ErrorCode.NOT_ALLOWED, "send register_worker first")

    async def register_worker(self, conn: Connection, msg: Message) -> None:
        if conn.registered:
            raise ProtocolError(ErrorCode.NOT_ALLOWED, "this socket is already registered")
        old = self.registry.add_worker(conn)
        if old is not None:
            old.close(CloseCode.REPLACED, "replaced by a newer connection for this worker id")
        conn.job_types = msg.fields["job_types"]
        try:
            # an earlier socket of this worker gone without Redis hearing of it: its
            # job is requeued first, uncounted (the registration would count it)
            await self.tell_losses(conn.id)
            closed = msg.fields["closed_session"]
            if closed is not None:  # the same, for a socket its hub (maybe another)
                # closed for an outage, as the worker says (docs/protocol.md)
                await self.svc.worker_lost(conn.id, closed, count=False)
            assignment = await self.svc.register_worker(
                conn.id,
                conn.job_types,
                msg.fields["capabilities"],
                hub_id=self.hub_id,
                session=conn.session,
                prefetch=msg.fields["prefetch"],
            )
        except BaseException:
            self.registry.remove_worker(conn)
            raise
        if assignment is not None:
            self.events.push(assignment)  # held in conn.early until the reply below is sent
        lease_s = self.svc.limits.lease_s
        conn.send(
            protocol.worker_registered(
                msg.id, conn.id, conn.job_types, lease_s, bool(conn.early), conn.session
            )
        )
        conn.registered = True
        for frame in conn.early:
            conn.send(frame)
        conn.early.clear()

    def _ack(self, conn: Connection, msg: Message, **extra: Any) -> None:
        if msg.id is not None:
            conn.send(protocol.ack(msg.id, **extra))

    async def worker_heartbeat(self, conn: Connection, msg: Message) -> None:
        self._require_registered(conn)
        if await self.svc.touch([(conn.id, conn.session)]):
            conn.close(CloseCode.SESSION_EXPIRED, "worker record expired; reconnect")
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
        done = msg.fields["job_id"]
        conn.delivered = [d for d in conn.delivered if d[0] != done]
        # has_next tells the worker whether a job_assigned follows right away (so a
        # burst-mode worker knows, without waiting, that its queue is empty)
        with conn.batch():  # the ack and the next job(s) in one write
            self._ack(
                conn,
                msg,
                job_id=done,
                outcome=res.outcome,
                has_next=res.next is not None or res.ahead is not None,
            )
            for a in (res.next, res.ahead):
                if a is not None:
                    self.events.push(a)

    async def complete_job(self, conn: Connection, msg: Message) -> None:
        self._require_registered(conn)
        f = msg.fields
        try:
            res = await self.svc.complete_job(f["job_id"], f["attempt"], conn.id, f["result"])
        except RedisError:  # it may complete once Redis catches up: its client must hear
            self.events.recheck(f["job_id"], f["attempt"], conn.id)
            raise
        if res.outcome == "completed":  # first: the result is what its client waits for
            self.events.tell_final(
                "completed", f["job_id"], f["attempt"], conn.id, result=f["result"]
            )
        self._finished(conn, msg, res)

    async def fail_job(self, conn: Connection, msg: Message) -> None:
        self._require_registered(conn)
        f = msg.fields
        try:
            res = await self.svc.fail_job(
                f["job_id"], f["attempt"], conn.id, f["error"], f["retryable"]
            )
        except RedisError:  # as in complete_job
            self.events.recheck(f["job_id"], f["attempt"], conn.id)
            raise
        if res.outcome == "retrying":
            self.events.retry_scheduled()  # the promoter moves it back when it is due
        if res.outcome == "failed":
            self.events.tell_final("failed", f["job_id"], f["attempt"], conn.id, error=f["error"])
        self._finished(conn, msg, res)

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
        self.events.tap_from(last)
        conn.send(protocol.subscribed_events(msg.id, last))
