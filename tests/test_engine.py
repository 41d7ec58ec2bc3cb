"""The queue engine against a real redis-server: ordering, fencing, requeue, retries."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest
import redis
import redis.asyncio

from redisq_server import (
    AsyncRedisService,
    EngineLimits,
    ErrorCode,
    JobStatus,
    ProtocolError,
    RedisService,
)
from redisq_server.main import Hub
from redisq_server.models import WorkerModel, queue_score

from .helpers import invariant_violations, namespace_keys, wait_for


async def test_seed_example_runs_as_written(sync_svc: RedisService) -> None:
    sync_svc.add_job(
        job_id="test-job-123",
        job_type="image_generation",
        priority=5,
        params={"prompt": "a beautiful sunset"},
        client_id="test-client",
    )
    status = sync_svc.get_job_status("test-job-123")
    assert status is not None
    assert status["status"] == "queued"
    assert status["position"] == 0
    assert status["priority"] == 5
    assert status["params"] == {"prompt": "a beautiful sunset"}
    assert status["client_id"] == "test-client"
    assert status["created"] is not None
    assert status["queued"] is not None
    assert sync_svc.get_job_status("no-such-job") is None


async def test_lua_score_matches_python(svc: AsyncRedisService) -> None:
    for prio in (5, -3, 32767, -32768):
        r = await svc.submit_job("scores", prio)
        score = await svc.redis.zscore(svc.keys.queue("scores"), r.job_id)
        job = await svc.get_job(r.job_id)
        assert job is not None
        seq = int(await svc.redis.hget(svc.keys.job(r.job_id), "seq"))
        assert score == queue_score(prio, seq)


async def test_priority_then_fifo_over_1000_jobs(svc: AsyncRedisService) -> None:
    rng = random.Random(7)
    submitted = []
    for i in range(1000):
        prio = rng.randint(-5, 5)
        r = await svc.submit_job("render", prio, {"i": i})
        submitted.append((-prio, i, r.job_id))
    expected = [jid for _, _, jid in sorted(submitted)]
    # the reported positions agree with that order
    for pos in (0, 1, 500, 999):
        job = await svc.get_job(expected[pos])
        assert job is not None
        assert job.position == pos

    order = []
    a = await svc.register_worker("m1:gpu0", ["render"], session="s")
    while a is not None:
        order.append(a.job_id)
        a = (await svc.complete_job(a.job_id, a.attempt, "m1:gpu0", None)).next
    assert order == expected
    stats = await svc.get_stats()
    assert stats["totals"]["completed"] == 1000
    assert stats["queued"] == 0
    assert stats["workers_idle"] == 1


async def test_matching_by_job_type(svc: AsyncRedisService) -> None:
    a_job = await svc.submit_job("type_a", 0)
    b_job = await svc.submit_job("type_b", 9)
    c_job = await svc.submit_job("type_c", 0)
    got = await svc.register_worker("m1:gpu0", ["type_a"], session="s0")
    assert got is not None
    assert got.job_id == a_job.job_id
    # a worker for b and c takes the higher-priority one first, across its types
    got2 = await svc.register_worker("m1:gpu1", ["type_c", "type_b"], session="s1")
    assert got2 is not None
    assert got2.job_id == b_job.job_id
    nxt = await svc.complete_job(got2.job_id, got2.attempt, "m1:gpu1", {"ok": 1})
    assert nxt.next is not None
    assert nxt.next.job_id == c_job.job_id
    # a type nobody accepts stays queued while workers of other types are idle
    d = await svc.submit_job("type_d")
    await svc.complete_job(got.job_id, got.attempt, "m1:gpu0")
    job = await svc.get_job(d.job_id)
    assert job is not None
    assert job.status == JobStatus.QUEUED
    assert await invariant_violations(svc.redis, svc.keys) == []


async def test_submit_goes_straight_to_an_idle_worker(svc: AsyncRedisService) -> None:
    assert await svc.register_worker("m1:gpu0", ["t"], {"gpu": "A100"}, session="s") is None
    r = await svc.submit_job("t", 1, {"x": 1}, client_id="c1")
    assert r.status == JobStatus.ASSIGNED
    assert r.position is None
    assert r.assignment is not None
    assert r.assignment.worker_id == "m1:gpu0"
    assert r.assignment.attempt == 1
    assert r.assignment.params == {"x": 1}
    assert r.assignment.to_message()["type"] == "job_assigned"


async def test_full_lifecycle_timestamps_and_progress(svc: AsyncRedisService) -> None:
    r = await svc.submit_job("t", client_id="c1")
    a = await svc.register_worker("m1:gpu0", ["t"], session="s")
    assert a is not None
    assert (await svc.get_job(r.job_id)).status == JobStatus.ASSIGNED  # type: ignore[union-attr]
    assert await svc.update_progress(a.job_id, a.attempt, "m1:gpu0", 40, "denoising") == "running"
    job = await svc.get_job(r.job_id)
    assert job is not None
    assert job.status == JobStatus.RUNNING
    assert job.progress == 40
    assert job.message == "denoising"
    await svc.complete_job(a.job_id, a.attempt, "m1:gpu0", {"image": "abc"})
    job = await svc.get_job(r.job_id)
    assert job is not None
    assert job.status == JobStatus.COMPLETED
    assert job.result == {"image": "abc"}
    assert job.created
    assert job.queued
    assert job.assigned
    assert job.started
    assert job.finished
    assert job.created <= job.queued <= job.assigned <= job.started <= job.finished
    names = [e.name for e in await svc.events_since("0")]
    assert names == ["submitted", "worker_up", "assigned", "progress", "completed"]


async def test_fencing_rejects_stale_attempts_and_changes_nothing(
    svc: AsyncRedisService, sync_svc: RedisService
) -> None:
    r = await svc.submit_job("t")
    a1 = await svc.register_worker("m1:gpu0", ["t"], session="old")
    assert a1 is not None
    assert a1.attempt == 1
    # the worker drops; the job is requeued and reassigned to another worker
    assert await svc.worker_lost("m1:gpu0", "old")
    a2 = await svc.register_worker("m1:gpu1", ["t"], session="new")
    assert a2 is not None
    assert a2.job_id == r.job_id
    assert a2.attempt == 2
    before = namespace_keys(sync_svc.redis, sync_svc.keys)
    for call in (
        svc.complete_job(r.job_id, 1, "m1:gpu0", "late"),
        svc.complete_job(r.job_id, 1, "m1:gpu1", "wrong attempt"),
        svc.complete_job(r.job_id, 2, "m1:gpu0", "wrong worker"),
        svc.fail_job(r.job_id, 1, "m1:gpu0", "late failure"),
        svc.update_progress(r.job_id, 1, "m1:gpu0", 50),
    ):
        with pytest.raises(ProtocolError) as err:
            await call
        assert err.value.code == ErrorCode.STALE_ATTEMPT
    assert namespace_keys(sync_svc.redis, sync_svc.keys) == before
    # the current attempt still completes, exactly once
    done = await svc.complete_job(r.job_id, 2, "m1:gpu1", "ok")
    assert done.outcome == "completed"
    with pytest.raises(ProtocolError) as err:
        await svc.complete_job(r.job_id, 2, "m1:gpu1", "again")
    assert err.value.code == ErrorCode.BAD_STATE
    job = await svc.get_job(r.job_id)
    assert job is not None
    assert job.result == "ok"
    assert job.attempt == 2


async def test_requeue_keeps_original_position(svc: AsyncRedisService) -> None:
    ids = [(await svc.submit_job("t", 1)).job_id for _ in range(5)]
    a = await svc.register_worker("m1:gpu0", ["t"], session="s")
    assert a is not None
    assert a.job_id == ids[0]
    job = await svc.get_job(ids[1])
    assert job is not None
    assert job.position == 0
    assert await svc.worker_lost("m1:gpu0", "s")
    back = await svc.get_job(ids[0])
    assert back is not None
    assert back.status == JobStatus.QUEUED
    assert back.position == 0
    assert back.lost == 1
    assert (await svc.get_job(ids[1])).position == 1  # type: ignore[union-attr]
    assert (await svc.get_stats())["totals"]["requeued"] == 1
    # a stale session's close changes nothing
    a2 = await svc.register_worker("m1:gpu0", ["t"], session="s2")
    assert a2 is not None
    assert a2.job_id == ids[0]
    assert a2.attempt == 2
    assert not await svc.worker_lost("m1:gpu0", "s")
    assert (await svc.get_job(ids[0])).status == JobStatus.ASSIGNED  # type: ignore[union-attr]


async def test_a_new_attempt_starts_without_the_last_ones_progress(
    svc: AsyncRedisService,
) -> None:
    """A first assignment writes no empty progress fields (there is nothing to clear);
    a later attempt starts without the start time, progress and message of the one
    before it."""
    r = await svc.submit_job("t")
    a = await svc.register_worker("m1:gpu0", ["t"], session="s")
    assert a is not None and a.attempt == 1
    fields = set(await svc.redis.hkeys(svc.keys.job(r.job_id)))
    assert not fields & {"started", "progress", "message"}, fields
    await svc.update_progress(r.job_id, 1, "m1:gpu0", 50, "half way")
    job = await svc.get_job(r.job_id)
    assert job is not None and (job.progress, job.message) == (50, "half way") and job.started
    assert await svc.worker_lost("m1:gpu0", "s")
    a2 = await svc.register_worker("m1:gpu1", ["t"], session="s2")
    assert a2 is not None and a2.attempt == 2
    job = await svc.get_job(r.job_id)
    assert job is not None and job.status == JobStatus.ASSIGNED
    assert (job.started, job.progress, job.message) == (None, None, None)


async def test_a_queued_job_stores_only_what_it_cannot_derive(
    svc: AsyncRedisService, sync_svc: RedisService
) -> None:
    """Every byte of a queued job's hash is paid per job: the id (in the key), zero
    counters, an empty client or worker and a `queued` equal to `created` are left
    out, and the job reads back whole."""
    r = await svc.submit_job("t", 2, {"x": 1})
    h = await svc.redis.hgetall(svc.keys.job(r.job_id))
    assert set(h) == {"type", "priority", "params", "status", "max_attempts", "seq", "created"}
    job = await svc.get_job(r.job_id)
    assert job is not None
    assert (job.job_id, job.client_id, job.worker_id) == (r.job_id, None, None)
    assert (job.attempt, job.lost, job.failures, job.position) == (0, 0, 0, 0)
    assert job.queued == job.created is not None
    # a requeue stamps its own `queued` time and clears the worker
    assert await svc.register_worker("m1:gpu0", ["t"], session="s") is not None
    assert await svc.worker_lost("m1:gpu0", "s")
    back = await svc.get_job(r.job_id)
    assert back is not None and back.status == JobStatus.QUEUED
    assert back.worker_id is None and back.attempt == 1 and back.lost == 1
    assert back.queued is not None and job.created is not None and back.queued > job.created
    assert [j.job_id for j in sync_svc.get_jobs([r.job_id, "gone"])] == [r.job_id]


async def test_a_worker_s_hash_is_a_hash_table_and_a_job_s_stays_a_list(
    svc: AsyncRedisService,
) -> None:
    """A worker's hash is read and written field by field on every report: it is
    made a hash table when the worker registers (also when its record is new again,
    after it expired), with no field left over. A job's hash stays a listpack."""
    w = svc.keys.worker("m1:gpu0")
    assert await svc.register_worker("m1:gpu0", ["t"], session="one") is None
    assert await svc.redis.object("encoding", w) == "hashtable"
    assert "-" not in await svc.redis.hgetall(w)
    assert await svc.worker_lost("m1:gpu0", "one")
    await svc.redis.delete(w)  # as when an offline worker's record expires
    assert await svc.register_worker("m1:gpu0", ["t"], session="two") is None
    assert await svc.redis.object("encoding", w) == "hashtable"
    r = await svc.submit_job("t", 0, {"x": 1})
    assert r.assignment is not None
    assert await svc.redis.object("encoding", svc.keys.job(r.job_id)) == "listpack"
    await svc.complete_job(r.job_id, 1, "m1:gpu0")
    assert await svc.redis.object("encoding", w) == "hashtable"


