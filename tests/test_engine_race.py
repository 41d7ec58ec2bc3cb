"""The engine's invariants under concurrency: 20 workers, 5 submitters, 2,000 jobs,
workers dropping mid-job. Assignments reach workers the way they reach a hub: from
the events stream."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import replace

from redisq_server import Assignment, AsyncRedisService, EngineLimits, JobStatus, ProtocolError

from .helpers import invariant_violations

N_JOBS = 2000
N_WORKERS = 20
N_SUBMITTERS = 5
TYPES = ["render", "train", "embed"]


class RaceWorker:
    def __init__(self, svc: AsyncRedisService, wid: str, types: list[str], rng: random.Random):
        self.svc = svc
        self.id = wid
        self.types = types
        self.rng = rng
        self.session = ""
        self.generation = 0
        self.inbox: asyncio.Queue[Assignment] = asyncio.Queue()
        self.seen: set[tuple[str, int]] = set()
        self.drops = 0

    def offer(self, a: Assignment) -> None:
        if a.session == self.session and (a.job_id, a.attempt) not in self.seen:
            self.seen.add((a.job_id, a.attempt))
            self.inbox.put_nowait(a)

    async def register(self) -> None:
        self.generation += 1
        self.session = f"{self.id}-{self.generation}"
        a = await self.svc.register_worker(self.id, self.types, session=self.session)
        if a is not None:
            self.offer(a)

    async def run(self, completed: list[str], done: asyncio.Event) -> None:
        await self.register()
        while not done.is_set():
            get = asyncio.ensure_future(self.inbox.get())
            stop = asyncio.ensure_future(done.wait())
            await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not get.done():
                get.cancel()
                break
            a = get.result()
            if a.session != self.session:
                continue
            await asyncio.sleep(0)  # "run" the job, letting others interleave
            if self.rng.random() < 0.04:
                # the socket drops mid-job; the GPU comes back with a new connection
                self.drops += 1
                await self.svc.worker_lost(self.id, self.session)
                await self.register()
                continue
            try:
                res = await self.svc.complete_job(a.job_id, a.attempt, self.id, {"by": self.id})
            except ProtocolError:
                continue
            completed.append(a.job_id)
            if len(completed) >= N_JOBS:
                done.set()
            if res.next is not None:
                self.offer(res.next)


async def test_invariants_hold_under_concurrency(redis_url: str, limits: EngineLimits) -> None:
    lim = replace(limits, max_lost=1000)
    rng = random.Random(42)
    services = [AsyncRedisService(redis_url, limits=lim) for _ in range(4)]
    svc = services[0]
    workers = {}
    for i in range(N_WORKERS):
        wid = f"m{i // 4}:gpu{i % 4}"
        types = rng.sample(TYPES, rng.randint(1, 3))
        workers[wid] = RaceWorker(services[i % 4], wid, types, random.Random(i))
    # every type has a worker, so everything can finish
    workers["m0:gpu0"].types = list(TYPES)

    completed: list[str] = []
    done = asyncio.Event()
    submitted: list[str] = []
    violations: list[str] = []

    async def route(last: str) -> None:
        reader = AsyncRedisService(redis_url, limits=lim)
        try:
            while not done.is_set():
                for ev in await reader.read_events(last, count=500, block_ms=50):
                    last = ev.id
                    if ev.name == "assigned":
                        f = ev.fields
                        a = Assignment(
                            f["job"],
                            int(f["attempt"]),
                            f["jtype"],
                            0,
                            {},
                            f["worker"],
                            "",
                            f["session"],
                            int(f["n"]),
                        )
                        workers[a.worker_id].offer(a)
        finally:
            await reader.aclose()

    async def submit(k: int) -> None:
        s = services[k % 4]
        for _ in range(N_JOBS // N_SUBMITTERS):
            r = await s.submit_job(rng.choice(TYPES), rng.randint(0, 3))
            submitted.append(r.job_id)
            if r.assignment is not None:
                workers[r.assignment.worker_id].offer(r.assignment)

    async def check() -> None:
        while not done.is_set():
            violations.extend(await invariant_violations(svc.redis, svc.keys))
            await asyncio.sleep(0.002)

    router = asyncio.create_task(route(await svc.last_event_id()))
    checker = asyncio.create_task(check())
    runners = [asyncio.create_task(w.run(completed, done)) for w in workers.values()]
    await asyncio.gather(*(submit(k) for k in range(N_SUBMITTERS)))
    await asyncio.wait_for(done.wait(), timeout=120)
    await asyncio.gather(*runners, router, checker)

    assert violations == []
    assert len(submitted) == N_JOBS
    counts = Counter(completed)
    assert len(counts) == N_JOBS
    assert set(counts) == set(submitted)
    assert max(counts.values()) == 1, "a job completed twice"
    stats = await svc.get_stats()
    assert stats["totals"]["completed"] == N_JOBS
    assert stats["queued"] == 0
    assert stats["running"] == 0
    assert sum(w.drops for w in workers.values()) > 10
    assert stats["totals"]["requeued"] == sum(w.drops for w in workers.values())
    for jid in rng.sample(submitted, 50):
        job = await svc.get_job(jid)
        assert job is not None
        assert job.status == JobStatus.COMPLETED
    assert await invariant_violations(svc.redis, svc.keys) == []
    for s in services:
        await s.aclose()
