"""Scheduling policies on a real hub with real mock workers: delayed jobs, aging and
fair share per client (docs/scheduling.md). Strict priority, the default, is covered
unchanged by test_engine.py and test_hub.py."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest

from redisq_lab import LocalStack, MockWorker, QueueClient, cli
from redisq_lab.frames import policy_text
from redisq_server import AsyncRedisService, EngineLimits, JobStatus, RedisService
from redisq_server.main import Hub
from redisq_server.models import aged_score, entered_ms
from redisq_server.protocol import ErrorCode, ProtocolError

from .helpers import hub_settings, invariant_violations, wait_for, wait_sync

#: how late a due job may reach its worker: the promoter wakes on the submit and
#: sleeps exactly until the due time, so this is a bound on a loaded test machine
SOON_S = 0.5


@asynccontextmanager
async def running_hub(redis_url: str, limits: EngineLimits) -> AsyncIterator[Hub]:
    async with Hub(hub_settings(redis_url, limits)) as hub:
        yield hub


async def first_update(client: QueueClient, job_id: str, status: str) -> dict[str, Any]:
    """The first update of ``job_id`` with ``status`` (bounded by the caller)."""
    async for update in client.follow(job_id):
        if update.get("status") == status:
            return update
    raise AssertionError(f"{job_id} ended without status {status}")


# ------------------------------------------------------------------ delayed jobs


async def test_delayed_job_waits_scheduled_then_runs_soon_after_its_time(
    redis_url: str, limits: EngineLimits, svc: AsyncRedisService
) -> None:
    async with (
        running_hub(redis_url, limits) as hub,
        MockWorker("m1", 1, hub=hub, job_types=["render"], run_time=0.0),
        QueueClient(hub, "alice") as client,
    ):
        job_id = await client.submit("render", params={}, delay_s=0.4)
        assert client.traces[job_id].status == "scheduled"
        job = await svc.get_job(job_id)
        assert job is not None and job.status is JobStatus.SCHEDULED and job.position is None
        assert job.due is not None and job.created is not None
        assert job.due == pytest.approx(job.created + 0.4, abs=1e-3)
        stats = await svc.get_stats()
        assert (stats["scheduled"], stats["retrying"], stats["queued"]) == (1, 0, 0)
        # the worker is idle all along: only the due time holds the job back
        await asyncio.wait_for(client.result(job_id), 5)
        done = await svc.get_job(job_id)
        assert done is not None and done.assigned is not None
        assert done.due is not None and done.due <= done.assigned < done.due + SOON_S
        assert done.queued == pytest.approx(done.assigned, abs=0.05)  # its wait starts when due
        assert (await svc.get_stats())["scheduled"] == 0


async def test_due_job_with_no_idle_worker_is_queued_with_its_priority(
    redis_url: str, limits: EngineLimits, svc: AsyncRedisService
) -> None:
    async with running_hub(redis_url, limits) as hub, QueueClient(hub, "alice") as client:
        early = await client.submit("train", priority=1)
        late = await client.submit("train", priority=5, delay_s=0.2)
        mid = await client.submit("train", priority=5)  # queued before `late` is due
        update = await asyncio.wait_for(first_update(client, late, "queued"), 5)
        assert update["event"] == "promoted"
        job = await svc.get_job(late)
        assert job is not None and job.status is JobStatus.QUEUED
        # behind the job of its priority queued before it was due, ahead of a lower one
        positions = [(await svc.get_job(j)).position for j in (mid, late, early)]  # type: ignore[union-attr]
        assert positions == [0, 1, 2]


async def test_cancel_a_scheduled_job(
    redis_url: str, limits: EngineLimits, svc: AsyncRedisService, sync_svc: RedisService
) -> None:
    async with running_hub(redis_url, limits) as hub, QueueClient(hub, "alice") as client:
        job_id = await client.submit("render", delay_s=60)
        assert sync_svc.job_ids("scheduled") == [job_id]
        assert job_id in sync_svc.job_ids("active")
        cancelled = await svc.cancel_job(job_id, "alice")
        assert cancelled.status is JobStatus.CANCELLED and cancelled.worker_id is None
        stats = await svc.get_stats()
        assert (stats["scheduled"], stats["retrying"]) == (0, 0)
        assert sync_svc.job_ids("scheduled") == [] and sync_svc.job_ids("active") == []
        assert sync_svc.job_ids("cancelled") == [job_id]


async def test_delay_fields_are_checked(svc: AsyncRedisService) -> None:
    with pytest.raises(ProtocolError) as both:
        await svc.submit_job("render", delay_s=1, run_at=2e9)
    assert both.value.code is ErrorCode.INVALID_FIELD
    for bad in (-1, float("nan"), 400 * 86_400, True):
        with pytest.raises(ProtocolError):
            await svc.submit_job("render", delay_s=bad)
    t = (await svc.get_stats())["time"]
    with pytest.raises(ProtocolError) as far:
        await svc.submit_job("render", run_at=t + 400 * 86_400)
    assert far.value.code is ErrorCode.INVALID_FIELD
    past = await svc.submit_job("render", run_at=t - 10)  # already due: queued at once
    assert past.status is JobStatus.QUEUED and past.position == 0
    zero = await svc.submit_job("render", delay_s=0)
    assert zero.status is JobStatus.QUEUED and zero.position == 1
    later = await svc.submit_job("render", run_at=t + 30)
    assert later.status is JobStatus.SCHEDULED and later.position is None


async def test_a_hub_started_later_promotes_what_is_due(
    redis_url: str, limits: EngineLimits, svc: AsyncRedisService
) -> None:
    # submitted with no hub running: any hub's promoter queues it once due
    result = await svc.submit_job("render", delay_s=0.1, client_id="alice")
    assert result.status is JobStatus.SCHEDULED
    async with (
        running_hub(redis_url, replace(limits)) as hub,
        MockWorker("m1", 1, hub=hub, job_types=["render"], run_time=0.0),
    ):

        async def done() -> bool:
            job = await svc.get_job(result.job_id)
            return job is not None and job.status is JobStatus.COMPLETED

        await wait_for(done, timeout=5, what="the due job ran")


# ------------------------------------------------------------------------ aging


async def run_in_order(hub: Hub, svc: AsyncRedisService, job_ids: list[str]) -> list[str]:
    """Start one GPU on ``hub``, let it run every job, and return the jobs in the
    order the GPU got them (by their server-clock assignment times)."""
    async with MockWorker("solo", 1, hub=hub, job_types=["render"], run_time=0.0):

        async def all_done() -> list[Any] | None:
            jobs = [await svc.get_job(j) for j in job_ids]
            ok = all(j is not None and j.status is JobStatus.COMPLETED for j in jobs)
            return jobs if ok else None

        jobs = await wait_for(all_done, timeout=10, what="every job completed")
    return [j.job_id for j in sorted(jobs, key=lambda j: j.assigned)]


async def server_time_reaches(svc: AsyncRedisService, t: float) -> None:
    """Wait until the Redis server's clock shows ``t`` (bounded)."""

    async def reached() -> bool:
        return bool((await svc.get_stats())["time"] >= t)

    await wait_for(reached, timeout=10, what=f"server time {t}")


