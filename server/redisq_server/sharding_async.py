"""The asyncio engine over the shards of one namespace: what a hub runs when
``REDISQ_SHARDS`` (or ``shards=`` in a ``redis+cluster://`` URL) is above 1.

:class:`AsyncShardedService` has :class:`~.redis_service.AsyncRedisService`'s
method names, so the hub, its routes and its event router are unchanged. Each call
goes to one shard: a job's to :func:`~.sharding.job_shard` of its id, a worker's to
the shard it is on (this hub spreads its GPUs evenly over the shards, and moves an
idle one to the shard with the best queued job); presence, reaping and promotion
go to every shard; reads merge the shards.
The streams (this hub's inboxes, the event stream) are read on every shard at once
and merged by entry id; the cursors are kept here, per shard.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import Counter
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from .config import EngineLimits
from .models import JobModel
from .operations import (
    Assignment,
    CancelResult,
    Event,
    FinishResult,
    Renewal,
    SubmitResult,
    new_job_id,
)
from .redis_client import CALL_TIMEOUT_S, connect_async, resolve_url
from .redis_service import EVENTS_LIMIT, AsyncRedisService, resolve_limits
from .sharding import event_id_key, job_shard, merge_events, merge_stats, shards_for, worker_shard

__all__ = ["AsyncShardedService", "open_async_service"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class _FanIn:
    """Reads one stream per shard at once and hands back what any of them has,
    merged by id. Each shard's read stays in flight across calls, so a quiet shard
    does not hold up a busy one."""

    def __init__(self, shards: list[AsyncRedisService], key: Any) -> None:
        self.shards = shards
        self.key = key  # shard service -> its stream's key
        self.cursors = ["0-0"] * len(shards)
        self.pending: dict[int, asyncio.Task[list[Event]]] = {}

    def reset(self, cursors: list[str]) -> None:
        self.cancel()
        self.cursors = cursors

    def cancel(self) -> None:
        for task in self.pending.values():
            task.cancel()
        self.pending.clear()

    async def read(self, count: int, block_ms: int | None) -> list[Event]:
        for i, svc in enumerate(self.shards):
            if i not in self.pending:
                read = svc._xread(self.key(svc), self.cursors[i], count, block_ms)
                self.pending[i] = asyncio.ensure_future(read)
        waits = list(self.pending.values())
        timeout = None if block_ms is None else block_ms / 1000 + CALL_TIMEOUT_S
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        got: list[list[Event]] = []
        for i, task in list(self.pending.items()):
            if not task.done():
                continue
            del self.pending[i]
            events = task.result()  # an error: the caller's loop backs off and calls again
            if events:
                self.cursors[i] = events[-1].id
                got.append(events)
        return merge_events(got, sum(len(g) for g in got))


async def _each(calls: Iterable[Awaitable[T]]) -> list[T]:
    """The results of ``calls`` (one per shard, run at once) from the shards that
    answered: one shard's master down must not stop the others' renewals, reaping
    and promotion. Raises the first error when no shard answered."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        if not ok:
            raise errors[0]
        log.warning("a shard did not answer: %s", errors[0])
    return ok


