"""The per-GPU prefetch window: a worker registered with ``prefetch=1`` holds one
queued job ahead while it runs one. Fencing, cancel, loss and renewal stay exact
for the job held ahead, and a worker without a window behaves as before."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest
from websockets.asyncio.client import connect

from redisq_lab.client import QueueClient
from redisq_lab.mock_worker import MockWorker
from redisq_server import (
    AsyncRedisService,
    EngineLimits,
    ErrorCode,
    JobStatus,
    ProtocolError,
    protocol,
)
from redisq_server.main import Hub

from .helpers import invariant_violations, wait_for

W = "m1:gpu0"


async def _queue(svc: AsyncRedisService, n: int, jtype: str = "t") -> list[str]:
    """``n`` jobs queued in this order (equal priority: FIFO)."""
    ids = [f"{jtype}{i}" for i in range(n)]
    for job_id in ids:
        r = await svc.submit_job(jtype, 0, {"i": job_id}, job_id=job_id, client_id="c")
        assert r.status is JobStatus.QUEUED
    return ids


async def _worker(svc: AsyncRedisService, w: str = W) -> dict[str, str]:
    return await svc.redis.hgetall(svc.keys.worker(w))


async def test_the_window_fills_at_the_first_report_and_runs_in_order(
    svc: AsyncRedisService,
) -> None:
    a, b, c, d = await _queue(svc, 4)
    first = await svc.register_worker(W, ["t"], session="s", prefetch=1)
    assert first is not None and first.job_id == a  # registration takes no job ahead
    assert not (await _worker(svc)).get("next")

    done = await svc.complete_job(a, 1, W, "ra")
    assert done.next is not None and done.next.job_id == b
    assert done.ahead is not None and done.ahead.job_id == c
    assert done.ahead.n == done.next.n + 1  # pushed in that order
    assert not done.took_ahead
    held = await svc.get_job(c)
    assert held is not None and held.status is JobStatus.ASSIGNED and held.worker_id == W
    # one job runs, one waits ahead of it: `running` counts only the first
    stats = await svc.get_stats()
    assert (stats["running"], stats["held_ahead"], stats["queued"]) == (1, 1, 1)
    assert await invariant_violations(svc.redis, svc.keys) == []

    # the job held ahead becomes current (already pushed): only the new one ahead is sent
    done = await svc.complete_job(b, 1, W, "rb")
    assert done.next is None and done.ahead is not None and done.ahead.job_id == d
    assert done.took_ahead
    w = await _worker(svc)
    assert (w["status"], w["job"], w["next"]) == ("busy", c, d)
    assert await invariant_violations(svc.redis, svc.keys) == []

    done = await svc.complete_job(c, 1, W, "rc")
    # d runs now (busy, though nothing is pushed); nothing left to hold
    assert (done.next, done.ahead, done.took_ahead) == (None, None, True)
    done = await svc.complete_job(d, 1, W, "rd")
    assert (done.next, done.ahead, done.took_ahead) == (None, None, False)  # idle
    w = await _worker(svc)
    assert (w["status"], w["job"], w["next"], w["done"]) == ("idle", "", "", "4")
    for job_id, result in zip((a, b, c, d), ("ra", "rb", "rc", "rd"), strict=True):
        job = await svc.get_job(job_id)
        assert job is not None and job.status is JobStatus.COMPLETED and job.result == result
    assert await invariant_violations(svc.redis, svc.keys) == []


async def test_a_held_job_s_wait_for_a_gpu_ends_when_it_becomes_the_gpu_s_job(
    svc: AsyncRedisService,
) -> None:
    """A job sent ahead keeps that time as ``held``; its ``assigned`` time moves to
    the end of the job before it, so queued -> assigned is the wait for the GPU, as
    without a window. Its ``assigned`` event says ``ahead``; a later attempt sent to
    an idle worker has no ``held`` time."""
    a, b, c = await _queue(svc, 3)
    await svc.register_worker(W, ["t"], session="s", prefetch=1)
    await svc.complete_job(a, 1, W)  # b runs, c held ahead
    sent = await svc.get_job(c)
    assert sent is not None and sent.held is not None and sent.assigned == sent.held
    events = await svc.read_events("0")
    told = {(e.fields["job"], e.fields.get("ahead")) for e in events if e.name == "assigned"}
    assert told == {(a, None), (b, None), (c, "1")}

    await svc.complete_job(b, 1, W)  # c is the GPU's job now
    ran, held = await svc.get_job(b), await svc.get_job(c)
    assert ran is not None and held is not None and ran.held is None
    assert held.held == sent.held and held.assigned == ran.finished
    assert held.assigned is not None and held.assigned > held.held
    assert await invariant_violations(svc.redis, svc.keys) == []

    # lost, then sent to an idle GPU: that attempt was never held
    assert await svc.worker_lost(W, "s")
    await svc.register_worker("m2:gpu0", ["t"], session="s2")
    again = await svc.get_job(c)
    assert again is not None and again.attempt == 2 and again.held is None


async def test_a_job_held_ahead_takes_no_report_until_the_one_before_it_ends(
    svc: AsyncRedisService,
) -> None:
    a, b, c = await _queue(svc, 3)
    await svc.register_worker(W, ["t"], session="s", prefetch=1)
    await svc.complete_job(a, 1, W)  # b runs, c held ahead
    for report in (
        svc.complete_job(c, 1, W, "early"),
        svc.fail_job(c, 1, W, "early"),
        svc.update_progress(c, 1, W, 50.0),
    ):
        with pytest.raises(ProtocolError) as err:
            await report
        assert err.value.code is ErrorCode.BAD_STATE and "held ahead" in err.value.message
    job = await svc.get_job(c)
    assert job is not None and job.status is JobStatus.ASSIGNED and job.result is None
    assert (await svc.complete_job(b, 1, W)).outcome == "completed"
    assert (await svc.complete_job(c, 1, W, "now")).outcome == "completed"


async def test_cancelling_a_job_held_ahead_frees_its_slot_not_the_worker(
    svc: AsyncRedisService,
) -> None:
    a, b, c, d = await _queue(svc, 4)
    await svc.register_worker(W, ["t"], session="s", prefetch=1)
    await svc.complete_job(a, 1, W)  # b runs, c held ahead
    res = await svc.cancel_job(c)
    assert res.status is JobStatus.CANCELLED and res.worker_id == W  # its hub tells the worker
    w = await _worker(svc)
    assert (w["status"], w["job"], w["next"]) == ("busy", b, "")
    # the worker's acknowledgement frees nothing: it is still running b
    ack = await svc.fail_job(c, 1, W, "cancelled", retryable=False)
    assert (ack.outcome, ack.next, ack.ahead) == ("cancelled", None, None)
    assert (await _worker(svc))["job"] == b
    assert await invariant_violations(svc.redis, svc.keys) == []
    done = await svc.complete_job(b, 1, W)
    assert done.next is not None and done.next.job_id == d  # c is gone; d is next
    job = await svc.get_job(c)
    assert job is not None and job.status is JobStatus.CANCELLED
    assert await invariant_violations(svc.redis, svc.keys) == []


async def test_a_lost_worker_requeues_the_job_held_ahead_without_counting_it(
    svc: AsyncRedisService,
) -> None:
    a, b, c = await _queue(svc, 3)
    await svc.register_worker(W, ["t"], session="s", prefetch=1)
    await svc.complete_job(a, 1, W)  # b runs, c held ahead
    assert await svc.worker_lost(W, "s")
    running, ahead = await svc.get_job(b), await svc.get_job(c)
    assert running is not None and ahead is not None
    assert running.status is ahead.status is JobStatus.QUEUED
    assert running.lost == 1  # it ran there
    assert ahead.lost == 0  # it never ran: no fault of its own
    assert (await svc.get_stats())["totals"]["requeued"] == 2  # one per job requeued
    raw = await svc.redis.hmget(svc.keys.job(c), "ahead", "avoid")
    assert raw == [None, None]
    assert await invariant_violations(svc.redis, svc.keys) == []
    # both come back in their old order to the next GPU
    again = await svc.register_worker("m2:gpu0", ["t"], session="s2", prefetch=1)
    assert again is not None and again.job_id == b


async def test_the_reaper_requeues_both_jobs_of_a_worker_whose_hub_died(
    redis_url: str, limits: EngineLimits
) -> None:
    svc = AsyncRedisService(redis_url, limits=replace(limits, lease_s=30))
    try:
        a, b, c = await _queue(svc, 3)
        await svc.register_worker(W, ["t"], session="s", prefetch=1)
        await svc.complete_job(a, 1, W)  # b runs, c held ahead
        await svc.redis.zadd(svc.keys.leases, {c: 0})  # only the lease of the job ahead lapsed
        assert await svc.reap() >= 1
        for job_id, lost in ((b, 1), (c, 0)):
            job = await svc.get_job(job_id)
            assert job is not None and job.status is JobStatus.QUEUED and job.lost == lost
        assert (await _worker(svc))["status"] == "offline"
        assert await invariant_violations(svc.redis, svc.keys) == []
    finally:
        await svc.aclose()


async def test_renewal_extends_the_lease_of_the_job_held_ahead_and_finds_it_missed(
    svc: AsyncRedisService,
) -> None:
    a, b, c = await _queue(svc, 3)
    await svc.register_worker(W, ["t"], session="s", prefetch=1)
    done = await svc.complete_job(a, 1, W)
    assert done.next is not None and done.ahead is not None
    await svc.redis.zadd(svc.keys.leases, {c: 1})
    renewal = await svc.renew([(W, "s", done.next.n)])  # the job ahead was never pushed
    assert renewal.stale == [] and [m.job_id for m in renewal.missed] == [c]
    assert float(await svc.redis.zscore(svc.keys.leases, c)) > 1
    renewal = await svc.renew([(W, "s", done.next.n - 1)])  # neither was
    assert [m.job_id for m in renewal.missed] == [b, c]
    assert (await svc.renew([(W, "s", done.ahead.n)])).missed == []


async def test_a_gpu_never_told_of_a_job_cancelled_since_is_freed(
    svc: AsyncRedisService,
) -> None:
    """The push of a job is lost (its hub never sent it) and its client cancels it
    before the sweep pushes it again: the GPU cannot acknowledge a cancel of a job
    it never heard of. The sweep frees it instead, and hands it the next job (it
    used to stay busy with the cancelled job for good)."""
    first = await svc.submit_job("t")
    assert await svc.register_worker(W, ["t"], session="s") is not None  # never pushed
    second = await svc.submit_job("t")
    assert (await svc.cancel_job(first.job_id)).status is JobStatus.CANCELLED
    renewal = await svc.renew([(W, "s", 0)])  # the hub pushed nothing to this socket
    assert [(a.job_id, a.attempt) for a in renewal.missed] == [(second.job_id, 1)]
    worker = await svc.redis.hget(svc.keys.worker(W), "job")
    assert worker == second.job_id
    assert await invariant_violations(svc.redis, svc.keys) == []


async def test_a_worker_without_a_window_never_holds_one_ahead(svc: AsyncRedisService) -> None:
    a, b, _ = await _queue(svc, 3)
    await svc.register_worker(W, ["t"], session="s")
    done = await svc.complete_job(a, 1, W)
    assert done.next is not None and done.next.job_id == b and done.ahead is None
    job = await svc.get_job("t2")
    assert job is not None and job.status is JobStatus.QUEUED


@pytest.mark.parametrize("bad", [2, -1, True, "1", 1.0])
async def test_a_bad_window_is_refused_and_changes_nothing(
    svc: AsyncRedisService, bad: object
) -> None:
    with pytest.raises(ProtocolError) as err:
        await svc.register_worker(W, ["t"], session="s", prefetch=bad)  # type: ignore[arg-type]
    assert err.value.code is ErrorCode.INVALID_FIELD and "prefetch" in err.value.message
    assert await _worker(svc) == {}


async def test_a_hub_drains_through_prefetching_gpus_each_job_once(hub: Hub) -> None:
    worker = MockWorker(
        "pf", gpu_count=2, hub=hub.url, job_types=["pf"], run_time=0.002, prefetch=1
    )
    async with QueueClient(hub.url, "pf-client") as client:
        ids = [await client.submit("pf", params={"k": i}) for i in range(60)]  # all queued
        await worker.start()
        try:
            results = await asyncio.gather(*(client.result(j, timeout=30) for j in ids))
            assert len(results) == 60

            async def all_completed() -> bool:
                return worker.completed == 60

            await wait_for(all_completed, timeout=10, what="60 completions")
        finally:
            await worker.stop()
    done = [r.job_id for r in worker.history if r.outcome == "completed"]
    assert sorted(done) == sorted(ids)  # each once
    assert not worker.errors
    # after each GPU's first three jobs (the first alone, then the window fills with
    # two at once, as that GPU is between jobs), every job came while another ran
    assert worker.held_ahead >= 60 - 3 * 2
    assert await invariant_violations(hub.svc.redis, hub.svc.keys) == []


async def test_a_hub_refuses_a_bad_window_and_keeps_the_socket(hub: Hub) -> None:
    async with connect(f"{hub.url}/ws/worker/bad:gpu0") as ws:
        assert json.loads(await ws.recv())["type"] == "welcome"
        frame = protocol.register_worker(["t"], id="r")
        frame["prefetch"] = 5
        await ws.send(protocol.encode(frame))
        m = json.loads(await ws.recv())
        assert m["type"] == "error" and m["code"] == "invalid_field" and "prefetch" in m["message"]
        await ws.send(protocol.encode(protocol.register_worker(["t"], prefetch=1, id="r2")))
        m = json.loads(await ws.recv())
        assert m["type"] == "worker_registered"


async def test_a_hub_tells_a_gpu_to_drop_a_cancelled_job_it_holds_ahead(hub: Hub) -> None:
    svc = hub.svc
    worker = MockWorker("pc", gpu_count=1, hub=hub.url, job_types=["pc"], prefetch=1)
    async with QueueClient(hub.url, "pc-client") as client:
        _, b, c = [await client.submit("pc", params={"duration_s": d}) for d in (0.05, 30.0, 0.01)]
        await worker.start()
        try:
            # a ends, b runs (30 s), c is held ahead on the GPU

            async def c_held_ahead() -> bool:
                w = await svc.redis.hmget(svc.keys.worker("pc:gpu0"), "job", "next")
                # c came in the same write as b: held once b runs
                return w == [b, c] and any(r.job_id == b for r in worker.history)

            await wait_for(c_held_ahead, timeout=10, what="c held ahead")
            await client.cancel(c)

            async def c_dropped() -> bool:
                return any(r.job_id == c and r.outcome == "cancelled" for r in worker.history)

            await wait_for(c_dropped, timeout=10, what="the GPU dropped c")
            w = await svc.redis.hmget(svc.keys.worker("pc:gpu0"), "status", "job", "next")
            assert w == ["busy", b, ""]  # still running b
            job = await svc.get_job(c)
            assert job is not None and job.status is JobStatus.CANCELLED and job.started is None
            assert not worker.errors  # the acknowledgement was accepted
            assert await invariant_violations(svc.redis, svc.keys) == []
            await client.cancel(b)
        finally:
            await worker.stop()