async def test_aging_a_low_priority_job_that_waited_three_steps_runs_first(
    redis_url: str, limits: EngineLimits
) -> None:
    aging = replace(limits, aging_s=1.0)
    aged = AsyncRedisService(redis_url, limits=aging)
    async with running_hub(redis_url, aging) as hub:
        old = (await aged.submit_job("render", 0, client_id="c")).job_id
        created = (await aged.get_job(old)).created  # type: ignore[union-attr]
        assert created is not None
        await server_time_reaches(aged, created + 1.0)
        mid = (await aged.submit_job("render", 2, client_id="c")).job_id  # 1 s later
        await server_time_reaches(aged, created + 3.0)
        late = (await aged.submit_job("render", 2, client_id="c")).job_id  # 3 s later
        # one step per second: old (p0) has gained 2 steps on mid, not enough; 3 on late
        positions = [(await aged.get_job(j)).position for j in (mid, old, late)]  # type: ignore[union-attr]
        assert positions == [0, 1, 2]
        assert await run_in_order(hub, aged, [old, mid, late]) == [mid, old, late]
    await aged.aclose()


async def test_aging_scores_match_the_model_and_survive_a_requeue(
    redis_url: str, limits: EngineLimits
) -> None:
    aging = replace(limits, aging_s=0.25)
    svc = AsyncRedisService(redis_url, limits=aging)
    r: Any = svc.redis
    queue = svc.keys.queue("render")
    try:
        ids = [(await svc.submit_job("render", p, client_id="c")).job_id for p in (0, 7, -3)]
        for jid in ids:
            h = await r.hgetall(svc.keys.job(jid))
            entered = entered_ms(float(h["created"]))
            expected = aged_score(int(h["priority"]), entered, 250, int(h["seq"]))
            assert await r.zscore(queue, jid) == expected
        before = await r.zrange(queue, 0, -1, withscores=True)
        # a worker takes the head and is lost: the job goes back with the same score
        a = await svc.register_worker("m1:gpu0", ["render"], session="s1")
        assert a is not None and a.job_id == before[0][0] == ids[1]
        assert await svc.worker_lost("m1:gpu0", "s1")
        assert await r.zrange(queue, 0, -1, withscores=True) == before
    finally:
        await svc.aclose()


