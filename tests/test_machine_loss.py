"""A machine that dies fails no job that ran nowhere.

A lost worker's job avoids that worker's machine for a few seconds: no GPU of it
gets the job unless that GPU has been heard from since the loss (it registered, or
reported progress, a completion or a failure). So a requeued job never bounces
through the other GPUs of a dying machine and collects one loss per socket. Engine tests first, then real hubs, mock machines and signals:
sockets of one machine dropping a few ms apart, a machine frozen with SIGSTOP, and
the poison rule for protocol v1 workers (which send nothing but ``complete_job``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from redisq_lab.client import QueueClient
from redisq_lab.mock_worker import MockWorker
from redisq_server import AsyncRedisService, EngineLimits, JobStatus

from .helpers import invariant_violations, wait_for
from .peers import Peer, open_worker
from .test_faults import LiveHub, read_events, stop_all

# --------------------------------------------------------------------- the engine


async def _busy(svc: AsyncRedisService, worker: str, job_type: str = "t") -> str:
    """Register ``worker`` and give it a job of its own; returns that job's id."""
    assert await svc.register_worker(worker, [job_type, "t"], session=worker) is None
    r = await svc.submit_job(job_type)
    assert r.assignment is not None and r.assignment.worker_id == worker
    return r.job_id


async def _machine(svc: AsyncRedisService, machine: str, gpus: int) -> list[str]:
    ids = [f"{machine}:gpu{i}" for i in range(gpus)]
    for w in ids:
        assert await svc.register_worker(w, ["t"], session=w) is None
    return ids


async def test_a_lost_job_waits_for_another_machine_not_the_dying_one(
    svc: AsyncRedisService,
) -> None:
    """m1's GPUs drop one after another while m2 is busy: the job m1:gpu0 held is
    not handed to m1's other (idle, still registered) GPUs; it waits at the head of
    its queue for m2, and its loss is counted once."""
    blocker = await _busy(svc, "m2:gpu0", "slow")
    gpus = await _machine(svc, "m1", 4)
    job = await svc.submit_job("t", client_id="c")
    assert job.assignment is not None and job.assignment.worker_id == "m1:gpu0"

    assert await svc.worker_lost("m1:gpu0", "m1:gpu0")
    queued = await svc.get_job(job.job_id)
    assert queued is not None and queued.status is JobStatus.QUEUED and queued.position == 0
    # m1's three idle GPUs next to a queued job: the one documented exception
    assert await invariant_violations(svc.redis, svc.keys) == []
    for w in gpus[1:]:
        assert await svc.worker_lost(w, w)
    done = await svc.complete_job(blocker, 1, "m2:gpu0")
    assert done.next is not None and done.next.job_id == job.job_id and done.next.attempt == 2
    await svc.complete_job(job.job_id, 2, "m2:gpu0")
    final = await svc.get_job(job.job_id)
    assert final is not None and final.status is JobStatus.COMPLETED and final.lost == 1
    assigned = [e.fields["worker"] for e in await svc.events_since("0") if e.name == "assigned"]
    assert assigned == ["m2:gpu0", "m1:gpu0", "m2:gpu0"]  # never m1:gpu1..3
    assert await invariant_violations(svc.redis, svc.keys) == []


async def test_another_idle_machine_takes_the_lost_job_at_once(svc: AsyncRedisService) -> None:
    await _machine(svc, "m1", 2)
    job = await svc.submit_job("t")
    assert job.assignment is not None and job.assignment.worker_id == "m1:gpu0"
    await _machine(svc, "m2", 1)  # idle for less time than m1:gpu1
    assert await svc.worker_lost("m1:gpu0", "m1:gpu0")
    moved = await svc.get_job(job.job_id)
    assert moved is not None and moved.status is JobStatus.ASSIGNED
    assert moved.worker_id == "m2:gpu0" and moved.lost == 1


