"""``GET /metrics``: parsed with prometheus_client's own parser after real jobs ran.

A hub in this process, a mock GPU machine and a client over real sockets; the
scraped values must equal what the engine's stats script says.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from redisq_lab.client import JobFailed, QueueClient
from redisq_lab.mock_worker import MockWorker
from redisq_server import AsyncRedisService, EngineLimits, metrics
from redisq_server.main import Hub
from redisq_server.metrics import OUTCOMES, DispatchTimer
from redisq_server.operations import Event

from .helpers import hub_settings, wait_for


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


async def scrape(hub: Hub) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics`` as {(name, sorted labels): value}."""
    status, ctype, text = await asyncio.to_thread(_get, f"http://127.0.0.1:{hub.port}/metrics")
    assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
async def own_hub(redis_url: str, svc: AsyncRedisService) -> AsyncIterator[Hub]:
    """A hub on the test's service object (so a test can count its Redis calls)."""
    async with Hub(hub_settings(redis_url, svc.limits), service=svc) as h:
        yield h


async def test_metrics_match_the_engine_after_jobs_ran(
    own_hub: Hub, svc: AsyncRedisService
) -> None:
    hub = own_hub
    async with (
        MockWorker("m1", 2, hub=hub, job_types=["render"], run_time=0.0),
        MockWorker("m2", 1, hub=hub, job_types=["flaky"], run_time=0.0, failure_rate=1.0),
        QueueClient(hub, "alice") as client,
    ):
        done = await client.submit_many(
            [{"job_type": "render", "priority": p % 3} for p in range(12)]
        )
        bad = await client.submit_many([{"job_type": "flaky", "max_attempts": 1} for _ in range(2)])
        results = await client.results([*done, *bad], timeout=30, return_exceptions=True)
        assert sum(isinstance(r, JobFailed) for r in results) == 2
        waiting = [await client.submit("nobody", priority=p) for p in (3, 3, 7)]
        gone = await client.submit("nobody", priority=1)
        await client.cancel(gone)

        samples = await scrape(hub)
        stats = await svc.get_stats()

    for outcome in OUTCOMES:
        assert sample(samples, "redisq_jobs_total", outcome=outcome) == stats["totals"][outcome]
    assert sample(samples, "redisq_jobs_total", outcome="submitted") == 18
    assert sample(samples, "redisq_jobs_total", outcome="completed") == 12
    assert sample(samples, "redisq_jobs_total", outcome="failed") == 2
    assert sample(samples, "redisq_jobs_total", outcome="cancelled") == 1
    assert len(waiting) == 3
    assert sample(samples, "redisq_queue_depth", job_type="nobody", priority="3") == 2
    assert sample(samples, "redisq_queue_depth", job_type="nobody", priority="7") == 1
    assert ("redisq_queue_depth", (("job_type", "nobody"), ("priority", "1"))) not in samples
    assert sample(samples, "redisq_workers", state="idle") == stats["workers_idle"] == 3
    assert sample(samples, "redisq_workers", state="busy") == 0
    assert sample(samples, "redisq_hub_connections", role="worker") == 3
    assert sample(samples, "redisq_hub_connections", role="client") == 1
    assert sample(samples, "redisq_hub_connections", role="monitor") == 0
    assert sample(samples, "redisq_redis_up") == 1
    assert sample(samples, "redisq_jobs_running") == stats["running"] == 0
    assert sample(samples, "redisq_jobs_held_ahead") == stats["held_ahead"] == 0
    # every job that got a GPU was timed once; the queued and the cancelled ones not
    assert sample(samples, "redisq_submit_to_assigned_seconds_count") == 14
    total = sample(samples, "redisq_submit_to_assigned_seconds_sum")
    assert 0 < total < 14 * 5
    assert sample(samples, "redisq_submit_to_assigned_seconds_bucket", le="+Inf") == 14
    assert len(hub.metrics.timer or ()) == 3  # the three still queued


async def test_a_queued_job_is_timed_when_a_worker_takes_it(own_hub: Hub) -> None:
    hub = own_hub
    hub.metrics.max_age_s = 0  # every scrape reads afresh
    async with QueueClient(hub, "bob") as client:
        job = await client.submit("render")
        samples = await scrape(hub)
        assert sample(samples, "redisq_submit_to_assigned_seconds_count") == 0
        async with MockWorker("late", 1, hub=hub, job_types=["render"], run_time=0.0):
            await client.result(job, timeout=10)
        samples = await scrape(hub)
    assert sample(samples, "redisq_submit_to_assigned_seconds_count") == 1
    assert sample(samples, "redisq_jobs_total", outcome="completed") == 1