# ------------------------------------------------------------- fair share per client


async def burst_then_single(svc: AsyncRedisService, n: int = 50) -> tuple[list[str], str]:
    """Client ``burst`` queues ``n`` jobs, then client ``single`` queues one (all
    priority 0, no worker connected yet)."""
    burst = [(await svc.submit_job("render", 0, client_id="burst")).job_id for _ in range(n)]
    single = (await svc.submit_job("render", 0, client_id="single")).job_id
    return burst, single


async def test_fair_share_a_single_job_runs_within_two_assignments_of_a_burst(
    redis_url: str, limits: EngineLimits, sync_svc: RedisService
) -> None:
    fair = replace(limits, fair_share="client")
    svc = AsyncRedisService(redis_url, limits=fair)
    try:
        async with running_hub(redis_url, fair) as hub:
            burst, single = await burst_then_single(svc)
            # every queued job is counted and listed, though only heads are in the queue
            stats = await svc.get_stats()
            assert stats["queued"] == 51 and stats["job_types"]["render"]["by_priority"] == {0: 51}
            listed = sync_svc.job_ids("queued")
            assert set(listed) == {*burst, single} and listed[:3] == [burst[0], single, burst[1]]
            assert [(await svc.get_job(j)).position for j in (burst[0], single)] == [0, 1]  # type: ignore[union-attr]
            order = await run_in_order(hub, svc, [*burst, single])
        assert order.index(single) <= 1  # within the first two assignments
        assert [j for j in order if j != single] == burst  # the burst keeps its own order
        assert (await svc.get_stats())["queued"] == 0
        assert sync_svc.redis.exists(svc.keys.subs("render")) == 0  # no sub-queue left
    finally:
        await svc.aclose()


