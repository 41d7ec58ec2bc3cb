"""Event routing: the engine's events to this hub's sockets, and the loops that feed it.

Three sources, in order of latency:

- *local*: the events this hub's own calls produced, handed back with each
  script's reply (``AsyncRedisService.on_events``). A request handler routes them
  before it yields (:meth:`EventRouter.flush_local`); what needs a Redis read is
  left to the local loop. A job's final outcome from its worker's report is not
  among them: the handler tells it itself (:meth:`EventRouter.tell_final`).
- *inbox*: events other hubs' calls produced for this hub's sockets, read from
  ``{ns}:inbox:<hub>``.
- *tap*: the whole stream, read only while a monitor asked for events.

An event reaches the job's subscribed clients (``job_update``, ``job_completed``,
``job_failed``) and the worker an assignment or a cancel concerns. The router also
runs the retry promoter, which wakes when a retry is scheduled, and the recheck of
jobs whose report met a Redis failure (:meth:`EventRouter.recheck`): the events of
a call whose reply was lost are lost with it, so such a job is read again until its
followers here have heard how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import protocol
from .connections import Registry
from .models import TERMINAL_STATUSES, JobModel
from .operations import Assignment, Event, Op, event_id_key
from .protocol import EventName
from .redis_service import AsyncRedisService

__all__ = ["EventRouter", "final_message", "forever"]

log = logging.getLogger("redisq.hub")

#: a read that failed for these may succeed if made again (any other Redis error
#: would fail again: a batch it stops is skipped, not retried for ever)
_TRANSIENT: Final = (RedisConnectionError, RedisTimeoutError)

#: how long a job whose report met a Redis failure is read again, at most
RECHECK_FOR_S: Final = 60.0
#: how often it is read while its fate is unknown
RECHECK_EVERY_S: Final = 0.25


def final_message(job: JobModel) -> dict[str, Any] | None:
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
    return protocol.client_frame(job.status.value, job.job_id, f, job.result, job.error)


@dataclass
class _Unsure:
    """A job whose fate a failed call left unknown (see :meth:`EventRouter.recheck`)."""

    attempt: int | None  # the attempt the failed report was about, if any
    worker: str | None  # the worker that sent it
    until: float  # loop time after which it is given up


async def forever(
    name: str, step: Callable[[], Awaitable[Any]], pause: float, stopping: Callable[[], bool]
) -> None:
    """Run ``await step()`` then sleep ``pause`` until ``stopping()``; log and back off
    on errors. (redis-py may turn a cancellation into a connection error, so the
    loop also checks ``stopping`` and the task's own cancel request.)"""
    task = asyncio.current_task()
    while not stopping():
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if stopping() or (task is not None and task.cancelling()):
                return
            if isinstance(exc, RedisError | OSError):
                log.warning("%s: %s", name, exc)
            else:
                log.exception("%s failed", name)
            await asyncio.sleep(1.0)
        if pause:
            await asyncio.sleep(pause)


#: Per engine function, the events of its first run that this hub's sockets must
#: not miss when that run's reply was lost and its rerun answered without them
#: (:meth:`EventRouter.rerun`), and the field of the call's first argument: a
#: cancel's (the followers' final frame, the cancel_job for the worker running the
#: job), the assignment a submit made to an idle worker (pushed now, not at the next
#: lease renewal), and a lost worker's jobs requeued or failed for good (then the
#: assignment of each requeued one, if an idle worker took it at once).
REPLAYED: Final[dict[str, tuple[str, frozenset[str]]]] = {
    "cancel": ("job", frozenset({EventName.CANCELLED})),
    "submit": ("job", frozenset({EventName.ASSIGNED})),
    "lost": ("worker", frozenset({EventName.REQUEUED, EventName.FAILED})),
}


class EventRouter:
    """Delivers this hub's share of the event stream to its sockets.

    Call :meth:`start` once the hub serves and :meth:`stop` when it stops; the
    service's ``on_events`` must be :meth:`local_events`.
    """

    def __init__(self, service: AsyncRedisService, registry: Registry) -> None:
        self.svc = service
        self.registry = registry
        self._retry_due = asyncio.Event()  # set when a retry is scheduled
        # events this hub's own calls produced, in order; routed by flush_local, or
        # by the local loop (run_local)
        self._local: deque[list[Event]] = deque()
        self._local_ready = asyncio.Event()
        self._local_busy = False  # run_local is routing a batch (reading from Redis)
        # the monitors' tap: where it reads the stream from, and its wake-up
        self._tap_cursor: str | None = None
        self._tap_wanted = asyncio.Event()
        # jobs to read again after a call about them failed without a reply
        self._unsure: dict[str, _Unsure] = {}
        self._unsure_added = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._replays: set[asyncio.Task[None]] = set()  # rerun: reading lost events again

    # ------------------------------------------------------------- loops

    def start(self) -> None:
        """Start the inbox, local, tap, promoter and recheck loops."""
        self._tasks = [
            asyncio.create_task(self._loop("fan-in", self._fan_in_step()), name="fan-in"),
            asyncio.create_task(self._loop("local", self.run_local), name="local"),
            asyncio.create_task(self._loop("tap", self._tap_step), name="tap"),
            asyncio.create_task(self._loop("promoter", self._promote_step), name="promoter"),
            asyncio.create_task(self._loop("recheck", self._recheck_step), name="recheck"),
        ]

    async def stop(self) -> None:
        """Stop the loops (events not yet routed are dropped: their sockets are gone)."""
        self._stopping = True
        for task in [*self._tasks, *self._replays]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._replays, return_exceptions=True)

    async def _loop(self, name: str, step: Callable[[], Awaitable[Any]]) -> None:
        await forever(name, step, 0, lambda: self._stopping)

    def _fan_in_step(self) -> Callable[[], Awaitable[None]]:
        last = "0-0"  # hub_start emptied the inbox

        async def step() -> None:
            nonlocal last
            events = await self.svc.read_inbox(last, count=1000, block_ms=1000)
            if not events:
                return
            try:
                await self.route_events(events)
            except _TRANSIENT:
                # the batch's payloads could not be read (Redis gone or slow for a
                # moment), so nothing of it was routed: it is read again on the next
                # step (a skipped batch lost its clients' final frames)
                raise
            except BaseException:
                last = events[-1].id
                raise
            last = events[-1].id

        return step

    async def _tap_step(self) -> None:
        if not any(m.events for m in self.registry.monitors):
            self._tap_cursor = None
            self._tap_wanted.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tap_wanted.wait(), 1.0)
            return
        if self._tap_cursor is None:
            self._tap_cursor = await self.svc.last_event_id()
        events = await self.svc.read_events(self._tap_cursor, count=1000, block_ms=1000)
        if events:
            self._tap_cursor = events[-1].id
            self.tap_events(events)

    async def _promote_step(self) -> None:
        _, wait_s, assignments = await self.svc.promote()
        for a in assignments:
            self.push(a)
        self._retry_due.clear()
        timeout = 1.0 if wait_s is None else min(1.0, wait_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._retry_due.wait(), timeout)

    def recheck(self, job: str, attempt: int | None = None, worker: str | None = None) -> None:
        """A call about ``job`` failed without a reply (Redis stalled past the call
        timeout, or the connection dropped): it may have run, or still run once
        Redis catches up, and the events it made for this hub's sockets are lost
        with the reply. Call this when such a call could have ended the job, or
        moved it on, while sockets here follow it (a worker's ``complete_job`` or
        ``fail_job``, a client's ``cancel_job``, a worker's loss).

        Until its fate is known, the job is read again every quarter second (once
        Redis answers), for at most a minute. Once it has finished, its followers
        here get the final frame, once, as if they had heard it live. For a report
        on ``attempt`` by ``worker``: once the job has a new attempt or another
        worker, nothing is needed (its later events reach this hub as usual)."""
        if job not in self.registry.job_subs:
            return
        until = asyncio.get_running_loop().time() + RECHECK_FOR_S
        self._unsure[job] = _Unsure(attempt, worker, until)
        self._unsure_added.set()

    async def _recheck_step(self) -> None:
        if not self._unsure:
            self._unsure_added.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._unsure_added.wait(), 1.0)
            return
        now = asyncio.get_running_loop().time()
        for job, unsure in list(self._unsure.items()):
            if job not in self.registry.job_subs or now > unsure.until:
                self._unsure.pop(job, None)  # told by the usual path, or given up
                continue
            state = await self.svc.get_job(job)  # a RedisError: the loop backs off, retries
            if state is None or state.status in TERMINAL_STATUSES:
                self._unsure.pop(job, None)
                if state is not None:
                    self.tell_finished(state)
            elif unsure.attempt is not None and (
                state.attempt != unsure.attempt or state.worker_id != unsure.worker
            ):
                self._unsure.pop(job, None)
        await asyncio.sleep(RECHECK_EVERY_S)

    def rerun(self, op: Op[Any], svc: AsyncRedisService) -> None:
        """The service's ``on_rerun``: ``op``'s first run (on ``svc``, a shard's
        service in a sharded namespace) may have run, and the events it made for
        this hub were then lost with its reply. Those in
        :data:`REPLAYED` are read back from the event stream and routed as if they
        had come with the reply (routing them when they were not lost does nothing
        twice: an assignment is pushed once, a final frame ends the subscription);
        if Redis cannot be read, or a cancel's event is not among the newest
        entries, the job is rechecked instead (its followers here still hear how it
        ended)."""
        replayed = REPLAYED.get(op.script)
        if replayed is None or self._stopping:
            return
        field, names = replayed
        about = (field, op.args[0])
        task = asyncio.get_running_loop().create_task(self._replay(svc, about, names))
        self._replays.add(task)
        task.add_done_callback(self._replays.discard)

    async def _replay(
        self, svc: AsyncRedisService, about: tuple[str, str], names: frozenset[str]
    ) -> None:
        try:
            events = await svc.recent_events(about, names)
            # a lost worker's requeued jobs: each one's assignment since, if any (the
            # jobs are on the worker's shard)
            for ev in [e for e in events if e.name == EventName.REQUEUED]:
                since = event_id_key(ev.id)
                events += [
                    e
                    for e in await svc.recent_events(
                        ("job", ev.fields["job"]), {EventName.ASSIGNED}
                    )
                    if event_id_key(e.id) > since
                ]
        except RedisError as exc:
            log.warning("could not read back the events lost with a reply (%s): %s", about, exc)
            if about[0] == "job":
                self.recheck(about[1])
            return
        if events:
            unique = {e.id: e for e in events}.values()  # a job requeued twice: once each
            self.local_events(sorted(unique, key=lambda e: event_id_key(e.id)))
        elif EventName.CANCELLED in names:  # not among the newest entries: read the job
            self.recheck(about[1])

    def tell_finished(self, job: JobModel) -> None:
        """Give this hub's followers of finished ``job`` its final frame and end their
        subscriptions (nothing if none follow it here any more)."""
        message = final_message(job)
        subs = self.registry.job_subs.get(job.job_id)
        if message is None or not subs:
            return
        for conn in list(subs):
            conn.deliver(job.job_id, message)
        self.registry.drop_job(job.job_id)

    def retry_scheduled(self) -> None:
        """A retry was scheduled: wake the promoter to learn when it is due."""
        self._retry_due.set()

    def tap_from(self, last_id: str) -> None:
        """A monitor asked for events after ``last_id``: start the tap there (if it
        is idle) and wake it."""
        if self._tap_cursor is None:
            self._tap_cursor = last_id
        self._tap_wanted.set()

    # ------------------------------------------------------------- local

    def local_events(self, events: list[Event]) -> None:
        """Take the events a call of this hub produced for its sockets (the service's
        ``on_events``). They are routed in order, by :meth:`flush_local` once the
        request that made the call is answered, else by :meth:`run_local`."""
        self._local.append(events)
        # a request handler flushes them before it yields; only what it leaves (and
        # what background calls produce) needs the local loop, woken after this turn
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
        when none are left. The local loop calls it over and over."""
        if not self._local:
            await self._local_ready.wait()
        self._local_ready.clear()
        while self._local:
            self._local_busy = True
            try:
                await self.route_events(self._local[0])
            except _TRANSIENT:
                raise  # nothing of the batch was routed: it stays first, for the next try
            except BaseException:
                self._local.popleft()
                raise
            else:
                self._local.popleft()
            finally:
                self._local_busy = False

    # ----------------------------------------------------------- routing

    def tap_events(self, events: Sequence[Event]) -> None:
        """Give a batch of the whole event stream to the monitors that asked for it."""
        monitors = [m for m in self.registry.monitors if m.events]
        for ev in events:
            frame = protocol.encode_bytes(ev.to_message())
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

    def push(self, a: Assignment) -> bool:
        """Deliver ``job_assigned`` if the worker's current socket is on this hub.
        Each assignment is pushed once, however many paths report it, and never
        after a newer one (assignment numbers only grow)."""
        conn = self.registry.workers.get(a.worker_id)
        if conn is None or conn.session != a.session or a.n <= conn.delivered_n:
            return False
        conn.delivered = [*conn.delivered[-1:], (a.job_id, a.attempt)]
        conn.delivered_n = a.n
        if not conn.registered:  # its worker_registered reply has not been sent yet
            conn.early.append(a.to_message())
            return True
        return conn.send(a.to_message())

    def tell_final(
        self, name: str, job: str, attempt: int, worker: str, result: Any = None, error: str = ""
    ) -> None:
        """Tell this hub's followers of ``job`` its outcome now, from the worker's
        report, and end their subscriptions. The engine hands the calling hub no copy
        of that final event (``told`` in lib.lua's ``emit``); a copy that reaches this
        hub another way (its inbox, a recheck) finds no one here to tell again."""
        subs = self.registry.job_subs.get(job)
        if not subs:
            return
        fields = {"job": job, "attempt": str(attempt), "worker": worker}
        message = protocol.client_frame(name, job, fields, result, error or None)
        if message is not None:
            for c in list(subs):
                c.deliver(job, message)
        self.registry.drop_job(job)

    def _needs_fetch(self, events: Sequence[Event]) -> set[str]:
        """The jobs among ``events`` whose params (for a push) or result (for a
        follower) the events do not carry and must be read."""
        need: set[str] = set()
        subs = self.registry.job_subs
        for ev in events:
            f = ev.fields
            job = f.get("job", "")
            if (ev.name == EventName.ASSIGNED and "params" not in f and self._wants_push(f)) or (
                ev.name in (EventName.COMPLETED, EventName.FAILED)
                and "result" not in f
                and job in subs
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
        if name == EventName.RETRYING:
            self._retry_due.set()
        if name == EventName.ASSIGNED and ("params" in f or row) and self._wants_push(f):
            params = f["params"] if "params" in f else row[0] if row else None
            self.push(
                Assignment(
                    job,
                    int(f["attempt"]),
                    f.get("jtype", ""),
                    int(f.get("priority", 0)),
                    protocol.loads_stored(params) or {},
                    f["worker"],
                    f.get("hub", ""),
                    f["session"],
                    int(f["n"]),
                )
            )
        elif name == EventName.CANCELLED and f.get("worker"):
            conn = self.registry.workers.get(f["worker"])
            if conn is not None and (job, int(f.get("attempt", 0))) in conn.delivered:
                conn.send(protocol.cancel_running(job, int(f["attempt"])))
        subs = self.registry.job_subs.get(job)
        if not subs:
            return
        result = protocol.loads_stored(f["result"] if "result" in f else row[1] if row else None)
        error = f.get("message") or (row[2] if row else None)
        message = protocol.client_frame(name, job, f, result, error)
        if message is None:
            return
        for conn in list(subs):
            conn.deliver(job, message)
        if name in protocol.FINAL_EVENTS:
            self.registry.drop_job(job)