async def test_reregistering_requeues_the_old_sessions_job(svc: AsyncRedisService) -> None:
    r = await svc.submit_job("t")
    a = await svc.register_worker("m1:gpu0", ["t"], session="one")
    assert a is not None
    # the same GPU reconnects (e.g. to another hub) before its old socket was noticed
    a2 = await svc.register_worker("m1:gpu0", ["t"], session="two")
    assert a2 is not None
    assert a2.job_id == r.job_id
    assert a2.attempt == 2
    with pytest.raises(ProtocolError):
        await svc.complete_job(r.job_id, 1, "m1:gpu0")


async def test_poison_job_fails_after_max_lost(redis_url: str, limits: EngineLimits) -> None:
    svc = AsyncRedisService(redis_url, limits=replace(limits, max_lost=2))
    try:
        r = await svc.submit_job("t")
        for i in range(3):
            a = await svc.register_worker("m1:gpu0", ["t"], session=f"s{i}")
            assert a is not None
            assert a.attempt == i + 1
            await svc.worker_lost("m1:gpu0", f"s{i}")
        job = await svc.get_job(r.job_id)
        assert job is not None
        assert job.status == JobStatus.FAILED
        assert job.error is not None
        assert "worker lost 3 times" in job.error
        # a deliberate shutdown does not count against the job
        r2 = await svc.submit_job("t")
        for i in range(4):
            await svc.register_worker("m1:gpu0", ["t"], session=f"q{i}")
            await svc.worker_lost("m1:gpu0", f"q{i}", count=False)
        job2 = await svc.get_job(r2.job_id)
        assert job2 is not None
        assert job2.status == JobStatus.QUEUED
        assert job2.lost == 0
    finally:
        await svc.aclose()