async def test_a_gpu_heard_from_since_the_loss_may_take_the_job(svc: AsyncRedisService) -> None:
    """Only the lost job avoids the machine, and only its GPUs not heard from since
    the loss: a GPU of that machine that reports (here: completes its job) takes it;
    its idle, silent siblings do not."""
    other = await _busy(svc, "m1:gpu1")
    await _machine(svc, "m1", 1)  # m1:gpu0
    lost = await svc.submit_job("t", 5)
    assert lost.assignment is not None and lost.assignment.worker_id == "m1:gpu0"
    for w in ("m1:gpu2", "m1:gpu3"):
        assert await svc.register_worker(w, ["t"], session=w) is None
    assert await svc.worker_lost("m1:gpu0", "m1:gpu0")
    assert (await svc.get_job(lost.job_id)).status is JobStatus.QUEUED  # type: ignore[union-attr]
    fresh = await svc.submit_job("t", 0)  # a new job may run on m1
    assert fresh.assignment is not None and fresh.assignment.worker_id == "m1:gpu2"
    assert await invariant_violations(svc.redis, svc.keys) == []  # m1:gpu3 waits, idle

    assert await svc.update_progress(other, 1, "m1:gpu1", 50) == "running"
    assert (await svc.get_job(lost.job_id)).status is JobStatus.QUEUED  # type: ignore[union-attr]
    done = await svc.complete_job(other, 1, "m1:gpu1")
    assert done.next is not None and done.next.job_id == lost.job_id and done.next.attempt == 2
    back = await svc.get_job(lost.job_id)
    assert back is not None and back.worker_id == "m1:gpu1" and back.lost == 1
    assert await svc.redis.exists(svc.keys.avoided("m1")) == 0
    assert await svc.redis.zcard(svc.keys.avoid) == 0
    assert "avoid" not in await svc.redis.hgetall(svc.keys.job(lost.job_id))
    assert await invariant_violations(svc.redis, svc.keys) == []


async def test_the_gpu_that_comes_back_takes_its_job(svc: AsyncRedisService) -> None:
    """The GPU whose socket dropped registers again: it has been heard from, so it
    takes its job back at once, not its sibling that stayed idle and silent."""
    await _machine(svc, "m1", 2)
    job = await svc.submit_job("t")
    assert await svc.worker_lost("m1:gpu0", "m1:gpu0")
    assert (await svc.get_job(job.job_id)).status is JobStatus.QUEUED  # type: ignore[union-attr]
    again = await svc.register_worker("m1:gpu0", ["t"], session="new")
    assert again is not None and again.job_id == job.job_id and again.attempt == 2
    assert await svc.redis.zcard(svc.keys.avoid) == 0
    # a registration that replaces a live session requeues its job and takes it back
    replaced = await svc.register_worker("m1:gpu0", ["t"], session="newer")
    assert replaced is not None and replaced.job_id == job.job_id and replaced.attempt == 3


async def test_the_avoidance_ends_after_its_time(redis_url: str, limits: EngineLimits) -> None:
    """With no sign of life and no other machine, the job runs on the machine that
    lost it once the avoidance has passed (min(5 s, the lease): 0.3 s here); the
    promoter hands it to the idle GPU."""
    svc = AsyncRedisService(redis_url, limits=replace(limits, lease_s=0.3))
    try:
        await _machine(svc, "m1", 2)
        job = await svc.submit_job("t")
        assert await svc.worker_lost("m1:gpu0", "m1:gpu0")
        _, wait_s, _ = await svc.promote()
        assert wait_s is not None and 0 < wait_s <= 0.3

        async def dispatched() -> bool:
            await svc.promote()
            j = await svc.get_job(job.job_id)
            return j is not None and j.status is JobStatus.ASSIGNED

        await wait_for(dispatched, 5, "the avoidance to end")
        j = await svc.get_job(job.job_id)
        assert j is not None and j.worker_id == "m1:gpu1" and j.lost == 1 and j.attempt == 2
        _, wait_s, _ = await svc.promote()
        assert wait_s is None
    finally:
        await svc.aclose()