async def test_fair_share_with_a_busy_worker_the_next_assignment_is_the_other_client(
    redis_url: str, limits: EngineLimits
) -> None:
    fair = replace(limits, fair_share="client")
    svc = AsyncRedisService(redis_url, limits=fair)
    try:
        async with (
            running_hub(redis_url, fair) as hub,
            MockWorker("solo", 1, hub=hub, job_types=["render"], run_time=0.02),
            QueueClient(hub, "burst") as burst_client,
            QueueClient(hub, "single") as single_client,
        ):
            burst = await burst_client.submit_many(
                [{"job_type": "render", "params": {}} for _ in range(50)]
            )
            single = await single_client.submit("render")
            await asyncio.wait_for(single_client.result(single), 10)
            done = await svc.get_job(single)
            assert done is not None and done.queued is not None and done.assigned is not None
            jobs = [await svc.get_job(j) for j in burst]
            between = [
                j for j in jobs if j and j.assigned and done.queued < j.assigned < done.assigned
            ]
            # the single job was one of the next two assignments after it was queued
            assert len(between) <= 1
    finally:
        await svc.aclose()


async def test_fair_share_a_resubmit_behind_the_head_tells_its_position(
    redis_url: str, limits: EngineLimits
) -> None:
    """The same job id sent again by its client (say, after `unavailable`) answers
    with the stored job's position, also for a job waiting behind its client's head
    under fair share (it used to answer none): the same lower bound a status read
    gives."""
    svc = AsyncRedisService(redis_url, limits=replace(limits, fair_share="client"))
    try:
        for i in range(3):
            await svc.submit_job("t", client_id="c", job_id=f"fs-{i}")
        again = await svc.submit_job("t", client_id="c", job_id="fs-2")
        stored = await svc.get_job("fs-2")
        assert stored is not None and again.position == stored.position == 2
    finally:
        await svc.aclose()


async def test_fair_share_a_retried_head_gets_its_place_back(
    redis_url: str, limits: EngineLimits
) -> None:
    """A job that became its client's head with a fresh sequence number keeps that
    head score: retried after a failure, it re-enters the queue at it, not at its own
    queue score (docs/scheduling.md)."""
    svc = AsyncRedisService(redis_url, limits=replace(limits, fair_share="client"))
    try:
        a1, a2 = [(await svc.submit_job("t", client_id="a")).job_id for _ in range(2)]
        b1 = (await svc.submit_job("t", client_id="b")).job_id
        first = await svc.register_worker("w:gpu0", ["t"], session="w")
        assert first is not None and first.job_id == a1  # a2 becomes a's head now
        head = await svc.redis.hget(svc.keys.job(a2), "head")
        own = await svc.redis.zscore(svc.keys.sub("t", "a"), a2)
        assert head is not None and own is not None and float(head) > own
        nxt = (await svc.complete_job(a1, 1, "w:gpu0")).next
        assert nxt is not None and nxt.job_id == b1
        nxt = (await svc.complete_job(b1, 1, "w:gpu0")).next
        assert nxt is not None and nxt.job_id == a2
        await svc.fail_job(a2, 1, "w:gpu0", "boom")
        assert await svc.worker_lost("w:gpu0", "w", count=False)  # no one to take it

        async def queued() -> bool:
            await svc.promote()
            j = await svc.get_job(a2)
            return j is not None and j.status is JobStatus.QUEUED

        await wait_for(queued, 5, "the retry to be due")
        assert await svc.redis.zscore(svc.keys.queue("t"), a2) == float(head)
        assert await invariant_violations(svc.redis, svc.keys) == []
    finally:
        await svc.aclose()


