"""MockWorker and QueueClient against a real hub and Redis."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import pytest

from redisq_lab.client import JobFailed, QueueClient, RequestError
from redisq_lab.mock_worker import MockWorker, sample_run_time
from redisq_server import EngineLimits, RedisService, Settings
from redisq_server.main import Hub

from .helpers import wait_for


async def test_seed_example_and_results(hub: Hub, redis_url: str, limits: EngineLimits) -> None:
    worker = MockWorker(
        machine_id="test-machine", gpu_count=2, ws_host="127.0.0.1", ws_port=hub.port
    )
    await worker.start()
    assert worker.running
    assert sorted(hub.registry.workers) == ["test-machine:gpu0", "test-machine:gpu1"]
    async with QueueClient(hub.url, "alice") as client:
        ids = [
            await client.submit("image_generation", params={"duration_s": 0.01}) for _ in range(6)
        ]
        results = [await client.result(j, timeout=10) for j in ids]
    assert {r["worker_id"] for r in results} <= set(worker.worker_ids)
    assert worker.completed == 6
    with RedisService(url=redis_url, limits=limits) as svc:
        w = svc.get_worker("test-machine:gpu0")
        assert w is not None and w.capabilities["gpu_model"] == "MockGPU A100"
    await worker.stop()
    assert not worker.running
    await worker.stop()  # idempotent


async def test_run_time_from_params_shows_in_job_timestamps(
    hub: Hub, redis_url: str, limits: EngineLimits
) -> None:
    async with MockWorker("m1", 1, hub=hub, progress_steps=3), QueueClient(hub, "c") as client:
        job_id = await client.submit("default", params={"duration_s": 0.2})
        updates = [u async for u in client.follow(job_id)]
    assert updates[-1]["type"] == "job_completed"
    progress = [u["progress"] for u in updates if u.get("status") == "running"]
    assert progress == [0.0, 33.33, 66.67]
    with RedisService(url=redis_url, limits=limits) as svc:
        job = svc.get_job(job_id)
    assert job is not None and job.started is not None and job.finished is not None
    assert 0.18 < job.finished - job.started < 1.0


async def test_failures_are_retried_then_fail(hub: Hub) -> None:
    async with (
        MockWorker("m1", 1, hub=hub, failure_rate=1.0, run_time=0.0),
        QueueClient(hub, "c") as client,
    ):
        job_id = await client.submit("default", max_attempts=2)
        with pytest.raises(JobFailed) as err:
            await client.result(job_id, timeout=10)
        assert err.value.error == "mock failure"
        st = await client.status(job_id)
        assert st["status"] == "failed" and st["attempt"] == 2


async def test_disconnects_lose_nothing(redis_url: str, limits: EngineLimits) -> None:
    lim = replace(limits, max_lost=100)
    async with Hub(Settings(redis_url=redis_url, hub_port=0, limits=lim)) as hub:
        worker = MockWorker("m1", 3, hub=hub, run_time=0.002, disconnect_rate=0.3, seed=3)
        await worker.start()
        async with QueueClient(hub, "c") as client:
            ids = await client.submit_many([{"job_type": "default"} for _ in range(60)])
            results = await asyncio.gather(*(client.result(j, timeout=60) for j in ids))
        await worker.stop()
    assert len(results) == 60
    assert worker.disconnects > 5
    assert worker.completed == 60
    assert worker.connects > 3
    with RedisService(url=redis_url, limits=lim) as svc:
        stats = svc.get_stats()
    assert stats["totals"]["completed"] == 60
    assert stats["totals"]["requeued"] == worker.disconnects


async def test_burst_mode_drains_then_stops(hub: Hub) -> None:
    async with QueueClient(hub, "c") as client:
        ids = await client.submit_many(
            [{"job_type": "default", "priority": i % 3} for i in range(50)]
        )
        worker = MockWorker("m1", 4, hub=hub, run_time=0.0, progress_steps=0, burst=True)
        await worker.start()
        await worker.join(timeout=30)
        assert not worker.running
        assert worker.completed == 50
        assert sorted(r.job_id for r in worker.history) == sorted(ids)
        assert (await client.stats())["queued"] == 0


async def test_cancel_reaches_the_running_mock(hub: Hub) -> None:
    async with MockWorker("m1", 1, hub=hub) as worker, QueueClient(hub, "c") as client:
        long = await client.submit("default", params={"duration_s": 60})
        await wait_for(lambda: _has_history(worker), what="job started")
        after = await client.submit("default", params={"duration_s": 0})
        await client.cancel(long)
        with pytest.raises(JobFailed) as err:
            await client.result(long, timeout=5)
        assert err.value.status == "cancelled"
        assert await client.result(after, timeout=10)
        assert worker.cancelled == 1
        assert worker.history[0].outcome == "cancelled"


async def _has_history(worker: MockWorker) -> bool:
    return bool(worker.history)


async def test_reconnects_when_the_hub_comes_back(redis_url: str, limits: EngineLimits) -> None:
    settings = Settings(redis_url=redis_url, hub_port=0, limits=limits)
    first = await Hub(settings).start()
    port = first.port
    worker = MockWorker("m1", 2, hub=first, run_time=0.0)
    await worker.start()
    await first.stop()
    second = await Hub(replace(settings, hub_port=port)).start()
    try:
        await wait_for(lambda: _registered(second, 2), timeout=20, what="re-registration")
        async with QueueClient(second, "c") as client:
            job_id = await client.submit("default")
            assert (await client.result(job_id, timeout=10))["worker_id"].startswith("m1:")
    finally:
        await worker.stop()
        await second.stop()


async def _registered(hub: Hub, n: int) -> bool:
    return len(hub.registry.workers) == n


async def test_start_fails_clearly_without_a_hub() -> None:
    worker = MockWorker("m1", 1, ws_host="127.0.0.1", ws_port=1, reconnect=False)
    with pytest.raises(ConnectionError, match="did not register"):
        await worker.start(timeout=3)


def test_sync_forms(redis_url: str, limits: EngineLimits) -> None:
    async def scenario() -> None:
        async with Hub(Settings(redis_url=redis_url, hub_port=0, limits=limits)) as h:
            worker = await asyncio.to_thread(MockWorker("m1", 1, hub=h, run_time=0).start_in_thread)
            async with QueueClient(h, "c") as client:
                assert await client.result(await client.submit("default"), timeout=10)
            await asyncio.to_thread(worker.close)
            assert not worker.running

    asyncio.run(scenario())


async def test_client_errors_and_ownership(hub: Hub) -> None:
    async with QueueClient(hub, "alice") as alice, QueueClient(hub, "bob") as bob:
        job_id = await alice.submit("nobody_runs_this")
        with pytest.raises(RequestError) as err:
            await bob.status(job_id)
        assert err.value.code == "not_found"
        with pytest.raises(RequestError) as err:
            await alice.submit("bad type!")
        assert err.value.code == "invalid_field"
        assert (await alice.status(job_id))["status"] == "queued"


def test_run_time_distributions() -> None:
    rng = random.Random(0)
    job: dict[str, object] = {"params": {}}
    assert sample_run_time(0.5, rng, job) == 0.5
    assert sample_run_time(("fixed", 2), rng, job) == 2.0
    assert sample_run_time(0.5, rng, {"params": {"duration_s": 3}}) == 3.0
    draws = [sample_run_time(("exponential", 0.1), rng, job) for _ in range(4000)]
    assert 0.09 < sum(draws) / len(draws) < 0.11
    draws = [sample_run_time(("lognormal", 0.2, 0.5), rng, job) for _ in range(4000)]
    assert 0.18 < sum(draws) / len(draws) < 0.22
    assert 1 <= sample_run_time(("uniform", 1, 2), rng, job) <= 2
    assert sample_run_time(lambda r, j: 7, rng, job) == 7.0
    with pytest.raises(ValueError, match="unknown"):
        sample_run_time(("weibull", 1), rng, job)