async def test_an_avoidance_ending_under_fair_share_dispatches_the_rest_right(
    redis_url: str, limits: EngineLimits
) -> None:
    """Fair share: m1 loses three jobs, two of client b (one waits behind the other
    in b's sub-queue) and one of c. When b's first job stops avoiding m1, the
    promoter hands it to m1's longest-idle GPU, b's second job becomes b's head,
    and m1's other idle GPU (silent since the loss) is offered the queue again:
    it takes nothing that still avoids m1, and nothing raises."""
    fair = replace(limits, lease_s=0.3, fair_share="client")
    svc = AsyncRedisService(redis_url, limits=fair)
    try:
        busy = await _machine(svc, "m1", 3)
        jobs = [await svc.submit_job("t", client_id=c) for c in ("b", "b", "c")]
        assert [j.assignment.worker_id for j in jobs if j.assignment] == busy
        for w in ("m1:gpu3", "m1:gpu4"):  # idle, and silent from here on
            assert await svc.register_worker(w, ["t"], session=w) is None
        for w in busy:
            assert await svc.worker_lost(w, w)
        first = jobs[0].job_id

        async def first_dispatched() -> bool:
            await svc.promote(limit=1)  # one avoidance ends per call: b's first job's
            j = await svc.get_job(first)
            return j is not None and j.status is JobStatus.ASSIGNED

        await wait_for(first_dispatched, 5, "the first avoidance to end")
        j = await svc.get_job(first)
        assert j is not None and j.worker_id == "m1:gpu3" and j.attempt == 2
        assert await invariant_violations(svc.redis, svc.keys) == []

        async def statuses() -> list[JobStatus]:
            return [(await svc.get_job(j.job_id)).status for j in jobs[1:]]  # type: ignore[union-attr]

        async def second_dispatched() -> bool:
            await svc.promote(limit=1)
            return JobStatus.ASSIGNED in await statuses()

        await wait_for(second_dispatched, 5, "the other avoidances to end")
        assert sorted(await statuses()) == sorted([JobStatus.ASSIGNED, JobStatus.QUEUED])
        assert await invariant_violations(svc.redis, svc.keys) == []
    finally:
        await svc.aclose()


@pytest.mark.parametrize("how", ["taken", "cancelled"])
async def test_a_client_s_next_head_goes_to_an_idle_gpu_it_may_use(
    redis_url: str, limits: EngineLimits, how: str
) -> None:
    """Fair share: m loses Y, then H, both of client c (H is c's head, Y waits behind
    it), while m:gpu2 sits idle. Y's avoidance ends first, while it is not a head.
    Then H leaves the queue another way (a GPU of another machine takes it, or it is
    cancelled): Y becomes c's head and goes to idle m:gpu2 at once, instead of
    waiting next to it until some later call."""
    svc = AsyncRedisService(redis_url, limits=replace(limits, fair_share="client"))
    try:
        for w in ("m:gpu0", "m:gpu1", "n:gpu0"):
            assert await svc.register_worker(w, ["t"], session=w) is None
        head = await svc.submit_job("t", client_id="c")
        behind = await svc.submit_job("t", client_id="c")
        other = await svc.submit_job("t", client_id="b")
        assert other.assignment is not None and other.assignment.worker_id == "n:gpu0"
        assert await svc.register_worker("m:gpu2", ["t"], session="m:gpu2") is None
        assert await svc.worker_lost("m:gpu1", "m:gpu1")  # Y: `behind`
        assert await svc.worker_lost("m:gpu0", "m:gpu0")  # H: `head`
        # Y's avoidance is due before H's (as if its time had passed): it ends, and Y,
        # not a head, stays in c's sub-queue
        await svc.redis.zadd(svc.keys.avoid, {behind.job_id: 0})
        await svc.promote()
        assert "avoid" not in await svc.redis.hgetall(svc.keys.job(behind.job_id))
        if how == "taken":
            done = await svc.complete_job(other.job_id, 1, "n:gpu0")
            assert done.next is not None and done.next.job_id == head.job_id
        else:
            assert (await svc.cancel_job(head.job_id)).status is JobStatus.CANCELLED
        j = await svc.get_job(behind.job_id)
        assert j is not None and j.status is JobStatus.ASSIGNED and j.worker_id == "m:gpu2"
        assert await invariant_violations(svc.redis, svc.keys) == []
    finally:
        await svc.aclose()