class AsyncShardedService(AsyncRedisService):
    """The queue engine over ``limits.shards`` shards of one namespace (asyncio).

    Connect from ``url`` (its ``shards=`` wins over ``limits.shards``) or pass a
    ready Redis Cluster ``client``; call :meth:`aclose` when done. The inherited
    attributes (``keys``, ``ops``) are shard 0's; every method below routes to the
    shard that owns the job or worker, or to all of them.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str | None = None,
        limits: EngineLimits | None = None,
        client: Any = None,
        call_timeout_s: float = CALL_TIMEOUT_S,
    ) -> None:
        limits = resolve_limits(limits, namespace)
        if client is None:
            url, extra = resolve_url(url)
            limits = shards_for(url, limits)
            client = connect_async(url, **extra)
        super().__init__(client=client, limits=limits, call_timeout_s=call_timeout_s)
        # a worker's report may move it to another shard (several calls, across
        # shards): a worker's next report waits for the last one's answer
        self.in_order = False
        self.shards = [
            AsyncRedisService(client=client, limits=limits, call_timeout_s=call_timeout_s, shard=i)
            for i in range(limits.shards)
        ]
        self._inbox = _FanIn(self.shards, lambda s: s.keys.inbox(self.hub_id))
        self._tap = _FanIn(self.shards, lambda s: s.keys.events)
        # the workers registered through this service: where each is now, how it
        # registered (to register again on another shard), which may be idle, and
        # which are moving (not renewed until they land)
        self._where: dict[str, int] = {}
        self._reg: dict[str, tuple[list[str], Mapping[str, Any] | None, str, str]] = {}
        self._prefetch: dict[str, int] = {}  # each worker's prefetch window
        self._idle: set[str] = set()
        self._moving: set[str] = set()
        #: idle workers moved to a shard with queued jobs
        self.moves = 0

    def _at(self, i: int) -> AsyncRedisService:
        """Shard ``i``'s service, with this service's hub id and event sink."""
        svc = self.shards[i]
        svc.hub_id, svc.on_events, svc.on_rerun = self.hub_id, self.on_events, self.on_rerun
        return svc

    def _job(self, job_id: str) -> AsyncRedisService:
        return self._at(job_shard(job_id, len(self.shards)))

    def _shard_of_worker(self, worker_id: str) -> int:
        """The shard the worker is on now (its home shard until it moves)."""
        return self._where.get(worker_id, worker_shard(worker_id, len(self.shards)))

    def _home(self, worker_id: str) -> AsyncRedisService:
        return self._at(self._shard_of_worker(worker_id))

    async def _heads(self, types: Iterable[str]) -> list[float | None]:
        """Per shard, the queue score of its best queued job of ``types`` (smaller
        runs first: priority, then order), None when it has none."""
        r: Any = self.redis
        kinds = list(types)
        tops = await asyncio.gather(
            *(
                self._bounded(r.zrange(s.keys.queue(t), 0, 0, withscores=True), "zrange")
                for s in self.shards
                for t in kinds
            )
        )
        n = len(kinds)
        out: list[float | None] = []
        for i in range(len(self.shards)):
            scores = [float(top[0][1]) for top in tops[i * n : (i + 1) * n] if top]
            out.append(min(scores) if scores else None)
        return out

    async def _claimed(
        self,
        worker_id: str,
        got: Assignment | None,
        seen: dict[tuple[str, ...], list[float | None]] | None = None,
    ) -> Assignment | None:
        """After a claim of ``worker_id`` on its shard: ``got``, or when its shard had
        nothing for it, the best queued job of its types on any shard (the smallest
        queue score: highest priority, then oldest), claimed by moving the worker to
        that shard (:meth:`_move`). ``seen`` keeps the shards' best scores per set
        of types across the calls of one sweep, so an idle fleet with nothing queued
        costs one read per shard and type per sweep, not per GPU."""
        if got is not None:
            self._idle.discard(worker_id)
            return got
        self._idle.add(worker_id)
        if worker_id not in self._reg or len(self.shards) == 1:
            return None
        types = tuple(self._reg[worker_id][0])
        heads = seen.get(types) if seen is not None else None
        if heads is None:
            heads = await self._heads(types)
            if seen is not None:
                seen[types] = heads
        found = [(h, i) for i, h in enumerate(heads) if h is not None]
        if not found:
            return None
        best = min(found)[1]
        if best == self._shard_of_worker(worker_id):
            return None
        if seen is not None:
            seen.pop(types, None)  # a move takes a job: read again for the next GPU
        return await self._move(worker_id, best)

    async def _move(self, worker_id: str, to: int) -> Assignment | None:
        """Move an idle worker to shard ``to``: it leaves its shard only if it still
        holds no job there (one script), then registers on ``to`` and claims its best
        job (one script). A job is never at risk: the worker holds none while moving."""
        types, caps, hub_id, session = self._reg[worker_id]
        window = self._prefetch.get(worker_id, 0)
        here = self._shard_of_worker(worker_id)
        self._moving.add(worker_id)
        try:
            svc = self._at(here)
            n = await svc._run(svc.ops.leave(worker_id, session))
            if n is None:
                return None  # assigned meanwhile: it stays
            self._where[worker_id] = to
            self.moves += 1
            try:
                dest = self._at(to)
                await dest._run(dest.ops.arrive(worker_id, n))
                got = await dest.register_worker(
                    worker_id, types, caps, hub_id=hub_id, session=session, prefetch=window
                )
            except Exception:
                self._where[worker_id] = here  # back where it was; renewed there
                await svc._run(svc.ops.arrive(worker_id, n))
                got = await svc.register_worker(
                    worker_id, types, caps, hub_id=hub_id, session=session, prefetch=window
                )
        finally:
            self._moving.discard(worker_id)
        if got is not None:
            self._idle.discard(worker_id)
        return got

    def _all(self) -> list[AsyncRedisService]:
        return [self._at(i) for i in range(len(self.shards))]

    async def aclose(self) -> None:
        self._inbox.cancel()
        self._tap.cancel()
        await self.redis.aclose()

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
        delay_s: float | None = None,
        run_at: float | None = None,
    ) -> SubmitResult:
        """Submit on the job's shard (its id drawn here when none is given)."""
        job_id = job_id if job_id is not None else new_job_id()
        return await self._job(job_id).submit_job(
            job_type,
            priority,
            params,
            job_id=job_id,
            client_id=client_id,
            max_attempts=max_attempts,
            delay_s=delay_s,
            run_at=run_at,
        )

    async def get_job(self, job_id: str) -> JobModel | None:
        return await self._job(job_id).get_job(job_id)

    async def cancel_job(self, job_id: str, client_id: str | None = None) -> CancelResult:
        return await self._job(job_id).cancel_job(job_id, client_id)

    async def job_payloads(self, job_ids: Iterable[str]) -> dict[str, list[str | None]]:
        ids = list(job_ids)
        out: dict[str, list[str | None]] = {}
        for i in range(len(self.shards)):
            mine = [j for j in ids if job_shard(j, len(self.shards)) == i]
            if mine:
                out.update(await self._at(i).job_payloads(mine))
        return {j: out[j] for j in ids}

    # -- workers
    async def register_worker(
        self,
        worker_id: str,
        job_types: Iterable[str],
        capabilities: Mapping[str, Any] | None = None,
        *,
        hub_id: str = "",
        session: str | None = None,
        prefetch: int = 0,
    ) -> Assignment | None:
        """Register on the shard with the fewest of this hub's GPUs and claim that
        shard's best job; with none there, move to the shard with the best one.
        A prefetch window takes jobs ahead from the shard the worker is on."""
        session = session or secrets.token_hex(8)
        types = list(job_types)
        self._where.pop(worker_id, None)
        # this hub's GPUs spread evenly over the shards (each hub balances its own)
        mine = Counter(self._where.values())
        self._where[worker_id] = min(range(len(self.shards)), key=lambda i: (mine[i], i))
        self._reg[worker_id] = (types, capabilities, hub_id, session)
        self._prefetch[worker_id] = prefetch
        got = await self._home(worker_id).register_worker(
            worker_id, types, capabilities, hub_id=hub_id, session=session, prefetch=prefetch
        )
        return await self._claimed(worker_id, got)

    async def complete_job(
        self, job_id: str, attempt: int, worker_id: str, result: Any = None
    ) -> FinishResult:
        done = await self._job(job_id).complete_job(job_id, attempt, worker_id, result)
        return await self._finished(worker_id, done)

    async def fail_job(
        self, job_id: str, attempt: int, worker_id: str, error: str, retryable: bool = True
    ) -> FinishResult:
        done = await self._job(job_id).fail_job(job_id, attempt, worker_id, error, retryable)
        return await self._finished(worker_id, done)

    async def _finished(self, worker_id: str, done: FinishResult) -> FinishResult:
        if done.took_ahead:  # busy with the job it held ahead
            self._idle.discard(worker_id)
            return done
        return replace(done, next=await self._claimed(worker_id, done.next))

    async def update_progress(
        self,
        job_id: str,
        attempt: int,
        worker_id: str,
        progress: float,
        message: str | None = None,
    ) -> str:
        return await self._job(job_id).update_progress(
            job_id, attempt, worker_id, progress, message
        )

    async def renew(self, workers: Iterable[tuple[str, str, int | None]]) -> Renewal:
        """Renew each worker on the shard it is on (one call per shard with workers;
        a worker moving between shards is skipped). Then idle workers move to the
        shard with the best queued job of their types; those assignments come back
        as ``missed`` (the caller pushes them)."""
        per: dict[int, list[tuple[str, str, int | None]]] = {}
        for triple in workers:
            if triple[0] not in self._moving:
                per.setdefault(self._shard_of_worker(triple[0]), []).append(triple)
        parts = await _each(self._at(i).renew(t) for i, t in per.items())
        stale = [w for p in parts for w in p.stale]
        missed = [a for p in parts for a in p.missed]
        seen: dict[tuple[str, ...], list[float | None]] = {}
        for worker_id in sorted(self._idle - set(stale)):
            got = await self._claimed(worker_id, None, seen)
            if got is not None:
                missed.append(got)
        return Renewal(stale, missed)

    async def worker_lost(self, worker_id: str, session: str, count: bool = True) -> bool:
        if self._reg.get(worker_id, ("", "", "", ""))[3] == session:  # the one registered here
            self._reg.pop(worker_id, None)
            self._prefetch.pop(worker_id, None)
            self._idle.discard(worker_id)
            lost = await self._home(worker_id).worker_lost(worker_id, session, count)
        else:
            # a session this hub no longer holds (one whose loss Redis could not hear
            # before, one replaced here) or never held (another hub's, named by the
            # worker after a close): it may be on any shard, and an error from any
            # shard is raised, since that shard may be the one that holds it
            shards = self._all()
            lost = any(
                await asyncio.gather(*(s.worker_lost(worker_id, session, count) for s in shards))
            )
        # its shard is kept until that shard has heard of the loss: a call that fails
        # (Redis away) raises before this, and is made again
        if worker_id not in self._reg:
            self._where.pop(worker_id, None)
        return lost

    async def reap(self, limit: int = 100) -> int:
        return sum(await _each(s.reap(limit) for s in self._all()))

    async def promote(self, limit: int = 100) -> tuple[int, float | None, list[Assignment]]:
        parts = await _each(s.promote(limit) for s in self._all())
        waits = [w for _, w, _ in parts if w is not None]
        return (
            sum(n for n, _, _ in parts),
            min(waits) if waits else None,
            [a for _, _, got in parts for a in got],
        )

    # -- reading
    async def get_stats(self, window_s: float = 60.0) -> dict[str, Any]:
        parts = await asyncio.gather(*(s.get_stats(window_s) for s in self._all()))
        return merge_stats(parts)

    async def events_since(self, since: str = "0", limit: int = EVENTS_LIMIT) -> list[Event]:
        parts = await asyncio.gather(*(s.events_since(since, limit) for s in self._all()))
        return merge_events(parts, limit)

    async def last_event_id(self) -> str:
        """The newest event id over every shard; the event tap (:meth:`read_events`)
        continues from each shard's newest."""
        ids = await asyncio.gather(*(s.last_event_id() for s in self._all()))
        self._tap.reset(list(ids))
        return max(ids, key=event_id_key)

    async def read_events(
        self, last_id: str, count: int = 1000, block_ms: int | None = None
    ) -> list[Event]:
        """New events of every shard, merged by id. ``last_id`` is not used: the
        cursors are per shard, set by :meth:`last_event_id` and moved by each read."""
        return await self._tap.read(count, block_ms)

    # -- this hub's presence, on every shard (each shard's scripts route to it)
    async def hub_start(self) -> None:
        self._inbox.reset(["0-0"] * len(self.shards))
        await asyncio.gather(*(s.hub_start() for s in self._all()))

    async def hub_alive(self) -> bool:
        return any(await _each(s.hub_alive() for s in self._all()))

    async def clients_here(self, client_ids: Iterable[str]) -> None:
        ids = list(client_ids)
        await _each(s.clients_here(ids) for s in self._all())

    async def clients_gone(self, client_ids: Iterable[str]) -> None:
        ids = list(client_ids)
        await _each(s.clients_gone(ids) for s in self._all())

    async def hub_stop(self) -> None:
        self._inbox.cancel()
        await asyncio.gather(*(s.hub_stop() for s in self._all()))

    async def read_inbox(
        self, last_id: str, count: int = 1000, block_ms: int = 1000
    ) -> list[Event]:
        """Events for this hub's sockets from every shard's inbox, merged by id;
        the cursors are per shard (``last_id`` is not used)."""
        return await self._inbox.read(count, block_ms)


def open_async_service(
    url: str | None = None, *, limits: EngineLimits | None = None
) -> AsyncRedisService:
    """The asyncio engine a namespace needs: :class:`AsyncRedisService` for one shard
    (today's layout, unchanged), :class:`AsyncShardedService` for more."""
    base = shards_for(url, resolve_limits(limits, None))
    if base.shards == 1:
        return AsyncRedisService(url, limits=base)
    return AsyncShardedService(url, limits=base)
