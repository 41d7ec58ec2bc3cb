"""``GET /metrics``: the queue and this hub in Prometheus' text format.

Needs the optional ``prometheus_client`` (``pip install "redisq-lab[metrics]"``);
without it the hub runs as before and ``/metrics`` answers 501 saying so.

What a scrape shows (see docs/operations.md):

- from one run of the engine's stats script (namespace-wide, the same numbers every
  hub reports): ``redisq_queue_depth{job_type,priority}``,
  ``redisq_jobs_total{outcome}``, ``redisq_workers{state}``, ``redisq_jobs_running``,
  ``redisq_jobs_held_ahead``,
  ``redisq_jobs_retrying``, ``redisq_redis_up``;
- from this hub's memory: ``redisq_hub_connections{role}`` and the histogram
  ``redisq_submit_to_assigned_seconds``: for each job submitted through this hub, the
  time from its ``submit_job`` reaching the hub to the hub learning of its first
  assignment (the hub's own clock).

A scrape costs at most one Redis call: scrapes less than :data:`STATS_MAX_AGE_S`
apart share one snapshot, and concurrent scrapes share one call. The call is awaited
like any other, so a scrape never holds up dispatch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

from redis.exceptions import RedisError

from .connections import Registry
from .operations import Event, new_job_id
from .protocol import EventName, Message, MessageType
from .redis_service import AsyncRedisService
from .routes import Handler, Routes
from .routing import EventRouter

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector

    HAVE_PROMETHEUS = True
except ImportError:  # the hub works without the metrics extra
    HAVE_PROMETHEUS = False

__all__ = ["HAVE_PROMETHEUS", "OUTCOMES", "DispatchTimer", "HubMetrics"]

log = logging.getLogger("redisq.hub")

#: scrapes closer together than this share one stats snapshot
STATS_MAX_AGE_S: Final = 1.0
#: a scrape waits this long for Redis, then reports ``redisq_redis_up 0``
STATS_TIMEOUT_S: Final = 2.0
#: the engine's namespace-wide counters, as ``redisq_jobs_total{outcome}``
OUTCOMES: Final = ("submitted", "completed", "failed", "cancelled", "retried", "requeued")
#: submit -> assigned buckets, in seconds
WAIT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
#: jobs submitted here and not yet assigned that the timer remembers (oldest dropped)
TIMER_LIMIT: Final = 100_000

_UNAVAILABLE: Final = (
    b"# /metrics needs the prometheus_client package: "
    b'pip install "redisq-lab[metrics]", then restart the hub\n'
)


class DispatchTimer:
    """Times submit -> first assignment for the jobs submitted through one hub.

    Call :meth:`start` when a submit reaches the hub (before the engine call: an
    assignment made by the submit itself comes back during that call) and
    :meth:`seen` with every batch of events the hub routes. ``observe`` gets each
    wait in seconds.
    """

    def __init__(self, observe: Any, limit: int = TIMER_LIMIT) -> None:
        self._observe = observe
        self._limit = limit
        self._started: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._started)

    def start(self, job_id: str) -> None:
        self._started[job_id] = time.monotonic()
        self._started.move_to_end(job_id)
        if len(self._started) > self._limit:  # a job whose events never reach this hub
            self._started.popitem(last=False)

    def forget(self, job_id: str) -> None:
        self._started.pop(job_id, None)

    def seen(self, events: Iterable[Event]) -> None:
        for ev in events:
            name = ev.name
            if name == EventName.ASSIGNED:
                t0 = self._started.pop(ev.fields.get("job", ""), None)
                if t0 is not None:
                    self._observe(time.monotonic() - t0)
            elif name in (EventName.CANCELLED, EventName.FAILED):
                self._started.pop(ev.fields.get("job", ""), None)


class _TimedRouter(EventRouter):
    """An :class:`EventRouter` that shows every batch it routes to a timer first."""

    def __init__(self, service: AsyncRedisService, registry: Registry, timer: DispatchTimer):
        super().__init__(service, registry)
        self.timer = timer

    def local_events(self, events: list[Event]) -> None:
        self.timer.seen(events)
        super().local_events(events)

    async def route_events(self, events: Sequence[Event]) -> None:
        self.timer.seen(events)
        await super().route_events(events)


class HubMetrics:
    """One hub's ``/metrics``. Build the hub's router with :meth:`event_router`,
    pass its :class:`Routes` to :meth:`time_submits`, and answer ``GET /metrics``
    with :meth:`scrape`. Without ``prometheus_client`` (``available`` False) the
    router is a plain one and :meth:`scrape` answers 501."""

    def __init__(self, service: AsyncRedisService, registry: Registry, hub_id: str) -> None:
        self.svc = service
        self.registry = registry
        self.hub_id = hub_id
        self.available = HAVE_PROMETHEUS
        #: scrapes closer together than this share one stats snapshot
        self.max_age_s = STATS_MAX_AGE_S
        self._stats: dict[str, Any] | None = None
        self._stats_at = -1e9
        self._redis_up = False
        self._fetch: asyncio.Task[None] | None = None
        self.timer: DispatchTimer | None = None
        if self.available:
            self._prom = CollectorRegistry(auto_describe=False)
            self._wait = Histogram(
                "redisq_submit_to_assigned_seconds",
                "Jobs submitted through this hub: seconds from the submit reaching the hub "
                "to the hub learning of the job's first assignment",
                buckets=WAIT_BUCKETS,
                registry=self._prom,
            )
            self._prom.register(_Snapshot(self))
            self.timer = DispatchTimer(self._wait.observe)

    def event_router(self) -> EventRouter:
        """The hub's event router (it also feeds the submit -> assigned timer)."""
        if self.timer is None:
            return EventRouter(self.svc, self.registry)
        return _TimedRouter(self.svc, self.registry, self.timer)

    def time_submits(self, routes: Routes) -> None:
        """Start the timer for each job submitted through ``routes``."""
        timer = self.timer
        if timer is None:
            return
        handler: Handler = routes.handlers[MessageType.SUBMIT_JOB]

        async def submit(conn: Any, msg: Message) -> None:
            if not msg.fields.get("job_id"):  # name it here, so the timer knows it
                msg.fields["job_id"] = new_job_id()
            job_id = msg.fields["job_id"]
            timer.start(job_id)
            try:
                await handler(conn, msg)
            except BaseException:
                timer.forget(job_id)
                raise

        routes.handlers[MessageType.SUBMIT_JOB] = submit

    async def scrape(self) -> tuple[int, bytes, str]:
        """``(status, body, content type)`` for ``GET /metrics``."""
        if not self.available:
            return 501, _UNAVAILABLE, "text/plain; charset=utf-8"
        if time.monotonic() - self._stats_at >= self.max_age_s:
            if self._fetch is None or self._fetch.done():
                self._fetch = asyncio.create_task(self._read_stats())
            await asyncio.shield(self._fetch)
        return 200, generate_latest(self._prom), CONTENT_TYPE_LATEST

    async def _read_stats(self) -> None:
        try:
            async with asyncio.timeout(STATS_TIMEOUT_S):
                self._stats = await self.svc.get_stats()
            self._redis_up = True
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("metrics: no stats from Redis: %s", exc)
            self._redis_up = False
        self._stats_at = time.monotonic()

    def families(self) -> Iterator[Any]:
        """The metric families of the last snapshot and of this hub's sockets."""
        r = self.registry
        conns = GaugeMetricFamily(
            "redisq_hub_connections", "Open sockets on this hub, by role", labels=["role"]
        )
        conns.add_metric(["client"], sum(len(c) for c in r.clients.values()))
        conns.add_metric(["worker"], len(r.workers))
        conns.add_metric(["monitor"], len(r.monitors))
        yield conns
        yield GaugeMetricFamily(
            "redisq_redis_up",
            "1 if the last stats read from Redis succeeded",
            value=1 if self._redis_up else 0,
        )
        stats = self._stats
        if stats is None:
            return
        depth = GaugeMetricFamily(
            "redisq_queue_depth",
            "Jobs waiting in the queue, by job type and priority",
            labels=["job_type", "priority"],
        )
        for job_type, t in sorted(stats["job_types"].items()):
            for priority, n in t["by_priority"].items():
                depth.add_metric([job_type, str(priority)], n)
        yield depth
        jobs = CounterMetricFamily(
            "redisq_jobs",
            "Jobs by outcome since the namespace began (the engine's counters)",
            labels=["outcome"],
        )
        for outcome in OUTCOMES:
            jobs.add_metric([outcome], stats["totals"].get(outcome, 0))
        yield jobs
        workers = GaugeMetricFamily(
            "redisq_workers", "Live GPU workers, by state", labels=["state"]
        )
        workers.add_metric(["idle"], stats["workers_idle"])
        workers.add_metric(["busy"], stats["workers_busy"])
        yield workers
        yield GaugeMetricFamily(
            "redisq_jobs_running",
            "Jobs assigned to or running on a worker, not counting those held ahead",
            value=stats["running"],
        )
        yield GaugeMetricFamily(
            "redisq_jobs_held_ahead",
            "Jobs a worker holds ahead in its prefetch window (assigned, not started)",
            value=stats["held_ahead"],
        )
        yield GaugeMetricFamily(
            "redisq_jobs_retrying", "Failed jobs waiting for their retry", value=stats["retrying"]
        )


if HAVE_PROMETHEUS:

    class _Snapshot(Collector):
        """Hands prometheus_client the families :class:`HubMetrics` holds."""

        def __init__(self, metrics: HubMetrics) -> None:
            self.metrics = metrics

        def collect(self) -> Iterable[Metric]:
            return list(self.metrics.families())