async def test_a_cancelled_job_stops_avoiding_its_machine(svc: AsyncRedisService) -> None:
    """A queued job lost on m avoids m; cancelled, it leaves no trace of that."""
    await _machine(svc, "m", 2)
    job = await svc.submit_job("t")
    assert await svc.worker_lost("m:gpu0", "m:gpu0")
    assert await svc.redis.sismember(svc.keys.avoided("m"), job.job_id)
    assert (await svc.cancel_job(job.job_id)).status is JobStatus.CANCELLED
    assert await svc.redis.zscore(svc.keys.avoid, job.job_id) is None
    assert not await svc.redis.exists(svc.keys.avoided("m"))
    assert "avoid" not in await svc.redis.hgetall(svc.keys.job(job.job_id))


async def test_registering_again_on_the_same_session_counts_no_loss(
    svc: AsyncRedisService,
) -> None:
    """A registration run twice with one session (its reply lost and the call sent
    again, or a worker registering twice on one socket) requeues what the first run
    handed out, which never ran, without counting a loss against it."""
    job = await svc.submit_job("t")
    first = await svc.register_worker("m:gpu0", ["t"], session="s")
    assert first is not None and first.job_id == job.job_id
    again = await svc.register_worker("m:gpu0", ["t"], session="s")
    assert again is not None and again.job_id == job.job_id and again.attempt == 2
    j = await svc.get_job(job.job_id)
    assert j is not None and j.lost == 0
    assert await svc.redis.zcard(svc.keys.avoid) == 0  # and it avoids nothing
    assert await invariant_violations(svc.redis, svc.keys) == []


async def test_a_loss_that_does_not_count_avoids_nothing(svc: AsyncRedisService) -> None:
    """A hub shutting down (or closing a worker for its own Redis trouble) requeues
    without counting: the machine is fine, its idle GPU takes the job at once."""
    await _machine(svc, "m1", 2)
    job = await svc.submit_job("t")
    assert await svc.worker_lost("m1:gpu0", "m1:gpu0", count=False)
    j = await svc.get_job(job.job_id)
    assert j is not None and j.worker_id == "m1:gpu1" and j.lost == 0


async def test_poison_job_still_fails_on_different_machines(
    redis_url: str, limits: EngineLimits
) -> None:
    """A job that kills each worker holding it at once, on machine after machine,
    fails after ``max_lost`` losses: avoiding one machine never hides a loss."""
    svc = AsyncRedisService(redis_url, limits=replace(limits, max_lost=3))
    try:
        for m in range(4):
            await _machine(svc, f"p{m}", 2)
        job = await svc.submit_job("t")
        machines = []
        for _ in range(4):
            j = await svc.get_job(job.job_id)
            assert j is not None and j.status is JobStatus.ASSIGNED and j.worker_id is not None
            machines.append(j.worker_id.split(":")[0])
            assert await svc.worker_lost(j.worker_id, j.worker_id)
        assert all(a != b for a, b in itertools.pairwise(machines))
        failed = await svc.get_job(job.job_id)
        assert failed is not None and failed.status is JobStatus.FAILED and failed.lost == 4
        assert failed.error == "worker lost 4 times while running this job"
    finally:
        await svc.aclose()


# ------------------------------------------------------------ real hubs, signals


@pytest.fixture
async def engine(redis_url: str, namespace: str) -> AsyncIterator[AsyncRedisService]:
    svc = AsyncRedisService(redis_url, limits=EngineLimits(namespace=namespace))
    yield svc
    await svc.aclose()


async def _status(engine: AsyncRedisService, job_id: str, status: JobStatus) -> bool:
    job = await engine.get_job(job_id)
    return job is not None and job.status is status


