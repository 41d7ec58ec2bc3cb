"""Scale-out: three hub processes on one Redis, mixed load, one hub killed with SIGKILL.

Clients and mock GPU machines are spread over hubs A, B and C. Mid-load, hub A is
killed (no graceful shutdown: its sockets just vanish). Then:

- its machines come back through a surviving hub with the same machine ids; one of
  them at once (its re-registration requeues what it held), the other only after a
  surviving hub's reaper has requeued the dead hub's leases;
- its clients reconnect to a surviving hub, catch up with ``get_events`` since the
  last event id they had seen, and learn every outcome with ``subscribe``/``result``;
- every accepted job completes exactly once, and every client hears about its own.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from redisq_lab.client import QueueClient
from redisq_lab.mock_worker import MockWorker
from redisq_server import JobStatus, RedisService, WorkerStatus

from .helpers import invariant_violations_sync, wait_for
from .test_hub_process import HubProcess

LEASE_S = 1.0
JOB_TYPES = {  # job type -> mock run time (seconds)
    "render": ("uniform", 0.1, 0.3),
    "embed": ("uniform", 0.05, 0.15),
    "caption": ("exponential", 0.15),
    "train": ("uniform", 0.2, 0.4),
}
PRIORITIES = (-1, 0, 0, 0, 1, 3, 5)
#: machine -> (hub index, job types). Every type is served on at least two hubs.
MACHINES = {
    "m0": (0, ["render", "embed"]),
    "m1": (1, ["render", "caption"]),
    "m2": (2, ["embed", "train"]),
    "m3": (0, ["caption", "train"]),
    "m4": (1, list(JOB_TYPES)),
    "m5": (2, list(JOB_TYPES)),
}
GPUS = 4
CLIENTS = 6  # client i starts on hub i % 3
PHASE1, PHASE2 = 40, 20  # jobs per client before and after the kill: 360 in all


class ScaleHub(HubProcess):
    """A :class:`HubProcess` with a fixed hub id."""

    def __init__(self, redis_url: str, namespace: str, hub_id: str) -> None:
        super().__init__(redis_url, namespace, "--hub-id", hub_id)
        self.hub_id = hub_id


class _AckTap:
    """Wraps a worker socket to record the hub's acknowledgements of outcomes."""

    def __init__(self, ws: Any, acks: list[dict[str, Any]], worker_id: str) -> None:
        self.ws = ws
        self.acks = acks
        self.worker_id = worker_id

    async def send(self, message: str) -> None:
        await self.ws.send(message)

    async def close(self) -> None:
        await self.ws.close()

    async def __aiter__(self) -> AsyncIterator[str | bytes]:
        async for raw in self.ws:
            m = json.loads(raw)
            if m.get("type") in ("ack", "error") and str(m.get("ref", "")).startswith(
                "complete_job:"
            ):
                self.acks.append({**m, "worker_id": self.worker_id})
            yield raw


class TappedWorker(MockWorker):
    """A MockWorker that also keeps every reply to its ``complete_job`` frames."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acks: list[dict[str, Any]] = []

    async def _serve(self, ws: Any, worker_id: str) -> bool:
        return await super()._serve(_AckTap(ws, self.acks, worker_id), worker_id)


@pytest.fixture
def hubs(
    redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[ScaleHub]]:
    # a short lease so that the reapers notice the dead hub within about a second
    monkeypatch.setenv("REDISQ_LEASE_S", str(LEASE_S))
    started: list[ScaleHub] = []
    try:
        for name in ("hub-a", "hub-b", "hub-c"):
            started.append(ScaleHub(redis_url, namespace, name))
        yield started
    finally:
        for hp in started:
            if hp.proc.poll() is None:
                hp.stop()


def _eid(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


async def _catch_up(
    client: QueueClient, since: str, until: str
) -> tuple[list[dict[str, Any]], str]:
    """Page through ``get_events`` from ``since`` until the stream position ``until``
    is covered: this client's events and the id to resume from."""
    events: list[dict[str, Any]] = []
    while _eid(since) < _eid(until):
        reply = await client.events_since(since, limit=1000)
        events.extend(reply["events"])
        assert reply["last_id"] != since, "the stream ended before the target id"
        since = reply["last_id"]
    return events, since


def _specs(rng: random.Random, n: int) -> list[dict[str, Any]]:
    return [
        {"job_type": rng.choice(list(JOB_TYPES)), "priority": rng.choice(PRIORITIES)}
        for _ in range(n)
    ]


