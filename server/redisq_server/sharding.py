"""One namespace split into shards on a Redis Cluster: placement and reading across them.

Each shard is a complete queue under its own hash tag (:func:`.keys.shard_tag`), so
every state change stays one script on one shard. Placement (docs/deploy.md,
"Sharded namespaces"):

- a job lives on shard ``crc32(job id) mod S`` (:func:`job_shard`), from submit to
  its end; every call about a job goes to that shard;
- a worker lives on one shard at a time and is assigned only that shard's jobs, so
  it is never assigned twice and a completion's claim of the next job is that
  shard's script. A hub spreads its GPUs evenly and moves idle ones
  (:mod:`.sharding_async`); the blocking facade here, for tools and tests, keeps a
  worker on ``crc32(worker id) mod S`` (:func:`worker_shard`) and never moves it.

Reading sums the shards' stats, merges their events by stream id (the masters'
clocks) and lists jobs and workers of every shard. :class:`ShardedRedisService` is
the blocking facade with :class:`~.redis_service.RedisService`'s method names;
:func:`open_service` picks the one a namespace needs.
"""

from __future__ import annotations

import heapq
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from .config import EngineLimits, split_shards
from .models import JobModel, WorkerModel
from .operations import (
    CancelResult,
    Event,
    FinishResult,
    SubmitResult,
    event_id_key,
    new_job_id,
)
from .redis_client import connect_sync, resolve_url
from .redis_service import EVENTS_LIMIT, RedisService, resolve_limits

__all__ = [
    "ShardedRedisService",
    "event_id_key",
    "inversion_bound",
    "job_shard",
    "merge_stats",
    "open_service",
    "shards_for",
    "worker_shard",
]


def _hash(value: str, shards: int) -> int:
    return zlib.crc32(value.encode()) % shards


def job_shard(job_id: str, shards: int) -> int:
    """The shard job ``job_id`` lives on: ``crc32(job_id) mod shards``."""
    return _hash(job_id, shards)


def worker_shard(worker_id: str, shards: int) -> int:
    """The shard worker ``worker_id`` serves: ``crc32(worker_id) mod shards``."""
    return _hash(worker_id, shards)


def shards_for(url: str | None, limits: EngineLimits) -> EngineLimits:
    """``limits`` with the shard count of ``url``'s ``shards=`` option when it has
    one: the URL wins over ``REDISQ_SHARDS``."""
    if url is None:
        return limits
    shards = split_shards(url)[1]
    return limits if shards is None else replace(limits, shards=shards)


def _add(into: dict[str, Any], more: Mapping[str, Any]) -> None:
    """Add the numbers of ``more`` into ``into``, key by key, nested dicts too."""
    for k, v in more.items():
        if isinstance(v, dict):
            _add(into.setdefault(k, {}), v)
        elif isinstance(v, bool) or not isinstance(v, int | float):
            into.setdefault(k, v)
        else:
            into[k] = into.get(k, 0) + v