async def test_scrapes_share_one_redis_call(
    own_hub: Hub, svc: AsyncRedisService, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real = svc.get_stats

    async def counted(window_s: float = 60.0) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return await real(window_s)

    monkeypatch.setattr(svc, "get_stats", counted)
    await asyncio.gather(*(scrape(own_hub) for _ in range(8)))
    assert calls == 1
    await scrape(own_hub)
    assert calls == 1  # within STATS_MAX_AGE_S: the same snapshot


async def test_without_prometheus_client_the_hub_still_works(
    redis_url: str, limits: EngineLimits, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "HAVE_PROMETHEUS", False)
    async with Hub(hub_settings(redis_url, limits)) as hub:
        status, ctype, text = await asyncio.to_thread(_get, f"http://127.0.0.1:{hub.port}/metrics")
        assert status == 501 and ctype.startswith("text/plain")
        assert "prometheus_client" in text and "redisq-lab[metrics]" in text
        async with (
            MockWorker("m", 1, hub=hub, job_types=["render"], run_time=0.0),
            QueueClient(hub, "carol") as client,
        ):
            job = await client.submit("render")
            assert (await client.result(job, timeout=10))["worker_id"] == "m:gpu0"


async def test_redis_down_is_a_metric_not_an_error(
    own_hub: Hub, svc: AsyncRedisService, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def down(window_s: float = 60.0) -> dict[str, Any]:
        raise RedisConnectionError("gone")

    monkeypatch.setattr(svc, "get_stats", down)
    samples = await scrape(own_hub)
    assert sample(samples, "redisq_redis_up") == 0
    assert sample(samples, "redisq_hub_connections", role="client") == 0


def test_dispatch_timer_times_first_assignments_only() -> None:
    waits: list[float] = []
    timer = DispatchTimer(waits.append, limit=2)

    def ev(name: str, job: str) -> Event:
        return Event("1-0", {"e": name, "job": job})

    timer.start("a")
    timer.start("b")
    timer.seen([ev("assigned", "a"), ev("assigned", "a"), ev("cancelled", "b")])
    assert len(waits) == 1 and waits[0] >= 0
    timer.seen([ev("assigned", "b")])  # cancelled before it got a GPU: not timed
    assert len(waits) == 1
    for job in ("c", "d", "e"):
        timer.start(job)
    assert len(timer) == 2  # the oldest is dropped past the limit
    timer.seen([ev("assigned", "c")])
    assert len(waits) == 1


async def test_timer_sees_inbox_events(redis_url: str, limits: EngineLimits) -> None:
    """A job submitted on hub A and taken by a worker of hub B: A learns of the
    assignment through its inbox and times it."""
    async with (
        Hub(hub_settings(redis_url, limits)) as a,
        Hub(hub_settings(redis_url, limits)) as b,
        QueueClient(a, "dave") as client,
    ):
        job = await client.submit("render")
        async with MockWorker("far", 1, hub=b, job_types=["render"], run_time=0.0):
            await client.result(job, timeout=10)
        timer = a.metrics.timer
        assert timer is not None
        await wait_for(lambda: asyncio.sleep(0, len(timer) == 0), what="hub A timed the job")
        samples = await scrape(a)
    assert sample(samples, "redisq_submit_to_assigned_seconds_count") == 1


def test_the_docs_name_only_metrics_the_hub_exports() -> None:
    """Every metric in docs/operations.md and the Grafana dashboard exists."""
    root = Path(__file__).resolve().parents[1]
    exported = {
        "redisq_queue_depth",
        "redisq_jobs_total",
        "redisq_workers",
        "redisq_jobs_running",
        "redisq_jobs_held_ahead",
        "redisq_jobs_retrying",
        "redisq_redis_up",
        "redisq_hub_connections",
        "redisq_submit_to_assigned_seconds",
    }
    for doc in ("docs/operations.md", "docs/grafana-dashboard.json"):
        named = set(re.findall(r"\bredisq_[a-z_]+", (root / doc).read_text()))
        named = {re.sub(r"_(bucket|count|sum)$", "", n) for n in named}
        assert named <= exported, (doc, named - exported)
    dashboard = json.loads((root / "docs/grafana-dashboard.json").read_text())
    assert len(dashboard["panels"]) >= 5