async def test_fair_share_cancel_and_requeue_of_a_head_keep_the_queue_right(
    redis_url: str, limits: EngineLimits, sync_svc: RedisService
) -> None:
    fair = replace(limits, fair_share="client")
    svc = AsyncRedisService(redis_url, limits=fair)
    r: Any = svc.redis
    queue = svc.keys.queue("render")
    try:
        a = [(await svc.submit_job("render", 0, client_id="a")).job_id for _ in range(3)]
        b = (await svc.submit_job("render", 0, client_id="b")).job_id
        assert await r.zrange(queue, 0, -1) == [a[0], b]
        # cancelling a's head puts a's next job in the queue, behind b
        await svc.cancel_job(a[0], "a")
        assert await r.zrange(queue, 0, -1) == [b, a[1]]
        # a worker takes b and is lost: b comes back at its place
        got = await svc.register_worker("m1:gpu0", ["render"], session="s1")
        assert got is not None and got.job_id == b
        assert await r.zrange(queue, 0, -1) == [a[1]]
        assert await svc.worker_lost("m1:gpu0", "s1")
        assert await r.zrange(queue, 0, -1) == [b, a[1]]
        # a job of higher priority from a becomes a's head at once
        urgent = (await svc.submit_job("render", 9, client_id="a")).job_id
        assert await r.zrange(queue, 0, -1) == [urgent, b]
        assert sync_svc.job_ids("queued") == [urgent, b, a[1], a[2]]
        stats = await svc.get_stats()
        assert stats["queued"] == 4
        # the last of a's jobs to leave empties its sub-queue
        for j in (urgent, a[1], a[2]):
            await svc.cancel_job(j)
        assert await r.smembers(svc.keys.subs("render")) == {"b"}
    finally:
        await svc.aclose()


async def test_strict_is_the_default_and_a_burst_holds_a_later_client_behind_it(
    redis_url: str, limits: EngineLimits, svc: AsyncRedisService
) -> None:
    assert limits.policy == {"aging_s": 0.0, "fair_share": "off"}
    async with running_hub(redis_url, limits) as hub:
        burst, single = await burst_then_single(svc, n=20)
        assert (await svc.get_job(single)).position == 20  # type: ignore[union-attr]
        assert await run_in_order(hub, svc, [*burst, single]) == [*burst, single]


async def test_fair_share_under_concurrent_load_runs_every_job_once(
    redis_url: str, limits: EngineLimits
) -> None:
    # three clients submit while four workers complete and claim, all at once
    fair = replace(limits, fair_share="client", aging_s=0.5)
    svc = AsyncRedisService(redis_url, limits=fair)
    n = 150
    try:
        inbox: dict[str, asyncio.Queue[Any]] = {}
        for i in range(4):
            inbox[f"m1:gpu{i}"] = asyncio.Queue()
            await svc.register_worker(f"m1:gpu{i}", ["render"], session=f"s{i}")
        ran: list[str] = []
        finished: list[int] = []  # completions answered: workers stop only after

        async def submit(client: str) -> list[str]:
            out = []
            for k in range(n):
                r = await svc.submit_job("render", k % 3, client_id=client)
                if r.assignment is not None:  # an idle worker took it at once
                    inbox[r.assignment.worker_id].put_nowait(r.assignment)
                out.append(r.job_id)
            return out

        async def work(worker_id: str) -> None:
            while True:
                a = await inbox[worker_id].get()
                while a is not None:
                    ran.append(a.job_id)
                    a = (await svc.complete_job(a.job_id, a.attempt, a.worker_id)).next
                    finished.append(1)

        workers = [asyncio.create_task(work(w)) for w in inbox]
        ids = [j for batch in await asyncio.gather(*(submit(c) for c in "abc")) for j in batch]

        async def all_ran() -> bool:
            return len(finished) >= len(ids)

        await wait_for(all_ran, timeout=30, what="every job ran")
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        assert sorted(ran) == sorted(ids)  # every job ran, exactly once
        stats = await svc.get_stats()
        assert stats["queued"] == 0 and stats["totals"]["completed"] == 3 * n
        r: Any = svc.redis
        assert await r.exists(svc.keys.queue("render"), svc.keys.subs("render")) == 0
        assert await invariant_violations(r, svc.keys) == []
    finally:
        await svc.aclose()


# --------------------------------------------------------------- where it shows