def merge_stats(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The stats of a whole namespace from those of its shards (as ``get_stats``
    returns them): counts and throughputs summed; ``time`` the latest, ``since`` the
    earliest, ``window_s`` the longest, ``policy`` shard 0's."""
    out: dict[str, Any] = {}
    for part in parts:
        _add(out, {k: v for k, v in part.items() if k not in ("time", "since", "window_s")})
    out["time"] = max(p["time"] for p in parts)
    sinces = [p["since"] for p in parts if p["since"] is not None]
    out["since"] = min(sinces) if sinces else None
    out["window_s"] = max(p["window_s"] for p in parts)
    out["policy"] = parts[0]["policy"]
    for jt in out["job_types"].values():
        jt["by_priority"] = dict(sorted(jt["by_priority"].items(), reverse=True))
    return out


def merge_events(per_shard: Iterable[list[Event]], limit: int) -> list[Event]:
    """The events of every shard in one list ordered by stream id (the time its
    master wrote it), at most ``limit``."""
    merged = heapq.merge(*per_shard, key=lambda e: event_id_key(e.id))
    return [e for _, e in zip(range(limit), merged, strict=False)]


class ShardedRedisService(RedisService):
    """The blocking engine over ``limits.shards`` shards of one namespace.

    Same method names as :class:`RedisService` for what monitors, the CLI and
    scripts call (the inherited ``keys`` and ``ops`` are shard 0's). Connect from
    ``url`` (a ``redis+cluster://`` URL; its ``shards=`` wins over
    ``limits.shards``) or pass a ready cluster ``client``. Call :meth:`close` when
    done.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str | None = None,
        limits: EngineLimits | None = None,
        client: Any = None,
    ) -> None:
        limits = resolve_limits(limits, namespace)
        if client is None:
            url, extra = resolve_url(url)
            limits = shards_for(url, limits)
            client = connect_sync(url, **extra)
        super().__init__(client=client, limits=limits)
        self.shards: list[RedisService] = [
            RedisService(client=client, limits=limits, shard=i) for i in range(limits.shards)
        ]

    def shard(self, job_id: str) -> RedisService:
        """The service of the shard job ``job_id`` lives on."""
        return self.shards[job_shard(job_id, len(self.shards))]

    def home(self, worker_id: str) -> RedisService:
        """The service of the shard worker ``worker_id`` serves."""
        return self.shards[worker_shard(worker_id, len(self.shards))]

    # -- jobs
    def submit_job(
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
        """:meth:`RedisService.submit_job` on the job's shard (an id is drawn here
        when none is given, as placement needs it)."""
        job_id = job_id if job_id is not None else new_job_id()
        return self.shard(job_id).submit_job(
            job_type,
            priority,
            params,
            job_id=job_id,
            client_id=client_id,
            max_attempts=max_attempts,
            delay_s=delay_s,
            run_at=run_at,
        )

    def get_job(self, job_id: str) -> JobModel | None:
        """The job (position within its shard's queue), or None if unknown."""
        return self.shard(job_id).get_job(job_id)

    def cancel_job(self, job_id: str, client_id: str | None = None) -> CancelResult:
        return self.shard(job_id).cancel_job(job_id, client_id)

    # -- workers (blocking callers: tests and tools; the hub uses the async engine)
    def register_worker(
        self,
        worker_id: str,
        job_types: Iterable[str],
        capabilities: Mapping[str, Any] | None = None,
        *,
        hub_id: str = "",
        session: str,
        prefetch: int = 0,
    ) -> Any:
        """Register the worker on its home shard and claim that shard's best job."""
        svc = self.home(worker_id)
        op = svc.ops.register(worker_id, job_types, capabilities, hub_id, session, prefetch)
        return svc._run(op)

    def complete_job(
        self, job_id: str, attempt: int, worker_id: str, result: Any = None
    ) -> FinishResult:
        """Record a result on the job's shard and claim the worker's next job there."""
        svc = self.shard(job_id)
        return svc._run(svc.ops.complete(job_id, attempt, worker_id, result))

    # -- reading
    def get_stats(self, window_s: float = 60.0) -> dict[str, Any]:
        """Every shard's stats, summed (:func:`merge_stats`): one round trip per shard."""
        return merge_stats([s.get_stats(window_s) for s in self.shards])

    def job_ids(self, status: str, limit: int = 1000) -> list[str]:
        """Ids of jobs in ``status`` across shards, taken from each shard in turn
        (each shard's own order kept)."""
        per = [s.job_ids(status, limit) for s in self.shards]
        out: list[str] = []
        for i in range(max((len(p) for p in per), default=0)):
            out += [p[i] for p in per if i < len(p)]
        return out[:limit]

    def get_jobs(self, job_ids: Sequence[str]) -> list[JobModel]:
        """The jobs that still exist among ``job_ids``, in order."""
        found: dict[str, JobModel] = {}
        for i, svc in enumerate(self.shards):
            mine = [j for j in job_ids if job_shard(j, len(self.shards)) == i]
            found.update({j.job_id: j for j in svc.get_jobs(mine)} if mine else {})
        return [found[j] for j in job_ids if j in found]

    def get_worker(self, worker_id: str) -> WorkerModel | None:
        return self.home(worker_id).get_worker(worker_id)

    def get_workers(self) -> list[WorkerModel]:
        return sorted((w for s in self.shards for w in s.get_workers()), key=lambda w: w.worker_id)

    def events_since(self, since: str = "0", limit: int = EVENTS_LIMIT) -> list[Event]:
        """Up to ``limit`` events after ``since`` from every shard, merged by id."""
        return merge_events((s.events_since(since, limit) for s in self.shards), limit)

    def last_event_id(self) -> str:
        """The newest event id over every shard."""
        return max((s.last_event_id() for s in self.shards), key=event_id_key)


def open_service(
    url: str | None = None,
    *,
    namespace: str | None = None,
    limits: EngineLimits | None = None,
) -> RedisService | ShardedRedisService:
    """The blocking engine a namespace needs: :class:`RedisService` for one shard
    (today's layout), :class:`ShardedRedisService` for more."""
    base = shards_for(url, resolve_limits(limits, namespace))
    if base.shards == 1:
        return RedisService(url=url, limits=base)
    return ShardedRedisService(url, limits=base)


def inversion_bound(placement: Sequence[Sequence[int]]) -> int:
    """The most priority inversions across shards when every shard drains at the
    same rate (the same number of workers with the same job times) from a backlog
    placed as ``placement`` (per shard, the priorities of its queued jobs).

    An inversion is a job of priority ``q`` started while a job of higher priority
    waits on another shard. Shard ``k`` starts its priority-``q`` jobs at steps
    ``N_k(>q) + 1 .. N_k(>=q)`` (``N_k(>q)``: its jobs above ``q``), while another
    shard ``j`` still holds jobs above ``q`` until step ``N_j(>q)``; so shard ``k``
    has at most ``min(n_k(q), max_j N_j(>q) - N_k(>q))`` inversions at priority
    ``q``: the imbalance of the placement of higher-priority jobs, which for
    placement by hash grows as the square root of the backlog, not with it."""
    levels = sorted({p for shard in placement for p in shard})
    above = [{q: sum(p > q for p in shard) for q in levels} for shard in placement]
    total = 0
    for k, shard in enumerate(placement):
        at = Counter(shard)
        for q in levels:
            others = max((above[j][q] for j in range(len(placement)) if j != k), default=0)
            total += max(0, min(at[q], others - above[k][q]))
    return total
