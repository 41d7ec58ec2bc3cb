"""A namespace split into shards on a real three-master Redis Cluster.

Each shard is a whole queue under its own hash tag (``keys.shard_tag``): the tests
check that the tags of three shards land on three different masters, that one shard
is today's layout, that ``shards=`` in the URL wins over ``REDISQ_SHARDS``, and, on
the cluster, that jobs spread over the shards, stats sum, events merge, nothing is
lost or doubled, priority order is exact within a shard and the inversions across
shards stay within the bound docs/deploy.md states.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import replace

import pytest
import redis
from redis.crc import key_slot

from redisq_lab.cli import main as cli_main
from redisq_lab.client import QueueClient
from redisq_lab.mock_worker import MockWorker
from redisq_lab.monitors import JobMonitor, RedisMonitor, WorkerMonitor
from redisq_server import AsyncRedisService, EngineLimits, JobStatus, Keys, RedisService, Settings
from redisq_server.config import RedisURLError, check_redis_url, split_shards
from redisq_server.keys import shard_tag
from redisq_server.main import Hub
from redisq_server.operations import Assignment
from redisq_server.sharding import (
    ShardedRedisService,
    inversion_bound,
    job_shard,
    open_service,
    worker_shard,
)
from redisq_server.sharding_async import AsyncShardedService

from .cluster import RedisClusterProcess
from .helpers import wait_for
from .test_hub_process import HubProcess


def _slot(keys: Keys) -> int:
    return key_slot(keys.prefix.encode())


# ------------------------------------------------------------ no Redis needed


def test_one_shard_is_todays_layout() -> None:
    assert Keys("redisq", shard=0) == Keys("redisq")
    assert Keys("redisq", shard=0).prefix == "{redisq}:"
    assert Keys("redisq").job("j1") == "{redisq}:job:j1"
    assert EngineLimits().shards == 1


def test_shard_tags_are_distinct_and_stable() -> None:
    tags = [shard_tag("redisq", i) for i in range(12)]
    assert tags[0] == "redisq"
    assert len(set(tags)) == 12
    assert all(t.startswith("redisq:") for t in tags[1:])
    # a shard's tag does not depend on how many shards were asked for before
    assert shard_tag("redisq", 5) == tags[5]
    with pytest.raises(ValueError, match="expected 0 or more"):
        Keys("redisq", shard=-1)


def test_consecutive_shards_fall_in_different_thirds() -> None:
    for ns in ("redisq", "a", "prod.queue", "t1x1"):
        thirds = [_slot(Keys(ns, shard=i)) * 3 // 16384 for i in range(9)]
        assert all(a != b for a, b in itertools.pairwise(thirds)), (ns, thirds)
        assert all(len(set(thirds[i : i + 3])) == 3 for i in range(7)), (ns, thirds)


def test_url_shards_win_over_the_environment() -> None:
    url = "redis+cluster://127.0.0.1:7000?shards=3"
    assert split_shards(url) == ("redis+cluster://127.0.0.1:7000", 3)
    assert check_redis_url(url) == url
    assert split_shards("redis+cluster://h:1") == ("redis+cluster://h:1", None)
    env = EngineLimits.from_env({"REDISQ_SHARDS": "2"})
    assert env.shards == 2
    from redisq_server.sharding import shards_for

    assert shards_for(url, env).shards == 3
    assert shards_for("redis+cluster://h:1", env).shards == 2
    for bad in (
        "redis://h:1?shards=2",
        "redis+cluster://h:1?shards=0",
        "redis+cluster://h:1?shards=x",
    ):
        with pytest.raises(RedisURLError):
            check_redis_url(bad)
    with pytest.raises(ValueError, match="shards=0"):
        EngineLimits(shards=0)


def test_placement_is_by_hash_and_spreads() -> None:
    counts = Counter(job_shard(f"job-{i}", 3) for i in range(3000))
    assert sorted(counts) == [0, 1, 2]
    assert all(900 <= n <= 1100 for n in counts.values()), counts
    assert job_shard("x", 1) == 0 and worker_shard("m:gpu0", 1) == 0


# ------------------------------------------------------------ on the cluster


def test_shards_land_on_different_masters(cluster: RedisClusterProcess, namespace: str) -> None:
    ports = [cluster.port_for_slot(_slot(Keys(namespace, shard=i))) for i in range(3)]
    assert len(set(ports)) == 3, ports
    limits = EngineLimits(namespace=namespace, shards=3)
    with ShardedRedisService(cluster.url, limits=limits) as svc:
        ids = [f"j{i}" for i in range(30)]
        for jid in ids:
            svc.submit_job("t", 0, {}, job_id=jid)
        for jid in ids:
            shard = job_shard(jid, 3)
            node = cluster.node_client(ports[shard])
            try:  # the job's hash is on its shard's master, and only there
                assert node.exists(Keys(namespace, shard=shard).job(jid)) == 1
            finally:
                node.close()


def test_open_service_one_shard_is_the_plain_service(
    cluster: RedisClusterProcess, namespace: str
) -> None:
    one = open_service(cluster.url, namespace=namespace)
    three = open_service(cluster.url + "?shards=3", namespace=namespace)
    try:
        assert type(one) is RedisService
        assert isinstance(three, ShardedRedisService) and len(three.shards) == 3
    finally:
        one.close()
        three.close()


def _one_worker_per_shard(shards: int) -> list[str]:
    """Worker ids, the i-th homed on shard i."""
    found: dict[int, str] = {}
    for n in itertools.count():
        found.setdefault(worker_shard(f"m:gpu{n}", shards), f"m:gpu{n}")
        if len(found) == shards:
            return [found[i] for i in range(shards)]
    raise AssertionError  # pragma: no cover


def test_drain_exact_per_shard_and_inversions_bounded(
    cluster: RedisClusterProcess, limits: EngineLimits
) -> None:
    """300 jobs of three priorities queued on 3 shards, one worker per shard drained
    in turn: every job completes once; within a shard the order is strict priority,
    FIFO within a priority; across shards the inversions (a job started while a job
    of higher priority waits on another shard) are at most :func:`inversion_bound`."""
    limits = replace(limits, shards=3)
    with ShardedRedisService(cluster.url, limits=limits) as svc:
        jobs = {f"j{i:03d}": (0, 5, 10)[i % 3] for i in range(300)}
        for jid, prio in jobs.items():
            svc.submit_job("t", prio, {}, job_id=jid)
        stats = svc.get_stats()
        assert stats["queued"] == 300
        assert stats["job_types"]["t"]["by_priority"] == {10: 100, 5: 100, 0: 100}
        workers = _one_worker_per_shard(3)
        current: dict[str, Assignment | None] = {
            w: svc.register_worker(w, ["t"], session="s") for w in workers
        }
        waiting = {i: {j for j in jobs if job_shard(j, 3) == i} for i in range(3)}
        started: list[list[str]] = [[], [], []]
        inversions = 0
        while any(current.values()):
            for i, w in enumerate(workers):
                a = current[w]
                if a is None:
                    continue
                assert job_shard(a.job_id, 3) == i  # a worker serves its own shard only
                waiting[i].discard(a.job_id)
                others = [jobs[j] for k in range(3) if k != i for j in waiting[k]]
                inversions += any(p > a.priority for p in others)
                started[i].append(a.job_id)
                current[w] = svc.complete_job(a.job_id, a.attempt, w, {"ok": 1}).next
        done = [j for s in started for j in s]
        assert sorted(done) == sorted(jobs)  # nothing lost, nothing doubled
        for i in range(3):  # strict priority, FIFO within a priority, on each shard
            order = [(-jobs[j], j) for j in started[i]]
            assert order == sorted(order)
        placement = [[jobs[j] for j in jobs if job_shard(j, 3) == i] for i in range(3)]
        bound = inversion_bound(placement)
        assert 0 < inversions <= bound, (inversions, bound)
        assert svc.get_stats()["totals"]["completed"] == 300
        events = svc.events_since("0")
        assert sum(e.name == "completed" for e in events) == 300
        assert [e.id for e in events] == sorted((e.id for e in events), key=_id)
        assert svc.last_event_id() == events[-1].id
        assert len(svc.job_ids("completed", 1000)) == 300


def _id(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


# ------------------------------------------------------------ hubs on a sharded namespace


_HELD = (JobStatus.ASSIGNED, JobStatus.RUNNING)


async def _count(engine: AsyncShardedService, field: str, n: int) -> bool:
    return int((await engine.get_stats())[field]) == n


async def test_hubs_on_a_sharded_namespace_survive_a_killed_hub(
    cluster: RedisClusterProcess, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two hubs on 3 shards (``shards=3`` in the URL): a hub process whose six slow
    GPUs hold a job each is SIGKILLed; the other hub's reaper requeues those jobs
    on their shards and fresh GPUs on it finish every job exactly once; the client
    sees its results and the stats through the surviving hub as for one shard."""
    url = cluster.url + "?shards=3"
    monkeypatch.setenv("REDISQ_LEASE_S", "1")
    monkeypatch.setenv("REDISQ_SHARDS", "2")  # the URL's shards= wins
    proc = HubProcess(url, namespace)
    engine = AsyncShardedService(url, namespace=namespace)
    gone = MockWorker("m1", 6, hub=proc.url, job_types=["t"], run_time=30, reconnect=False)
    fresh = MockWorker("m2", 6, job_types=["t"], run_time=0.001, progress_steps=0)
    try:
        assert len(engine.shards) == 3
        monkeypatch.setenv("REDIS_URL", url)
        monkeypatch.setenv("REDISQ_NAMESPACE", namespace)
        settings = Settings.from_env(hub_port=0)
        async with Hub(settings) as hub:
            assert isinstance(hub.svc, AsyncShardedService) and len(hub.svc.shards) == 3
            await gone.start()
            async with QueueClient(hub, client_id="alice") as client:
                jobs = [{"job_type": "t", "priority": i % 3} for i in range(60)]
                ids = await client.submit_many(jobs)
                assert {job_shard(j, 3) for j in ids} == {0, 1, 2}
                await wait_for(lambda: _count(engine, "running", 6), 10, "six jobs held")
                states = {j: await engine.get_job(j) for j in ids}
                held = [j for j, s in states.items() if s and s.status in _HELD]
                assert len(held) == 6
                proc.kill()
                await wait_for(lambda: _count(engine, "running", 0), 10, "the reaper")
                fresh.hub_url = hub.url
                await fresh.start()
                results = [await client.result(j, timeout=30) for j in ids]
                assert {r["worker_id"].split(":")[0] for r in results} == {"m2"}
                stats = await client.stats()
                assert stats["totals"]["completed"] == 60 and stats["queued"] == 0
        events = await engine.events_since("0")
        completed = Counter(e.fields["job"] for e in events if e.name == "completed")
        assert completed == Counter(ids)  # every job once, none twice
        for job_id in held:
            job = await engine.get_job(job_id)
            assert job is not None and job.lost == 1 and job.attempt == 2
        assert fresh.completed == 60 - gone.completed and gone.completed == 0
    finally:
        await gone.stop()
        await fresh.stop()
        await engine.aclose()
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()