async def _redis_time(svc: AsyncRedisService) -> float:
    s, us = await svc.redis.time()
    return float(s) + us / 1e6


@pytest.mark.parametrize("lease_s", [30.0, 10.0, 0.3])
async def test_a_lease_of_ten_seconds_or_more_ends_on_a_whole_second(
    redis_url: str, limits: EngineLimits, lease_s: float
) -> None:
    """A job's lease and its worker's liveness end lease_s after the worker was
    heard from, rounded up to a whole second for a lease of 10 s or more (an
    integer, which Redis keeps and compares cheapest); a shorter one is exact."""
    svc = AsyncRedisService(redis_url, limits=replace(limits, lease_s=lease_s))
    try:
        before = await _redis_time(svc)
        await svc.register_worker("m1:gpu0", ["t"], session="s")
        r = await svc.submit_job("t")
        assert r.assignment is not None
        await svc.update_progress(r.job_id, 1, "m1:gpu0", 10)
        after = await _redis_time(svc)
        for key, member in ((svc.keys.leases, r.job_id), (svc.keys.workers, "m1:gpu0")):
            due = await svc.redis.zscore(key, member)
            assert due is not None and before + lease_s <= due <= after + lease_s + 1
            if lease_s >= 10:
                assert due == int(due) and due - 1 < after + lease_s
            else:
                assert due != int(due) and due <= after + lease_s
    finally:
        await svc.aclose()


async def test_concurrent_reapers_requeue_once(redis_url: str, limits: EngineLimits) -> None:
    lim = replace(limits, lease_s=0.2)
    services = [AsyncRedisService(redis_url, limits=lim) for _ in range(8)]
    svc = services[0]
    try:
        r = await svc.submit_job("t")
        a = await svc.register_worker("m1:gpu0", ["t"], session="s")  # its hub then dies
        assert a is not None
        deadline = float((await svc.redis.zscore(svc.keys.leases, r.job_id)) or 0)
        await wait_for(lambda: _after(svc, deadline), what="lease deadline")
        counts = await asyncio.gather(*(s.reap() for s in services))
        assert sum(counts) == 1
        job = await svc.get_job(r.job_id)
        assert job is not None
        assert job.status == JobStatus.QUEUED
        assert job.lost == 1
        assert job.position == 0
        stats = await svc.get_stats()
        assert stats["totals"]["requeued"] == 1
        assert stats["workers"] == 0
        assert await invariant_violations(svc.redis, svc.keys) == []
    finally:
        for s in services:
            await s.aclose()