async def test_three_hubs_one_killed_mid_load(
    hubs: list[ScaleHub], redis_url: str, namespace: str
) -> None:
    rng = random.Random(20240611)
    hub_a, hub_b, hub_c = hubs
    urls = [h.url for h in hubs]
    svc = RedisService(url=redis_url, namespace=namespace)

    def machine(mid: str, url: str) -> TappedWorker:
        return TappedWorker(
            mid,
            GPUS,
            hub=url,
            job_types=MACHINES[mid][1],
            run_time=dict(JOB_TYPES),
            seed=rng.randrange(1 << 30),
        )

    machines = {mid: machine(mid, urls[h]) for mid, (h, _) in MACHINES.items()}
    on_hub_a = [machines["m0"], machines["m3"]]
    every_machine: list[TappedWorker] = list(machines.values())
    clients = [QueueClient(urls[i % 3], client_id=f"c{i}") for i in range(CLIENTS)]
    try:
        await asyncio.gather(*(m.start() for m in machines.values()))
        await asyncio.gather(*(c.connect() for c in clients))
        owned: dict[str, list[str]] = {c.client_id: [] for c in clients}
        results: dict[str, dict[str, Any]] = {c.client_id: {} for c in clients}

        async def submit(client: QueueClient, n: int) -> None:
            ids = await client.submit_many(_specs(rng, n), concurrency=8)
            owned[client.client_id].extend(ids)

        def worker_status(wid: str) -> WorkerStatus | None:
            w = svc.get_worker(wid)
            return None if w is None else w.status

        # ---- phase 1: load on all three hubs
        await asyncio.gather(*(submit(c, PHASE1) for c in clients))
        a_workers = [w for m in on_hub_a for w in m.worker_ids]

        async def a_is_busy() -> bool:
            busy = all(worker_status(wid) is WorkerStatus.BUSY for wid in a_workers)
            return busy and svc.get_stats()["totals"]["completed"] >= 40

        await wait_for(a_is_busy, timeout=20, what="hub A's GPUs busy mid-load")

        # clients on hub A remember the last event they had seen (a real client keeps
        # the id of the last event it processed)
        a_clients = [c for i, c in enumerate(clients) if i % 3 == 0]
        marks: dict[str, str] = {}
        for c in a_clients:
            _, marks[c.client_id] = await _catch_up(c, "0", svc.events_since("0")[-1].id)

        # ---- SIGKILL hub A: no goodbye, no requeue on close; its leases just stop
        hub_a.kill()
        assert hub_a.proc.returncode == -signal.SIGKILL
        # what its GPUs held when it died (nothing changes them now but a reaper or a
        # re-registration, and neither can happen before their lease runs out)
        held: dict[str, str] = {}
        for wid in a_workers:
            w = svc.get_worker(wid)
            assert w is not None and w.hub_id == "hub-a"
            if w.status is WorkerStatus.BUSY and w.current_job:
                held[wid] = w.current_job
        assert held

        # Hub A's machines come back through a surviving hub with the same machine ids.
        # Each MockWorker reconnects only to the URL it was given, so instead of a proxy
        # in front of the hubs the test does what a load balancer does after a backend
        # dies: the same machines open new sockets to a hub that is still up. The old
        # objects (retrying the dead address) are stopped; their history is kept.
        for m in on_hub_a:
            await m.stop()
        # m0 comes back at once: re-registering requeues what its old sessions held
        machines["m0"] = machine("m0", hub_b.url)
        every_machine.append(machines["m0"])
        await machines["m0"].start()

        # m3 comes back only once a surviving hub's reaper has taken its GPUs out of
        # service and requeued their jobs (their leases ran out with nobody to extend them)
        m3_workers = machines["m3"].worker_ids

        async def m3_reaped() -> bool:
            return all(worker_status(wid) in (None, WorkerStatus.OFFLINE) for wid in m3_workers)

        await wait_for(m3_reaped, timeout=10 * LEASE_S, what="the reaper to drop hub A's workers")
        for wid in m3_workers:
            if wid in held:
                job = svc.get_job(held[wid])
                assert job is not None and job.worker_id != wid
        machines["m3"] = machine("m3", hub_c.url)
        every_machine.append(machines["m3"])
        await machines["m3"].start()

        # hub A's clients lost their socket: every unfinished job's result() says so
        for c in a_clients:
            outcomes = await asyncio.gather(
                *(c.result(j, timeout=30) for j in owned[c.client_id]), return_exceptions=True
            )
            for jid, out in zip(owned[c.client_id], outcomes, strict=True):
                if not isinstance(out, BaseException):
                    results[c.client_id][jid] = out
                else:
                    assert isinstance(out, ConnectionError), out
            await c.close()
        # ... and reconnect to a surviving hub with the same client id
        for k, old in enumerate(a_clients):
            new = QueueClient(urls[1 + k % 2], client_id=old.client_id)
            clients[clients.index(old)] = await new.connect()

        # ---- phase 2: more load through the two surviving hubs
        await asyncio.gather(*(submit(c, PHASE2) for c in clients))
        n_jobs = CLIENTS * (PHASE1 + PHASE2)
        all_ids = [j for ids in owned.values() for j in ids]
        assert len(set(all_ids)) == n_jobs

        # every client hears about every one of its jobs (reconnected ones subscribe)
        async def hear(client: QueueClient) -> None:
            todo = [j for j in owned[client.client_id] if j not in results[client.client_id]]
            outs = await asyncio.gather(*(client.result(j, timeout=45) for j in todo))
            results[client.client_id].update(zip(todo, outs, strict=True))

        await asyncio.gather(*(hear(c) for c in clients))

        # the reconnected clients' catch-up: exactly their own events after their mark,
        # including the completion of every job of theirs that finished after it
        all_events = svc.events_since("0", limit=1_000_000)
        for c in clients:
            if c.client_id not in marks:
                continue
            missed, _ = await _catch_up(c, marks[c.client_id], all_events[-1].id)
            assert missed and all(e["client"] == c.client_id for e in missed)
            after = {
                e.fields["job"]
                for e in all_events
                if e.name == "completed"
                and e.fields.get("client") == c.client_id
                and _eid(e.id) > _eid(marks[c.client_id])
            }
            assert after  # some of its jobs finished after the kill
            assert {e["job"] for e in missed if e["e"] == "completed"} == after

        # ---- exactly once, counted in Redis
        stats = svc.get_stats()
        assert stats["totals"]["submitted"] == n_jobs
        assert stats["totals"]["completed"] == n_jobs
        assert stats["totals"]["failed"] == 0 and stats["totals"]["cancelled"] == 0
        assert stats["queued"] == 0 and stats["running"] == 0
        jobs = {j.job_id: j for j in svc.get_jobs(all_ids)}
        assert set(jobs) == set(all_ids)
        assert {j.status for j in jobs.values()} == {JobStatus.COMPLETED}
        completions = Counter(e.fields["job"] for e in all_events if e.name == "completed")
        assert completions == Counter(all_ids)  # one completed event per job, no other
        assert invariant_violations_sync(svc.redis, svc.keys) == []

        # what hub A's GPUs held was requeued and finished elsewhere, some of it by the
        # reaper of hub B or C
        requeued = {e.fields["job"] for e in all_events if e.name == "requeued"}
        assert set(held.values()) <= requeued
        for jid in held.values():
            assert jobs[jid].attempt >= 2 and jobs[jid].lost >= 1

        async def reaper_logged() -> bool:
            return any("reaped" in line for hp in (hub_b, hub_c) for line in hp.lines)

        await wait_for(reaper_logged, timeout=5, what="a surviving hub's reaper log line")

        # every client heard the stored result of each of its own jobs
        for cid, ids in owned.items():
            assert set(results[cid]) == set(ids)
            for jid in ids:
                assert jobs[jid].client_id == cid
                assert results[cid][jid] == jobs[jid].result

        # the mock GPUs' side: the stored (worker, attempt) of each job is one a GPU
        # really completed, and no job got two successful completion acks (a stale
        # completion is refused: the engine fences on the attempt)
        def completed_by(ms: list[TappedWorker]) -> set[tuple[str, int, str]]:
            return {
                (r.job_id, r.attempt, r.worker_id)
                for m in ms
                for r in m.history
                if r.outcome == "completed"
            }

        done_by = completed_by(every_machine)
        by_dead_hub = completed_by(on_hub_a)
        for jid, job in jobs.items():
            assert job.worker_id is not None
            assert (jid, job.attempt, job.worker_id) in done_by

        def ok_acks() -> Counter[str]:
            n: Counter[str] = Counter()
            for m in every_machine:
                for ack in m.acks:
                    _, jid, attempt = ack["ref"].split(":")
                    if ack["type"] == "ack" and ack["outcome"] == "completed":
                        n[jid] += 1
                        assert (jobs[jid].attempt, jobs[jid].worker_id) == (
                            int(attempt),
                            ack["worker_id"],
                        )
                    else:
                        assert ack["type"] == "error" and ack["code"] == "stale_attempt", ack
            return n

        async def acked_or_died_with_hub_a() -> bool:
            # a job without an ack was completed through hub A just before it died
            acked = ok_acks()
            return all(
                acked[j] == 1 or (j, jobs[j].attempt, jobs[j].worker_id) in by_dead_hub
                for j in all_ids
            )

        await wait_for(acked_or_died_with_hub_a, timeout=10, what="completion acks")
        assert max(ok_acks().values()) == 1
    finally:
        await asyncio.gather(*(m.stop() for m in every_machine), return_exceptions=True)
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        svc.close()