async def _assigned_to(engine: AsyncRedisService, job_id: str) -> list[str]:
    return [
        e.fields["worker"]
        for e in await read_events(engine)
        if e.name == "assigned" and e.fields["job"] == job_id
    ]


@pytest.mark.parametrize(
    ("reconnect", "gap_s"), [(False, 0.005), (True, 0.03)], ids=["gone", "reconnecting"]
)
async def test_sockets_of_a_machine_dropping_ms_apart_fail_nothing(
    redis_url: str, namespace: str, engine: AsyncRedisService, reconnect: bool, gap_s: float
) -> None:
    """A 4-GPU machine runs a job; its sockets drop a few ms apart, the one holding
    the job first, while the only other machine is busy. The job never goes to the
    machine's other (dying) sockets: it waits for the healthy machine, or for the
    GPU that lost it to come back on a new socket, and has lost one worker. Before
    the avoidance it went gpu1, gpu2, gpu3 and failed."""
    hub = LiveHub(redis_url, namespace, env={"REDISQ_MAX_LOST": "3"})
    run_time = 0.5 if reconnect else 60  # a GPU that comes back may run it
    dying = MockWorker(
        "dying", 4, hub=hub.url, job_types=["t"], run_time=run_time, reconnect=reconnect
    )
    healthy = MockWorker(
        "healthy", 1, hub=hub.url, job_types=["t", "slow"], run_time={"slow": 2.0, "t": 0.01}
    )
    try:
        await dying.start()  # registered first: its GPUs are the longest idle
        await healthy.start()
        async with QueueClient(hub.url, "c-drop") as qc:
            slow = await qc.submit("slow")  # only the healthy machine takes it: busy 2 s
            await wait_for(lambda: _status(engine, slow, JobStatus.RUNNING), 10, "slow running")
            job_id = await qc.submit("t")
            await wait_for(lambda: _status(engine, job_id, JobStatus.RUNNING), 10, "job running")
            held = (await engine.get_job(job_id)).worker_id  # type: ignore[union-attr]
            assert held is not None and held.startswith("dying:")
            order = [held, *(w for w in dying.worker_ids if w != held)]
            for w in order:  # the machine dies socket by socket
                dying._sockets[w].transport.abort()
                await asyncio.sleep(gap_s)
            result = await qc.result(job_id, timeout=30)
        job = await engine.get_job(job_id)
        assert job is not None and job.status is JobStatus.COMPLETED
        assert job.lost == 1 and job.attempt == 2
        events = await read_events(engine)
        if reconnect:  # the healthy machine, or a dying GPU back on a new socket
            took = result["worker_id"]
            assert await _assigned_to(engine, job_id) == [held, took]
            if took != "healthy:gpu0":
                seq = [(e.name, e.fields.get("job") or e.fields.get("worker")) for e in events]
                came_back = seq.index(("worker_up", took), seq.index(("requeued", job_id)))
                assert came_back < seq.index(("assigned", job_id), came_back)
        else:
            assert result["worker_id"] == "healthy:gpu0"
            assert await _assigned_to(engine, job_id) == [held, "healthy:gpu0"]
            names = [(e.name, e.fields.get("job")) for e in events]
            # it waited: requeued before the healthy machine finished its slow job
            assert names.index(("requeued", job_id)) < names.index(("completed", slow))
            assert sum(1 for e in events if e.name == "worker_down") == 4
        await stop_all([dying, healthy])
        assert await invariant_violations(engine.redis, engine.keys) == []
    finally:
        await stop_all([dying, healthy])
        hub.stop()


FROZEN_MACHINE = """
import asyncio, sys
from redisq_lab.mock_worker import MockWorker

async def main() -> None:
    machine = MockWorker("frozen", 4, hub=sys.argv[1], job_types=["t"], run_time=600,
                         reconnect=False)
    await machine.start()
    print("registered", flush=True)
    await machine.join()

asyncio.run(main())
"""