async def test_the_policy_shows_in_health_stats_summary_and_card(
    redis_url: str, limits: EngineLimits, capsys: pytest.CaptureFixture[str]
) -> None:
    fair = replace(limits, fair_share="client", aging_s=2.0)
    svc = AsyncRedisService(redis_url, limits=limits)  # a reader with the default policy
    try:
        assert (await svc.get_stats())["policy"] is None  # no hub has started
        async with running_hub(redis_url, fair) as hub:
            loop = asyncio.get_running_loop()
            body = await loop.run_in_executor(None, _health, hub.port)
            assert body["policy"] == {"aging_s": 2.0, "fair_share": "client"}
            # a reader sees what the hubs run, not its own setting
            assert (await svc.get_stats())["policy"] == {"aging_s": 2.0, "fair_share": "client"}
            argv = ["--redis-url", redis_url, "--namespace", limits.namespace, "summary"]
            assert await loop.run_in_executor(None, cli.main, argv) == 0
            out = capsys.readouterr().out
            assert "policy      aging 2 s/step, fair share by client" in out
            assert "scheduled   0" in out
            top = [*argv[:-1], "top", "--iterations", "1"]
            assert await loop.run_in_executor(None, cli.main, top) == 0
            frame = capsys.readouterr().out
            assert "0 scheduled" in frame and "aging 2 s/step, fair share by client" in frame
    finally:
        await svc.aclose()
    assert policy_text({"aging_s": 0.0, "fair_share": "off"}) == "strict priority"


def test_the_stack_card_shows_its_policy() -> None:
    with LocalStack(aging_s=0.5) as stack:
        assert "aging 0.5 s/step" in stack._repr_html_()
        assert "Scheduled" in stack._repr_html_()


def _health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return dict(json.loads(r.read()))


async def test_fair_share_when_avoidances_end_every_idle_gpu_gets_a_head(
    redis_url: str, limits: EngineLimits
) -> None:
    # two jobs of one client lost by machine m avoid it; m's other GPUs idle meanwhile
    fair = replace(limits, fair_share="client", lease_s=0.3)  # avoidance: 0.3 s
    svc = AsyncRedisService(redis_url, limits=fair)
    try:
        for i in range(4):
            await svc.register_worker(f"m:gpu{i}", ["render"], session=f"s{i}")
        h1 = await svc.submit_job("render", client_id="a")
        h2 = await svc.submit_job("render", client_id="a")
        assert h1.assignment and h2.assignment
        assert await svc.worker_lost(h1.assignment.worker_id, h1.assignment.session)
        assert await svc.worker_lost(h2.assignment.worker_id, h2.assignment.session)
        for jid in (h1.job_id, h2.job_id):
            job = await svc.get_job(jid)
            assert job is not None and job.status is JobStatus.QUEUED
        t = (await svc.get_stats())["time"]
        await server_time_reaches(svc, t + 0.35)
        await svc.promote()  # ends both avoidances (assignments go out as events)
        # both go to m's idle GPUs: h1 as a's head, then h2, which became the head
        for jid in (h1.job_id, h2.job_id):
            job = await svc.get_job(jid)
            assert job is not None and job.status is JobStatus.ASSIGNED, job
        assert (await svc.get_stats())["queued"] == 0
        assert await invariant_violations(svc.redis, svc.keys) == []
    finally:
        await svc.aclose()


def test_a_stack_submits_a_delayed_job_without_a_socket() -> None:
    with LocalStack() as stack:
        stack.add_workers(machines=1, gpus=1, run_time=0.0, progress_steps=1)
        job_id = stack.submit("inference", delay_s=0.3, client_id="lab")
        with stack.service() as svc:
            job = svc.get_job(job_id)
            assert job is not None and job.status is JobStatus.SCHEDULED

            def done() -> Any:
                j = svc.get_job(job_id)
                return j if j is not None and j.status is JobStatus.COMPLETED else None

            finished = wait_sync(done, timeout=10, what="the delayed job completed")
        assert finished.due <= finished.assigned < finished.due + 1.5  # promoter: <= 1 s
