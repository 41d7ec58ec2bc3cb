"""The read-only monitors against a real redis-server, and against a real hub with
worker sockets: frame shapes and dtypes, values matching what happened, errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pytest

from redisq_lab.monitors import (
    JOB_COLUMNS,
    WORKER_COLUMNS,
    JobMonitor,
    NotFoundError,
    RedisMonitor,
    WorkerMonitor,
)
from redisq_server import AsyncRedisService, RedisService
from redisq_server.main import Hub

from .helpers import wait_for
from .peers import Peer

TIME = "datetime64[ns, UTC]"
JOB_DTYPES = {
    "job_type": "category",
    "priority": "int64",
    "status": "category",
    "worker_id": "string",
    "client_id": "string",
    "attempt": "int64",
    "max_attempts": "int64",
    "progress": "float64",
    "message": "string",
    "error": "string",
    "created": TIME,
    "queued": TIME,
    "held": TIME,
    "assigned": TIME,
    "started": TIME,
    "finished": TIME,
    "wait_s": "float64",
    "run_s": "float64",
    "total_s": "float64",
}
WORKER_DTYPES = {
    "machine_id": "string",
    "status": "category",
    "job_types": "string",
    "current_job": "string",
    "hub_id": "string",
    "registered": TIME,
    "last_heartbeat": TIME,
    "jobs_done": "int64",
    "jobs_failed": "int64",
    "busy_s": "float64",
    "uptime_s": "float64",
    "busy_share": "float64",
}
EVENT_DTYPES = {
    "event_id": "string",
    "time": TIME,
    "event": "string",
    "job": "string",
    "job_type": "string",
    "priority": "Int64",
    "status": "string",
    "worker": "string",
    "hub": "string",
    "client": "string",
    "attempt": "Int64",
    "progress": "float64",
    "message": "string",
    "due": TIME,
    "session": "string",
    "assignment_n": "Int64",
    "params": "string",
    "result": "string",
}
GPU_A100 = {"gpu": {"model": "A100", "memory_gb": 80}}
GPU_L4 = {"gpu": {"model": "L4", "memory_gb": 24}}


def dtypes(frame: pd.DataFrame) -> dict[str, str]:
    """Column -> dtype name, every categorical as plain ``category``."""
    return {
        c: "category" if isinstance(t, pd.CategoricalDtype) else str(t)
        for c, t in frame.dtypes.items()
    }


@pytest.fixture
def jobs(redis_url: str, namespace: str) -> Iterator[JobMonitor]:
    with JobMonitor(redis_url, namespace=namespace) as m:
        yield m


@pytest.fixture
def workers(redis_url: str, namespace: str) -> Iterator[WorkerMonitor]:
    with WorkerMonitor(redis_url, namespace=namespace) as m:
        yield m


@pytest.fixture
def queue(redis_url: str, namespace: str) -> Iterator[RedisMonitor]:
    with RedisMonitor(redis_url, namespace=namespace) as m:
        yield m


# ---------------------------------------------------------------- connecting


@dataclass
class Stack:
    """Stands in for a local stack: anything with ``redis_url`` and ``namespace``."""

    redis_url: str
    namespace: str


def test_connects_from_a_source_object_the_environment_or_a_service(
    redis_url: str, namespace: str, sync_svc: RedisService, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync_svc.add_job(job_id="j1", job_type="render")
    with JobMonitor(Stack(redis_url, namespace)) as m:
        assert m.namespace == namespace
        assert list(m.get_queued_jobs().index) == ["j1"]
    with JobMonitor(url=redis_url, namespace=namespace) as m:
        assert list(m.get_queued_jobs().index) == ["j1"]
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("REDISQ_NAMESPACE", namespace)
    with RedisMonitor() as m:
        assert m.namespace == namespace
        assert m.get_queue_stats()["queued"] == 1
    # a shared service is left open for its owner
    with WorkerMonitor(service=sync_svc) as m:
        assert m.get_all_workers().empty
    assert sync_svc.ping()
    with pytest.raises(TypeError):
        JobMonitor(redis_url, service=sync_svc)
    with pytest.raises(TypeError):
        JobMonitor(redis_url, url=redis_url)


# ------------------------------------------------------------------ shapes


def test_empty_namespace_gives_typed_empty_frames(
    jobs: JobMonitor, workers: WorkerMonitor, queue: RedisMonitor
) -> None:
    for status in ("queued", "active", "completed", "failed", "cancelled"):
        frame = jobs.get_jobs(status)
        assert frame.empty
        assert tuple(frame.columns) == JOB_COLUMNS
        assert dtypes(frame) == JOB_DTYPES
        assert frame.index.name == "job_id"
    for getter in (jobs.get_queued_jobs, jobs.get_active_jobs, jobs.get_completed_jobs):
        assert dtypes(getter()) == JOB_DTYPES
    all_workers = workers.get_all_workers()
    assert all_workers.empty and all_workers.index.name == "worker_id"
    assert tuple(all_workers.columns) == WORKER_COLUMNS
    assert dtypes(all_workers) == WORKER_DTYPES
    assert workers.get_worker_stats("worker").empty
    per_machine = workers.get_worker_stats("machine")
    assert per_machine.empty and per_machine.index.name == "machine_id"
    assert list(per_machine.columns) == [
        "workers",
        "busy",
        "idle",
        "jobs_done",
        "jobs_failed",
        "busy_s",
        "uptime_s",
        "failure_rate",
        "busy_share",
    ]
    depth = queue.get_queue_depth()
    assert depth.empty and depth.index.names == ["job_type", "priority"]
    assert str(depth["count"].dtype) == "int64"
    events = queue.get_events()
    assert events.empty and dtypes(events) == EVENT_DTYPES
    stats = queue.get_queue_stats()
    assert stats["queued"] == stats["running"] == stats["workers"] == 0
    assert stats["latency"] == {
        "sample": 0,
        "wait_s": {"p50": None, "p95": None, "p99": None},
        "run_s": {"p50": None, "p95": None, "p99": None},
    }


def test_bad_arguments_are_refused(
    jobs: JobMonitor, workers: WorkerMonitor, queue: RedisMonitor
) -> None:
    with pytest.raises(ValueError, match="status"):
        jobs.get_jobs("running")
    with pytest.raises(ValueError, match="limit"):
        jobs.get_queued_jobs(limit=0)
    with pytest.raises(ValueError, match="by"):
        workers.get_worker_stats(by="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        queue.get_events(limit=0)


def test_unknown_ids_raise_key_error(jobs: JobMonitor, workers: WorkerMonitor) -> None:
    with pytest.raises(KeyError, match="no job 'nope'"):
        jobs.get_job_details("nope")
    with pytest.raises(NotFoundError, match="not a valid job id"):
        jobs.get_job_details("not an id!")
    with pytest.raises(KeyError, match="no worker 'm9:gpu9'"):
        workers.get_worker_by_id("m9:gpu9")
    with pytest.raises(NotFoundError, match="machine1:gpu0"):
        workers.get_worker_by_id("no-colon")


# --------------------------------------------------- a lifecycle, step by step


async def test_frames_follow_a_job_lifecycle(svc: AsyncRedisService, jobs: JobMonitor) -> None:
    low = (await svc.submit_job("render", 1, {"n": 1}, client_id="c1")).job_id
    high = (await svc.submit_job("render", 5, {"n": 2}, client_id="c1")).job_id
    queued = jobs.get_queued_jobs()
    assert list(queued.index) == [high, low]  # priority first
    assert dtypes(queued) == JOB_DTYPES
    assert list(queued["status"]) == ["queued", "queued"]
    assert list(queued["priority"]) == [5, 1]
    assert list(queued["client_id"]) == ["c1", "c1"]
    assert queued["created"].notna().all() and queued["assigned"].isna().all()
    assert queued["wait_s"].isna().all() and queued["run_s"].isna().all()
    assert jobs.get_job_details(low)["position"] == 1

    a = await svc.register_worker("m1:gpu0", ["render"], session="s1")
    assert a is not None and a.job_id == high
    await svc.update_progress(high, a.attempt, "m1:gpu0", 50, "half way")
    active = jobs.get_active_jobs()
    row = active.loc[high]
    assert list(active.index) == [high]
    assert row["status"] == "running" and row["worker_id"] == "m1:gpu0"
    assert row["progress"] == 50.0 and row["message"] == "half way" and row["attempt"] == 1
    assert row["wait_s"] >= 0 and pd.isna(row["run_s"])

    await asyncio.sleep(0.2)  # the job's work
    nxt = (await svc.complete_job(high, a.attempt, "m1:gpu0", {"url": "x.png"})).next
    assert nxt is not None and nxt.job_id == low
    done = jobs.get_completed_jobs()
    assert list(done.index) == [high]
    row = done.loc[high]
    assert row["status"] == "completed" and row["progress"] == 100.0
    assert 0.15 < row["run_s"] < 1.0
    assert row["total_s"] == pytest.approx(
        (row["finished"] - row["created"]).total_seconds(), abs=1e-6
    )
    steps = [row[s] for s in ("created", "queued", "assigned", "started", "finished")]
    assert steps == sorted(steps)

    details = jobs.get_job_details(high)
    assert details["result"] == {"url": "x.png"} and details["params"] == {"n": 2}
    assert details["status"] == "completed" and details["worker_id"] == "m1:gpu0"
    assert isinstance(details["finished"], pd.Timestamp) and str(details["finished"].tz) == "UTC"
    assert details["run_s"] == pytest.approx(row["run_s"])
    assert details["position"] is None

    # a failure with attempts left waits to retry (still active), then fails for good
    await svc.fail_job(low, nxt.attempt, "m1:gpu0", "out of memory", retryable=True)
    retrying = jobs.get_active_jobs()
    assert list(retrying.index) == [low]
    assert retrying.loc[low, "status"] == "retrying"
    assert retrying.loc[low, "error"] == "out of memory"
    moved, _, assigned = await wait_for(
        lambda: _promoted(svc), timeout=5, what="the retry to be due"
    )
    assert moved == 1 and assigned[0].job_id == low and assigned[0].attempt == 2
    await svc.fail_job(low, 2, "m1:gpu0", "out of memory again", retryable=False)
    failed = jobs.get_failed_jobs()
    assert list(failed.index) == [low]
    assert failed.loc[low, "error"] == "out of memory again"
    assert failed.loc[low, "attempt"] == 2
    assert jobs.get_active_jobs().empty

    gone = (await svc.submit_job("render")).job_id
    await svc.cancel_job(gone)
    cancelled = jobs.get_cancelled_jobs()
    assert list(cancelled.index) == [gone]
    assert cancelled.loc[gone, "status"] == "cancelled"
    assert jobs.get_queued_jobs().empty


async def _promoted(svc: AsyncRedisService) -> Any:
    moved, due, assigned = await svc.promote()
    return (moved, due, assigned) if moved else None


async def test_wait_is_unknown_while_a_requeued_job_waits_again(
    svc: AsyncRedisService, jobs: JobMonitor
) -> None:
    job = (await svc.submit_job("render")).job_id
    await svc.register_worker("m1:gpu0", ["render"], session="s1")
    assert jobs.get_active_jobs().loc[job, "wait_s"] >= 0
    assert await svc.worker_lost("m1:gpu0", "s1")
    row = jobs.get_queued_jobs().loc[job]
    assert row["status"] == "queued" and pd.isna(row["worker_id"])
    assert row["assigned"] < row["queued"]  # from the lost attempt
    assert pd.isna(row["wait_s"])


# ------------------------------------------------------------- a large queue


def test_ten_thousand_queued_jobs_read_at_once(
    sync_svc: RedisService, jobs: JobMonitor, queue: RedisMonitor
) -> None:
    n = 10_000
    for i in range(n):
        sync_svc.add_job(job_type=("render", "train")[i % 2], priority=i % 5)
    start = time.perf_counter()
    frame = jobs.get_queued_jobs(limit=n)
    elapsed = time.perf_counter() - start
    print(f"\nget_queued_jobs(limit={n}) read {len(frame)} jobs in {elapsed:.3f} s")
    assert len(frame) == n and frame.index.is_unique
    assert dtypes(frame) == JOB_DTYPES
    assert frame["priority"].is_monotonic_decreasing  # queue order over both types
    assert (frame["status"] == "queued").all()
    depth = queue.get_queue_depth()
    assert int(depth["count"].sum()) == n
    assert depth.loc[("render", 4), "count"] == n // 10
    stats = queue.get_queue_stats()
    assert stats["queued"] == n
    assert stats["depth_by_type"] == {"render": n // 2, "train": n // 2}
    assert stats["depth_by_priority"] == {p: n // 5 for p in (4, 3, 2, 1, 0)}
    assert list(stats["depth_by_priority"]) == [4, 3, 2, 1, 0]


# ------------------------------------------------- a real hub with workers


async def gpu(hub: Hub, worker_id: str, job_types: list[str], caps: dict[str, Any]) -> Peer:
    """A worker socket registered with ``caps`` as its capabilities."""
    peer = await Peer.open(f"{hub.url}/ws/worker/{worker_id}")
    reply = await peer.request(
        {"type": "register_worker", "job_types": job_types, "capabilities": caps}
    )
    assert reply["type"] == "worker_registered", reply
    return peer


async def test_monitors_watch_a_hub_with_real_workers(
    hub: Hub, jobs: JobMonitor, workers: WorkerMonitor, queue: RedisMonitor
) -> None:
    w1 = await gpu(hub, "m1:gpu0", ["render"], GPU_A100)
    w2 = await gpu(hub, "m1:gpu1", ["train"], GPU_A100)
    w3 = await gpu(hub, "m2:gpu0", ["train"], GPU_L4)
    client = await Peer.open(f"{hub.url}/ws/client/c1")
    acc = await client.request({"type": "submit_job", "job_type": "render", "priority": 2})
    job_id = acc["job_id"]
    a = await w1.expect("job_assigned")
    assert a["job_id"] == job_id
    ack = await w1.request(
        {"type": "update_job_progress", "job_id": job_id, "attempt": 1, "progress": 10}
    )
    assert ack["type"] == "ack"

    # while it runs
    active = await asyncio.to_thread(jobs.get_active_jobs)
    assert active.loc[job_id, "status"] == "running"
    assert active.loc[job_id, "worker_id"] == "m1:gpu0"
    live = await asyncio.to_thread(workers.get_all_workers)
    assert list(live.index) == ["m1:gpu0", "m1:gpu1", "m2:gpu0"]
    assert {c: dtypes(live)[c] for c in WORKER_COLUMNS} == WORKER_DTYPES
    assert live.loc["m1:gpu0", "status"] == "busy"
    assert live.loc["m1:gpu0", "current_job"] == job_id
    assert list(live["hub_id"]) == [hub.hub_id] * 3
    assert list(live["job_types"]) == ["render", "train", "train"]
    assert list(live["cap_gpu_model"]) == ["A100", "A100", "L4"]
    assert list(live["cap_gpu_memory_gb"]) == [80, 80, 24]

    await asyncio.sleep(0.2)  # the job's work
    ack = await w1.request(
        {"type": "complete_job", "job_id": job_id, "attempt": 1, "result": {"ok": True}}
    )
    assert ack["outcome"] == "completed"

    row = (await asyncio.to_thread(jobs.get_completed_jobs)).loc[job_id]
    assert 0.15 < row["run_s"] < 1.0
    assert row["wait_s"] < 1.0

    live = await asyncio.to_thread(workers.get_all_workers)
    assert list(live["status"]) == ["idle"] * 3
    assert list(live["jobs_done"]) == [1, 0, 0]
    assert live.loc["m1:gpu0", "busy_s"] > 0.15
    assert 0 < live.loc["m1:gpu0", "busy_share"] <= 1
    assert (live["last_heartbeat"] >= live["registered"]).all()
    one = await asyncio.to_thread(workers.get_worker_by_id, "m1:gpu0")
    assert one["capabilities"] == GPU_A100 and one["job_types"] == ["render"]
    assert one["hub_id"] == hub.hub_id and one["jobs_done"] == 1 and one["status"] == "idle"
    assert isinstance(one["last_heartbeat"], pd.Timestamp)

    per_worker = await asyncio.to_thread(workers.get_worker_stats)
    assert per_worker.loc["m1:gpu0", "failure_rate"] == 0.0
    assert pd.isna(per_worker.loc["m2:gpu0", "failure_rate"])
    per_machine = await asyncio.to_thread(workers.get_worker_stats, "machine")
    assert list(per_machine.index) == ["m1", "m2"]
    assert per_machine.loc["m1"][["workers", "idle", "busy", "jobs_done"]].tolist() == [2, 2, 0, 1]
    assert per_machine.loc["m2", "workers"] == 1
    assert per_machine.loc["m1", "busy_s"] == pytest.approx(live.loc["m1:gpu0", "busy_s"])

    events = await asyncio.to_thread(queue.get_events)
    assert dtypes(events) == EVENT_DTYPES
    assert events["time"].is_monotonic_increasing
    assert list(events.loc[events["event"] == "worker_up", "worker"]) == [
        "m1:gpu0",
        "m1:gpu1",
        "m2:gpu0",
    ]
    mine = events[events["job"] == job_id]
    assert list(mine["event"]) == ["submitted", "assigned", "progress", "completed"]
    assert mine["worker"].tolist()[1:] == ["m1:gpu0"] * 3
    assert mine.iloc[0]["job_type"] == "render" and mine.iloc[0]["priority"] == 2
    assert mine.iloc[1]["attempt"] == 1 and mine.iloc[1]["assignment_n"] == 1
    assert mine.iloc[2]["progress"] == 10.0
    later = await asyncio.to_thread(queue.get_events, events["event_id"].iloc[-2])
    assert list(later["event_id"]) == [events["event_id"].iloc[-1]]

    stats = await asyncio.to_thread(queue.get_queue_stats)
    assert stats["workers"] == 3 and stats["workers_idle"] == 3 and stats["workers_busy"] == 0
    assert stats["totals"]["completed"] == 1 and stats["throughput_per_s"] > 0
    assert stats["latency"]["sample"] == 1
    assert 0.15 < stats["latency"]["run_s"]["p50"] < 1.0

    # a worker that leaves drops out of the live set but can still be looked up
    await w3.close()

    async def gone() -> bool:
        return "m2:gpu0" not in (await asyncio.to_thread(workers.get_all_workers)).index

    await wait_for(gone, what="m2:gpu0 to leave the live set")
    assert (await asyncio.to_thread(workers.get_worker_by_id, "m2:gpu0"))["status"] == "offline"
    for peer in (client, w1, w2):
        await peer.close()