def _start_frozen_machine(hub_url: str) -> subprocess.Popen[str]:
    """The 4-GPU machine as a process of its own (so that it can be frozen)."""
    return subprocess.Popen(
        [sys.executable, "-c", FROZEN_MACHINE, hub_url], stdout=subprocess.PIPE, text=True
    )


async def test_a_machine_frozen_with_sigstop_fails_nothing(
    redis_url: str, namespace: str, engine: AsyncRedisService
) -> None:
    """A 4-GPU worker process runs a job on one GPU and is frozen (SIGSTOP): its
    sockets stay open until the hub's keepalive gives up on each of them (20-40 s),
    within a few ms of each other. The job goes to the healthy machine, not to the
    frozen GPUs that still look idle, and has lost one worker."""
    hub = LiveHub(redis_url, namespace, env={"REDISQ_MAX_LOST": "3"})
    proc = _start_frozen_machine(hub.url)
    healthy: list[MockWorker] = []
    try:
        assert proc.stdout is not None
        line = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)
        assert line.strip() == "registered"
        healthy = [MockWorker("healthy", 1, hub=hub.url, job_types=["t"], run_time=0.01)]
        await healthy[0].start()  # idle for less time than any frozen GPU
        async with QueueClient(hub.url, "c-frozen") as qc:
            job_id = await qc.submit("t")
            await wait_for(lambda: _status(engine, job_id, JobStatus.RUNNING), 10, "job running")
            held = (await engine.get_job(job_id)).worker_id  # type: ignore[union-attr]
            assert held is not None and held.startswith("frozen:")
            os.kill(proc.pid, signal.SIGSTOP)
            result = await qc.result(job_id, timeout=90)
        assert result["worker_id"] == "healthy:gpu0"
        job = await engine.get_job(job_id)
        assert job is not None and job.lost == 1 and job.attempt == 2
        assert await _assigned_to(engine, job_id) == [held, "healthy:gpu0"]

        async def all_down() -> bool:
            downs = [e for e in await read_events(engine) if e.name == "worker_down"]
            return len(downs) == 4

        await wait_for(all_down, 30, "every frozen GPU to be dropped")
        assert await invariant_violations(engine.redis, engine.keys) == []
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(10)
        await stop_all(healthy)
        hub.stop()


async def test_poison_job_on_v1_workers_fails_after_max_lost(
    redis_url: str, namespace: str, engine: AsyncRedisService
) -> None:
    """Protocol v1 workers send nothing but ``complete_job``. One that dies holding a
    job, on machine after machine, still makes the job fail once it has lost more
    than REDISQ_MAX_LOST workers; and a v1 worker still completes ordinary jobs."""
    hub = LiveHub(redis_url, namespace, env={"REDISQ_MAX_LOST": "3"})
    try:
        client = await Peer.open(f"{hub.url}/ws/client/c-poison")
        accepted = await client.request({"type": "submit_job", "job_type": "t"})
        poison = accepted["job_id"]
        for m in range(4):
            worker = await open_worker(hub.url, f"v1-{m}:gpu0", ["t"])
            pushed = await worker.expect("job_assigned")
            assert (pushed["job_id"], pushed["attempt"]) == (poison, m + 1)
            worker.ws.transport.abort()  # it dies at once, before any report
        failed = await client.expect("job_failed")
        assert failed["job_id"] == poison
        assert failed["error"] == "worker lost 4 times while running this job"
        job = await engine.get_job(poison)
        assert job is not None and job.status is JobStatus.FAILED and job.lost == 4

        worker = await open_worker(hub.url, "v1-0:gpu0", ["t"])
        ok = await client.request({"type": "submit_job", "job_type": "t"})
        pushed = await worker.expect("job_assigned")
        report = {"type": "complete_job", "job_id": ok["job_id"], "attempt": 1, "result": 7}
        await worker.send(report)
        done = await client.expect("job_completed")
        assert done["job_id"] == pushed["job_id"] == ok["job_id"] and done["result"] == 7
        await worker.close()
        await client.close()
    finally:
        hub.stop()
