"""The engine and the hub on a real three-master Redis Cluster (``redis+cluster://``).

Every key of a namespace carries the hash tag ``{ns}``, so each namespace lives in one
hash slot (one shard) and every Lua script touches that slot only. These tests run
the seed example, the whole job lifecycle, the event stream (XRANGE and a blocking
XREAD), hubs and the lab's MockWorker/QueueClient against the cluster, and check that
two namespaces land on different masters.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from redis.crc import key_slot

from redisq_lab.client import JobFailed, QueueClient
from redisq_lab.mock_worker import MockWorker
from redisq_server import (
    AsyncRedisService,
    EngineLimits,
    ErrorCode,
    JobStatus,
    Keys,
    ProtocolError,
    RedisService,
    Settings,
)
from redisq_server.main import Hub

from .cluster import RedisClusterProcess
from .helpers import invariant_violations, wait_for
from .test_hub_process import HubProcess


@pytest.fixture
def cluster_url(cluster: RedisClusterProcess) -> str:
    return cluster.url


@pytest.fixture
async def csvc(cluster_url: str, limits: EngineLimits) -> AsyncIterator[AsyncRedisService]:
    service = AsyncRedisService(cluster_url, limits=limits)
    yield service
    await service.aclose()


def test_cluster_is_up(cluster: RedisClusterProcess) -> None:
    owners = cluster.slot_owners()
    assert sorted(owners.values()) == sorted(cluster.ports)  # three masters share the slots
    assert sum(hi - lo + 1 for lo, hi in owners) == 16384


def test_seed_example_on_cluster(cluster_url: str, namespace: str) -> None:
    with RedisService(url=cluster_url, namespace=namespace) as svc:
        assert type(svc.redis).__name__ == "RedisCluster"
        svc.add_job(
            job_id="test-job-123",
            job_type="image_generation",
            priority=5,
            params={"prompt": "a beautiful sunset"},
            client_id="test-client",
        )
        status = svc.get_job_status("test-job-123")
        assert status is not None
        assert status["status"] == "queued"
        assert status["position"] == 0
        assert status["params"] == {"prompt": "a beautiful sunset"}
        assert status["client_id"] == "test-client"
        assert svc.get_job_status("no-such-job") is None
        # the monitors' pipelined reads work on the cluster client too
        assert svc.job_ids("queued") == ["test-job-123"]
        assert [j.job_id for j in svc.get_jobs(["test-job-123", "nope"])] == ["test-job-123"]
        assert svc.get_workers() == []
        assert [e.name for e in svc.events_since("0")] == ["submitted"]


def test_seed_environment_with_a_cluster_url(
    cluster_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", cluster_url)
    with RedisService(namespace=namespace) as svc:
        assert type(svc.redis).__name__ == "RedisCluster"
        svc.add_job(job_id="from-env", job_type="t")
        assert svc.get_stats()["queued"] == 1


async def test_engine_lifecycle_on_cluster(csvc: AsyncRedisService) -> None:
    svc = csvc
    # submit: queued by priority
    low = await svc.submit_job("render", 1, {"n": 1}, client_id="c1")
    high = await svc.submit_job("render", 5, {"n": 2}, client_id="c1")
    assert (low.status, high.status) == (JobStatus.QUEUED, JobStatus.QUEUED)
    assert (await svc.get_job(high.job_id)).position == 0  # type: ignore[union-attr]

    # register: claims the higher priority first; progress; complete claims the next
    a = await svc.register_worker("m1:gpu0", ["render"], {"gpu": "A100"}, session="s1")
    assert a is not None and a.job_id == high.job_id and a.attempt == 1
    assert await svc.update_progress(a.job_id, 1, "m1:gpu0", 50, "half") == "running"
    done = await svc.complete_job(a.job_id, 1, "m1:gpu0", {"ok": True})
    assert done.outcome == "completed"
    assert done.next is not None and done.next.job_id == low.job_id

    # fail (retryable) -> retrying -> promoted after the backoff -> completed
    res = await svc.fail_job(low.job_id, 1, "m1:gpu0", "flaky")
    assert res.outcome == "retrying" and res.next is None

    async def promoted() -> list[Any]:
        return (await svc.promote())[2]

    again = await wait_for(promoted, timeout=5, what="retry backoff")
    assert again[0].job_id == low.job_id and again[0].attempt == 2
    with pytest.raises(ProtocolError) as err:  # fenced: the old attempt is refused
        await svc.complete_job(low.job_id, 1, "m1:gpu0", "late")
    assert err.value.code == ErrorCode.STALE_ATTEMPT
    assert (await svc.complete_job(low.job_id, 2, "m1:gpu0", 7)).outcome == "completed"
    job = await svc.get_job(low.job_id)
    assert job is not None and job.status is JobStatus.COMPLETED and job.result == 7

    # cancel a queued job and a running one
    queued = await svc.submit_job("train", client_id="c1")
    c = await svc.cancel_job(queued.job_id, client_id="c1")
    assert c.status is JobStatus.CANCELLED and c.worker_id is None
    running = await svc.submit_job("render", client_id="c1")
    assert running.assignment is not None
    c = await svc.cancel_job(running.job_id)
    assert c.status is JobStatus.CANCELLED and c.worker_id == "m1:gpu0"
    ack = await svc.fail_job(running.job_id, 1, "m1:gpu0", "cancelled", retryable=False)
    assert ack.outcome == "cancelled"

    # requeue: the worker's socket closes; its job goes back to the head of the queue
    lost = await svc.submit_job("render", client_id="c1")
    behind = await svc.submit_job("render", client_id="c1")
    assert lost.assignment is not None and behind.assignment is None
    assert await svc.worker_lost("m1:gpu0", "s1")
    back = await svc.get_job(lost.job_id)
    assert back is not None and back.status is JobStatus.QUEUED and back.position == 0
    a2 = await svc.register_worker("m1:gpu1", ["render"], session="s2")
    assert a2 is not None and a2.job_id == lost.job_id and a2.attempt == 2
    assert (await svc.complete_job(lost.job_id, 2, "m1:gpu1")).next is not None
    assert (await svc.complete_job(behind.job_id, 1, "m1:gpu1")).next is None

    stats = await svc.get_stats()
    assert stats["totals"] == {
        "submitted": 6,
        "completed": 4,
        "failed": 0,
        "cancelled": 2,
        "retried": 1,
        "requeued": 1,
    }
    assert stats["queued"] == 0 and stats["workers"] == 1 and stats["workers_idle"] == 1
    assert await invariant_violations(svc.redis, svc.keys) == []

    names = [e.name for e in await svc.events_since("0")]
    for name in ("submitted", "worker_up", "assigned", "progress", "completed", "retrying"):
        assert name in names
    for name in ("cancelled", "requeued", "worker_down"):
        assert name in names
    assert names.count("completed") == 4


async def test_reaper_and_touch_on_cluster(cluster_url: str, limits: EngineLimits) -> None:
    svc = AsyncRedisService(cluster_url, limits=replace(limits, lease_s=0.2))
    try:
        r = await svc.submit_job("t")
        assert await svc.register_worker("m1:gpu0", ["t"], session="s") is not None
        assert await svc.touch([("m1:gpu0", "s")]) == []
        # nobody extends the lease (its hub "died"): a reaper requeues the job

        async def reaped() -> int:
            return await svc.reap()

        assert await wait_for(reaped, timeout=5, what="lease expiry") == 1
        job = await svc.get_job(r.job_id)
        assert job is not None and job.status is JobStatus.QUEUED and job.lost == 1
    finally:
        await svc.aclose()


async def test_events_on_cluster(csvc: AsyncRedisService, cluster: RedisClusterProcess) -> None:
    svc = csvc
    first = await svc.submit_job("t", client_id="c1")
    last = await svc.last_event_id()
    assert [e.fields["job"] for e in await svc.read_events("0")] == [first.job_id]
    assert await svc.events_since(last) == []
    # a blocking XREAD through the async cluster client wakes up on a new event
    owner = cluster.node_client(cluster.port_for_slot(key_slot(svc.keys.events.encode())))
    blocked_before = int(owner.info("clients")["blocked_clients"])
    reader = asyncio.create_task(svc.read_events(last, block_ms=10_000))

    async def reader_blocked() -> bool:
        return int(owner.info("clients")["blocked_clients"]) > blocked_before

    await wait_for(reader_blocked, timeout=5, what="the XREAD to block on its master")
    owner.close()
    second = await svc.submit_job("t", client_id="c1")
    got = await asyncio.wait_for(reader, 10)
    assert [(e.name, e.fields["job"]) for e in got] == [("submitted", second.job_id)]
    assert [e.fields["job"] for e in await svc.events_since(last)] == [second.job_id]
    # an empty blocking read times out quietly
    assert await svc.read_events(got[-1].id, block_ms=50) == []


def _get_json(url: str) -> tuple[int, Any]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, json.loads(r.read())


async def test_hubs_run_jobs_end_to_end_on_cluster(
    cluster_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a hub process configured with REDIS_URL=redis+cluster://... and an in-process hub
    # built from the same environment; the worker is on one, the client on the other
    proc = HubProcess(cluster_url, namespace)
    try:
        monkeypatch.setenv("REDIS_URL", cluster_url)
        monkeypatch.setenv("REDISQ_NAMESPACE", namespace)
        settings = Settings.from_env(hub_port=0)
        assert settings.redis_url == cluster_url
        loop = asyncio.get_running_loop()
        health_url = proc.url.replace("ws://", "http://") + "/health"
        status, health = await loop.run_in_executor(None, _get_json, health_url)
        assert status == 200 and health["redis"] is True

        worker = MockWorker("m1", 2, hub=proc.url, job_types=["render"], run_time=0.01)
        async with Hub(settings) as hub, worker:
            assert type(hub.svc.redis).__name__ == "RedisCluster"
            async with QueueClient(hub, client_id="alice") as client:
                ids = await client.submit_many(
                    [{"job_type": "render", "priority": i % 3} for i in range(30)]
                )
                results = [await client.result(j, timeout=30) for j in ids]
                assert {r["worker_id"] for r in results} <= {"m1:gpu0", "m1:gpu1"}
                # a job nobody accepts stays queued and can be cancelled
                stuck = await client.submit("train")
                assert (await client.status(stuck))["status"] == "queued"
                assert (await client.cancel(stuck))["status"] == "cancelled"
                with pytest.raises(JobFailed):
                    await client.result(stuck, timeout=5)
                # replay: this client's events, from any hub
                events = (await client.events_since("0"))["events"]
                assert {e["job"] for e in events if e["e"] == "completed"} == set(ids)
                stats = await client.stats()
                assert stats["totals"]["completed"] == 30 and stats["totals"]["cancelled"] == 1
        assert worker.completed == 30 and not worker.errors
        assert proc.stop() == 0  # a graceful stop on the cluster too
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()


def _namespaces_on_two_masters(cluster: RedisClusterProcess, base: str) -> tuple[str, str]:
    """Two namespaces whose hash tags fall in slots served by different masters."""
    first = f"{base}a"
    owner = cluster.port_for_slot(key_slot(first.encode()))
    for i in range(1000):
        other = f"{base}b{i}"
        if cluster.port_for_slot(key_slot(other.encode())) != owner:
            return first, other
    raise AssertionError("no second namespace found")  # pragma: no cover


async def test_namespaces_map_to_slots_on_different_masters(
    cluster: RedisClusterProcess, namespace: str
) -> None:
    names = _namespaces_on_two_masters(cluster, namespace)
    services = [AsyncRedisService(cluster.url, namespace=ns) for ns in names]
    try:
        for svc in services:
            await svc.register_worker("m1:gpu0", ["t"], session="s")
            r = await svc.submit_job("t", client_id="c1")
            assert r.assignment is not None
            await svc.complete_job(r.job_id, 1, "m1:gpu0", "done")
            assert (await svc.get_stats())["totals"]["completed"] == 1
        ports = []
        for ns in names:
            keys = Keys(ns)
            slot = key_slot(keys.events.encode())
            assert slot == key_slot(ns.encode())  # the tag alone decides the slot
            port = cluster.port_for_slot(slot)
            ports.append(port)
            node = cluster.node_client(port)
            try:
                assert node.execute_command("CLUSTER", "KEYSLOT", keys.events) == slot
                assert node.execute_command("CLUSTER", "KEYSLOT", keys.job("x")) == slot
                # every key of the namespace is on its master, in its one slot
                n = node.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)
                in_slot = node.execute_command("CLUSTER", "GETKEYSINSLOT", slot, n)
                # the slot may also hold another test's namespace whose tag hashes to
                # it; every key of this one is here
                ours = [k for k in in_slot if k.startswith(keys.prefix)]
                assert len(ours) >= 5  # job, queue/idle, worker, stats, events, ...
                assert keys.events in ours and keys.stats in ours
            finally:
                node.close()
            for other in cluster.ports:  # the other masters hold none of them
                if other == port:
                    continue
                node = cluster.node_client(other)
                try:
                    assert node.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
                finally:
                    node.close()
        assert ports[0] != ports[1]
    finally:
        for svc in services:
            await svc.aclose()