async def _after(svc: AsyncRedisService, t: float) -> bool:
    return await _redis_time(svc) > t


async def _past_deadlines(svc: AsyncRedisService, workers: list[str]) -> None:
    """Wait until the liveness deadline of each of ``workers`` has passed (Redis'
    clock), as when the hub that touched them died."""
    last = max([float(await svc.redis.zscore(svc.keys.workers, w) or 0) for w in workers])
    await wait_for(lambda: _after(svc, last), what="the workers' deadlines")


async def test_the_reaper_hands_no_job_to_a_gpu_as_dead_as_its_own(
    redis_url: str, limits: EngineLimits
) -> None:
    """A hub dies holding a busy GPU and idle GPUs of four other machines; all their
    deadlines lapse together. The busy GPU's job is requeued once, with one loss,
    not handed down the row of dead idle GPUs (each hand-over counted one more loss,
    and the job failed as a poison job having run nowhere but the first)."""
    svc = AsyncRedisService(redis_url, limits=replace(limits, lease_s=0.3))
    try:
        await svc.register_worker("a:gpu0", ["t"], session="a")
        job = await svc.submit_job("t")
        assert job.assignment is not None and job.assignment.worker_id == "a:gpu0"
        idle = [f"{m}:gpu0" for m in "bcde"]
        for w in idle:
            assert await svc.register_worker(w, ["t"], session=w) is None
        await _past_deadlines(svc, ["a:gpu0", *idle])
        assert await svc.reap() == 5
        j = await svc.get_job(job.job_id)
        assert j is not None and j.status is JobStatus.QUEUED and j.lost == 1
        assigned = [e.fields["worker"] for e in await svc.events_since("0") if e.name == "assigned"]
        assert assigned == ["a:gpu0"]
        assert (await svc.get_stats())["workers"] == 0
        assert await invariant_violations(svc.redis, svc.keys) == []
    finally:
        await svc.aclose()


async def test_the_reaper_keeps_the_lease_of_a_job_it_hands_on(
    redis_url: str, limits: EngineLimits
) -> None:
    """With more dead workers than one call handles, the reaper finds a job by its
    lapsed lease and requeues it onto a live idle GPU at once: the job's new lease
    stays (it used to be deleted after the hand-over, leaving a running job that no
    reaper would ever requeue)."""
    svc = AsyncRedisService(redis_url, limits=replace(limits, lease_s=0.3))
    try:
        for w in ("a:gpu0", "b:gpu0"):
            assert await svc.register_worker(w, ["t"], session=w) is None
        jobs = [await svc.submit_job("t") for _ in range(2)]
        await _past_deadlines(svc, ["a:gpu0", "b:gpu0"])
        for w in ("c:gpu0", "d:gpu0"):  # live and idle
            assert await svc.register_worker(w, ["t"], session=w) is None
        assert await svc.reap(limit=1) == 2  # one worker by its deadline, one job by its lease
        for r in jobs:
            j = await svc.get_job(r.job_id)
            assert j is not None and j.status is JobStatus.ASSIGNED
            assert j.worker_id in ("c:gpu0", "d:gpu0")
            assert await svc.redis.zscore(svc.keys.leases, r.job_id) is not None
        assert await invariant_violations(svc.redis, svc.keys) == []
    finally:
        await svc.aclose()


async def test_a_worker_arriving_from_another_shard_leaves_no_record_for_ever(
    svc: AsyncRedisService,
) -> None:
    """A worker moving here from another shard first carries its assignment number
    over; until it registers here its record holds only that number. If it never
    registers here, the record expires (it used to stay for good); when it does,
    the record is kept and its numbers go on from the carried one."""
    wk = svc.keys.worker("m9:gpu0")
    assert await svc._run(svc.ops.arrive("m9:gpu0", 5)) == 1
    assert await svc.redis.hgetall(wk) == {"n": "5"}
    assert await svc.redis.ttl(wk) > 0
    await svc.submit_job("t")
    a = await svc.register_worker("m9:gpu0", ["t"], session="s")
    assert a is not None and a.n == 6
    assert await svc.redis.ttl(wk) == -1


async def test_touch_keeps_a_live_worker(redis_url: str, limits: EngineLimits) -> None:
    svc = AsyncRedisService(redis_url, limits=replace(limits, lease_s=0.3))
    try:
        await svc.submit_job("t")
        await svc.register_worker("m1:gpu0", ["t"], session="s")
        for _ in range(3):
            assert await svc.touch([("m1:gpu0", "s")]) == []
            assert await svc.reap() == 0
        assert await svc.touch([("m1:gpu0", "other"), ("m9:gpu0", "x")]) == ["m1:gpu0", "m9:gpu0"]
    finally:
        await svc.aclose()