def test_monitors_and_cli_read_a_sharded_namespace(
    cluster: RedisClusterProcess, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The lab's monitors and the ``redisq`` command read across the shards: jobs
    of every shard, their details, the summed depth, a worker on shard 2."""
    url = cluster.url + "?shards=3"
    limits = EngineLimits(namespace=namespace, shards=3)
    with ShardedRedisService(url, limits=limits) as svc:
        ids = [
            svc.submit_job("t", p, {}, job_id=f"q{i}").job_id for i, p in enumerate([0, 5, 10] * 4)
        ]
        assert {job_shard(j, 3) for j in ids} == {0, 1, 2}
        worker = next(f"w{i}:gpu0" for i in range(99) if worker_shard(f"w{i}:gpu0", 3) == 2)
        got = svc.register_worker(worker, ["t"], session="s")
        assert got is not None and job_shard(got.job_id, 3) == 2
    with JobMonitor(url, namespace=namespace) as jobs:
        assert isinstance(jobs.service, ShardedRedisService)
        queued = jobs.get_jobs("queued", 100)
        assert sorted(queued.index) == sorted(set(ids) - {got.job_id})
        assert jobs.get_job_details(got.job_id)["status"] == "assigned"
    with WorkerMonitor(url, namespace=namespace) as workers:
        assert list(workers.get_all_workers().index) == [worker]
    with RedisMonitor(url, namespace=namespace) as redis_monitor:
        stats = redis_monitor.get_queue_stats()
        assert stats["queued"] == 11 and stats["running"] == 1
    code = cli_main(
        [
            "--redis-url",
            url,
            "--namespace",
            namespace,
            "jobs",
            "--status",
            "queued",
            "--format",
            "json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and len(out) == 11


@pytest.mark.parametrize("window", [0, 1])
async def test_one_gpu_serves_every_shard(
    cluster: RedisClusterProcess, namespace: str, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    """One GPU on 3 shards: idle before any job exists, it is moved by the hub's
    sweep to a shard with queued jobs, and after each job to the fullest shard when
    its own is empty; every job is assigned and completed exactly once. The same
    with a prefetch window (the job held ahead comes from the shard it is on)."""
    url = cluster.url + "?shards=3"
    monkeypatch.setenv("REDIS_URL", url)
    monkeypatch.setenv("REDISQ_NAMESPACE", namespace)
    monkeypatch.setenv("REDISQ_LEASE_S", "1")
    engine = AsyncShardedService(url, namespace=namespace)
    worker = MockWorker(
        "solo", 1, job_types=["t"], run_time=0.001, progress_steps=0, prefetch=window
    )
    try:
        async with Hub(Settings.from_env(hub_port=0)) as hub:
            svc = hub.svc
            assert isinstance(svc, AsyncShardedService)
            worker.hub_url = hub.url
            await worker.start()
            async with QueueClient(hub, client_id="alice") as client:
                jobs = [{"job_type": "t", "priority": (0, 5, 10)[i % 3]} for i in range(45)]
                ids = await client.submit_many(jobs)
                assert {job_shard(j, 3) for j in ids} == {0, 1, 2}
                results = await client.results(ids, timeout=30)
                assert {r["worker_id"] for r in results} == {"solo:gpu0"}
            assert svc.moves >= 2  # it served the two shards that are not its home
        events = await engine.events_since("0")
        completed = [e.fields["job"] for e in events if e.name == "completed"]
        assert Counter(completed) == Counter(ids)
        for shard in range(3):  # each job assigned once, on its own shard
            started = [
                e.fields["job"]
                for e in events
                if e.name == "assigned" and job_shard(e.fields["job"], 3) == shard
            ]
            assert sorted(started) == sorted(j for j in ids if job_shard(j, 3) == shard)
    finally:
        await worker.stop()
        await engine.aclose()


async def _placed_off_its_hash_shard(engine: AsyncShardedService, session: str) -> tuple[str, str]:
    """A worker registered through ``engine`` with ``session``, placed on shard 0
    (the one with the fewest of the hub's GPUs) though its hash shard is 1, holding
    a job of shard 0: its id and the job's."""
    worker = next(f"m{i}:gpu0" for i in itertools.count() if worker_shard(f"m{i}:gpu0", 2))
    job_id = next(f"j{i}" for i in itertools.count() if job_shard(f"j{i}", 2) == 0)
    await engine.submit_job("t", 0, {}, job_id=job_id)
    got = await engine.register_worker(worker, ["t"], session=session)
    assert got is not None and got.job_id == job_id  # on shard 0; its hash shard is 1
    return worker, job_id


def _loss_fails_once(monkeypatch: pytest.MonkeyPatch, shard: AsyncRedisService) -> list[str]:
    """Make ``shard``'s first ``worker_lost`` fail as if Redis were away; returns the
    worker ids of its calls so far."""
    real = shard.worker_lost
    calls: list[str] = []

    async def fails_once(worker_id: str, session: str, count: bool = True) -> bool:
        calls.append(worker_id)
        if len(calls) == 1:
            raise redis.exceptions.ConnectionError("Redis is away")
        return await real(worker_id, session, count)

    monkeypatch.setattr(shard, "worker_lost", fails_once)
    return calls


async def test_a_session_another_hub_placed_is_found_on_its_shard_or_the_call_fails(
    cluster: RedisClusterProcess, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker closed by hub A for an outage registers on hub B naming that socket's
    session: B does not know which shard A put it on, so it asks every shard. If the
    shard that holds it cannot be asked, the call fails (the registration is closed
    and tried again), rather than answering "not found" and leaving the job to be
    counted as lost by the reaper."""
    a = AsyncShardedService(cluster.url + "?shards=2", namespace=namespace)
    b = AsyncShardedService(cluster.url + "?shards=2", namespace=namespace)
    try:
        worker, job_id = await _placed_off_its_hash_shard(a, "5e555e555e555e55")
        _loss_fails_once(monkeypatch, b.shards[0])
        with pytest.raises(redis.exceptions.ConnectionError):
            await b.worker_lost(worker, "5e555e555e555e55", count=False)
        assert await b.worker_lost(worker, "5e555e555e555e55", count=False) is True
        job = await b.get_job(job_id)
        assert job is not None and job.status is JobStatus.QUEUED and job.lost == 0
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_lost_worker_s_shard_is_kept_until_that_shard_hears_of_the_loss(
    cluster: RedisClusterProcess, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker is placed on the shard with the fewest of the hub's GPUs, not on its
    hash shard. When the call telling its shard of the worker's loss fails (Redis
    away), the call made again must go to that same shard, which requeues the job
    uncounted; the hash shard would do nothing, and the job would sit with a gone
    worker until the reaper counted the loss."""
    engine = AsyncShardedService(cluster.url + "?shards=2", namespace=namespace)
    try:
        worker, job_id = await _placed_off_its_hash_shard(engine, "s1")
        calls = _loss_fails_once(monkeypatch, engine.shards[0])
        with pytest.raises(redis.exceptions.ConnectionError):
            await engine.worker_lost(worker, "s1", count=False)
        assert await engine.worker_lost(worker, "s1", count=False) is True
        assert calls == [worker, worker]
        job = await engine.get_job(job_id)
        assert job is not None and job.status is JobStatus.QUEUED and job.lost == 0
    finally:
        await engine.aclose()