async def test_retries_with_backoff_then_final_failure(svc: AsyncRedisService) -> None:
    r = await svc.submit_job("t", max_attempts=3, client_id="c")
    a = await svc.register_worker("m1:gpu0", ["t"], session="s")
    assert a is not None
    dues = []
    for attempt in (1, 2):
        res = await svc.fail_job(r.job_id, attempt, "m1:gpu0", f"boom {attempt}")
        assert res.outcome == "retrying"
        assert res.next is None
        job = await svc.get_job(r.job_id)
        assert job is not None
        assert job.status == JobStatus.RETRYING
        moved, wait_s, _ = await svc.promote()
        assert moved == 0
        assert wait_s is not None
        dues.append(wait_s)
        promoted = await wait_for(lambda: _promote_one(svc), what="backoff")
        assert promoted[0].job_id == r.job_id
        assert promoted[0].attempt == attempt + 1
    assert dues[1] > dues[0]  # exponential: 0.05 s, then 0.1 s
    res = await svc.fail_job(r.job_id, 3, "m1:gpu0", "boom 3")
    assert res.outcome == "failed"
    job = await svc.get_job(r.job_id)
    assert job is not None
    assert job.status == JobStatus.FAILED
    assert job.error == "boom 3"
    assert job.attempt == 3
    stats = await svc.get_stats()
    assert stats["totals"]["retried"] == 2
    assert stats["totals"]["failed"] == 1
    # a non-retryable failure fails at once
    r2 = await svc.submit_job("t", max_attempts=5)
    assert r2.assignment is not None
    res2 = await svc.fail_job(r2.job_id, 1, "m1:gpu0", "bad input", retryable=False)
    assert res2.outcome == "failed"


async def _promote_one(svc: AsyncRedisService) -> list[object]:
    _, _, assigned = await svc.promote()
    return assigned  # type: ignore[return-value]


async def test_cancel_queued_running_and_finished(svc: AsyncRedisService) -> None:
    q = await svc.submit_job("t", client_id="alice")
    c = await svc.cancel_job(q.job_id, client_id="alice")
    assert c.status == JobStatus.CANCELLED
    assert c.worker_id is None
    assert (await svc.get_stats())["queued"] == 0
    # another client cannot see or cancel it
    r = await svc.submit_job("t", client_id="alice")
    with pytest.raises(ProtocolError) as err:
        await svc.cancel_job(r.job_id, client_id="mallory")
    assert err.value.code == ErrorCode.NOT_FOUND
    # running: cancelled at once, the worker is named for a cancel_job push
    a = await svc.register_worker("m1:gpu0", ["t"], session="s")
    assert a is not None
    assert a.job_id == r.job_id
    nxt = await svc.submit_job("t")
    c2 = await svc.cancel_job(r.job_id)
    assert c2.status == JobStatus.CANCELLED
    assert c2.worker_id == "m1:gpu0"
    assert c2.attempt == 1
    events = [e for e in await svc.events_since("0") if e.name == "cancelled"]
    assert events[-1].fields["worker"] == "m1:gpu0"
    # progress on a cancelled job is refused; the acknowledgement frees the worker
    with pytest.raises(ProtocolError) as err:
        await svc.update_progress(r.job_id, 1, "m1:gpu0", 10)
    assert err.value.code == ErrorCode.JOB_CANCELLED
    ack = await svc.fail_job(r.job_id, 1, "m1:gpu0", "cancelled", retryable=False)
    assert ack.outcome == "cancelled"
    assert ack.next is not None
    assert ack.next.job_id == nxt.job_id
    job = await svc.get_job(r.job_id)
    assert job is not None
    assert job.status == JobStatus.CANCELLED
    # cancelling a finished job changes nothing
    assert (await svc.cancel_job(r.job_id)).status == JobStatus.CANCELLED
    with pytest.raises(ProtocolError):
        await svc.cancel_job("never-existed")
    assert await invariant_violations(svc.redis, svc.keys) == []


async def test_finished_jobs_expire_after_ttl(redis_url: str, limits: EngineLimits) -> None:
    svc = AsyncRedisService(redis_url, limits=replace(limits, result_ttl_s=1))
    try:
        r = await svc.submit_job("t")
        await svc.register_worker("m1:gpu0", ["t"], session="s")
        await svc.complete_job(r.job_id, 1, "m1:gpu0", 42)
        ttl = await svc.redis.ttl(svc.keys.job(r.job_id))
        assert 0 < ttl <= 1
        await wait_for(lambda: _gone(svc, r.job_id), timeout=5, what="expiry")
        assert await svc.get_job(r.job_id) is None
        # the done index drops ids past the TTL once per 64 jobs that reach it
        done = svc.keys.done("completed")
        later = []
        for i in range(63):
            r2 = await svc.submit_job("t")
            assert r2.assignment is not None
            await svc.complete_job(r2.job_id, 1, "m1:gpu0", i)
            later.append(r2.job_id)
            if i == 61:  # 63 jobs completed: not trimmed yet
                assert r.job_id in await svc.redis.zrange(done, 0, -1)
        kept = await svc.redis.zrange(done, 0, -1)
        assert r.job_id not in kept and set(kept) <= set(later)
    finally:
        await svc.aclose()


async def _gone(svc: AsyncRedisService, job_id: str) -> bool:
    return not await svc.redis.exists(svc.keys.job(job_id))


async def test_events_stream_is_capped(redis_url: str, limits: EngineLimits) -> None:
    svc = AsyncRedisService(redis_url, limits=replace(limits, events_maxlen=100))
    try:
        for _ in range(600):
            await svc.submit_job("t")
        assert await svc.redis.xlen(svc.keys.events) < 300
    finally:
        await svc.aclose()


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"job_type": "bad type"}, ErrorCode.INVALID_FIELD),
        ({"job_type": "t", "priority": 1.5}, ErrorCode.INVALID_FIELD),
        ({"job_type": "t", "priority": 10**6}, ErrorCode.INVALID_FIELD),
        ({"job_type": "t", "params": {"x": object()}}, ErrorCode.INVALID_FIELD),
        ({"job_type": "t", "params": {"x": "y" * 9_000_000}}, ErrorCode.TOO_LARGE),
        ({"job_type": "t", "job_id": "bad/id"}, ErrorCode.INVALID_FIELD),
        ({"job_type": "t", "client_id": ""}, ErrorCode.INVALID_FIELD),
        ({"job_type": "t", "max_attempts": 0}, ErrorCode.INVALID_FIELD),
    ],
)
async def test_bad_submit_raises_typed_error_and_writes_nothing(
    svc: AsyncRedisService, sync_svc: RedisService, kwargs: dict[str, object], code: ErrorCode
) -> None:
    before = namespace_keys(sync_svc.redis, sync_svc.keys)
    with pytest.raises(ProtocolError) as err:
        await svc.submit_job(**kwargs)  # type: ignore[arg-type]
    assert err.value.code == code
    assert namespace_keys(sync_svc.redis, sync_svc.keys) == before


async def test_bad_worker_calls_raise_and_write_nothing(
    svc: AsyncRedisService, sync_svc: RedisService
) -> None:
    r = await svc.submit_job("t", job_id="dup")
    before = namespace_keys(sync_svc.redis, sync_svc.keys)
    bad_calls = [
        (svc.submit_job("t", job_id="dup"), ErrorCode.DUPLICATE),
        (svc.register_worker("no-gpu-part", ["t"]), ErrorCode.INVALID_FIELD),
        (svc.register_worker("m:g", []), ErrorCode.INVALID_FIELD),
        (svc.register_worker("m:g", ["bad type"]), ErrorCode.INVALID_FIELD),
        (svc.complete_job(r.job_id, 0, "m:g"), ErrorCode.INVALID_FIELD),
        (svc.complete_job(r.job_id, 1, "m:g", {1, 2}), ErrorCode.INVALID_FIELD),
        (svc.complete_job("missing", 1, "m:g"), ErrorCode.NOT_FOUND),
        (svc.complete_job(r.job_id, 1, "m:g"), ErrorCode.STALE_ATTEMPT),
        (svc.update_progress(r.job_id, 1, "m:g", 150), ErrorCode.INVALID_FIELD),
        (svc.fail_job(r.job_id, True, "m:g", "x"), ErrorCode.INVALID_FIELD),  # type: ignore[arg-type]
        (svc.get_job("bad id"), ErrorCode.INVALID_FIELD),
        (svc.cancel_job("missing"), ErrorCode.NOT_FOUND),
    ]
    for call, code in bad_calls:
        with pytest.raises(ProtocolError) as err:
            await call
        assert err.value.code == code, err.value
    assert namespace_keys(sync_svc.redis, sync_svc.keys) == before


def test_sync_facade_reads(sync_svc: RedisService) -> None:
    for i in range(5):
        sync_svc.add_job(job_id=f"j{i}", job_type="t", priority=i % 2)
    assert sync_svc.job_ids("queued") == ["j1", "j3", "j0", "j2", "j4"]
    jobs = sync_svc.get_jobs(["j0", "nope", "j1"])
    assert [j.job_id for j in jobs] == ["j0", "j1"]
    assert sync_svc.job_ids("completed") == []
    with pytest.raises(ProtocolError):
        sync_svc.job_ids("weird")
    c = sync_svc.cancel_job("j0")
    assert c.status == JobStatus.CANCELLED
    assert sync_svc.job_ids("cancelled") == ["j0"]
    assert sync_svc.get_stats()["queued"] == 4
    assert [e.name for e in sync_svc.events_since("0")][-1] == "cancelled"


def test_connection_from_seed_environment(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, namespace: str
) -> None:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("REDIS_HOST", "127.0.0.1")
    monkeypatch.setenv("REDIS_PORT", str(port))
    monkeypatch.setenv("REDIS_DB", "3")
    with RedisService(namespace=namespace) as svc:
        svc.add_job(job_id="envjob", job_type="t")
        assert svc.redis.connection_pool.connection_kwargs["db"] == 3
    with redis.Redis(port=port, db=3, decode_responses=True) as r:
        assert r.exists(f"{{{namespace}}}:job:envjob")
        r.flushdb()


async def test_cancel_is_acknowledged_once(svc: AsyncRedisService) -> None:
    r = await svc.submit_job("t")
    a = await svc.register_worker("m1:gpu0", ["t"], session="s")
    assert a is not None
    queued = [(await svc.submit_job("t")).job_id for _ in range(2)]
    await svc.cancel_job(r.job_id)
    first = await svc.fail_job(r.job_id, 1, "m1:gpu0", "cancelled", retryable=False)
    assert first.outcome == "cancelled" and first.next is not None
    assert first.next.job_id == queued[0]
    # a repeated acknowledgement must not free the worker a second time
    with pytest.raises(ProtocolError) as err:
        await svc.complete_job(r.job_id, 1, "m1:gpu0")
    assert err.value.code == ErrorCode.STALE_ATTEMPT
    second = await svc.get_job(queued[1])
    assert second is not None and second.status == JobStatus.QUEUED
    assert await invariant_violations(svc.redis, svc.keys) == []


async def test_requeues_do_not_use_up_retries(svc: AsyncRedisService) -> None:
    r = await svc.submit_job("t", max_attempts=2)
    for i in range(2):  # lost twice (within max_lost)
        await svc.register_worker("m1:gpu0", ["t"], session=f"s{i}")
        await svc.worker_lost("m1:gpu0", f"s{i}")
    a = await svc.register_worker("m1:gpu0", ["t"], session="s9")
    assert a is not None and a.attempt == 3
    res = await svc.fail_job(r.job_id, 3, "m1:gpu0", "first real failure")
    assert res.outcome == "retrying"
    job = await svc.get_job(r.job_id)
    assert job is not None and job.failures == 1 and job.started is not None


async def test_a_promoted_retry_that_waits_is_announced(svc: AsyncRedisService) -> None:
    r = await svc.submit_job("t", client_id="c")
    await svc.register_worker("m1:gpu0", ["t"], session="s")
    await svc.submit_job("t")  # keeps the only worker busy after the failure
    res = await svc.fail_job(r.job_id, 1, "m1:gpu0", "boom")
    assert res.outcome == "retrying" and res.next is not None
    await wait_for(lambda: _promoted(svc), what="promotion")
    job = await svc.get_job(r.job_id)
    assert job is not None and job.status == JobStatus.QUEUED
    ev = [e for e in await svc.events_since("0") if e.name == "promoted"]
    assert ev[-1].fields["job"] == r.job_id and ev[-1].fields["status"] == "queued"


async def _promoted(svc: AsyncRedisService) -> bool:
    moved, _, _ = await svc.promote()
    return moved > 0


def test_job_ids_limit_must_be_positive(sync_svc: RedisService) -> None:
    with pytest.raises(ProtocolError):
        sync_svc.job_ids("queued", 0)


async def test_a_redis_that_never_answers_fails_each_call_in_time() -> None:
    """redis-py runs without a socket timeout here (see connect_async): each engine
    call and read is bounded by ``call_timeout_s`` instead, and fails with a Redis
    TimeoutError (a RedisError: the hub answers ``unavailable``)."""
    peers: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer)  # accepts, reads nothing, answers nothing

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    svc = AsyncRedisService(f"redis://127.0.0.1:{port}/0", call_timeout_s=0.2)
    try:
        with pytest.raises(redis.exceptions.TimeoutError, match=r"within 0\.2 s"):
            await svc.get_stats()
        with pytest.raises(redis.exceptions.TimeoutError, match=r"within 0\.3 s"):
            await svc.read_events("0", block_ms=100)
        with pytest.raises(redis.exceptions.TimeoutError):
            await svc.job_payloads(["j1"])
        # a call queued behind one in flight fails in its own time too (0.2 s), not
        # once the one before it has used up its time (0.4 s)
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def timed() -> tuple[float, str]:
            with pytest.raises(redis.exceptions.TimeoutError) as err:
                await svc.get_stats()
            return loop.time() - started, str(err.value)

        for took, message in await asyncio.gather(timed(), timed()):  # one sent, one queued
            assert took < 0.35 and message.endswith("within 0.2 s (stats)"), (took, message)
    finally:
        await svc.aclose()
        for w in peers:
            w.close()
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def _paused(redis_url: str, ms: int) -> AsyncIterator[None]:
    """Inside: every client of the Redis at ``redis_url`` is paused for ``ms``
    (``CLIENT PAUSE``: their commands wait, unanswered). Leaving waits until the pause
    is over (a PING waits for it like any other command)."""
    r = redis.asyncio.Redis.from_url(redis_url)
    try:
        await r.execute_command("CLIENT", "PAUSE", ms, "ALL")
        yield
        await r.ping()
    finally:
        await r.aclose()


async def test_a_call_that_times_out_leaves_no_late_reply_behind(
    redis_url: str, limits: EngineLimits
) -> None:
    """A lone call that Redis does not answer in time fails with a Redis
    TimeoutError, and the connection it was on is dropped: Redis' late answer
    must not be read as the reply to the next call."""
    svc = AsyncRedisService(redis_url, limits=limits, call_timeout_s=0.2)
    try:
        await svc.submit_job("late", 0, {})  # the library is loaded, a connection held
        async with _paused(redis_url, 600):
            with pytest.raises(redis.exceptions.TimeoutError, match=r"within 0\.2 s \(stats\)"):
                await svc.get_stats()
        # the calls after it get time to spare on a loaded machine (a new connection
        # is made): what is checked is the reply they read, not how soon it comes
        svc.call_timeout_s = 10
        r = await svc.submit_job("late", 0, {})  # not the stats reply that came late
        assert r.status is JobStatus.QUEUED and r.position == 1
        assert (await svc.get_stats())["queued"] == 2
    finally:
        await svc.aclose()


async def test_a_call_cancelled_by_its_caller_stays_cancelled(
    redis_url: str, limits: EngineLimits
) -> None:
    """A caller that cancels a call in flight gets CancelledError, not a timeout
    (the deadline's cancel and the caller's are told apart), and the engine works
    on once Redis answers again."""
    svc = AsyncRedisService(redis_url, limits=limits, call_timeout_s=5)
    try:
        await svc.submit_job("gone", 0, {})
        async with _paused(redis_url, 300):
            call = asyncio.create_task(svc.get_stats())

            async def in_flight() -> bool:
                return svc._in_flight > 0  # the call waits for Redis' reply

            await wait_for(in_flight, what="the call in flight")
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        assert (await svc.get_stats())["queued"] == 1
    finally:
        await svc.aclose()


async def test_throughput_covers_only_the_time_since_the_first_hub_started(
    hub: Hub, svc: AsyncRedisService
) -> None:
    """A burst right after start is not averaged over a 60 s window that the namespace
    has not lived yet; without a hub start the full window is used."""
    before = await svc.get_stats(60)
    assert before["since"] is not None and before["window_s"] < 60
    jobs = [await svc.submit_job("burst") for _ in range(24)]
    token = "burst-worker"
    first = await svc.register_worker(f"{token}:g0", ["burst"], session="s1")
    assert first is not None
    current = first
    for _ in range(len(jobs) - 1):
        res = await svc.complete_job(current.job_id, current.attempt, current.worker_id)
        assert res.next is not None
        current = res.next
    await svc.complete_job(current.job_id, current.attempt, current.worker_id)
    s = await svc.get_stats(60)
    covered = s["time"] - s["since"]
    assert s["window_s"] == pytest.approx(covered, abs=1e-6) and covered < 60
    assert s["throughput_per_s"] == pytest.approx(24 / covered, rel=1e-6)
    assert s["throughput_per_s"] > 24 / 60
    short = await svc.get_stats(0.5)
    assert short["window_s"] == pytest.approx(min(0.5, short["time"] - short["since"]))


def test_without_a_hub_the_rate_window_is_the_one_asked_for(sync_svc: RedisService) -> None:
    s = sync_svc.get_stats(60)
    assert s["since"] is None and s["window_s"] == 60.0


async def test_the_owner_resubmitting_gets_the_stored_job(svc: AsyncRedisService) -> None:
    """Sending a submit again (say, after `unavailable`) is safe for the job's own
    client: the stored job stands, whatever the second send carries, and the answer
    is its current status and position. Anyone else gets `duplicate`."""
    ahead = await svc.submit_job("t", 5, client_id="c")
    first = await svc.submit_job("t", 5, {"n": 1}, job_id="again", client_id="c")
    assert (first.status, first.position) == (JobStatus.QUEUED, 1)
    before = await svc.get_stats()
    last_event = await svc.last_event_id()
    same = await svc.submit_job("t2", 9, {"n": 2}, job_id="again", client_id="c")
    assert (same.job_id, same.status, same.position, same.assignment) == (
        "again",
        JobStatus.QUEUED,
        1,
        None,
    )
    job = await svc.get_job("again")
    assert job is not None and (job.job_type, job.priority, job.params) == ("t", 5, {"n": 1})
    assert (await svc.get_stats())["totals"] == before["totals"]
    assert await svc.last_event_id() == last_event  # nothing happened
    for other in ("someone-else", None):
        with pytest.raises(ProtocolError) as err:
            await svc.submit_job("t", job_id="again", client_id=other)
        assert err.value.code == ErrorCode.DUPLICATE

    a = await svc.register_worker("m1:gpu0", ["t"], session="s")
    assert a is not None and a.job_id == ahead.job_id
    done = await svc.complete_job(a.job_id, 1, "m1:gpu0")
    assert done.next is not None and done.next.job_id == "again"
    running = await svc.submit_job("t", job_id="again", client_id="c")
    assert (running.status, running.position) == (JobStatus.ASSIGNED, None)
    await svc.complete_job("again", 1, "m1:gpu0", "r")
    finished = await svc.submit_job("t", job_id="again", client_id="c")
    assert (finished.status, finished.position) == (JobStatus.COMPLETED, None)


async def test_counters_add_up_over_mixed_outcomes(svc: AsyncRedisService) -> None:
    """The worker's counters (jobs done and failed, busy seconds, assignment number)
    are written with its next state, and the totals are the sums of the per-type
    counts: both must stay exact over completions, failures, a cancel and a window."""
    ids = [(await svc.submit_job(jt, client_id="c")).job_id for jt in ("a", "a", "b", "a", "b")]
    w = "m1:gpu0"
    a = await svc.register_worker(w, ["a", "b"], session="s", prefetch=1)
    seen: list[tuple[str, int]] = []
    held = None  # the job held ahead (the window)
    for outcome in ["done", "failed", "cancel", "done", "done"]:
        assert a is not None
        seen.append((a.job_id, a.attempt))
        if outcome == "done":
            r = await svc.complete_job(a.job_id, a.attempt, w, {"ok": 1})
        elif outcome == "failed":
            r = await svc.fail_job(a.job_id, a.attempt, w, "boom", retryable=False)
        else:
            await svc.cancel_job(a.job_id)
            r = await svc.complete_job(a.job_id, a.attempt, w)
            assert r.outcome == "cancelled"
        a = held if r.took_ahead else r.next
        held = r.ahead if r.ahead is not None or r.took_ahead else held
    assert a is None and held is None
    assert sorted(seen) == sorted((i, 1) for i in ids)  # each job ran once, attempt 1
    h = {str(k): str(v) for k, v in (await svc.redis.hgetall(svc.keys.worker(w))).items()}
    worker = WorkerModel.from_redis(h)
    assert (worker.jobs_done, worker.jobs_failed) == (3, 1)  # a cancel counts as neither
    assert int(h["n"]) == 5  # one number per assignment, none skipped or repeated
    # busy without a break from the first assignment to the last report
    first, last = await svc.get_job(seen[0][0]), await svc.get_job(seen[-1][0])
    assert first is not None and first.assigned is not None
    assert last is not None and last.finished is not None
    assert worker.busy_s == pytest.approx(last.finished - first.assigned, abs=1e-5)
    stats = await svc.get_stats()
    assert stats["totals"] == {
        "submitted": 5,
        "completed": 3,
        "failed": 1,
        "cancelled": 1,
        "retried": 0,
        "requeued": 0,
    }
    by_type = stats["job_types"]
    assert (by_type["a"]["submitted"], by_type["b"]["submitted"]) == (3, 2)
    assert by_type["a"]["completed"] + by_type["b"]["completed"] == 3
    assert await invariant_violations(svc.redis, svc.keys) == []
